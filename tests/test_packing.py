"""Packing (--packing): several examples per row, no padding between them, must give the padded layout's
numbers. The reference is always the padded path (collate / collate_pairs / collate_prefix_shared and plain
causal or boolean-mask attention), a separate code path, or a layout written out by hand; float64 shows the
algorithm exact, float32 within rounding."""

import math

import pytest
import torch
import torch.nn.functional as F

from configurator import UserError
from data import attention_groups, check_pack_tokens, collate, collate_prefix_shared, pack, place_segments
from logprobs import Packing, completion_logps, concatenated_logps, packed_logps, prefix_shared_logps
from losses import dpo_loss
from model import GPT, GPTConfig, Segments
from test_ddp import assert_same_losses, run
from test_dpo_options import dpo, losses, run_script, sft_ckpt  # noqa: F401  (sft_ckpt: a fixture)
from test_resume import DPO_ARGS, SFT_TINY, assert_same_final_state, assert_same_metrics, prepare_resume
from test_resume import sft_full  # noqa: F401  (a fixture: the tiny SFT run DPO_ARGS start from)
from test_resume import run_script as run_subprocess

E, PAD = 256, 257  # the byte tokenizer's EOS and padding ids


# --------------------------------------------------------------------------------------------------------------
# The layout, by hand

def test_place_segments_by_hand():
    # budget 0: one row, in order
    assert place_segments([4, 3, 2]) == ([(0, 0), (0, 4), (0, 7)], 1)
    # first-fit decreasing in rows of 6: 4 opens row 0, 3 does not fit beside it (row 1), 2 does (row 0)
    assert place_segments([4, 3, 2], budget=6) == ([(0, 0), (1, 0), (0, 4)], 2)
    # two segments longer than half the budget never share a row (the short one joins the first)
    assert place_segments([5, 5, 1], budget=9) == ([(0, 0), (1, 0), (0, 5)], 2)
    with pytest.raises(UserError, match="pack_tokens=3: a row of 4 tokens does not fit"):
        place_segments([4, 3], budget=3)


