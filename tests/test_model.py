"""Tests for model.py: per-token log-probs against torch's cross-entropy, float32 log-probs under bf16 autocast,
the concatenated (right-padded) forward against one forward per sequence, batched generation against one
prompt at a time, EOS handling, seeded sampling, GPT-2's parameter layout and weight tying."""

import copy

import pytest
import torch
import torch.nn.functional as F

from data import collate_pairs
from logprobs import summed_logps, token_logps
from model import GPT, GPTConfig, KVCache

V = 258


def random_tokens(B, T, seed=0, high=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (B, T), generator=g)


def sharpen(model, std=0.2, seed=2):
    """Re-draw the weights so greedy decoding is context-dependent and free of near-ties (a freshly initialised
    GPT is almost uniform, where float rounding could flip an argmax; plain large random weights collapse onto
    one token). Biases 0, LayerNorm gains 1, unit-norm token embeddings so no token wins by its norm alone.
    With these settings the four PROMPTS below give 16 distinct tokens and top-2 logit gaps >= 0.01."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        wte = model.transformer.wte.weight
        wte.copy_(wte / wte.norm(dim=1, keepdim=True))
    return model


# ---------------------------------------------------------------- log-probs

def test_token_logprobs_equal_negative_cross_entropy(tiny_model):
    idx, targets = random_tokens(3, 20, seed=1), random_tokens(3, 20, seed=2)
    logits = tiny_model(idx)
    expected = -F.cross_entropy(logits.view(-1, V), targets.view(-1), reduction="none").view(3, 20)
    got = token_logps(tiny_model(idx), targets)
    assert got.shape == (3, 20) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # and in float64, from the definition log p = z_t - log sum_v exp(z_v)
    m64 = copy.deepcopy(tiny_model).double()
    z = m64(idx)
    by_hand = z.gather(2, targets[..., None])[..., 0] - torch.logsumexp(z, dim=-1)
    torch.testing.assert_close(got.double(), by_hand, rtol=0, atol=1e-5)


def test_cross_entropy_loss_is_mean_nll_ignoring_minus_one(tiny_model):
    """nanoGPT's training loss (cross-entropy, targets of -1 ignored) is the mean of the kept tokens'
    negative log-probs."""
    idx, targets = random_tokens(2, 10, seed=3), random_tokens(2, 10, seed=4)
    targets[0, :4] = -1
    logits = tiny_model(idx)
    loss = F.cross_entropy(logits.float().view(-1, V), targets.view(-1), ignore_index=-1)
    logps = token_logps(logits, targets.clamp(min=0))
    keep = targets != -1
    torch.testing.assert_close(loss, -logps[keep].mean(), rtol=0, atol=1e-6)


def test_token_logprobs_are_float32_under_bf16_autocast(tiny_model):
    idx, targets = random_tokens(2, 12, seed=5), random_tokens(2, 12, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = tiny_model(idx)
        got = token_logps(tiny_model(idx), targets)
    assert logits.dtype == torch.bfloat16  # autocast really was on
    assert got.dtype == torch.float32
    # the normaliser is computed from the upcast logits, not in bf16
    expected = torch.log_softmax(logits.double(), -1).gather(2, targets[..., None])[..., 0]
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    assert token_logps(logits, targets).dtype == torch.float32


def test_concatenated_forward_equals_separate_forwards(tiny_model):
    """Chosen and rejected rows of different lengths, right-padded into one batch: every real position's
    log-prob (and so each sequence's summed log-prob) equals that of the sequence run alone, unpadded."""
    pairs = [([5, 6, 7], [8, 9, 256], [10, 256]),
             ([11], [12, 13, 14, 15, 16, 17, 256], [18, 256]),
             ([20, 21, 22, 23, 24, 25], [26, 256], [27, 28, 29, 30, 256])]
    idx, targets, mask = collate_pairs(pairs, pad_id=257)
    batch_logps = token_logps(tiny_model(idx), targets)  # (2B, T)
    seqs = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    sums = []
    for b, s in enumerate(seqs):
        alone = token_logps(tiny_model(torch.tensor([s[:-1]])), torch.tensor([s[1:]]))[0]  # (len(s) - 1,)
        n = len(s) - 1
        assert (batch_logps[b, :n] - alone).abs().max() <= 1e-5
        prompt_len = len(pairs[b % len(pairs)][0])
        sums.append(alone[prompt_len - 1:].double().sum())  # the response + EOS targets only
    logps, n_tokens = summed_logps(batch_logps, mask)
    torch.testing.assert_close(logps.double(), torch.stack(sums), rtol=0, atol=1e-4)
    assert n_tokens.tolist() == [len(c) for _, c, _ in pairs] + [len(r) for _, _, r in pairs]


# ---------------------------------------------------------------- generation

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [40], [100, 101, 102], [9, 8]]


