"""What a learner sees on stdout, and where a run writes: progress lines with an ETA (training, pair building,
evaluation), an MFU that is defined and never over 100%, KTO's rewards and KL on its training line, and a
default folder per loss so that one loss never overwrites another's run."""

import os
import re
import subprocess
import sys

import pytest
import torch

from nanopo import logger
from nanopo.runtime import SINGLE_PROCESS_CPU
from test_dpo_options import DPO, SFT, run_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("sft")
    run_script(repo_root, "sft.py", SFT + [f"--out_dir={out}"])
    return str(out / "ckpt.pt")


def test_training_lines_show_progress_and_eta(repo_root, tmp_path, capsys):
    run_script(repo_root, "sft.py", SFT[:4] + ["--max_iters=6", "--eval_interval=3", "--log_interval=2", "--n_eval=20",
                                               f"--out_dir={tmp_path}"])
    out = capsys.readouterr().out
    train = [line for line in out.splitlines() if line.startswith("iter ")]
    assert [line.split(":")[0] for line in train] == ["iter 0/6", "iter 2/6", "iter 4/6", "iter 5/6"]
    for line in train:  # '... | 0:01 elapsed, eta 0:02'
        assert re.search(r"ms/iter, [\d,]+ tok/s.* \| \d+:\d\d elapsed, eta \d+:\d\d$", line), line
    evals = [line for line in out.splitlines() if line.startswith("eval ")]
    assert [line.split(":")[0] for line in evals] == ["eval 0/6", "eval 3/6", "eval 6/6"]
    assert evals[0].endswith("elapsed") and "eta" in evals[1]  # no eta before the first step
    assert out.strip().splitlines()[-1].startswith("SFT done: held-out task_accuracy ")


