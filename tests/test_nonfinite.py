"""The non-finite guard of common.train_loop, the refusal to save non-finite weights, and fully masked batches.

train_loop runs in-process on a tiny GPT with a compute_loss that turns NaN (or gives a NaN gradient) at chosen
steps; the checks compare parameters, optimizer step counts and saved files against what a skipped step must
leave: exactly the state before it.
"""

import hashlib
import json
import math
import os

import pytest
import torch

import common
from data import BatchOrder, UserError
from losses import average_logprobs, dpo_loss, sequence_logprobs, sft_loss, simpo_loss
from model import GPT, GPTConfig, logprobs_from_logits

N_ROWS, T, VOCAB = 32, 9, 32


def make_cfg(out_dir, **kw):
    """Every key train_loop reads, for a tiny run that logs every step."""
    cfg = dict(out_dir=str(out_dir), batch_size=4, gradient_accumulation_steps=1, max_iters=6, eval_interval=100,
               log_interval=1, checkpoint_interval=0, always_save_checkpoint=False, keep_last=1,
               learning_rate=1e-2, min_lr=1e-3, warmup_iters=0, lr_decay_iters=0, decay_lr=False, grad_clip=1.0,
               max_nonfinite=3)
    cfg.update(kw)
    return cfg


def run(tmp_path, bad_steps, how="loss", nonfinite_skipped=0, **cfg_kw):
    """Train a tiny GPT with common.train_loop; the loss (or only its gradient) is NaN at calls in bad_steps.
    Returns (model, optimizer, params seen at the start of each step, cfg)."""
    rt = common.setup_runtime("cpu", "float32", seed=3)
    model = GPT(GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, dropout=0.0))
    data = torch.randint(0, VOCAB, (N_ROWS, T), generator=torch.Generator().manual_seed(0))
    optimizer = common.configure_optimizer(model, 0.1, 1e-2, (0.9, 0.99), "cpu")
    cfg = make_cfg(tmp_path, **cfg_kw)
    seen = []  # a copy of every parameter at the start of each step (compute_loss runs once per step here)

    def make_batch(indices):
        rows = data[indices]
        return {"idx": rows[:, :-1], "targets": rows[:, 1:], "n_tokens": rows[:, 1:].numel()}

    def compute_loss(batch):
        step = len(seen)
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        _, loss = model(batch["idx"], batch["targets"])
        if step in bad_steps:
            if how == "loss":
                loss = loss * float("nan")
            else:  # a finite loss (sqrt(0) = 0) whose gradient is 0 * inf = NaN
                loss = loss + torch.sqrt(model.lm_head.weight[0, 0] * 0.0)
        return loss, {}

    common.train_loop(rt, model, optimizer, cfg, BatchOrder(N_ROWS, 1), make_batch, compute_loss,
                      evaluate=lambda: {"score": 1.0}, describe=lambda r: "", tokenizer="byte",
                      nonfinite_skipped=nonfinite_skipped)
    return model, optimizer, seen, cfg


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_nonfinite_step_is_skipped_and_counted(tmp_path, how):
    bad = {2, 4}
    model, optimizer, seen, cfg = run(tmp_path, bad, how)
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    after = seen[1:] + [final]  # the parameters after step i
    for i in range(cfg["max_iters"]):
        # a skipped step leaves every parameter bit for bit as it was; a normal step changes them
        assert same(seen[i], after[i]) == (i in bad), f"step {i}"
    # AdamW counted only the steps it took (its moments and bias correction ignore the skipped ones)
    steps = {float(s["step"]) for s in optimizer.state.values()}
    assert steps == {cfg["max_iters"] - len(bad)}
    ckpt = common.load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))
    assert ckpt["nonfinite_skipped"] == len(bad)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    for state in ckpt["optimizer"]["state"].values():
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))
    # the metrics carry the running count from the first skipped step on
    counts = {r["iter"]: r.get("nonfinite_skipped", 0) for r in records(tmp_path) if "loss" in r}
    assert counts == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}
    if how == "grad":
        assert [r for r in records(tmp_path) if r["iter"] == 2 and "loss" in r][0]["grad_norm"] is None  # null, not NaN


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    # NaN from step 3 on, a checkpoint at iter 4 (after one skip): the 3rd bad step in a row (step 5) stops it
    with pytest.raises(UserError, match=r"3 non-finite steps in a row at iter 5"):
        run(tmp_path, bad_steps=set(range(3, 100)), max_iters=10, checkpoint_interval=4)
    ckpt = common.load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))
    assert ckpt["iter_num"] == 4 and ckpt["nonfinite_skipped"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nonfinite_steps_apart_do_not_stop_the_run(tmp_path):
    # two bad steps in a row, a good one, two more: never 3 in a row, so the run finishes with 4 skipped
    model, _, seen, cfg = run(tmp_path, bad_steps={1, 2, 4, 5}, max_iters=7)
    assert len(seen) == 7
    assert common.load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))["nonfinite_skipped"] == 4


def test_save_checkpoint_refuses_nonfinite_weights(tmp_path):
    model = GPT(GPTConfig(block_size=8, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16))
    path = os.path.join(tmp_path, "ckpt.pt")
    common.save_checkpoint(path, model, {"a": 1}, "byte", iter_num=1)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, 5] = float("inf")
    with pytest.raises(UserError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight.*not finite"):
        common.save_checkpoint(path, model, {"a": 1}, "byte", iter_num=2)
    # the previous checkpoint is untouched and no temporary file is left behind
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
    assert common.load_checkpoint(path)["iter_num"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_fully_masked_batch_gives_zero_loss_and_zero_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, VOCAB, (3, 8))
    token_logps = logprobs_from_logits(model(idx)[0], torch.roll(idx, -1, 1))  # (3, 8)
    logps, n_tokens = sequence_logprobs(token_logps, torch.zeros(3, 8))
    assert torch.equal(logps, torch.zeros(3)) and torch.equal(n_tokens, torch.zeros(3))
    loss = sft_loss(logps, n_tokens)
    assert loss.item() == 0.0  # 0 tokens: 0, never 0/0
    # the per-token averages of empty responses are 0 too, so the length-normalised losses stay finite
    assert torch.equal(average_logprobs(logps, n_tokens), torch.zeros(3))
    simpo, _, _ = simpo_loss(average_logprobs(logps, n_tokens), average_logprobs(logps, n_tokens), 2.0, 0.5)
    dpo, _, _ = dpo_loss(logps, logps, torch.zeros(3), torch.zeros(3), 0.1)
    (loss + simpo + dpo).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


def test_the_count_continues_across_a_resume(tmp_path):
    # a resumed run passes its checkpoint's count on (sft.py / dpo.py read it from ckpt.pt): 2 earlier + 1 now
    run(tmp_path, {1}, nonfinite_skipped=2)
    ckpt = common.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["nonfinite_skipped"] == 3
    assert [r.get("nonfinite_skipped") for r in records(tmp_path) if "loss" in r][1:3] == [3, 3]
