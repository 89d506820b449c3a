"""
Packed rows on a CPU: which exact attention is fastest? Times a forward + backward of the model on one micro-batch
of pairs packed into one row (data.pack), with three ways to keep attention inside each segment:

  segments   model.Segments: the segments' q, k, v gathered into groups of similar length, each padded to its
             longest, causal SDPA there, the outputs moved back (what dpo.py and sft.py run on a CPU)
  mask       SDPA over the whole packed row with the block-diagonal boolean mask (every query against every key)
  padded     no packing: the padded rows of collate_pairs, causal SDPA (today's step, for scale)

Each is checked against the padded path's log-probs before timing. Lengths are drawn as bench/step_time.py's
--lengths=hh draws them (log-normal; prompts median 120 cut at 384, answers median 80 cut at 128).

$ python -m bench.packed_attention --size=small --batch_size=8 --steps=5
"""

import math
import statistics
import time

import torch

from configurator import apply_overrides
from data import collate_pairs
from logprobs import Packing, concatenated_logps, packed_batch, sums_by_id, token_logps
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------------------------------------
size = "small"            # 'small' (6 layers, 384 wide) or 'gpt2' (12 layers, 768 wide)
batch_size = 8            # pairs per micro-batch: 16 segments
steps = 5                 # timed steps per way (after one warm-up each), taking turns
seed = 0
# -----------------------------------------------------------------------------------------------------------
apply_overrides(globals())
SHAPES = {"small": (6, 6, 384), "gpt2": (12, 12, 768)}
n_layer, n_head, n_embd = SHAPES[size]
torch.manual_seed(seed)
g = torch.Generator().manual_seed(seed)


def lognormal(median, sigma, cap):
    """One length drawn log-normally around `median`, between 1 and `cap`."""
    return max(1, min(cap, round(math.exp(math.log(median) + sigma * torch.randn(1, generator=g).item()))))


V, E, PAD = 260, 258, 259
pairs = []
for _ in range(batch_size):
    prompt = torch.randint(0, 256, (lognormal(120, 0.8, 384),), generator=g).tolist()
    chosen = torch.randint(0, 256, (lognormal(80, 0.7, 128) - 1,), generator=g).tolist() + [E]
    rejected = torch.randint(0, 256, (lognormal(80, 0.7, 128) - 1,), generator=g).tolist() + [E]
    pairs.append((prompt, chosen, rejected))
model = GPT(GPTConfig(block_size=512, vocab_size=V, n_layer=n_layer, n_head=n_head, n_embd=n_embd))
B = len(pairs)
lengths = [len(p) + len(c) - 1 for p, c, _ in pairs] + [len(p) + len(r) - 1 for p, _, r in pairs]
idx, targets, mask = collate_pairs(pairs, PAD)
rows = {"idx": idx, "targets": targets, "mask": mask}
batch = packed_batch(rows, lengths, PAD, "cpu", 1, Packing(0))
# the block-diagonal mask over the packed row, (1, 1, T, T): same segment, key not after query
doc = batch["doc"][0]
T = doc.numel()
causal = torch.ones(T, T, dtype=torch.bool).tril()
dense = (causal & (doc[:, None] == doc[None, :]))[None, None]
print(f"{size}: {B} pairs, {len(lengths)} segments of {min(lengths)}-{max(lengths)} tokens: packed row {T} tokens, "
      f"padded {idx.numel()} ({1 - sum(lengths) / idx.numel():.0%} padding); {torch.get_num_threads()} threads")


def packed_loss(attn_mask):
    """The packed row's summed log-probs per response, (2B,), with the given attention."""
    logits = model(batch["idx"], pos=batch["pos"], attn_mask=attn_mask)
    rows_ = torch.arange(logits.size(0))[:, None]
    per_token = token_logps(logits[rows_, batch["cols"]], batch["targets"])
    return sums_by_id(per_token, batch["ids"], 2 * B)[0]


def padded_loss(_):
    """The padded rows' summed log-probs per response, (2B,): the reference."""
    chosen, rejected, _, _ = concatenated_logps(model, pairs, PAD, 512, "cpu")
    return torch.cat([chosen, rejected])


WAYS = {"segments": (packed_loss, batch["attn_mask"]), "mask": (packed_loss, dense), "padded": (padded_loss, None)}
with torch.no_grad():
    want = padded_loss(None)
    for name, (fn, attn) in WAYS.items():
        diff = (fn(attn) - want).abs().max().item()
        print(f"{name}: summed log-probs vs padded, max |diff| {diff:.1e}")
        assert diff < 1e-3 * want.abs().max().item()
times = {name: [] for name in WAYS}
for i in range(steps + 1):
    for name, (fn, attn) in WAYS.items():
        t0 = time.perf_counter()
        fn(attn).sum().backward()
        model.zero_grad(set_to_none=True)
        if i > 0:
            times[name].append((time.perf_counter() - t0) * 1000)
base = statistics.median(times["padded"])
for name, ts in times.items():
    ms = statistics.median(ts)
    print(f"{name:<10}{ms:>9.0f} ms fwd+bwd   {base / ms:.2f}x the padded step")