def test_pack_of_three_rows_is_the_diagram():
    # data.py's diagram: segments of 4, 3 and 2 columns
    seqs = [([10, 11], [12, 13, E]), ([20], [21, 22, E]), ([30, 31], [E])]
    idx, targets, mask = collate(seqs, PAD)
    b = pack({"idx": idx, "targets": targets, "mask": mask}, [4, 3, 2], PAD)
    assert b["idx"].tolist() == [[10, 11, 12, 13, 20, 21, 22, 30, 31]]
    assert b["doc"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2]]
    assert b["pos"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert b["local"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    # attention's layout: the segments of 4 and 3 tokens in a group 4 wide, the one of 2 in a group of its own;
    # slot -> packed position (the slot past b's end: 0), packed position -> slot
    assert b["groups"] == [(2, 4), (1, 2)] and b["group_masks"] is None
    assert b["index"].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 7, 8]
    assert b["slot_real"].tolist() == [True] * 7 + [False] + [True] * 2
    assert b["inverse"].tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    # the scored tokens: response tokens and EOS, each with its row and its place in the response
    assert b["cols"].tolist() == [[1, 2, 3, 4, 5, 6, 8]]
    assert b["targets"].tolist() == [[12, 13, E, 21, 22, E, E]]
    assert b["ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2]]
    assert b["rank"].tolist() == [[1, 2, 3, 1, 2, 3, 1]]
    assert b["n_sums"] == 3 and b["seg_mask"] is None


def test_attention_groups_by_hand():
    # longest first; a segment under 3/4 of its group's longest starts a new group; widths rounded up
    assert attention_groups([4, 3, 2]) == [([0, 1], 4), ([2], 2)]
    assert attention_groups([10, 40, 31, 29, 12, 8], multiple=16) == [([1, 2], 48), ([3], 32), ([4, 0], 16),
                                                                      ([5], 16)]


def test_pack_in_two_rows_pads_the_shorter_and_rounds_up():
    seqs = [([10, 11], [12, 13, E]), ([20], [21, 22, E]), ([30, 31], [E])]
    idx, targets, mask = collate(seqs, PAD)
    b = pack({"idx": idx, "targets": targets, "mask": mask}, [4, 3, 2], PAD, budget=6, multiple=4)
    # rows of 6 (4 + 2, then 3), rounded up to 8; padding holds PAD and segment id -1
    assert b["idx"].tolist() == [[10, 11, 12, 13, 30, 31, PAD, PAD], [20, 21, 22, PAD, PAD, PAD, PAD, PAD]]
    assert b["doc"].tolist() == [[0, 0, 0, 0, 2, 2, -1, -1], [1, 1, 1, -1, -1, -1, -1, -1]]
    assert b["ids"].tolist() == [[0, 0, 0, 2], [1, 1, 1, -1]]  # row 1 padded to row 0's 4 entries with -1
    assert b["cols"][1, :3].tolist() == [0, 1, 2]


def test_pack_of_prefix_shared_pairs_by_hand():
    # pair 0 as in test_prefix's layout (P=3, C=3, R=2: 6 columns); pair 1 with a one-token prompt (3 columns)
    pairs = [([10, 11, 12], [20, 21, E], [30, E]), ([40], [50, E], [60, E])]
    b = pack(collate_prefix_shared(pairs, PAD), [6, 3], PAD)
    assert b["idx"].tolist() == [[10, 11, 12, 20, 21, 30, 40, 50, 60]]
    assert b["pos"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 1]]  # rejected restarts after the prompt
    # the last prompt column predicts c0 and r0 (ids 0..1 chosen, 2..3 rejected): it is scored twice
    assert b["cols"].tolist() == [[2, 2, 3, 4, 5, 6, 6, 7, 8]]
    assert b["targets"].tolist() == [[20, 30, 21, E, E, 50, 60, E, E]]
    assert b["ids"].tolist() == [[0, 2, 0, 0, 2, 1, 3, 1, 3]]
    assert b["rank"].tolist() == [[1, 1, 2, 3, 2, 1, 1, 2, 2]]
    assert b["n_sums"] == 4 and b["seg_mask"].shape == (2, 1, 6, 6)
    # attention: each pair in a group of its own (3 < 3/4 of 6), with its own mask cut to the group's width
    assert b["groups"] == [(1, 6), (1, 3)]
    # the second group's mask is pair 1's own prefix-shared mask, as collate_prefix_shared makes it alone
    assert torch.equal(b["group_masks"][1], collate_prefix_shared(pairs[1:], PAD)["attn_mask"])


def test_pack_tokens_below_the_longest_row_is_one_line():
    check_pack_tokens(0, 32)
    check_pack_tokens(32, 32)
    with pytest.raises(UserError, match=r"pack_tokens=31 cannot hold the longest row, 32 tokens"):
        check_pack_tokens(31, 32)
    with pytest.raises(UserError, match=r"use --pack_tokens=63 or more"):
        check_pack_tokens(40, 32, prefix_sharing=True)


# --------------------------------------------------------------------------------------------------------------
# Attention: segment by segment equals a block-diagonal mask written out by hand

DIAGRAM = ["x........",
           "xx.......",
           "xxx......",
           "xxxx.....",
           "....x....",
           "....xx...",
           "....xxx..",
           ".......x.",
           ".......xx"]


def segments_of(b):
    return Segments(b["index"], b["inverse"], b["doc"].flatten() >= 0, b["slot_real"], b["groups"],
                    b["group_masks"])


def test_segments_attention_equals_the_block_diagonal_mask():
    seqs = [([10, 11], [12, 13, E]), ([20], [21, 22, E]), ([30, 31], [E])]
    idx, targets, mask = collate(seqs, PAD)
    b = pack({"idx": idx, "targets": targets, "mask": mask}, [4, 3, 2], PAD)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 9, 24, generator=g, dtype=torch.float64)
    got = segments_of(b).attend(qkv, n_head=2)
    allowed = torch.tensor([[c == "x" for c in row] for row in DIAGRAM])

    def heads(x):
        return x.reshape(1, 9, 2, 4).transpose(1, 2)

    q, k, v = qkv.split(8, dim=2)
    want = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=allowed)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(1, 9, 8), rtol=0, atol=1e-12)


