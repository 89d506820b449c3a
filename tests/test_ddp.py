"""DDP (and FSDP2) are world-size invariant: 2 processes (torchrun, gloo) log the same losses as 1 process with
twice the gradient accumulation, also with a reference that moves (TR-DPO); uneven held-out shards do not hang;
torch.compile trains without recompiling after the first step."""

import json
import os
import subprocess
import sys

import pytest

TINY_SFT = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=8", "--max_iters=6", "--eval_interval=3",
            "--log_interval=1", "--n_eval=51"]  # 51 held-out problems: one rank gets 26, the other 25
TINY_DPO = ["--batch_size=8", "--max_iters=6", "--eval_interval=3", "--log_interval=1", "--n_pairs=40",
            "--n_samples=1", "--learning_rate=1e-3", "--min_lr=1e-3"]


def run(args, repo_root, env, nproc=1, timeout=240):
    if nproc == 1:
        cmd = [sys.executable] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + args
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def records(out_dir, key):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


def assert_same_losses(a_dir, b_dir, keys):
    a, b = records(a_dir, "loss"), records(b_dir, "loss")
    assert [r["iter"] for r in a] == [r["iter"] for r in b] == list(range(6))
    for ra, rb in zip(a, b):
        for k in keys:
            rel = abs(ra[k] - rb[k]) / max(abs(ra[k]), 1e-6)
            assert rel <= 1e-5, (k, ra["iter"], ra[k], rb[k])
    # and the training did something, so equality is not trivial
    assert a[0]["loss"] != a[-1]["loss"]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, repo_root, script_env):
    root = tmp_path_factory.mktemp("ddp")
    out = {}
    for name, nproc in (("one", 1), ("two", 2)):
        sft_dir, dpo_dir = root / f"sft_{name}", root / f"dpo_{name}"
        out[f"sft_{name}_stdout"] = run(["sft.py", *TINY_SFT, "--gradient_accumulation_steps=2",
                                         f"--out_dir={sft_dir}"], repo_root, script_env, nproc)
        # both DPO runs start from the same (1-process) SFT checkpoint
        out[f"dpo_{name}_stdout"] = run(["dpo.py", *TINY_DPO, "--gradient_accumulation_steps=2",
                                         f"--sft_ckpt={root / 'sft_one' / 'ckpt.pt'}", f"--out_dir={dpo_dir}"],
                                        repo_root, script_env, nproc)
        out[f"sft_{name}"], out[f"dpo_{name}"] = str(sft_dir), str(dpo_dir)
    # one micro-batch of 16 rows in one process, and the same shared out over 2 processes: SFT's per-token mean
    # must come out the same though the halves hold different numbers of response tokens
    for name, nproc in (("sft_big", 1), ("sft_split", 2)):
        out[name] = str(root / name)
        run(["sft.py", *TINY_SFT, "--gradient_accumulation_steps=1", "--batch_size=16", f"--out_dir={out[name]}"],
            repo_root, script_env, nproc)
    # the headline command's split: gradient_accumulation_steps=1 on 2 ranks, each rank half of every micro-batch
    out["dpo_split"] = str(root / "dpo_split")
    run(["dpo.py", *TINY_DPO, "--gradient_accumulation_steps=1", "--batch_size=16",
         f"--sft_ckpt={root / 'sft_one' / 'ckpt.pt'}", f"--out_dir={out['dpo_split']}"], repo_root, script_env, 2)
    # FSDP2: policy and reference sharded over the 2 processes
    out["dpo_fsdp"] = str(root / "dpo_fsdp")
    run(["dpo.py", *TINY_DPO, "--gradient_accumulation_steps=2", "--fsdp=True",
         f"--sft_ckpt={root / 'sft_one' / 'ckpt.pt'}", f"--out_dir={out['dpo_fsdp']}"], repo_root, script_env, 2)
    # TR-DPO: the reference moves every 2 steps, in one process, under DDP (a full copy per rank) and under FSDP2
    # (each rank mixes its own shards)
    sync = ["--ref_sync_steps=2", "--ref_mixup_alpha=0.5", "--gradient_accumulation_steps=2"]
    fsdp_ckpts = ["--fsdp=True", "--checkpoint_interval=2", "--keep_last=10"]
    for name, nproc, extra in (("sync_one", 1, []), ("sync_ddp", 2, []), ("sync_fsdp", 2, fsdp_ckpts)):
        out[name] = str(root / name)
        run(["dpo.py", *TINY_DPO, *sync, *extra, f"--sft_ckpt={root / 'sft_one' / 'ckpt.pt'}",
             f"--out_dir={out[name]}"], repo_root, script_env, nproc)
    return out


def test_sft_two_processes_equal_one_with_twice_the_accumulation(ddp_runs):
    assert_same_losses(ddp_runs["sft_one"], ddp_runs["sft_two"], ["loss", "grad_norm"])


def test_sft_loss_is_the_mean_over_the_steps_tokens_however_split(ddp_runs):
    # 16 rows as 1 micro-batch, as 2 of 8 in one process, and as 8 on each of 2 processes: one and the same step
    assert_same_losses(ddp_runs["sft_big"], ddp_runs["sft_one"], ["loss", "grad_norm"])
    assert_same_losses(ddp_runs["sft_big"], ddp_runs["sft_split"], ["loss", "grad_norm"])


