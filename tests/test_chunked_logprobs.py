"""The chunked log-prob path (--logprobs=chunked: the LM head only where a target is scored, logits a chunk of rows
at a time) against the plain one (logits everywhere, log_softmax, gather) and against float64 autograd: log-probs
and gradients, prompt-only rows, empty responses, padding, prefix-shared rows, tied weights, bf16 autocast,
torch.compile, DPO's ln 2 at step 0, and whole sft.py / dpo.py runs that log the same losses either way."""

import copy
import json
import math
import os

import pytest
import torch

from data import collate, collate_prefix_shared
from logprobs import (chunked_token_logps, completion_logps, concatenated_logps, logprob_path, prefix_shared_logps,
                      scored_columns, summed_logps)
from losses import dpo_loss
from model import GPT, GPTConfig, target_logps

E, PAD = 256, 257  # the byte tokenizer's EOS and padding ids


@pytest.fixture(scope="module")
def model():
    """A tiny GPT with larger weights than GPT-2's init, so log-probs and gradients depend on the context."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=258, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def pairs(seed=1):
    """Pairs of unequal prompt and response lengths: a one-token prompt, EOS-only responses, a long chosen."""
    g = torch.Generator().manual_seed(seed)
    lengths = [(3, 4, 2), (5, 1, 6), (1, 3, 3), (7, 2, 1), (2, 9, 5)]  # (prompt, chosen, rejected), EOS included
    rand = lambda n: torch.randint(0, 250, (n,), generator=g).tolist()  # noqa: E731
    return [(rand(p), rand(c - 1) + [E], rand(r - 1) + [E]) for p, c, r in lengths]


def logps_and_grads(model, fn, **kw):
    """The four (B,) tensors of a pair function and the gradients of a weighted sum of them, per parameter."""
    model.zero_grad(set_to_none=True)
    out = fn(model, pairs(), PAD, 32, "cpu", **kw)
    weights = torch.linspace(0.5, 1.5, len(out[0]))
    ((out[0] - 0.7 * out[1]) * weights).sum().backward()
    return [t.detach() for t in out], {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_close(a, b, rel=1e-5):
    for name in a:
        scale = a[name].abs().max().clamp(min=1e-12)
        assert (a[name] - b[name]).abs().max() <= rel * scale, name


# ---------------------------------------------------------------- the autograd Function

def test_target_logps_equal_log_softmax_with_gradients():
    """Against log_softmax of the full logits, for chunks smaller than, dividing, equal to and larger than N."""
    g = torch.Generator().manual_seed(0)
    N, C, V = 13, 8, 40
    hidden, weight = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g)
    targets, upstream = torch.randint(0, V, (N,), generator=g), torch.randn(N, generator=g)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = torch.log_softmax(h @ w.t(), dim=-1).gather(1, targets[:, None])[:, 0]
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (h, w))
    for chunk in (1, 4, 13, 100):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        got = target_logps(h, w, targets, chunk)
        assert got.shape == (N,) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-5)
        for a, b in zip(torch.autograd.grad((got * upstream).sum(), (h, w)), expected_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_gradcheck_in_float64():
    g = torch.Generator().manual_seed(1)
    N, C, V = 7, 5, 11
    hidden = torch.randn(N, C, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, C, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    assert target_logps(hidden, weight, targets, 3).dtype == torch.float64  # no float32 rounding in the check
    assert torch.autograd.gradcheck(lambda h, w: target_logps(h, w, targets, 3), (hidden, weight))
    # the second-order check is not claimed: backward is written by hand


def saved_for_backward(model, logprobs):
    """The shapes of the tensors autograd keeps between forward and backward of concatenated_logps, the LM
    head's weight left out."""
    shapes, weight_ptr = [], model.lm_head.weight.data_ptr()

    def pack(t):
        if t.data_ptr() != weight_ptr:
            shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        concatenated_logps(model, pairs(), PAD, 32, "cpu", logprobs=logprobs, chunk=4)
    return shapes


def test_no_vocabulary_sized_tensor_is_saved_for_backward(model):
    """The plain path keeps (N, V) log-softmax outputs for backward; the chunked path nothing with a vocabulary
    dimension but the LM head's weight itself."""
    V = model.config.vocab_size
    assert any(V in s for s in saved_for_backward(model, "plain"))  # the control: the check sees such copies
    assert not [s for s in saved_for_backward(model, "chunked") if V in s]


# ---------------------------------------------------------------- which columns are scored