def test_pair_building_and_evaluation_print_progress_when_slow(repo_root, sft_ckpt, tmp_path, capsys, monkeypatch):
    # as if every loop were slow: no wait before the first progress line, none between lines
    monkeypatch.setattr(logger, "PROGRESS_AFTER", 0.0)
    monkeypatch.setattr(logger, "PROGRESS_EVERY", 0.0)
    run_script(repo_root, "dpo.py", DPO + ["--max_iters=1", "--n_pairs=600", f"--sft_ckpt={sft_ckpt}",
                                           f"--out_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert re.search(r"^building pairs, temperature 0\.0: 500/600, \d+:\d\d elapsed, eta \d+:\d\d$", out, re.M), out
    assert re.search(r"^building pairs, temperature 1\.0: 600/600, ", out, re.M)
    assert re.search(r"^evaluating held-out prompts: 100/100, ", out, re.M)


def test_quick_loops_print_no_progress(capsys):
    progress = logger.Progress("quick", 10)
    for i in range(1, 11):
        progress.update(i)
    assert capsys.readouterr().out == ""  # finished well within PROGRESS_AFTER seconds


def test_kto_line_shows_rewards_and_kl(repo_root, sft_ckpt, tmp_path, capsys):
    run_script(repo_root, "dpo.py", DPO + ["--loss_type=kto", "--max_iters=2", f"--sft_ckpt={sft_ckpt}",
                                           f"--out_dir={tmp_path}"])
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("iter 0/2"))
    assert re.search(r"loss 0\.5000, rewards/chosen \+0\.000, rewards/rejected \+0\.000, kl 0\.000, lr ", first), first


def test_mfu_is_defined_and_never_over_100_percent(monkeypatch, tmp_path, capsys):
    # a CPU peak measured at a busy moment (1 GFLOP/s) while training runs at 2 GFLOP/s: measured again
    monkeypatch.setattr(logger, "peak_flops", lambda rt: (1e9, None, "CPU: measured"))
    again = iter([4e9, 1.5e9])
    monkeypatch.setattr(logger, "measure_matmul_flops", lambda **kw: (next(again), None))
    log = logger.Logger(str(tmp_path), SINGLE_PROCESS_CPU, 0, 4, 1, flops_per_token=1e6)
    assert capsys.readouterr().out.startswith("mfu = model FLOPs per second (6N per trained token")

    def step(it, tokens):
        log.add(torch.tensor(1.0), {}, 1.0, tokens)
        log.step(it, 1e-3, torch.tensor(0.5), dt=1.0)
        return capsys.readouterr().out

    assert "mfu 50.0%" in step(0, 2000)  # 2e9 FLOP/s against the peak measured again: 4e9
    assert "mfu 50.0%" in step(1, 2000)  # the better peak is kept
    # above even the kept peak: measured once more (1.5e9, lower), and the figure is left out, not > 100%
    assert "mfu n/a" in step(2, 5000)
    assert not re.search(r"mfu (1\d\d|[2-9]\d\d)\.\d%", step(3, 3000))


def test_each_loss_writes_its_own_folder(sft_ckpt, tmp_path, script_env):
    """Without --out_dir, a loss writes out/<loss_type> (sft: out/sft_chosen): `--loss_type=ipo` after a DPO run
    leaves out/dpo as it was. A run whose out_dir holds its own SFT checkpoint is refused."""
    def dpo(*args):
        return subprocess.run([sys.executable, os.path.join(REPO, "dpo.py"), *DPO, "--max_iters=1", "--n_eval=20",
                               f"--sft_ckpt={sft_ckpt}", *args], cwd=tmp_path, env=script_env, capture_output=True,
                              text=True, timeout=120)

    for loss_type in ("dpo", "ipo", "sft"):
        assert dpo(f"--loss_type={loss_type}").returncode == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["dpo", "ipo", "sft_chosen"]
    for name, loss_type in (("dpo", "dpo"), ("ipo", "ipo"), ("sft_chosen", "sft")):
        ckpt = torch.load(tmp_path / "out" / name / "ckpt.pt", weights_only=True)
        assert ckpt["config"]["loss_type"] == loss_type and ckpt["config"]["out_dir"] == f"out/{name}"
    refused = dpo(f"--out_dir={os.path.dirname(sft_ckpt)}")
    assert refused.returncode != 0 and refused.stderr.strip().splitlines() == [
        f"error: out_dir={os.path.dirname(sft_ckpt)} holds the SFT checkpoint this run starts from: it would be "
        "overwritten; choose another --out_dir"]


def test_summary_json_agrees_with_the_last_line_and_the_log(sft_ckpt, repo_root, tmp_path, capsys):
    """dpo.py's out_dir/summary.json: the same last line it printed, the final and starting held-out
    results as metrics.jsonl logged them at the last and the first evaluation, the settings, the git
    commit of this checkout, and a speed."""
    import json
    out_dir = tmp_path / "dpo"
    g = run_script(repo_root, "dpo.py", DPO + ["--n_eval=20", f"--sft_ckpt={sft_ckpt}",
                                               f"--out_dir={out_dir}"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    with open(out_dir / "summary.json") as f:
        summary = json.load(f)
    assert summary["last_line"] == last and last.startswith("DPO done: held-out task_accuracy ")
    with open(out_dir / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "task_accuracy" in r]
    assert summary["results"] == {"task_accuracy": evals[-1]["task_accuracy"]}
    assert summary["start_results"] == {"task_accuracy": evals[0]["task_accuracy"]}
    # the line shows both, as percentages: '... 45.0% (SFT) -> 50.0% in ...'
    shown = re.search(r"task_accuracy ([\d.]+)% \(SFT\) -> ([\d.]+)%", last).groups()
    assert shown == (f"{summary['sft_accuracy']:.1%}"[:-1], f"{evals[-1]['task_accuracy']:.1%}"[:-1])
    assert summary["config"] == g["config"] and summary["training_rows"] == len(g["train_data"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True, text=True)
    if head.returncode == 0:
        assert summary["git_commit"].split("+")[0] == head.stdout.strip()
    assert summary["tokens_per_s"] > 0 and 0 < summary["mfu"] <= 1
    assert summary["wall_s"] <= float(re.search(r" in (\d+) s,", last).group(1)) + 1


def test_compare_prints_one_row_per_run(tmp_path, repo_root, script_env):
    """scripts/compare.py's table, from summary.json files written here by hand."""
    import json
    runs = {"dpo_b1": ({"loss_type": "dpo", "beta": 1.0}, {"task_accuracy": 0.965}, 12.0),
            "ipo_b05": ({"loss_type": "ipo", "beta": 0.5}, {"task_accuracy": 0.9}, 30.4),
            "kto": ({"loss_type": "kto", "beta": 0.1}, {"eval_loss": 0.25, "kl": 0.125}, 7.0)}
    for name, (config, results, wall) in runs.items():
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "summary.json", "w") as f:
            json.dump({"config": config, "results": results, "start_results": {"task_accuracy": 0.45},
                       "wall_s": wall}, f)
    os.makedirs(tmp_path / "unfinished")
    run = subprocess.run([sys.executable, "-m", "scripts.compare", *[str(tmp_path / n) for n in
                          (*runs, "unfinished")]], cwd=repo_root, env=script_env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["run", "loss", "beta", "held-out", "from", "kl", "time"]
    assert lines[1].split()[1:] == ["dpo", "1.0", "task_accuracy", "96.5%", "45.0%", "-", "12", "s"]
    assert lines[2].split()[1:] == ["ipo", "0.5", "task_accuracy", "90.0%", "45.0%", "-", "30", "s"]
    assert lines[3].split()[1:] == ["kto", "0.1", "eval_loss", "0.2500", "-", "0.1250", "7", "s"]
    assert "no summary.json" in lines[4]


def test_compare_measures_kl_to_the_sft_model(tmp_path, repo_root, script_env):
    """--kl=N: a run whose policy never moved (0 steps) is at KL 0 from its SFT model, exactly (every
    sampled answer has the same log-prob under both); one that trained is above 0; the SFT run itself
    has no SFT model to compare with."""
    tiny = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--n_eval=50", "--device=cpu"]
    sft = subprocess.run([sys.executable, "sft.py", *tiny, "--max_iters=30", "--eval_interval=100",
                          f"--out_dir={tmp_path / 'sft'}"], cwd=repo_root, env=script_env,
                         capture_output=True, text=True, timeout=120)
    assert sft.returncode == 0, sft.stderr
    for name, steps in (("still", 0), ("moved", 40)):
        dpo = subprocess.run([sys.executable, "dpo.py", "--n_pairs=64", "--batch_size=16",
                              f"--max_iters={steps}", "--eval_interval=100", "--n_eval=50",
                              "--learning_rate=1e-2", "--min_lr=1e-2",
                              f"--sft_ckpt={tmp_path / 'sft' / 'ckpt.pt'}",
                              f"--out_dir={tmp_path / name}"], cwd=repo_root, env=script_env,
                             capture_output=True, text=True, timeout=120)
        assert dpo.returncode == 0, dpo.stderr
    run = subprocess.run([sys.executable, "-m", "scripts.compare", "--kl=50",
                          *[str(tmp_path / n) for n in ("sft", "still", "moved")]], cwd=repo_root,
                         env=script_env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    kl = [line.split()[-3] for line in run.stdout.splitlines()[1:]]
    assert kl[0] == "-" and kl[1] == "0.000±0.000" and float(kl[2].split("±")[0]) > 0.3
