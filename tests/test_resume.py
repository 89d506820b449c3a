"""Exact resume: N iterations in one go equal k iterations + `--init_from=resume` to N (same logged metrics, the
same final weights bit for bit), for sft.py and dpo.py; under DDP to within 1e-6; and a run killed with SIGKILL at
any moment, even in the middle of writing a checkpoint, leaves a ckpt.pt that loads and resumes to the end.

The reference is always an uninterrupted run of the real script, never the resume code path itself."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanopo import checkpoint
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=8", "--n_eval=50", "--device=cpu",
            "--log_interval=1"]
# dropout > 0: the resumed run must also restore the RNG to draw the same dropout masks
SFT_ARGS = SFT_TINY + ["--max_iters=8", "--dropout=0.1", "--eval_interval=4", "--checkpoint_interval=3",
                       "--keep_last=10"]
DPO_ARGS = ["--n_pairs=64", "--batch_size=8", "--max_iters=6", "--eval_interval=3", "--log_interval=1",
            "--checkpoint_interval=2", "--keep_last=10", "--device=cpu"]


def run_script(script, args, cwd, env, torchrun=False):
    """Run one of the repo's scripts to completion (cwd = a temporary folder, so no default path points at
    anything real); fail the test with its output if it fails."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    proc = subprocess.run(launcher + [os.path.join(REPO, script)] + args, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def prepare_resume(src_dir, dst_dir, k):
    """A fresh out_dir holding the full run's checkpoint of iter k as ckpt.pt and its metrics before iter k, plus a
    record from 'after the checkpoint' (as a killed run leaves) and a line cut short, which resume must drop."""
    os.makedirs(dst_dir)
    shutil.copy(os.path.join(src_dir, f"ckpt_{k:07d}.pt"), os.path.join(dst_dir, "ckpt.pt"))
    kept = [r for r in read_metrics(src_dir) if r["iter"] < k]
    assert kept  # otherwise the comparison below proves nothing about keeping records
    with open(os.path.join(dst_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.write(json.dumps({"iter": k + 1, "loss": 123.0}) + "\n" + '{"iter": ')


def assert_same_final_state(full_dir, resumed_dir, atol=0.0):
    a = torch.load(os.path.join(full_dir, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(resumed_dir, "ckpt.pt"), weights_only=True)
    assert a["iter_num"] == b["iter_num"] and a["data_order"] == b["data_order"]
    for name, p in a["model"].items():
        if atol == 0.0:
            assert torch.equal(p, b["model"][name]), name  # bit for bit
        else:
            torch.testing.assert_close(b["model"][name], p, rtol=0, atol=atol, msg=name)
    for i, state in a["optimizer"]["state"].items():
        for key, v in state.items():
            torch.testing.assert_close(b["optimizer"]["state"][i][key], v, rtol=0, atol=atol)
    if atol == 0.0:
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def assert_same_metrics(full_dir, resumed_dir, atol=0.0):
    full, resumed = read_metrics(full_dir), read_metrics(resumed_dir)
    assert [r["iter"] for r in full] == [r["iter"] for r in resumed]  # the garbage records are gone
    for a, b in zip(full, resumed):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=0, abs=atol), (a["iter"], key)


@pytest.fixture(scope="module")
def sft_full(tmp_path_factory, script_env):
    """The uninterrupted tiny SFT run (8 iters, checkpoints at 3 and 6 kept); its ckpt.pt also starts dpo.py."""
    root = tmp_path_factory.mktemp("sft_full")
    run_script("sft.py", SFT_ARGS + [f"--out_dir={root / 'out'}"], root, script_env)
    return root / "out"


def test_sft_resume_is_exact(sft_full, tmp_path, script_env):
    resumed = tmp_path / "resumed"
    prepare_resume(sft_full, resumed, 3)
    # without the model's shape on the command line: as in nanoGPT, it comes from the checkpoint
    args = [a for a in SFT_ARGS if not a.startswith(("--n_layer", "--n_head", "--n_embd"))]
    out = run_script("sft.py", args + [f"--out_dir={resumed}", "--init_from=resume"], tmp_path, script_env)
    assert "from iter 3" in out
    assert_same_metrics(sft_full, resumed)
    assert_same_final_state(sft_full, resumed)


def test_resume_past_max_iters_is_an_error_that_keeps_the_checkpoint(sft_full, tmp_path, script_env):
    """Resuming an 8-iteration run with --max_iters=4 (say, a forgotten override) must not overwrite its ckpt.pt
    with one labelled iter 4."""
    out = tmp_path / "run"
    shutil.copytree(sft_full, out)
    before = (out / "ckpt.pt").read_bytes()
    args = [a for a in SFT_ARGS if not a.startswith("--max_iters")] + ["--max_iters=4"]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "sft.py"), *args, f"--out_dir={out}",
                           "--init_from=resume"], cwd=tmp_path, env=script_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "at iter 8, past max_iters=4" in proc.stderr.strip().splitlines()[-1]
    assert (out / "ckpt.pt").read_bytes() == before