def test_scored_columns_by_hand():
    rows = [([10, 11, 12], [20, 21, E]), ([30], [E]), ([40, 41], [])]  # the last one: prompt only
    idx, targets, mask = collate(rows, PAD)
    b = scored_columns({"idx": idx, "targets": targets, "mask": mask})
    # row 0 scores columns 2, 3, 4 (c0 c1 E); row 1 column 0 (E); row 2 nothing: padding slots, mask 0
    assert b["cols"].tolist() == [[2, 3, 4], [0, 1, 2], [0, 1, 2]]
    assert b["targets"].tolist() == [[20, 21, E], [E, PAD, PAD], [41, PAD, PAD]]
    assert b["mask"].tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    # rounded up to a multiple, for torch.compile's shapes (never past the row length)
    assert scored_columns({"idx": idx, "targets": targets, "mask": mask}, multiple=4)["cols"].shape == (3, 4)
    # a packed row: chosen and rejected columns, then the first rejected token from the last prompt column
    packed = collate_prefix_shared([([10, 11, 12], [20, 21, E], [30, E])], PAD)
    b = scored_columns(packed)
    assert b["cols"].tolist() == [[2, 3, 4, 5, 2]]
    assert b["targets"].tolist() == [[20, 21, E, E, 30]]
    assert b["chosen_mask"].tolist() == [[1, 1, 1, 0, 0]]
    assert b["rejected_mask"].tolist() == [[0, 0, 0, 1, 1]]


# ---------------------------------------------------------------- the chunked path equals the plain path

@pytest.mark.parametrize("chunk", [0, 1, 5, 1024])  # 0: every scored row's logits at once, kept for backward
def test_concatenated_chunked_equals_plain(model, chunk):
    plain, plain_grads = logps_and_grads(model, concatenated_logps)
    got, grads = logps_and_grads(model, concatenated_logps, logprobs="chunked", chunk=chunk)
    for a, b in zip(got, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert got[2].tolist() == [len(c) for _, c, _ in pairs()] and got[3].tolist() == [len(r) for _, _, r in pairs()]
    assert_grads_close(grads, plain_grads)


def test_prefix_shared_chunked_equals_the_plain_concatenated_forward(model):
    plain, plain_grads = logps_and_grads(model, concatenated_logps)
    for chunk in (3, 0):
        got, grads = logps_and_grads(model, prefix_shared_logps, logprobs="chunked", chunk=chunk)
        for a, b in zip(got, plain):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert_grads_close(grads, plain_grads)


def test_padding_to_a_multiple_changes_nothing(model):
    plain, plain_grads = logps_and_grads(model, concatenated_logps)
    for fn in (concatenated_logps, prefix_shared_logps):
        got, grads = logps_and_grads(model, fn, logprobs="chunked", chunk=7, multiple=16)
        for a, b in zip(got, plain):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert_grads_close(grads, plain_grads)


def test_prompt_only_rows_and_empty_responses(model):
    rows = [([1, 2, 3], [4, 5, E]), ([6, 7], []), ([8], [E])]
    plain, n = completion_logps(model, rows, PAD, 32, "cpu")
    assert plain[1].item() == 0.0 and n.tolist() == [3, 0, 1]
    for chunk in (1024, 0):
        logps, n = completion_logps(model, rows, PAD, 32, "cpu", logprobs="chunked", chunk=chunk)
        assert logps[1].item() == 0.0 and n.tolist() == [3, 0, 1]
        torch.testing.assert_close(logps, plain, rtol=0, atol=1e-5)
        # a batch where nothing is scored at all: K = 0 columns, zero log-probs, and a backward that runs
        model.zero_grad(set_to_none=True)
        logps, n = completion_logps(model, [([1, 2], []), ([3], [])], PAD, 32, "cpu", logprobs="chunked", chunk=chunk)
        assert logps.tolist() == [0.0, 0.0] and n.tolist() == [0, 0]
        logps.sum().backward()
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())


# ---------------------------------------------------------------- tied weights, autocast, compile

