"""Prefix sharing: one packed row [prompt | chosen | rejected] per pair must give the same log-probs and the same
gradients as the plain concatenated forward (two rows per pair, plain causal attention)."""

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from data import collate_pairs, collate_prefix_shared
from logprobs import prefix_shared_row_logps
from model import GPT, GPTConfig

E, PAD = 256, 257  # the byte tokenizer's EOS and padding ids


def test_layout_by_hand():
    # the docstring's example (with one pad column) and a longer pair that sets T = 7
    pairs = [([10, 11, 12], [20, 21, E], [30, E]),
             ([40, 41, 42, 43], [50, E], [60, 61, E])]
    b = collate_prefix_shared(pairs, PAD)
    assert b["idx"].tolist() == [[10, 11, 12, 20, 21, 30, PAD], [40, 41, 42, 43, 50, 60, 61]]
    assert b["targets"].tolist() == [[11, 12, 20, 21, E, E, PAD], [41, 42, 43, 50, E, 61, E]]
    assert b["pos"].tolist() == [[0, 1, 2, 3, 4, 3, 0], [0, 1, 2, 3, 4, 4, 5]]
    assert b["chosen_mask"].tolist() == [[0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0]]
    assert b["rejected_mask"].tolist() == [[0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1, 1]]
    assert b["first_index"].tolist() == [2, 3]
    assert b["first_target"].tolist() == [30, 60]
    expected = [
        ["x......",   # p0
         "xx.....",   # p1
         "xxx....",   # p2
         "xxxx...",   # c0
         "xxxxx..",   # c1
         "xxx..x.",   # r0: prompt and itself, not c0 c1
         "......x"],  # pad: only itself
        ["x......",   # p0
         "xx.....",   # p1
         "xxx....",   # p2
         "xxxx...",   # p3
         "xxxxx..",   # c0
         "xxxx.x.",   # r0
         "xxxx.xx"],  # r1
    ]
    got = [["".join("x" if v else "." for v in row) for row in b["attn_mask"][i, 0].tolist()] for i in range(2)]
    assert got == expected
    assert b["attn_mask"].shape == (2, 1, 7, 7) and b["attn_mask"].dtype == torch.bool


def test_length_and_bad_pairs():
    pairs = [([1, 2], [3, E], [4, E])]
    assert collate_prefix_shared(pairs, PAD, length=6)["idx"].shape == (1, 6)
    with pytest.raises(ValueError):
        collate_prefix_shared(pairs, PAD, length=3)  # needs 4 columns
    with pytest.raises(ValueError):
        collate_prefix_shared([([1], [], [4, E])], PAD)


def _plain_logps(model, pairs):
    """The reference: collate_pairs' two rows per pair, causal attention, log-probs via cross_entropy."""
    idx, targets, mask = collate_pairs(pairs, PAD)
    logits = model(idx)
    token_logps = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (2B, T)
    logps = (token_logps * mask).sum(-1)
    B = len(pairs)
    return logps[:B], logps[B:], mask.sum(-1)


def _pairs(seed):
    """Pairs of unequal prompt and response lengths, including a one-token prompt and EOS-only responses."""
    g = torch.Generator().manual_seed(seed)
    lengths = [(3, 4, 2), (5, 1, 6), (1, 3, 3), (7, 2, 1), (2, 5, 5)]  # (prompt, chosen, rejected) incl. EOS
    rand = lambda n: torch.randint(0, 250, (n,), generator=g).tolist()
    return [(rand(p), rand(c - 1) + [E], rand(r - 1) + [E]) for p, c, r in lengths]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=258, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    with torch.no_grad():  # larger weights than GPT-2's init, so log-probs depend clearly on the context
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_logps_and_gradients_match_plain_forward(model):
    pairs = _pairs(1)
    params = [p for p in model.parameters()]

    pc, pr, n = _plain_logps(model, pairs)
    plain_grads = torch.autograd.grad((pc - pr).sum(), params)

    batch = collate_prefix_shared(pairs, PAD)
    logits = model(batch["idx"], pos=batch["pos"], attn_mask=batch["attn_mask"])
    assert torch.isfinite(logits).all()  # padded query rows must not be NaN
    sc, sr, sc_n, sr_n = prefix_shared_row_logps(logits, batch)
    shared_grads = torch.autograd.grad((sc - sr).sum(), params)

    B = len(pairs)
    assert sc.dtype == torch.float32 and sc.shape == (B,)
    assert sc_n.tolist() == [len(c) for _, c, _ in pairs] == n[:B].tolist()
    assert sr_n.tolist() == [len(r) for _, _, r in pairs] == n[B:].tolist()
    assert (sc - pc).abs().max() <= 1e-5
    assert (sr - pr).abs().max() <= 1e-5
    for (name, _), g_plain, g_shared in zip(model.named_parameters(), plain_grads, shared_grads):
        scale = g_plain.abs().max().clamp(min=1e-12)
        assert (g_shared - g_plain).abs().max() <= 1e-5 * scale, name


def test_leaky_mask_is_detected(model):
    """Negative control: let the rejected branch see the chosen tokens and the log-probs must change."""
    pairs = _pairs(2)
    _, pr, _ = _plain_logps(model, pairs)
    batch = collate_prefix_shared(pairs, PAD)
    batch["attn_mask"] = batch["attn_mask"] | torch.ones_like(batch["attn_mask"]).tril()  # plain causal
    with torch.no_grad():
        logits = model(batch["idx"], pos=batch["pos"], attn_mask=batch["attn_mask"])
        _, sr, _, _ = prefix_shared_row_logps(logits, batch)
    assert (sr - pr).abs().max() > 1e-3


@pytest.mark.skipif(not model_module.FLEX_AVAILABLE, reason="this torch has no FlexAttention")
def test_flex_attention_block_mask_equals_the_boolean_mask():
    # what dpo.py runs on a GPU with --prefix_sharing (attention='auto'): the same mask as a FlexAttention
    # BlockMask. A CPU has no FlexAttention backward, so this checks the forward, without gradients.
    import warnings
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=32, vocab_size=40, n_layer=2, n_head=2, n_embd=16)).eval()
    pairs = [([1, 2, 3], [4, 5, 39], [6, 39]), ([7], [8, 39], [9, 10, 11, 39])]
    batch = collate_prefix_shared(pairs, pad_id=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention on a CPU warns that it is slow
        dense = gpt(batch["idx"], pos=batch["pos"], attn_mask=batch["attn_mask"])
        flex = gpt(batch["idx"], pos=batch["pos"], attn_mask=model_module.block_mask(batch["attn_mask"]))
    real = batch["attn_mask"][:, 0].diagonal(dim1=1, dim2=2) & (batch["idx"] != 0)  # non-padding positions
    assert (dense - flex)[real].abs().max().item() < 1e-5