def test_segments_gradient_is_autograds_with_padding_between_rows():
    """model.Relayout's hand-written backward (a gather back) against autograd through the block-diagonal mask, on
    two packed rows with padding after their segments: the same gradient everywhere, 0 on the padding."""
    seqs = [([10, 11], [12, 13, E]), ([20], [21, 22, E]), ([30, 31], [E]), ([40, 41, 42], [43, E])]
    idx, targets, mask = collate(seqs, PAD)
    b = pack({"idx": idx, "targets": targets, "mask": mask}, [4, 3, 2, 4], PAD, budget=6, multiple=4)
    R, T = b["idx"].shape
    assert (b["doc"] == -1).sum() > 0  # there is packing padding to get wrong
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(R, T, 24, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(R, T, 8, generator=g, dtype=torch.float64) * (b["doc"] >= 0)[..., None]
    (segments_of(b).attend(qkv, n_head=2) * weights).sum().backward()
    got = qkv.grad.clone()
    qkv.grad = None
    doc, local = b["doc"], b["local"]
    same = (doc[:, :, None] == doc[:, None, :]) & (local[:, None, :] <= local[:, :, None])
    allowed = same | torch.eye(T, dtype=torch.bool)  # a padding column sees itself only
    q, k, v = (x.reshape(R, T, 2, 4).transpose(1, 2) for x in qkv.split(8, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
    (y.transpose(1, 2).reshape(R, T, 8) * weights).sum().backward()
    torch.testing.assert_close(got, qkv.grad, rtol=0, atol=1e-12)
    assert got[b["doc"] == -1].abs().max().item() == 0.0


@pytest.mark.parametrize("prefix_sharing,budget,multiple", [(False, 0, 1), (True, 0, 1), (False, 24, 16),
                                                            (True, 40, 16)])
def test_flex_document_mask_equals_segments(prefix_sharing, budget, multiple):
    """FlexAttention (what a GPU runs) against model.Segments (what a CPU runs), forward only: torch 2.13 has no
    FlexAttention backward on a CPU. With a budget and rounding, rows end in padding (doc -1)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    pairs = random_pairs(5, seed=3)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)).eval().requires_grad_(False)
    seg = packed_logps(model, pairs, PAD, 64, "cpu", multiple, packing=Packing(budget),
                       prefix_sharing=prefix_sharing)
    flex = packed_logps(model, pairs, PAD, 64, "cpu", multiple, packing=Packing(budget, flex=True),
                        prefix_sharing=prefix_sharing)
    for a, b in zip(seg, flex):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Log-probs and gradients against the padded path

def random_pairs(n, seed):
    """Mixed lengths, with the corner cases: an empty response (EOS alone), one-token prompts, a long pair."""
    g = torch.Generator().manual_seed(seed)

    def tokens(k):
        return torch.randint(0, 256, (k,), generator=g).tolist()

    def length(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    pairs = [(tokens(length(1, 12)), tokens(length(0, 10)) + [E], tokens(length(0, 10)) + [E]) for _ in range(n)]
    pairs[0] = (tokens(1), [E], tokens(3) + [E])  # empty chosen response, one-token prompt
    # longer than half of the budgets below: 21 columns of 24 (chosen row), of 40 (prefix-shared)
    pairs[1] = (tokens(12), tokens(9) + [E], [E])
    return pairs


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=258, n_layer=2, n_head=2, n_embd=32)).to(dtype)


# (prefix sharing, log-prob path, budget, multiple): budget 24 / 40 leaves the long pair a row of its own and
# the rows padding at their ends; multiple 16 is compile's rounding (of T, K and the attention groups)
LAYOUTS = [(prefix, path, budget, multiple) for prefix in (False, True) for path in ("plain", "chunked")
           for budget, multiple in ((0, 1), (24 + 16 * prefix, 1), (0, 16))]


@pytest.mark.parametrize("prefix_sharing,logprobs,pack_tokens,multiple", LAYOUTS)
def test_packed_logps_equal_the_padded_ones(prefix_sharing, logprobs, pack_tokens, multiple):
    pairs = random_pairs(7, seed=1)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-11)):
        model = tiny_model(dtype).eval()
        with torch.no_grad():
            padded = concatenated_logps(model, pairs, PAD, 32, "cpu", logprobs=logprobs)
            packed = packed_logps(model, pairs, PAD, 32, "cpu", multiple, packing=Packing(pack_tokens),
                                  prefix_sharing=prefix_sharing, logprobs=logprobs)
        # per-token means within 1e-5 (float32); the sums (~100, whose last float32 bit is 7.6e-6) relative
        for a, b, n in zip(padded[:2], packed[:2], padded[2:]):
            assert (a / n.clamp(min=1) - b / n.clamp(min=1)).abs().max().item() <= tolerance, (dtype, a - b)
            assert ((a - b).abs() / a.abs().clamp(min=1)).max().item() <= tolerance, (dtype, a - b)
        # and the DPO loss of the two against a reference that differs
        shift = torch.linspace(-1, 1, len(pairs), dtype=dtype)
        loss_padded = dpo_loss(padded[0], padded[1], padded[0] + shift, padded[1] - shift, beta=0.5)[0]
        loss_packed = dpo_loss(packed[0], packed[1], padded[0] + shift, padded[1] - shift, beta=0.5)[0]
        assert abs(loss_padded.item() - loss_packed.item()) <= tolerance
        # the token counts by hand: response + EOS
        assert packed[2].tolist() == [len(c) for _, c, _ in pairs]
        assert packed[3].tolist() == [len(r) for _, _, r in pairs]


def test_compile_rounding_never_makes_a_group_wider_than_its_rows():
    """multiple 16 rounds a group of 39-column prefix-shared rows up to 48 slots, but rows of block_size 20 are
    at most 40 wide: the group must stop at 40 (it once did not, and SDPA failed on the shapes)."""
    g = torch.Generator().manual_seed(7)
    pairs = [([1], torch.randint(0, 256, (19,), generator=g).tolist() + [E],
              torch.randint(0, 256, (19,), generator=g).tolist() + [E]), ([2, 3], [4, E], [5, E])]
    model = tiny_model(torch.float64).eval()
    with torch.no_grad():
        padded = prefix_shared_logps(model, pairs, PAD, 20, "cpu", 16)
        packed = packed_logps(model, pairs, PAD, 20, "cpu", 16, prefix_sharing=True)
    for a, b in zip(padded, packed):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_ld_dpo_and_wpo_packed_equal_padded(prefix_sharing):
    pairs = random_pairs(6, seed=2)
    model = tiny_model(torch.float64).eval()
    with torch.no_grad():
        for options in ({"ld_alpha": 0.3}, {"wpo": True}):
            padded = concatenated_logps(model, pairs, PAD, 32, "cpu", **options)
            packed = packed_logps(model, pairs, PAD, 32, "cpu", packing=Packing(40 if not prefix_sharing else 70),
                                  prefix_sharing=prefix_sharing, **options)
            assert len(padded) == len(packed)
            for a, b in zip(padded, packed):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_prefix_shared_packing_equals_unpacked_prefix_sharing():
    pairs = random_pairs(5, seed=4)
    model = tiny_model(torch.float64).eval()
    with torch.no_grad():
        unpacked = prefix_shared_logps(model, pairs, PAD, 32, "cpu", logprobs="chunked")
        packed = packed_logps(model, pairs, PAD, 32, "cpu", prefix_sharing=True, logprobs="chunked")
    for a, b in zip(unpacked, packed):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_sft_rows_and_a_prompt_only_row():
    # SFT's rows, one with no response at all (no scored token): its sum and count are 0 on both paths
    g = torch.Generator().manual_seed(5)
    seqs = [(torch.randint(0, 256, (n,), generator=g).tolist(), torch.randint(0, 256, (m,), generator=g).tolist()
             + [E]) for n, m in ((3, 9), (12, 0), (1, 4), (7, 14))]
    seqs.append(([1, 2, 3, 4], []))
    model = tiny_model(torch.float64).eval()
    with torch.no_grad():
        for logprobs in ("plain", "chunked"):
            padded = completion_logps(model, seqs, PAD, 32, "cpu", logprobs=logprobs)
            packed = completion_logps(model, seqs, PAD, 32, "cpu", logprobs=logprobs, packing=Packing(0))
            torch.testing.assert_close(padded[0], packed[0], rtol=0, atol=1e-11)
            assert packed[1].tolist() == padded[1].tolist() == [10, 1, 5, 15, 0]
            assert packed[0][-1].item() == 0.0


GRADIENT_CASES = [
    # (prefix sharing, log-prob path, budget, multiple, LD-DPO's alpha, activation checkpointing)
    (False, "plain", 0, 1, 1.0, False),
    (False, "chunked", 24, 16, 1.0, False),
    (True, "plain", 40, 1, 0.5, False),
    (True, "chunked", 0, 16, 1.0, True),
    (False, "chunked", 24, 1, 0.5, "selective"),
]


@pytest.mark.parametrize("prefix_sharing,logprobs,budget,multiple,ld_alpha,checkpointing", GRADIENT_CASES)
def test_gradients_equal_in_float64(prefix_sharing, logprobs, budget, multiple, ld_alpha, checkpointing):
    """Every parameter's gradient of a DPO loss, packed against padded, in float64; with padding at the packed
    rows' ends (budget, multiple) and with activation checkpointing, which runs model.Relayout's forward again."""
    from model import set_grad_checkpoint
    pairs = random_pairs(6, seed=6)
    policy = tiny_model(torch.float64)
    reference = tiny_model(torch.float64).requires_grad_(False)
    with torch.no_grad():  # a reference that differs, so the loss is not at ln 2 and every term has a gradient
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def grads(logps_fn, checkpoint=False):
        set_grad_checkpoint(policy, checkpoint)
        policy.zero_grad()
        with torch.no_grad():
            ref = logps_fn(reference)
        pol = logps_fn(policy)
        loss = dpo_loss(pol[0], pol[1], ref[0], ref[1], beta=0.5)[0]
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in policy.named_parameters()}

    loss_a, a = grads(lambda m: concatenated_logps(m, pairs, PAD, 32, "cpu", logprobs=logprobs,
                                                   ld_alpha=ld_alpha))
    loss_b, b = grads(lambda m: packed_logps(m, pairs, PAD, 32, "cpu", multiple, packing=Packing(budget),
                                             prefix_sharing=prefix_sharing, logprobs=logprobs,
                                             ld_alpha=ld_alpha), checkpointing)
    assert abs(loss_a - loss_b) < 1e-12 and abs(loss_a - math.log(2)) > 1e-3
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-11, msg=name)


def test_packing_under_bf16_autocast_stays_within_bf16_rounding():
    pairs = random_pairs(6, seed=8)
    model = tiny_model().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        padded = concatenated_logps(model, pairs, PAD, 32, "cpu", logprobs="chunked")
        packed = packed_logps(model, pairs, PAD, 32, "cpu", packing=Packing(24), logprobs="chunked")
    assert packed[0].dtype == torch.float32  # log-probs stay float32 under autocast
    for a, b, n in zip(padded[:2], packed[:2], padded[2:]):
        assert (a / n.clamp(min=1) - b / n.clamp(min=1)).abs().max().item() < 2e-2


def test_flex_tiles_cover_every_pair_that_may_attend():
    """model.document_block_mask lists tiles from the segments' extents; on a CPU FlexAttention computes
    every tile anyway, so the outputs cannot tell a missing tile. Checked here directly: every (query, key) that
    the mask allows lies in a listed tile, and tiles no segment spans are left out."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from model import document_block_mask
    pairs = random_pairs(7, seed=9)
    for prefix_sharing, budget in ((False, 0), (True, 0), (False, 24), (True, 40)):
        rows = collate_prefix_shared(pairs, PAD)
        lengths = [len(p) + len(c) + len(r) - 2 for p, c, r in pairs]
        if not prefix_sharing:
            idx, targets, mask = collate([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], PAD)
            rows = {"idx": idx, "targets": targets, "mask": mask}
            lengths = [len(p) + len(y) - 1 for p, y in [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]]
        b = pack(rows, lengths, PAD, budget)
        R, T = b["doc"].shape
        blocks = document_block_mask(b["doc"], b["local"], b["seg_mask"], block=4)
        n = -(-T // 4)
        listed = torch.zeros(R, n, n, dtype=torch.bool)
        for r in range(R):
            for q in range(n):
                count = blocks.kv_num_blocks[r, 0, q]
                listed[r, q, blocks.kv_indices[r, 0, q, :count].long()] = True
        # what may attend, from the segment ids and places alone (the diagram's rule)
        doc, local = b["doc"], b["local"]
        allowed = (doc[:, :, None] == doc[:, None, :]) & (local[:, None, :] <= local[:, :, None])
        allowed &= (doc >= 0)[:, :, None]
        pad = torch.zeros(R, n * 4, n * 4, dtype=torch.bool)
        pad[:, :T, :T] = allowed
        needed = pad.view(R, n, 4, n, 4).any(4).any(2)
        assert not (needed & ~listed).any(), (prefix_sharing, budget)
        assert listed.sum() < R * n * (n + 1) // 2  # sparser than causal over the whole row


# --------------------------------------------------------------------------------------------------------------
# The scripts: packed runs log the padded runs' losses

def records_of(out_dir, key):
    import json
    import os
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


def assert_same_per_step(a_dir, b_dir, keys=("loss",), atol=1e-5):
    a, b = records_of(a_dir, "loss"), records_of(b_dir, "loss")
    assert [r["iter"] for r in a] == [r["iter"] for r in b] and len(a) >= 6
    for ra, rb in zip(a, b):
        for key in keys:
            # within 1e-5, relative above 1 (a gradient norm of 7 has float32 steps of 5e-7)
            assert abs(ra[key] - rb[key]) <= atol * max(1.0, abs(ra[key])), (key, ra["iter"], ra[key], rb[key])
    assert a[0]["loss"] != a[-1]["loss"]  # it trained, so equality is not trivial


LOSS_TYPES = ["dpo", "ipo", "hinge", "simpo", "orpo", "kto", "sft", "dpo_norm", "robust", "exo", "nca", "bco",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop"]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_logs_the_same_losses_packed(loss_type, repo_root, sft_ckpt, tmp_path):  # noqa: F811
    extra = [f"--loss_type={loss_type}"] + (["--beta=2.0"] if loss_type == "simpo" else [])
    dpo(repo_root, sft_ckpt, tmp_path / "padded", *extra)
    dpo(repo_root, sft_ckpt, tmp_path / "packed", *extra, "--packing=True")
    assert_same_per_step(tmp_path / "padded", tmp_path / "packed", ("loss", "grad_norm"))
    if loss_type == "dpo":
        assert abs(losses(tmp_path / "packed")[0] - math.log(2)) < 1e-6  # policy = reference at step 0


@pytest.mark.parametrize("extra,budget", [(["--prefix_sharing=True", "--logprobs=chunked"], 0),
                                          (["--precompute_ref=True", "--logprobs=chunked"], 64),
                                          (["--prefix_sharing=True", "--precompute_ref=True", "--ld_alpha=0.5"], 70),
                                          (["--use_weighting=True", "--gradient_accumulation_steps=2"], 0)],
                         ids=["prefix-chunked", "precomputed-budget", "prefix-precomputed-ld", "wpo-accumulation"])
def test_dpo_options_log_the_same_losses_packed(extra, budget, repo_root, sft_ckpt, tmp_path):  # noqa: F811
    dpo(repo_root, sft_ckpt, tmp_path / "padded", *extra)
    dpo(repo_root, sft_ckpt, tmp_path / "packed", *extra, "--packing=True", f"--pack_tokens={budget}")
    assert_same_per_step(tmp_path / "padded", tmp_path / "packed", ("loss", "rewards/margins", "grad_norm"))


@pytest.mark.parametrize("extra,budget", [([], 0), (["--logprobs=chunked"], 40)])
def test_sft_logs_the_same_losses_packed(extra, budget, repo_root, tmp_path):
    args = SFT_TINY + ["--max_iters=8", "--eval_interval=4", "--dropout=0.0", *extra]
    run_script(repo_root, "sft.py", args + [f"--out_dir={tmp_path / 'padded'}"])
    run_script(repo_root, "sft.py", args + [f"--out_dir={tmp_path / 'packed'}", "--packing=True",
                                            f"--pack_tokens={budget}"])
    assert_same_per_step(tmp_path / "padded", tmp_path / "packed", ("loss", "grad_norm"))


def test_settings_that_make_no_sense_are_one_line(repo_root, sft_ckpt, tmp_path):  # noqa: F811
    with pytest.raises(UserError, match="pack_tokens=64 without packing=True does nothing"):
        dpo(repo_root, sft_ckpt, tmp_path, "--pack_tokens=64")
    with pytest.raises(UserError, match="pack_tokens=10 cannot hold the longest row"):
        dpo(repo_root, sft_ckpt, tmp_path, "--packing=True", "--pack_tokens=10")
    with pytest.raises(UserError, match="pack_tokens=-1 makes no sense"):
        run_script(repo_root, "sft.py", SFT_TINY + ["--packing=True", "--pack_tokens=-1", f"--out_dir={tmp_path}"])


# --------------------------------------------------------------------------------------------------------------
# DDP and resume

TINY_SFT = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=8", "--max_iters=6", "--eval_interval=3",
            "--log_interval=1", "--n_eval=51"]
TINY_DPO = ["--batch_size=8", "--max_iters=6", "--eval_interval=3", "--log_interval=1", "--n_pairs=40",
            "--n_samples=1", "--learning_rate=1e-3", "--min_lr=1e-3", "--packing=True"]


def test_packed_dpo_on_two_processes_equals_one(repo_root, script_env, tmp_path):
    run(["sft.py", *TINY_SFT, "--packing=True", f"--out_dir={tmp_path / 'sft'}"], repo_root, script_env)
    ckpt = f"--sft_ckpt={tmp_path / 'sft' / 'ckpt.pt'}"
    run(["dpo.py", *TINY_DPO, "--gradient_accumulation_steps=2", ckpt, f"--out_dir={tmp_path / 'one'}"],
        repo_root, script_env)
    run(["dpo.py", *TINY_DPO, "--gradient_accumulation_steps=1", "--batch_size=16", ckpt,
         f"--out_dir={tmp_path / 'two'}"], repo_root, script_env, nproc=2)
    assert_same_losses(tmp_path / "one", tmp_path / "two", ["loss", "rewards/margins", "grad_norm"])


def test_packed_sft_with_a_budget_on_two_processes_equals_one(repo_root, script_env, tmp_path):
    run(["sft.py", *TINY_SFT, "--packing=True", "--pack_tokens=40", "--gradient_accumulation_steps=2",
         f"--out_dir={tmp_path / 'one'}"], repo_root, script_env)
    run(["sft.py", *TINY_SFT, "--packing=True", "--pack_tokens=40", "--gradient_accumulation_steps=2",
         f"--out_dir={tmp_path / 'two'}"], repo_root, script_env, nproc=2)
    assert_same_losses(tmp_path / "one", tmp_path / "two", ["loss", "grad_norm"])


def test_grpo_has_no_packing_and_says_so(repo_root, script_env, tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "grpo.py", "--packing=True", f"--out_dir={tmp_path}"], cwd=repo_root,
                          env=script_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "unknown config key 'packing'" in proc.stderr + proc.stdout


def assert_resume_is_exact(script, args, k, tmp_path, script_env):
    """The uninterrupted run against one resumed from its checkpoint of iter k: the same metrics, the same
    final weights and optimizer state bit for bit."""
    run_subprocess(script, args + [f"--out_dir={tmp_path / 'full'}"], tmp_path, script_env)
    prepare_resume(tmp_path / "full", tmp_path / "resumed", k)
    out = run_subprocess(script, args + [f"--out_dir={tmp_path / 'resumed'}", "--init_from=resume"], tmp_path,
                         script_env)
    assert f"from iter {k}" in out
    assert_same_metrics(tmp_path / "full", tmp_path / "resumed")
    assert_same_final_state(tmp_path / "full", tmp_path / "resumed")


def test_packed_sft_resume_is_exact(tmp_path, script_env):
    # dropout > 0: the resumed run must draw the same masks on the packed rows
    args = SFT_TINY + ["--max_iters=8", "--dropout=0.1", "--eval_interval=4", "--checkpoint_interval=3",
                       "--keep_last=10", "--packing=True"]
    assert_resume_is_exact("sft.py", args, 3, tmp_path, script_env)


def test_packed_dpo_resume_is_exact(sft_full, tmp_path, script_env):  # noqa: F811
    args = DPO_ARGS + [f"--sft_ckpt={sft_full / 'ckpt.pt'}", "--packing=True", "--prefix_sharing=True"]
    assert_resume_is_exact("dpo.py", args, 2, tmp_path, script_env)


def test_flex_is_never_chosen_with_attention_dropout():
    from types import SimpleNamespace

    from nanopo.runtime import use_flex_attention
    gpu = SimpleNamespace(device_type="cuda")
    assert use_flex_attention("auto", True, gpu) is True
    assert use_flex_attention("auto", True, gpu, dropout=0.1) is False  # model.Segments, which has dropout
    with pytest.raises(UserError, match="attention='flex' with dropout=0.1: FlexAttention has no attention"):
        use_flex_attention("flex", True, gpu, dropout=0.1)


def test_compiled_packed_sft_logs_the_eager_losses_without_recompiling(repo_root, script_env, tmp_path):
    """torch.compile around packed rows: model.Segments runs eagerly inside the compiled model (its shapes change
    with every batch), so no step after the first recompiles, and the losses are the eager run's."""
    env = dict(script_env, TORCHINDUCTOR_COMPILE_THREADS="1")
    args = ["sft.py", *TINY_SFT, "--max_iters=8", "--packing=True"]
    run(args + [f"--out_dir={tmp_path / 'eager'}"], repo_root, env)
    stdout = run(args + ["--compile=True", f"--out_dir={tmp_path / 'compiled'}"], repo_root, env, timeout=600)
    assert "torch.compile: 0 recompiles after the first step" in stdout, stdout[-1500:]
    assert_same_per_step(tmp_path / "eager", tmp_path / "compiled", ("loss",), atol=1e-5)