def test_dpo_two_processes_equal_one_with_twice_the_accumulation(ddp_runs):
    assert_same_losses(ddp_runs["dpo_one"], ddp_runs["dpo_two"],
                       ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "grad_norm"])


def test_two_processes_share_out_a_single_micro_batch(ddp_runs):
    # 1 process: 2 micro-batches of 8 pairs; 2 processes with gas=1, batch 16: 8 pairs each. Same global batch.
    assert_same_losses(ddp_runs["dpo_one"], ddp_runs["dpo_split"], ["loss", "rewards/chosen", "grad_norm"])


def test_fsdp_dpo_equals_one_process(ddp_runs):
    assert_same_losses(ddp_runs["dpo_one"], ddp_runs["dpo_fsdp"],
                       ["loss", "rewards/chosen", "rewards/rejected", "grad_norm"])
    import torch
    one = torch.load(os.path.join(ddp_runs["dpo_one"], "ckpt.pt"), weights_only=True)["model"]
    sharded = torch.load(os.path.join(ddp_runs["dpo_fsdp"], "ckpt.pt"), weights_only=True)["model"]
    assert one.keys() == sharded.keys()  # the gathered checkpoint is a plain, complete state dict
    assert max((one[k] - sharded[k]).abs().max().item() for k in one) < 1e-5


def test_uneven_eval_shards_finish_and_agree(ddp_runs):
    # 51 held-out problems over 2 ranks: the run ended (run() checked the exit code) and the summed accuracy
    # is the same as one process's
    one, two = records(ddp_runs["sft_one"], "task_accuracy"), records(ddp_runs["sft_two"], "task_accuracy")
    assert [r["task_accuracy"] for r in one] == [r["task_accuracy"] for r in two]
    assert len(one) == 3


def test_uneven_world_split_is_one_line_error(repo_root, script_env, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py", *TINY_SFT,
           "--gradient_accumulation_steps=3", "--batch_size=7", f"--out_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=repo_root, env=script_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "batch_size=7 x gradient_accumulation_steps=3 cannot be split evenly over 2 processes" in proc.stderr


def test_compile_does_not_recompile_after_warmup(repo_root, script_env, tmp_path):
    # rows of the addition task have different lengths; padded_length buckets them so one graph serves all
    env = dict(script_env, TORCHINDUCTOR_COMPILE_THREADS="1")
    stdout = run(["sft.py", *TINY_SFT, "--compile=True", "--max_iters=8", f"--out_dir={tmp_path}"], repo_root, env,
                 timeout=600)
    assert "torch.compile: first step took" in stdout
    assert "torch.compile: 0 recompiles after the first step" in stdout, stdout[-1500:]


@pytest.mark.parametrize("name", ["sync_ddp", "sync_fsdp"])
def test_tr_dpo_moves_the_reference_alike_under_ddp_and_fsdp(ddp_runs, name):
    assert_same_losses(ddp_runs["sync_one"], ddp_runs[name], ["loss", "rewards/chosen", "rewards/rejected",
                                                              "grad_norm"])
    import torch
    one = torch.load(os.path.join(ddp_runs["sync_one"], "ckpt.pt"), weights_only=True)
    other = torch.load(os.path.join(ddp_runs[name], "ckpt.pt"), weights_only=True)
    assert one["reference_syncs"] == other["reference_syncs"] == 3
    assert one["reference"].keys() == other["reference"].keys()  # gathered from the shards: a plain state dict
    assert max((one["reference"][k] - other["reference"][k]).abs().max().item() for k in one["reference"]) < 1e-5
    # and it moved: the synced runs' losses part from plain DPO's after the first sync
    plain = records(ddp_runs["dpo_one"], "loss")
    assert abs(plain[2]["loss"] - records(ddp_runs[name], "loss")[2]["loss"]) > 1e-4


def test_tr_dpo_resume_under_fsdp_is_exact(ddp_runs, repo_root, script_env, tmp_path):
    """Resumed from the FSDP2 run's checkpoint of iter 4 (after two syncs), the sharded reference is rebuilt from
    the checkpoint's full weights and the run continues as it went."""
    import json
    import shutil

    import torch
    full = ddp_runs["sync_fsdp"]
    shutil.copy(os.path.join(full, "ckpt_0000004.pt"), tmp_path / "ckpt.pt")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["reference_syncs"] == 2
    with open(os.path.join(full, "metrics.jsonl")) as f, open(tmp_path / "metrics.jsonl", "w") as out:
        out.writelines(line for line in f if json.loads(line)["iter"] < 4)
    run(["dpo.py", *TINY_DPO, "--ref_sync_steps=2", "--ref_mixup_alpha=0.5", "--gradient_accumulation_steps=2",
         "--fsdp=True", "--init_from=resume", f"--out_dir={tmp_path}"], repo_root, script_env, 2)
    a, b = records(full, "loss"), records(str(tmp_path), "loss")
    assert [r["iter"] for r in a] == [r["iter"] for r in b] and a[-1]["loss"] != a[3]["loss"]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=0), ra["iter"]
    one, other = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["reference"] for d in (full, tmp_path))
    assert max((one[k] - other[k]).abs().max().item() for k in one) < 1e-6
