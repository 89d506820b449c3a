"""End-to-end: a seeded tiny SFT run then a tiny DPO run of the real scripts (subprocesses, a few seconds each),
checked through their metrics.jsonl and checkpoints; and, in-process, that dpo.py's pattern for the frozen
reference (a deep copy, requires_grad off, forwards under no_grad) keeps it bit-identical while the policy trains.
"""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from nanopo import checkpoint
from nanopo import runtime
from data import collate_pairs
from logprobs import summed_logps, token_logps
from losses import dpo_loss
from model import GPT, GPTConfig

# Small enough for seconds on one CPU thread, large enough that SFT learns something and DPO visibly separates
# chosen from rejected (measured: SFT ~2 s, DPO ~1 s of training; DPO loss 0.69 -> ~0.1, accuracies -> ~1.0).
SFT_ARGS = ["--n_layer=1", "--n_head=2", "--n_embd=64", "--max_iters=150", "--batch_size=32", "--warmup_iters=10",
            "--learning_rate=3e-3", "--eval_interval=150", "--log_interval=50", "--n_eval=200", "--seed=1",
            "--device=cpu", "--dtype=float32"]
DPO_ARGS = ["--max_iters=30", "--batch_size=32", "--n_pairs=256", "--n_samples=1", "--eval_interval=30",
            "--log_interval=5", "--learning_rate=1e-3", "--min_lr=1e-3", "--seed=1", "--device=cpu",
            "--dtype=float32"]
DPO_KEYS = {"iter", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "grad_norm", "lr"}


def run_script(script, args, repo_root, env):
    run = subprocess.run([sys.executable, script, *args], cwd=repo_root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"{script} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return run


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "task_accuracy" in r]
    return train, evals


@pytest.fixture(scope="module")
def runs(tmp_path_factory, repo_root, script_env):
    base = tmp_path_factory.mktemp("pipeline")
    sft_dir, dpo_dir = str(base / "sft"), str(base / "dpo")
    run_script("sft.py", SFT_ARGS + [f"--out_dir={sft_dir}"], repo_root, script_env)
    dpo = run_script("dpo.py", DPO_ARGS + [f"--out_dir={dpo_dir}", f"--sft_ckpt={sft_dir}/ckpt.pt"], repo_root,
                     script_env)
    return {"sft": sft_dir, "dpo": dpo_dir, "dpo_stdout": dpo.stdout}


def test_sft_metrics_and_checkpoint(runs):
    train, evals = read_metrics(runs["sft"])
    assert [r["iter"] for r in train] == [0, 50, 100, 149]
    for r in train:
        assert {"iter", "loss", "grad_norm", "lr"} <= set(r)
        assert all(math.isfinite(v) for v in r.values())
    assert [set(r) for r in evals] == [{"iter", "task_accuracy"}] * 2 and [r["iter"] for r in evals] == [0, 150]
    # from ~ln(258) per token at the start to well below it: the model learnt the answer format
    assert train[0]["loss"] > 5.0 and train[-1]["loss"] < 2.5
    ckpt = checkpoint.load_checkpoint(os.path.join(runs["sft"], "ckpt.pt"), "byte")
    assert ckpt["iter_num"] == 150 and ckpt["task_accuracy"] == evals[-1]["task_accuracy"]


def test_dpo_starts_at_ln2_with_zero_rewards(runs):
    train, _ = read_metrics(runs["dpo"])
    first = train[0]
    assert first["iter"] == 0
    # policy == reference at step 0: every implicit reward is exactly 0, so the loss is -log sigmoid(0) = ln 2
    assert abs(first["loss"] - math.log(2)) < 1e-3
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["rewards/margins"] == 0.0 and first["rewards/accuracies"] == 0.0  # no strict win on a tie


def test_dpo_starts_from_the_sft_model(runs):
    _, sft_evals = read_metrics(runs["sft"])
    _, dpo_evals = read_metrics(runs["dpo"])
    sft_ckpt = checkpoint.load_checkpoint(os.path.join(runs["sft"], "ckpt.pt"))
    assert dpo_evals[0]["iter"] == 0
    assert dpo_evals[0]["task_accuracy"] == sft_ckpt["task_accuracy"] == sft_evals[-1]["task_accuracy"]


def test_dpo_learns_the_preferences(runs):
    train, _ = read_metrics(runs["dpo"])
    assert [r["iter"] for r in train] == [0, 5, 10, 15, 20, 25, 29]
    late = train[-2:]
    assert max(r["loss"] for r in late) < 0.5 * math.log(2)
    assert min(r["rewards/accuracies"] for r in late) > 0.5
    assert min(r["rewards/margins"] for r in late) > 0
    # the logged margin is the mean of chosen - rejected rewards
    for r in train:
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)


def test_dpo_metrics_schema(runs):
    train, evals = read_metrics(runs["dpo"])
    for r in train:
        assert DPO_KEYS <= set(r), DPO_KEYS - set(r)
        assert all(math.isfinite(r[k]) for k in DPO_KEYS)
        assert r["lr"] == pytest.approx(1e-3)
    assert [r["iter"] for r in evals] == [0, 30]
    for r in evals:
        assert set(r) == {"iter", "task_accuracy"} and 0.0 <= r["task_accuracy"] <= 1.0
    ckpt = checkpoint.load_checkpoint(os.path.join(runs["dpo"], "ckpt.pt"), "byte")
    assert ckpt["iter_num"] == 30 and ckpt["task_accuracy"] == evals[-1]["task_accuracy"]
    assert ckpt["sft_ckpt"] == os.path.join(runs["sft"], "ckpt.pt")


def test_reference_stays_frozen_and_bit_identical():
    """dpo.py's pattern, in-process: reference = deepcopy(policy) with requires_grad off, the policy's forward
    with gradients, the reference's under no_grad; after optimizer steps the reference is unchanged bit for bit
    while the policy has moved."""
    torch.manual_seed(0)
    policy = GPT(GPTConfig(block_size=16, vocab_size=258, n_layer=1, n_head=2, n_embd=32))
    reference = copy.deepcopy(policy)
    reference.eval()
    reference.requires_grad_(False)
    saved = {k: v.clone() for k, v in reference.state_dict().items()}
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    optimizer = runtime.configure_optimizer(policy, 0.0, 1e-2, (0.9, 0.99), "cpu")
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == policy.get_num_params(False)

    g = torch.Generator().manual_seed(1)

    def rand_ids(n):
        return torch.randint(0, 256, (n,), generator=g).tolist()

    def logps(model, idx, targets, mask):
        B = idx.size(0) // 2
        lp, _ = summed_logps(token_logps(model(idx), targets), mask)
        return lp[:B], lp[B:]

    for step in range(4):
        pairs = [(rand_ids(3), rand_ids(2 + i) + [256], rand_ids(4 - i % 2) + [256]) for i in range(4)]
        idx, targets, mask = collate_pairs(pairs, 257)
        pc, pr = logps(policy, idx, targets, mask)
        with torch.no_grad():
            rc, rr = logps(reference, idx, targets, mask)
        assert not rc.requires_grad and not rr.requires_grad
        loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
        if step == 0:
            assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    assert all(not p.requires_grad and p.grad is None for p in reference.parameters())
    for k, v in reference.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert any(not torch.equal(v, start[k]) for k, v in policy.state_dict().items())
    # the deep copy shares no storage with the policy (an in-place update of one cannot leak into the other)
    ref_ptrs = {p.data_ptr() for p in reference.parameters()}
    assert not ref_ptrs & {p.data_ptr() for p in policy.parameters()}