def test_batched_greedy_equals_one_prompt_at_a_time(tiny_model):
    model = sharpen(tiny_model)
    unused_eos = 300  # outside the vocabulary: no row stops early here
    batched = model.generate(PROMPTS, 10, eos_id=unused_eos, pad_id=257)
    alone = [model.generate([p], 10, eos_id=unused_eos, pad_id=257)[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(o) == 10 for o in batched)
    assert len({tuple(o) for o in alone}) > 1  # the outputs depend on the prompt, so the check has teeth
    # and greedy = repeated argmax of a plain forward, written out here without any padding
    for p, out in zip(PROMPTS, alone):
        seq = list(p)
        for _ in range(10):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert seq[len(p):] == out


def test_generation_stops_at_eos_per_row(tiny_model):
    """Choose as EOS a token that one prompt's greedy output reaches at step 3: that row must stop there (EOS
    not returned) while the other rows, which keep going, are unchanged."""
    model = sharpen(tiny_model)
    alone = [model.generate([p], 8, eos_id=300, pad_id=257)[0] for p in PROMPTS]
    eos, row = next((o[2], i) for i, o in enumerate(alone) if o[2] not in o[:2])
    expected = [o[:o.index(eos)] if eos in o else o for o in alone]
    assert expected[row] == alone[row][:2]
    assert model.generate(PROMPTS, 8, eos_id=eos, pad_id=257) == expected
    assert all(eos not in o for o in model.generate(PROMPTS, 8, eos_id=eos, pad_id=257, temperature=1.0))


def test_a_model_that_always_says_eos_returns_nothing(tiny_config):
    """Craft the weights so the next-token argmax is EOS everywhere: the final LayerNorm outputs a constant
    vector equal to EOS's (tied) embedding, which has by far the largest dot product with itself."""
    model = GPT(tiny_config).eval()
    eos = 256
    with torch.no_grad():
        model.transformer.wte.weight[eos] = 5.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[eos])
    assert model.generate(PROMPTS, 5, eos_id=eos, pad_id=257) == [[], [], [], []]


def test_seeded_sampling_is_reproducible(tiny_model):
    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return tiny_model.generate(PROMPTS, 12, eos_id=300, pad_id=257, temperature=1.0, generator=g, **kw)

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)  # a near-uniform model: 48 draws from ~258 tokens cannot all coincide
    # top_k = 1 sampling is greedy whatever the seed
    greedy = tiny_model.generate(PROMPTS, 12, eos_id=300, pad_id=257)
    assert sample(3, top_k=1) == greedy


