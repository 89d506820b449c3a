"""The all-rank non-finite check of the training loops (optim.NonFiniteGuard), the refusal to save non-finite
weights, and fully masked batches.

sft.py runs in-process on a tiny model with losses.sft_loss patched to turn NaN (or to give a NaN gradient) at
chosen steps; the checks compare parameters, optimizer step counts and saved files against what a skipped step
must leave: exactly the state before it.
"""

import hashlib
import json
import os
import sys

import pytest
import torch

from nanopo import checkpoint
import losses
from configurator import UserError
from logprobs import average_logps, summed_logps, token_logps
from losses import dpo_loss, sft_loss, simpo_loss
from model import GPT, GPTConfig
from test_dpo_options import run_script

VOCAB = 32
TINY_SFT = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4", "--n_eval=20",
            "--eval_interval=100", "--log_interval=1", "--learning_rate=1e-2", "--decay_lr=False",
            "--warmup_iters=0", "--max_nonfinite=3", "--max_iters=6", "--device=cpu", "--dtype=float32", "--seed=3"]


def run(repo_root, out_dir, monkeypatch, bad_steps, how="loss", *args):
    """sft.py in this process, its loss NaN (or only its gradient) at the steps in bad_steps (counted from this
    process's first step). Returns (the script's globals, the parameters seen at the start of each step)."""
    seen = []

    def patched_sft_loss(logps, n_tokens):
        model = sys.modules["__main__"].model  # runpy runs the script as __main__: its globals are there
        step = len(seen)
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        loss = sft_loss(logps, n_tokens)
        if step in bad_steps:
            if how == "loss":
                loss = loss * float("nan")
            else:  # a finite loss (sqrt(0) = 0) whose gradient is 0 * inf = NaN
                loss = loss + torch.sqrt(model.lm_head.weight[0, 0] * 0.0)
        return loss

    monkeypatch.setattr(losses, "sft_loss", patched_sft_loss)
    g = run_script(repo_root, "sft.py", TINY_SFT + [f"--out_dir={out_dir}", *args])
    return g, seen


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_nonfinite_step_is_skipped_and_counted(repo_root, tmp_path, monkeypatch, how):
    bad = {2, 4}
    g, seen = run(repo_root, tmp_path, monkeypatch, bad, how)
    final = {k: v.detach().clone() for k, v in g["model"].state_dict().items()}
    after = seen[1:] + [final]  # the parameters after step i
    assert len(seen) == 6
    for i in range(6):
        # a skipped step leaves every parameter bit for bit as it was; a normal step changes them
        assert same(seen[i], after[i]) == (i in bad), f"step {i}"
    # AdamW counted only the steps it took (its moments and bias correction ignore the skipped ones)
    steps = {float(s["step"]) for s in g["optimizer"].state.values()}
    assert steps == {6 - len(bad)}
    ckpt = checkpoint.load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))
    assert ckpt["nonfinite_skipped"] == len(bad)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    for state in ckpt["optimizer"]["state"].values():
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))
    # the metrics carry the running count from the first skipped step on
    counts = {r["iter"]: r.get("nonfinite_skipped", 0) for r in records(tmp_path) if "loss" in r}
    assert counts == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}
    if how == "grad":
        assert [r for r in records(tmp_path) if r["iter"] == 2 and "loss" in r][0]["grad_norm"] is None  # null, not NaN


def test_consecutive_nonfinite_steps_stop_the_run(repo_root, tmp_path, monkeypatch):
    # NaN from step 3 on, a checkpoint at iter 4 (after one skip): the 3rd bad step in a row (step 5) stops it
    with pytest.raises(UserError, match=r"3 non-finite steps in a row at iter 5"):
        run(repo_root, tmp_path, monkeypatch, set(range(3, 100)), "loss", "--max_iters=10", "--checkpoint_interval=4")
    ckpt = checkpoint.load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))
    assert ckpt["iter_num"] == 4 and ckpt["nonfinite_skipped"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nonfinite_steps_apart_do_not_stop_the_run(repo_root, tmp_path, monkeypatch):
    # two bad steps in a row, a good one, two more: never 3 in a row, so the run finishes with 4 skipped
    _, seen = run(repo_root, tmp_path, monkeypatch, {1, 2, 4, 5}, "loss", "--max_iters=7")
    assert len(seen) == 7
    assert checkpoint.load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))["nonfinite_skipped"] == 4


def test_save_checkpoint_refuses_nonfinite_weights(tmp_path):
    model = GPT(GPTConfig(block_size=8, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16))
    path = os.path.join(tmp_path, "ckpt.pt")
    checkpoint.save_checkpoint(path, model, {"a": 1}, "byte", iter_num=1)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, 5] = float("inf")
    with pytest.raises(UserError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight.*not finite"):
        checkpoint.save_checkpoint(path, model, {"a": 1}, "byte", iter_num=2)
    # the previous checkpoint is untouched and no temporary file is left behind
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
    assert checkpoint.load_checkpoint(path)["iter_num"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_fully_masked_batch_gives_zero_loss_and_zero_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, VOCAB, (3, 8))
    per_token = token_logps(model(idx), torch.roll(idx, -1, 1))  # (3, 8)
    logps, n_tokens = summed_logps(per_token, torch.zeros(3, 8))
    assert torch.equal(logps, torch.zeros(3)) and torch.equal(n_tokens, torch.zeros(3))
    loss = sft_loss(logps, n_tokens)
    assert loss.item() == 0.0  # 0 tokens: 0, never 0/0
    # the per-token averages of empty responses are 0 too, so the length-normalised losses stay finite
    assert torch.equal(average_logps(logps, n_tokens), torch.zeros(3))
    simpo, _, _ = simpo_loss(average_logps(logps, n_tokens), average_logps(logps, n_tokens), 2.0, 0.5)
    dpo, _, _ = dpo_loss(logps, logps, torch.zeros(3), torch.zeros(3), 0.1)
    (loss + simpo + dpo).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


def test_the_count_continues_across_a_resume(repo_root, tmp_path, monkeypatch):
    # 4 steps with one skipped, then a resume to 8 with one more skipped (this process's 2nd step = iter 5)
    run(repo_root, tmp_path, monkeypatch, {1}, "loss", "--max_iters=4")
    assert checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))["nonfinite_skipped"] == 1
    run(repo_root, tmp_path, monkeypatch, {1}, "loss", "--max_iters=8", "--init_from=resume")
    assert checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))["nonfinite_skipped"] == 2
    counts = {r["iter"]: r.get("nonfinite_skipped", 0) for r in records(tmp_path) if "loss" in r}
    assert counts == {0: 0, 1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 6: 2, 7: 2}
