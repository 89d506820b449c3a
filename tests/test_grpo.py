"""grpo.py, the real script on a tiny SFT model: at step 0 the policy is its reference, so the KL
is exactly 0 and the loss is 0 (advantages sum to 0 in every group); it learns; 2 processes
under torchrun log what 1 process logs; a resumed run ends bit for bit where an uninterrupted one
does; bad settings end in one line."""

import json
import os
import subprocess
import sys

import pytest
import torch

from test_resume import assert_same_final_state, assert_same_metrics, prepare_resume

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=8", "--n_eval=50",
            "--device=cpu"]
GRPO_TINY = ["--prompts_per_step=8", "--num_generations=4", "--batch_size=16",
             "--log_interval=1", "--eval_interval=3", "--device=cpu", "--learning_rate=1e-3",
             "--min_lr=1e-3"]


def run(args, cwd, env, nproc=1):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(launcher + args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory, script_env):
    root = tmp_path_factory.mktemp("sft")
    run([os.path.join(REPO, "sft.py"), *SFT_TINY, "--max_iters=150", "--eval_interval=1000",
         "--learning_rate=3e-3", "--min_lr=3e-3", f"--out_dir={root / 'out'}"], root, script_env)
    return str(root / "out" / "ckpt.pt")


def test_grpo_starts_at_zero_and_learns(sft_ckpt, tmp_path, script_env):
    out_dir = tmp_path / "grpo"
    out = run([os.path.join(REPO, "grpo.py"), *GRPO_TINY, "--max_iters=30",
               f"--sft_ckpt={sft_ckpt}", f"--out_dir={out_dir}"], tmp_path, script_env)
    steps = [r for r in read_metrics(out_dir) if "loss" in r]
    # the policy is its reference: every k3 term is exactly 0; each group's advantages sum to 0
    assert steps[0]["kl"] == 0.0 and abs(steps[0]["loss"]) < 1e-6
    assert steps[0]["clip_ratio/region_mean"] == 0.0  # on-policy: the ratio is exactly 1
    assert all(r["kl"] >= 0 for r in steps) and steps[-1]["kl"] > 0
    # the reward of the sampled answers rises
    first = sum(r["reward"] for r in steps[:5]) / 5
    last = sum(r["reward"] for r in steps[-5:]) / 5
    assert last > first + 0.2, (first, last)
    assert out.strip().splitlines()[-1].startswith("GRPO done: held-out task_accuracy")
    summary = json.load(open(out_dir / "summary.json"))
    assert summary["answers_sampled"] == 30 * 8 * 4


@pytest.mark.parametrize("options", [[], ["--batch_size=8", "--loss_type=dapo"]],
                         ids=["grpo", "dapo_accumulated"])