def test_top_k_samples_only_the_k_most_likely(tiny_model):
    model = sharpen(tiny_model)
    p = [PROMPTS[0]]
    logits = model(torch.tensor(p))[0, -1]
    allowed = set(logits.topk(3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    firsts = {model.generate(p, 1, 300, 257, temperature=5.0, top_k=3, generator=g)[0][0] for _ in range(60)}
    assert firsts <= allowed and len(firsts) > 1


def test_kv_cache_step_equals_the_full_forward(tiny_model):
    """Logits of tokens fed one at a time through a KVCache (after a prefill of 5) equal the same positions of
    one plain forward over the whole sequence, in float64 so only the arithmetic order differs."""
    model = sharpen(tiny_model).double()
    seq = torch.tensor([[5, 17, 99, 3, 42, 250, 7, 7, 120, 64], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    full = model(seq)  # (2, 10, V)
    cache = KVCache(model.config.n_layer, max_len=10)
    steps = [model(seq[:, :5], cache=cache)] + [model(seq[:, t:t + 1], cache=cache) for t in range(5, 10)]
    assert cache.filled == 10
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)


def test_generation_with_and_without_the_cache_agrees(tiny_model):
    """Left padding, rows stopping at EOS at different steps, greedy and seeded sampling: the cached path and
    the re-run-everything path give the same tokens."""
    model = sharpen(tiny_model)
    eos = next(o[2] for o in (model.generate([p], 8, 300, 257)[0] for p in PROMPTS) if o[2] not in o[:2])
    for kw in ({}, {"temperature": 1.0}, {"temperature": 0.7, "top_k": 5}):
        outs = [model.generate(PROMPTS, 8, eos, 257, generator=torch.Generator().manual_seed(4), use_cache=c,
                               **kw) for c in (True, False)]
        assert outs[0] == outs[1], kw
        if not kw:  # greedy: one row stops at EOS, others run on, so padding joins mid-generation
            assert min(map(len, outs[0])) < 8 == max(map(len, outs[0]))


def test_generation_past_block_size_slides_a_window(tiny_model):
    """prompt + new tokens > block_size (32): the cache serves the first steps, then each step sees the last 32
    tokens at positions 0..31, like nanoGPT's generate, written out here with plain forwards."""
    model = sharpen(tiny_model)
    prompt = [(7 * i) % 250 for i in range(30)]
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(model(torch.tensor([seq[-32:]]))[0, -1].argmax()))
    for use_cache in (True, False):
        assert model.generate([prompt], 6, eos_id=300, pad_id=257, use_cache=use_cache) == [seq[30:]]
    # a batch with one prompt longer than block_size: that prompt is cut to its last 32 tokens
    batched = model.generate([prompt + [5, 6, 7], prompt[:5]], 4, eos_id=300, pad_id=257)
    assert batched == [model.generate([(prompt + [5, 6, 7])[-32:]], 4, 300, 257, use_cache=False)[0],
                       model.generate([prompt[:5]], 4, 300, 257)[0]]


def test_empty_prompt_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        tiny_model.generate([[1], []], 3, 256, 257)


# ---------------------------------------------------------------- parameter layout

def test_parameter_layout_matches_gpt2():
    C, L, T = 16, 1, 8
    model = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=2, n_embd=C))
    expected = {
        "transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C),
        "transformer.h.0.ln_1.weight": (C,), "transformer.h.0.ln_1.bias": (C,),
        "transformer.h.0.attn.c_attn.weight": (3 * C, C), "transformer.h.0.attn.c_attn.bias": (3 * C,),
        "transformer.h.0.attn.c_proj.weight": (C, C), "transformer.h.0.attn.c_proj.bias": (C,),
        "transformer.h.0.ln_2.weight": (C,), "transformer.h.0.ln_2.bias": (C,),
        "transformer.h.0.mlp.c_fc.weight": (4 * C, C), "transformer.h.0.mlp.c_fc.bias": (4 * C,),
        "transformer.h.0.mlp.c_proj.weight": (C, 4 * C), "transformer.h.0.mlp.c_proj.bias": (C,),
        "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,),
        "lm_head.weight": (V, C),
    }
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    # unique parameters: V*C + T*C + per layer (12 C^2 + 13 C) + the final LayerNorm's 2C
    n = V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C
    assert sum(p.numel() for p in model.parameters()) == n
    assert model.get_num_params(non_embedding=False) == n
    assert model.get_num_params() == n - T * C


def test_no_bias_config_drops_every_bias():
    model = GPT(GPTConfig(block_size=8, vocab_size=V, n_layer=1, n_head=2, n_embd=16, bias=False))
    assert not [k for k in model.state_dict() if k.endswith(".bias")]


def test_weight_tying(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.transformer.wte.weight
    # the output layer really uses the embedding table: logits are ln_f(x) @ wte^T
    idx = random_tokens(1, 6, seed=7)
    with torch.no_grad():
        x = tiny_model.transformer.wte(idx) + tiny_model.transformer.wpe(torch.arange(6))
        for block in tiny_model.transformer.h:
            x = block(x)
        expected = tiny_model.transformer.ln_f(x) @ tiny_model.transformer.wte.weight.T
    torch.testing.assert_close(tiny_model(idx), expected, rtol=0, atol=1e-5)
    # one gradient, reaching the table from both uses; and a deep copy keeps the tie
    tiny_model.zero_grad()
    targets = random_tokens(1, 6, seed=8)
    F.cross_entropy(tiny_model(idx).view(-1, V), targets.view(-1)).backward()
    assert tiny_model.lm_head.weight.grad is tiny_model.transformer.wte.weight.grad
    clone = copy.deepcopy(tiny_model)
    assert clone.lm_head.weight is clone.transformer.wte.weight


def test_last_only_matches_full_forward(tiny_model):
    idx = random_tokens(2, 9, seed=9)
    full = tiny_model(idx)
    last = tiny_model(idx, last_only=True)
    assert last.shape == (2, 1, V)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=0, atol=1e-6)