def test_tied_weights_get_both_gradients_once(model):
    """The LM head's gradient (from the Function) and the embedding's (from the lookup) land in one .grad, summed:
    equal to the sum of the two gradients of an untied copy with the same values."""
    tied, _ = logps_and_grads(model, concatenated_logps, logprobs="chunked", chunk=4)
    assert model.lm_head.weight is model.transformer.wte.weight
    tied_grad = model.lm_head.weight.grad.clone()
    untied = copy.deepcopy(model)
    untied.lm_head.weight = torch.nn.Parameter(untied.transformer.wte.weight.detach().clone())
    out, _ = logps_and_grads(untied, concatenated_logps, logprobs="chunked", chunk=4)
    torch.testing.assert_close(out[0], tied[0], rtol=0, atol=1e-6)
    head, embedding = untied.lm_head.weight.grad, untied.transformer.wte.weight.grad
    assert head.abs().sum() > 0 and embedding.abs().sum() > 0  # both uses contribute
    torch.testing.assert_close(tied_grad, head + embedding, rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk", [4, 0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_gives_float32_logprobs(model, dtype, chunk):
    """Under autocast the LM head's matmul runs in the low-precision dtype, as nn.Linear's does on the plain path;
    the log-probs come out float32, and both paths agree to the rounding of that dtype."""
    with torch.autocast("cpu", dtype=dtype):
        plain = concatenated_logps(model, pairs(), PAD, 32, "cpu")
        got = concatenated_logps(model, pairs(), PAD, 32, "cpu", logprobs="chunked", chunk=chunk)
        assert model(torch.tensor([[1, 2, 3]])).dtype == dtype  # autocast really was on
    assert got[0].dtype == got[1].dtype == torch.float32
    for a, b in zip(got[:2], plain[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0.1)  # summed over up to 9 tokens of ~2^-8 rounding
    model.zero_grad(set_to_none=True)
    got[0].sum().backward()  # the backward of the chunked head under autocast
    assert model.lm_head.weight.grad.dtype == torch.float32 and model.lm_head.weight.grad.abs().sum() > 0


def test_compiled_model_gives_the_same_logprobs_and_gradients(model):
    """torch.compile (the aot_eager backend: the same tracing, no code generation, quick on a CPU): the Function
    runs eagerly behind a graph break, with the same numbers."""
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=False, backend="aot_eager")
    plain, plain_grads = logps_and_grads(model, concatenated_logps)
    got, _ = logps_and_grads(compiled, concatenated_logps, logprobs="chunked", chunk=4)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for a, b in zip(got, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert_grads_close(grads, plain_grads)
    # traced into the graph, the backward's logits matmul would be merged with the forward's, whose (N, V)
    # output would then be kept for backward: the graph break keeps the Function eager
    assert not [s for s in saved_for_backward(compiled, "chunked") if model.config.vocab_size in s]
    # chunk=0 is plain autograd on the scored rows: traced into the graph, with the same numbers
    got, _ = logps_and_grads(compiled, concatenated_logps, logprobs="chunked", chunk=0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for a, b in zip(got, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert_grads_close(grads, plain_grads)
    torch._dynamo.reset()


# ---------------------------------------------------------------- DPO at step 0, and whole runs

def test_dpo_loss_at_step_zero_is_ln2(model):
    """Policy = a frozen copy: the same chunked computation with and without gradients gives bit-equal log-probs,
    so every reward is 0 and the loss is ln 2."""
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    for fn, chunk in ((concatenated_logps, 4), (prefix_shared_logps, 4), (concatenated_logps, 0)):
        pc, pr, _, _ = fn(model, pairs(), PAD, 32, "cpu", logprobs="chunked", chunk=chunk)
        with torch.no_grad():
            rc, rr, _, _ = fn(reference, pairs(), PAD, 32, "cpu", logprobs="chunked", chunk=chunk)
        assert torch.equal(pc.detach(), rc) and torch.equal(pr.detach(), rr)
        loss, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.5)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
        assert not chosen_rewards.any() and not rejected_rewards.any()


def test_chunked_token_logps_accepts_a_plain_batch_dict(model):
    """chunked_token_logps on a collate batch: per-token log-probs at the scored columns, whose gathered mask sums
    them to the plain path's sums (B,) with the token counts the mask holds."""
    rows = [([1, 2, 3], [4, 5, E]), ([6], [7, E])]
    idx, targets, mask = collate(rows, PAD)
    per_token, scored = chunked_token_logps(model, {"idx": idx, "targets": targets, "mask": mask}, "cpu", chunk=2)
    logps, n = summed_logps(per_token, scored["mask"])
    plain, _ = completion_logps(model, rows, PAD, 32, "cpu")
    torch.testing.assert_close(logps, plain, rtol=0, atol=1e-5)
    assert n.tolist() == [3, 2]


SFT = ["--n_layer=1", "--n_head=2", "--n_embd=48", "--max_iters=40", "--batch_size=32", "--learning_rate=3e-3",
       "--warmup_iters=5", "--eval_interval=40", "--log_interval=5", "--n_eval=50"]
DPO = ["--max_iters=6", "--batch_size=16", "--eval_interval=6", "--log_interval=1", "--n_pairs=64", "--n_samples=1",
       "--learning_rate=1e-3", "--min_lr=1e-3", "--n_eval=50"]


def logged(out_dir, key="loss"):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


def assert_same_records(a, b, keys, tol=1e-5):
    assert [r["iter"] for r in a] == [r["iter"] for r in b] and len(a) >= 6
    for ra, rb in zip(a, b):
        for k in keys:
            assert abs(ra[k] - rb[k]) <= tol * max(1.0, abs(ra[k])), (k, ra["iter"], ra[k], rb[k])


def test_sft_and_dpo_runs_log_the_same_losses_either_way(repo_root, tmp_path):
    from test_dpo_options import run_script
    for logprobs in ("plain", "chunked"):
        run_script(repo_root, "sft.py", SFT + [f"--out_dir={tmp_path / ('sft_' + logprobs)}", f"--logprobs={logprobs}",
                                               "--logprob_chunk=100"])
    run_script(repo_root, "sft.py", SFT + [f"--out_dir={tmp_path / 'sft_auto'}"])  # the default, 'auto'
    sft_plain, sft_chunked = logged(tmp_path / "sft_plain"), logged(tmp_path / "sft_chunked")
    assert logged(tmp_path / "sft_auto") == sft_plain  # 'auto' at the embedded task's vocabulary: plain, bit for bit
    assert sft_plain[-1]["loss"] < sft_plain[0]["loss"] - 1.0  # it trained: equality is not trivial
    assert_same_records(sft_plain, sft_chunked, ["loss", "grad_norm"])
    assert logged(tmp_path / "sft_plain", "task_accuracy") == logged(tmp_path / "sft_chunked", "task_accuracy")
    ckpt = str(tmp_path / "sft_plain" / "ckpt.pt")
    runs = {"dpo": [], "prefix": ["--prefix_sharing=True"], "kto": ["--loss_type=kto"],
            "kept": ["--logprob_chunk=0"]}  # kept: no chunks, the scored rows' logits kept for backward
    for name, extra in runs.items():
        for logprobs in ("plain", "chunked"):
            run_script(repo_root, "dpo.py", DPO + [f"--sft_ckpt={ckpt}", f"--out_dir={tmp_path / (name + logprobs)}",
                                                   f"--logprobs={logprobs}", "--logprob_chunk=50", *extra])
        plain, chunked = logged(tmp_path / (name + "plain")), logged(tmp_path / (name + "chunked"))
        assert plain[-1]["loss"] < plain[0]["loss"]
        assert_same_records(plain, chunked, ["loss", "rewards/chosen", "rewards/rejected", "grad_norm"])
        if name != "kto":
            assert chunked[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_the_memory_benchmark_predicts_chunks_not_full_logits():
    """bench_memory.predict with --logprobs=chunked: the log-prob path holds two chunks of logits, not three
    (rows, T, vocab) tensors."""
    from bench import memory as bench_memory
    shape = dict(n_layer=2, n_embd=32, vocab_size=258)
    plain, _ = bench_memory.predict("full", shape, 1000, tokens=10, rank=4)
    chunked, _ = bench_memory.predict("full", shape, 1000, tokens=10, rank=4, logprobs="chunked", chunk=4)
    assert plain["activations"] == 4 * 10 * (2 * 16 * 32) + 4 * 10 * 3 * 258
    assert chunked["activations"] == 4 * 10 * (2 * 16 * 32) + 4 * 2 * 4 * 258


def test_mfu_counts_the_lm_head_where_it_runs(model):
    """logger.model_flops_per_token with chunked log-probs: the head's 6VC FLOPs per trained token (2VC per
    forward-only pass) leave out the prompt's share of the tokens, by hand."""
    from nanopo.logger import model_flops_per_token
    rows = [([1, 2, 3], [4, E]), ([5, 6, 7, 8, 9], [10, 11, E])]  # 8 prompt tokens of 13
    VC = model.lm_head.weight.numel()
    for forward_only in (0, 1):
        plain = model_flops_per_token(model, rows, forward_only)
        assert plain == model.flops_per_token(6.5) + forward_only * model.flops_per_token(6.5, train=False)
        chunked = model_flops_per_token(model, rows, forward_only, logprobs="chunked")
        assert chunked == pytest.approx(plain - (6 + 2 * forward_only) * VC * 8 / 13, rel=1e-12)


def test_auto_picks_the_chunked_path_for_a_large_vocabulary():
    assert logprob_path("auto", 258) == "plain"      # the embedded task's bytes + specials: the head costs nothing
    assert logprob_path("auto", 50304) == "chunked"  # GPT-2's, padded
    assert logprob_path("auto", 4096) == "chunked" and logprob_path("auto", 4095) == "plain"
    assert logprob_path("plain", 50304) == "plain" and logprob_path("chunked", 258) == "chunked"  # as asked