def test_keep_last_keeps_this_runs_newest(tmp_path, script_env):
    """keep_last=2 with numbered checkpoints of an earlier, longer run in the same out_dir (iters 8 and 50, and
    one past 7 digits): those are another timeline and go; this run's newest two (iters 4 and 6) stay."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("ckpt_0000008.pt", "ckpt_0000050.pt", "ckpt_12345678.pt"):
        (out / name).write_bytes(b"stale")
    args = SFT_TINY + ["--max_iters=6", "--eval_interval=100", "--checkpoint_interval=2", "--keep_last=2"]
    run_script("sft.py", args + [f"--out_dir={out}"], tmp_path, script_env)
    assert sorted(f.name for f in out.glob("ckpt_*.pt")) == ["ckpt_0000004.pt", "ckpt_0000006.pt"]
    assert checkpoint.load_checkpoint(str(out / "ckpt_0000004.pt"))["iter_num"] == 4


def test_dpo_resume_is_exact(sft_full, tmp_path, script_env):
    sft_ckpt = str(sft_full / "ckpt.pt")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_script("dpo.py", DPO_ARGS + [f"--out_dir={full}", f"--sft_ckpt={sft_ckpt}"], tmp_path, script_env)
    prepare_resume(full, resumed, 2)
    # no --sft_ckpt: the reference must be rebuilt from the SFT checkpoint the run's own checkpoint names (the
    # default path does not exist in this cwd)
    out = run_script("dpo.py", DPO_ARGS + [f"--out_dir={resumed}", "--init_from=resume"], tmp_path, script_env)
    assert "from iter 2" in out
    assert_same_metrics(full, resumed)
    assert_same_final_state(full, resumed)
    # and the resumed run's checkpoints name it too, so it can be resumed once more
    assert checkpoint.load_checkpoint(os.path.join(resumed, "ckpt.pt"))["config"]["sft_ckpt"] == sft_ckpt


def test_dpo_resume_across_a_reference_sync_is_exact(sft_full, tmp_path, script_env):
    """TR-DPO (the reference moves after steps 3 and 6) with BCO (a running mean of the rewards): resumed from the
    checkpoint of iter 4, after the first sync, the run continues with the moved reference and the mean as they
    were. A control resumed from the same checkpoint without them must differ, so the comparison can fail."""
    args = DPO_ARGS + ["--loss_type=bco", "--ref_sync_steps=3", "--ref_mixup_alpha=0.5"]
    full, resumed, control = tmp_path / "full", tmp_path / "resumed", tmp_path / "control"
    run_script("dpo.py", args + [f"--out_dir={full}", f"--sft_ckpt={sft_full / 'ckpt.pt'}"], tmp_path, script_env)
    before, after = (checkpoint.load_checkpoint(str(full / f"ckpt_{k:07d}.pt")) for k in (2, 4))
    assert "reference" not in before and after["reference_syncs"] == 1  # saved once it has moved
    sft = checkpoint.load_checkpoint(str(sft_full / "ckpt.pt"))["model"]
    assert not torch.equal(after["reference"]["lm_head.weight"], sft["lm_head.weight"])
    assert after["bco_running_delta"]["count"] == 4 * 8 * 2  # 4 steps of 8 pairs, two rewards each
    prepare_resume(full, resumed, 4)
    out = run_script("dpo.py", args + [f"--out_dir={resumed}", "--init_from=resume"], tmp_path, script_env)
    assert "from iter 4" in out
    assert_same_metrics(full, resumed)
    assert_same_final_state(full, resumed)
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (full, resumed))
    assert a["reference_syncs"] == b["reference_syncs"] == 2 and a["bco_running_delta"] == b["bco_running_delta"]
    assert all(torch.equal(a["reference"][k], b["reference"][k]) for k in a["reference"])
    # the control: the same checkpoint without the moved reference and the running mean
    prepare_resume(full, control, 4)
    ckpt = torch.load(control / "ckpt.pt", weights_only=True)
    for key in ("reference", "reference_syncs", "bco_running_delta"):
        del ckpt[key]
    torch.save(ckpt, control / "ckpt.pt")
    run_script("dpo.py", args + [f"--out_dir={control}", "--init_from=resume"], tmp_path, script_env)
    assert read_metrics(control)[-2]["loss"] != pytest.approx(read_metrics(full)[-2]["loss"], rel=1e-6)


def test_dpo_from_scratch_resume_is_exact(tmp_path, script_env):
    """One-stage ORPO from random weights (no SFT checkpoint, no reference): resumed with neither the model's
    shape nor the task's size on the command line, they come from the run's own checkpoint."""
    args = ["--loss_type=orpo", "--n_pairs=64", "--batch_size=8", "--max_iters=6", "--eval_interval=3",
            "--log_interval=1", "--checkpoint_interval=2", "--keep_last=10", "--device=cpu", "--learning_rate=1e-3",
            "--min_lr=1e-3"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_script("dpo.py", args + ["--init_from=scratch", "--n_layer=1", "--n_head=2", "--n_embd=32", "--n_eval=50",
                                 f"--out_dir={full}"], tmp_path, script_env)
    prepare_resume(full, resumed, 2)
    again = tmp_path / "again"
    shutil.copytree(resumed, again)
    out = run_script("dpo.py", args + ["--init_from=resume", f"--out_dir={resumed}"], tmp_path, script_env)
    assert "from iter 2" in out
    assert_same_metrics(full, resumed)
    assert_same_final_state(full, resumed)
    assert checkpoint.load_checkpoint(os.path.join(resumed, "ckpt.pt"))["config"]["sft_ckpt"] == ""
    # a loss that needs a reference model cannot continue it: one line, no traceback
    proc = subprocess.run([sys.executable, os.path.join(REPO, "dpo.py"), *args, "--loss_type=dpo",
                           "--init_from=resume", f"--out_dir={again}"], cwd=tmp_path, env=script_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "has no reference model for 'dpo'" in proc.stderr.strip().splitlines()[-1]


def test_sft_ddp_resume(tmp_path, script_env):
    """2 processes (gloo), 2 micro-batches per step: one each. One-digit sums ('3+4=7', '9+8=17') give the ranks
    rows of different lengths, so their dropout draws, and RNG streams, differ: each must continue its own."""
    args = SFT_TINY + ["--max_iters=5", "--dropout=0.1", "--eval_interval=100", "--checkpoint_interval=2",
                       "--keep_last=10", "--gradient_accumulation_steps=2", "--n_digits=1", "--seed=3"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_script("sft.py", args + [f"--out_dir={full}"], tmp_path, script_env, torchrun=True)
    prepare_resume(full, resumed, 2)
    run_script("sft.py", args + [f"--out_dir={resumed}", "--init_from=resume"], tmp_path, script_env, torchrun=True)
    assert_same_metrics(full, resumed, atol=1e-6)
    assert_same_final_state(full, resumed, atol=1e-6)


def wait_for_checkpoints(path, proc, n):
    """Wait until the running script has replaced `path` n times (each os.replace brings a new inode/mtime)."""
    def stamp():
        try:
            st = os.stat(path)
            return st.st_ino, st.st_mtime_ns
        except FileNotFoundError:
            return None
    last, seen, deadline = stamp(), 0, time.time() + 60
    while seen < n:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.0002)
        now = stamp()
        seen, last = seen + (now != last), now


def test_sigkill_at_any_moment_leaves_a_resumable_checkpoint(tmp_path, script_env):
    """Kill a run that checkpoints every iter (SIGKILL: no handler runs) at seeded random moments and the moment
    a checkpoint's temporary file appears; each time ckpt.pt must load, and the next run resumes from it."""
    out = tmp_path / "out"
    max_iters = 20
    # a bigger model than the other tests: its ~3 MB checkpoint takes a few ms to write, a window to kill in
    args = [sys.executable, os.path.join(REPO, "sft.py"), "--n_layer=2", "--n_head=2", "--n_embd=96",
            "--batch_size=8", "--n_eval=20", "--device=cpu", "--log_interval=1", "--eval_interval=1000",
            f"--max_iters={max_iters}", "--checkpoint_interval=1", f"--out_dir={out}"]
    rng = random.Random(0)
    last_iter, caught_mid_write = 0, 0
    for attempt, moment in enumerate(["during write", "random", "during write"]):
        proc = subprocess.Popen(args + (["--init_from=resume"] if attempt else []), cwd=tmp_path, env=script_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        tmp = out / f"ckpt.pt.tmp.{proc.pid}"  # save_checkpoint's temporary file
        # a ckpt.pt of this run's first (the first run: second) checkpoint, then a few more at random
        wait_for_checkpoints(out / "ckpt.pt", proc, (attempt == 0) + rng.randint(1, 3))
        if moment == "random":  # anywhere in the next iteration (each takes tens of ms)
            time.sleep(rng.uniform(0.0, 0.03))
        else:  # the moment the next write begins
            while not tmp.exists() and proc.poll() is None:
                time.sleep(0.0002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed: make it longer"
        caught_mid_write += tmp.exists()  # the half-written file is still there
        ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"), tokenizer="byte")
        assert last_iter <= ckpt["iter_num"] < max_iters
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
        last_iter = ckpt["iter_num"]
    assert caught_mid_write >= 1, "no kill landed inside a checkpoint write"
    # resume to the end: exit 0, the final iteration reached, every iteration logged exactly once
    done = subprocess.run(args + ["--init_from=resume"], cwd=tmp_path, env=script_env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoint.load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == max_iters
    assert [r["iter"] for r in read_metrics(out) if "loss" in r] == list(range(max_iters))