def test_two_processes_log_what_one_does(sft_ckpt, tmp_path, script_env, options):
    """Each rank samples every answer of the step (the same stream), then trains on its half: one
    micro-batch each, or (dapo) two each, accumulated, weighted by their shares of the tokens."""
    args = [os.path.join(REPO, "grpo.py"), *GRPO_TINY, *options, "--max_iters=4",
            f"--sft_ckpt={sft_ckpt}"]
    run(args + [f"--out_dir={tmp_path / 'one'}"], tmp_path, script_env)
    run(args + [f"--out_dir={tmp_path / 'two'}"], tmp_path, script_env, nproc=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["iter"] for r in one] == [r["iter"] for r in two]
    for a, b in zip(one, two):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["iter"], key)
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    for name in a:
        if name.endswith("attn.c_attn.bias"):
            # The key bias adds one constant to every score of a query, which softmax ignores: its
            # true gradient is 0, and AdamW turns the rounding noise it gets instead into steps of
            # about the learning rate, different for different summation orders. Compare the rest.
            n_embd = a[name].numel() // 3
            keep = torch.cat([torch.arange(n_embd), torch.arange(2 * n_embd, 3 * n_embd)])
            torch.testing.assert_close(b[name][keep], a[name][keep], rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("options", [[], ["--lora_rank=4", "--lora_dropout=0.1"]],
                         ids=["plain", "lora_dropout"])
def test_resume_is_bit_exact(sft_ckpt, tmp_path, script_env, options):
    """k steps, then --init_from=resume to the end, equal the uninterrupted run: the prompt order,
    the sampling stream and (with LoRA dropout) the global RNG all continue."""
    args = [os.path.join(REPO, "grpo.py"), *GRPO_TINY, *options, "--max_iters=6",
            "--checkpoint_interval=2", "--keep_last=10", f"--sft_ckpt={sft_ckpt}"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(args + [f"--out_dir={full}"], tmp_path, script_env)
    prepare_resume(full, resumed, 4)
    out = run(args + [f"--out_dir={resumed}", "--init_from=resume"], tmp_path, script_env)
    assert "from iter 4" in out
    assert_same_metrics(full, resumed)
    assert_same_final_state(full, resumed)


def test_two_iterations_per_batch_use_the_sampling_policy(sft_ckpt, tmp_path, script_env):
    """num_iterations=2 without a KL term: the first optimizer step is on-policy (ratio 1, its loss
    0 as every group's advantages sum to 0), the second is not (the old log-probs stay those of
    the policy that sampled), so a step's logged loss, their mean, is no longer 0; and the run
    resumes bit for bit."""
    args = [os.path.join(REPO, "grpo.py"), *GRPO_TINY, "--num_iterations=2", "--beta=0",
            "--max_iters=4", "--checkpoint_interval=2", "--keep_last=10",
            f"--sft_ckpt={sft_ckpt}"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(args + [f"--out_dir={full}"], tmp_path, script_env)
    steps = [r for r in read_metrics(full) if "loss" in r]
    assert all(abs(r["loss"]) > 1e-5 for r in steps)
    one = tmp_path / "one"
    run([a for a in args if a != "--num_iterations=2"] + [f"--out_dir={one}"], tmp_path,
        script_env)
    assert all(abs(r["loss"]) < 1e-6 for r in read_metrics(one) if "loss" in r)
    prepare_resume(full, resumed, 2)
    run(args + [f"--out_dir={resumed}", "--init_from=resume"], tmp_path, script_env)
    assert_same_metrics(full, resumed)
    assert_same_final_state(full, resumed)


@pytest.mark.parametrize("setting, message", [
    ("--num_generations=1", "num_generations=1: a group needs 2 or more answers"),
    ("--epsilon_high=0.1", "epsilon_high=0.1 is below epsilon=0.2"),
    ("--batch_size=12", "32 answers per step is not a multiple of batch_size=12"),
    ("--loss_type=ppo", "unknown loss_type 'ppo'"),
    ("--scale_rewards=rank", "unknown scale_rewards 'rank'"),
    ("--importance_sampling_level=token_mean", "unknown importance_sampling_level"),
    ("--reward=judge", "unknown reward 'judge'"),
    ("--init_from=scratch", "unknown init_from 'scratch'"),
    ("--beta=-0.1", "beta=-0.1 makes no sense: expected >= 0"),
])
def test_bad_settings_end_in_one_line(tmp_path, script_env, setting, message):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "grpo.py"), *GRPO_TINY, setting],
                          cwd=tmp_path, env=script_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]


def test_the_reward_functions(sft_ckpt, tmp_path, script_env):
    """--reward=correct gives 0/1 rewards: the sampled accuracy is their mean."""
    out_dir = tmp_path / "correct"
    run([os.path.join(REPO, "grpo.py"), *GRPO_TINY, "--max_iters=3", "--reward=correct",
         f"--sft_ckpt={sft_ckpt}", f"--out_dir={out_dir}"], tmp_path, script_env)
    for r in read_metrics(out_dir):
        if "loss" in r:
            assert r["reward"] == pytest.approx(r["sampled_accuracy"], abs=1e-6)
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["reward"] == "correct" and "sampling_rng" in ckpt
