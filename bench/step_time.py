"""
Step-time benchmark: how much does a preference-optimisation step cost next to an SFT step, and what do the
faster DPO configurations buy? Times, after warm-up, kinds of optimizer step on random tokens:

  sft                 fwd + bwd + AdamW on 2B sequences [prompt | response]          (per example: a sequence)
  dpo_live            policy fwd + bwd on the concatenated 2B rows (chosen, rejected),
                      reference fwd on the same rows under no_grad                     (per example: a pair)
  dpo_precomputed     as dpo_live, the reference log-probs computed once beforehand   (per example: a pair)
  prefix_live         one packed row [prompt | chosen | rejected] per pair (data.collate_prefix_shared):
                      B rows instead of 2B, the prompt run once, for policy and reference
  prefix_precomputed  packed rows, precomputed reference log-probs
  <kind>_chunked      each of the above with --logprobs=chunked (logprobs.py): the LM head only at the response
                      positions, log-probs a chunk of logit rows at a time, with --grad_checkpoint's checkpointing
  <kind>_packed       each of the ten above with --packing=True (data.pack, "Packing"): the step's rows laid end to
                      end, no padding between them, each keeping its positions and attending within itself
                      (logprobs.packed_batch, then packed_batch_logps and sums_by_id in the step, as dpo.py and
                      sft.py run it); one packed row per step, or rows of at most --pack_tokens tokens. E.g.
                      dpo_live_chunked_packed: the packed twin of dpo_live_chunked

and the peak memory of one step of each kind after a warm-up step: on CUDA max_memory_allocated,
reset before the step; on a CPU the peak RSS of a fresh process running that kind alone, its peak
mark reset before (bench/measure.py); and generation: the B prompts continued greedily by
response_len - 1 tokens with model.generate, with its KV cache and without, the outputs checked
equal.

Every step is what dpo.py / sft.py run: model.GPT, nanopo.runtime.configure_optimizer (AdamW),
losses.dpo_loss / losses.sft_loss, data.collate_pairs / data.collate_prefix_shared / data.pack, gradient
clipping at 1.0. Batches are collated (packed) and moved to the device before timing (collation is timed on
its own: collate_ms). The kinds take turns step by step; ms/step is the median over the timed
steps.

Lengths (--lengths). By default every pair has prompt_len prompt tokens and two responses of response_len tokens
(EOS included): no row is padded, packing has nothing to remove, and one batch serves every step. Real preference
data varies several-fold in length, and a padded batch runs every row at its longest row's length. --lengths gives
the pairs realistic lengths (the token ids stay random):

  --lengths=hh              HH-RLHF-like (multi-turn prompts, short answers), log-normal: prompts median 120 tokens,
                            sigma 0.8, cut at 384; answers median 80, sigma 0.7, cut at 128
  --lengths=ultrafeedback   UltraFeedback-like (shorter prompts, long answers), log-normal: prompts median 100,
                            sigma 0.9, cut at 512; answers median 250, sigma 0.7, cut at 512
  --lengths=FILE            the lengths of pairs from a preference file (any nanopo.formats reads: 'prompt',
                            'chosen', 'rejected'), tokenised with the size's tokenizer ('byte' for tiny and small,
                            GPT-2's BPE for the gpt2 sizes, which needs TIKTOKEN_CACHE_DIR offline), EOS appended, cut
                            to the size's block_size as data.truncate cuts training rows; pairs drawn from its rows
                            at random, cycling through them when it has fewer than needed

The named distributions' parameters (LENGTHS below) are chosen to resemble each dataset's published character;
they are not fitted here (no network). Chosen and rejected lengths are drawn independently from the answer
distribution, every length at least 1 (an answer holds its EOS), from a fixed seed: runs are reproducible. With
--lengths the run draws n_batches batches of batch_size pairs, and step j of every kind (warm-up steps included)
runs batch j % n_batches, so all kinds see the same batches in the same order; ms/step is then the mean over the
batches of each batch's median step time (take steps a multiple of n_batches, so every batch is timed alike), and
a kind's peak memory the largest over one measured step per batch after a warm-up step. The position table grows
to the longest row where the size's block_size is shorter (hh on tiny); FILE lengths are cut to block_size.

Padding fraction (pad%): the share of a step's row tokens that are padding: 2B concatenated rows padded to the
longest (dpo_*, and SFT's 2B rows alike), B prefix-shared rows padded to the longest (prefix_*), and for the
packed kinds what packing leaves (the columns after a packed row's last segment: none with pack_tokens 0); the
mean over the batches. Rows of one length (no --lengths) have none.

FLOPs are counted as nanoGPT's estimate_mfu does: a token of fwd + bwd costs 6N + 12*L*H*Q*T (N = parameters
without the position table, L layers, H heads, Q head size, T the row length), a forward-only token a third of
that. Per example, live DPO costs 2 sequences x (fwd + bwd) + 2 x fwd = 16N against SFT's 6N for one sequence
(ratio 16/6), precomputed 12N/6N; the prefix-shared steps run fewer tokens per pair. MFU is achieved FLOP/s over
a peak: on CUDA a per-GPU bf16 table below, on CPU the float32 matmul rate this script measures in the same run.
Two counts per step, equal for rows of one length: the FLOPs the layout executes (flops_per_step, mfu: how busy
the hardware was), a padded kind's rows at their padded length, padding included, a packed kind's segments at
their own lengths and packed padding at 6N a token; and the useful FLOPs (useful_flops_per_example, useful_mfu),
every row or segment at its own length, as if no padding ran: for a packed kind, how close the step comes to the
FLOP limit of the non-padding tokens. The chunked kinds' LM head counts at the scored tokens only (at the columns
it runs, padding included, for the executed count). ceiling_speedup of a packed kind: its padded twin's executed
FLOPs over its own, what perfect packing could give at equal MFU (on a CPU model.Segments computes attention in
groups of segments of similar length, each padded to its longest, a little padding these counts leave out);
speedup_vs_padded: the twin's ms per example over the packed kind's.

$ python -m bench.step_time --size=tiny --steps=20
$ python -m bench.step_time --size=small --steps=20 --out=out/bench_small.json
$ python -m bench.step_time --size=gpt2 --device=cuda --batch_size=8 --prompt_len=256 --response_len=256 --compile=True
$ python -m bench.step_time --size=gpt2 --device=cpu --batch_size=8 --prompt_len=256 --response_len=256 --timing=False \
      --kinds=dpo_live,dpo_live_chunked,prefix_live_chunked --grad_checkpoint=selective   # peak memory only
$ python -m bench.step_time --size=gpt2 --device=cpu --batch_size=8 --lengths=hh \
      --kinds=sft_chunked,sft_chunked_packed,dpo_live_chunked,dpo_live_chunked_packed --steps=4 --warmup=1 \
      --generation=False --out=out/bench_gpt2_hh.json   # packing on HH-like lengths: the issue's run
$ python -m bench.step_time --size=small --lengths=ultrafeedback --batch_size=4 --steps=8 --warmup=2 \
      --kinds=dpo_live,dpo_live_packed,prefix_live,prefix_live_packed
$ python -m bench.step_time --size=tiny --lengths=data/pairs.jsonl --kinds=dpo_live,dpo_live_packed   # a file's
$ python -m bench.step_time --memory=True --size=gpt2   # bench/memory.py: LoRA, checkpointing

(--compile=True with --lengths or the packed kinds: every batch shape compiles its own graph, so give --warmup at
least n_batches rounds.)

Memory allocator (CPU): glibc's malloc serves blocks above its mmap threshold (128 KiB, rising to
at most 32 MiB) with mmap and returns freed memory above its trim threshold, so a step's large
activations are page-faulted in afresh (zero-filled) every step. MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ at 4 GiB keep them in the heap (glibc 2.36 accepts 4 GiB; a small-size
fwd + bwd drops from ~13,000 to ~3,000 minor page faults, 0 once warm). When neither is set,
bench/step_time.py re-executes itself once with both, so numbers do not depend on the caller's
shell; set either yourself (any value) to opt out.

OpenMP threads: as in sft.py and dpo.py, GOMP_SPINCOUNT=1000 unless OMP_WAIT_POLICY or
GOMP_SPINCOUNT is set (bench/threads.py and docs/scale_and_speed.md, "CPU threads", say why), so
the steps timed here run as training runs them.
"""

import os
import platform
import sys

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # before torch loads OpenMP, as the training scripts do
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
if (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
        and not any(k in os.environ for k in MALLOC_ENV)):
    # before torch is imported, so its allocations see the settings from the first byte
    # (run as `python -m bench.step_time`: the same module again, so its imports resolve from the repo root)
    command = [sys.executable, "-m", __spec__.name] if __spec__ else [sys.executable, sys.argv[0]]
    os.execve(sys.executable, command + sys.argv[1:], {**os.environ, **MALLOC_ENV})

import copy
import json
import math
import random
import statistics
from functools import partial

import torch

from nanopo import runtime
from configurator import UserError, apply_overrides, install_error_handler, overridden
from data import Tokenizer, collate, collate_pairs, collate_prefix_shared, encode_pair_rows
from nanopo.formats import load_splits
from nanopo.logger import measure_matmul_flops, peak_flops
from logprobs import (Packing, packed_batch, packed_batch_logps, prefix_shared_row_logps, scored_columns, sums_by_id,
                      summed_logps, token_logps)
from losses import dpo_loss, sft_loss
from bench.measure import (device_name, in_fresh_process, memory_table, step_peak_memory, time_generation,
                           time_in_turns, timed, write_json)
from model import GPT, GPTConfig, set_grad_checkpoint
from nanopo.runtime import configure_optimizer

# -----------------------------------------------------------------------------------------------------------
size = "small"            # 'tiny', 'small' or 'gpt2' (see SIZES)
batch_size = 0            # pairs per step (SFT steps take 2x this many sequences); 0 = the size's default
prompt_len = 0            # prompt tokens; 0 = the size's default
response_len = 0          # tokens per response, EOS included (chosen and rejected alike); 0 = the size's default
lengths = ""              # '' = every pair prompt_len + response_len tokens; a name of LENGTHS or a preference file
n_batches = 4             # with --lengths: batches of different lengths; step j of every kind runs batch j % n_batches
steps = 20                # timed steps per kind
warmup = 3                # untimed steps per kind before them
device = "auto"
dtype = "auto"            # 'auto' = bfloat16 on CUDA when supported, else float32
compile = False
beta = 0.1
generation = True         # also time model.generate with and without its KV cache
logprob_chunk = 1024      # the *_chunked kinds: rows of logits made at a time; 0: all, kept for backward
grad_checkpoint = False   # the *_chunked kinds: True (whole blocks) or 'selective' activation checkpointing (model.py)
pack_tokens = 0           # the *_packed kinds: tokens a packed row may hold (logprobs.Packing); 0 = one row a step
kinds = ""                # comma-separated step kinds to run ('' = all of KINDS)
timing = True             # False: only the peak memory per kind (no timing, generation or targets)
peak_memory = True        # the peak memory of a step of each kind (CUDA: in this run; CPU: a fresh process per kind)
peak_memory_kind = ""     # (set by this script: the kind a fresh process measures the peak of)
out = "out/bench.json"    # '' = print only
memory = False            # True: bench/memory.py instead (full vs LoRA, +/- checkpointing)
lora_rank = 8             # memory benchmark: the adapters' rank
logprobs = "plain"        # memory benchmark: the log-prob path, 'plain' or 'chunked' (logprob_chunk rows at a time)
# -----------------------------------------------------------------------------------------------------------
install_error_handler()  # a UserError (a bad file, pack_tokens too small) ends the run with one line
config = apply_overrides(globals())
# -----------------------------------------------------------------------------------------------------------

# model shape and default batch per size: (n_layer, n_head, n_embd, vocab_size, block_size, pairs, prompt, response)
SIZES = {
    "tiny": (2, 2, 64, 260, 64, 16, 16, 16),
    "small": (6, 6, 384, 260, 128, 16, 64, 64),
    "gpt2": (12, 12, 768, 50304, 1024, 8, 256, 256),  # GPT-2 124M, vocab padded to a multiple of 64
    "gpt2-medium": (24, 16, 1024, 50304, 1024, 8, 256, 256),  # GPT-2 355M's shape
}
# --lengths=NAME: synthetic lengths in tokens, each log-normal, as (median, sigma, cut): a draw is
# round(median * exp(sigma * z)), z standard normal, kept within [1, cut]; an answer's length includes its EOS.
# We have no network here: the parameters are chosen to resemble each dataset's published character (its
# description and the lengths commonly reported for it), not fitted to its rows. For a real dataset's lengths,
# --lengths=FILE.
LENGTHS = {
    # Anthropic HH-RLHF: multi-turn dialogues whose earlier turns sit in the prompt (so prompts are long and vary a
    # lot: sigma 0.8), answered by one short assistant turn (sigma 0.7); prompts cut at 384 tokens, answers at 128
    "hh": {"prompt": (120, 0.8, 384), "answer": (80, 0.7, 128)},
    # UltraFeedback (binarized): mostly single instructions, shorter prompts with a long tail of pasted text and
    # code (sigma 0.9), answered by long model completions (median 250, sigma 0.7); both cut at 512 tokens
    "ultrafeedback": {"prompt": (100, 0.9, 512), "answer": (250, 0.7, 512)},
}
KINDS = ["sft", "dpo_live", "dpo_precomputed", "prefix_live", "prefix_precomputed"]
KINDS += [k + "_chunked" for k in KINDS]  # the same steps with --logprobs=chunked
KINDS += [k + "_packed" for k in KINDS]   # the same steps with --packing=True
if kinds and not set(kinds.split(",")) <= set(KINDS):
    sys.exit(f"error: kinds='{kinds}': choose from {', '.join(KINDS)}")
KINDS = [k for k in KINDS if not kinds or k in kinds.split(",")]
DPO_KINDS = [k for k in KINDS if not k.startswith("sft")]
if grad_checkpoint not in (True, False, "selective"):
    sys.exit(f"error: grad_checkpoint={grad_checkpoint!r}: expected True, False or 'selective'")
if size not in SIZES:
    sys.exit(f"error: unknown size '{size}': expected one of {', '.join(SIZES)}")
n_layer, n_head, n_embd, vocab_size, block_size, B0, P0, R0 = SIZES[size]
B, P, R = batch_size or B0, prompt_len or P0, response_len or R0
if B < 1 or P < 1 or R < 1:
    sys.exit("error: batch_size, prompt_len and response_len must be positive")
if lengths and ("prompt_len" in overridden or "response_len" in overridden):
    sys.exit(f"error: lengths='{lengths}' sets the lengths: leave prompt_len and response_len unset")
if n_batches < 1:
    sys.exit(f"error: n_batches={n_batches}: expected >= 1")
if pack_tokens < 0:
    sys.exit(f"error: pack_tokens={pack_tokens}: expected >= 0 (0 = one packed row a step)")
if memory:  # bench/memory.py: a DPO step's peak memory and time per pair, a fresh process per kind
    from bench import memory as memory_bench
    memory_bench.main(config, dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                                   block_size=block_size), overridden)
    sys.exit(0)


# -----------------------------------------------------------------------------------------------------------
# Lengths: (prompt, chosen, rejected) token counts of every pair, batch after batch

def drawn_lengths(name, n):
    """n (prompt, chosen, rejected) lengths from LENGTHS[name], a fixed seed: the same every run."""
    rng = random.Random(0)

    def draw(median, sigma, cut):
        return min(cut, max(1, round(rng.lognormvariate(math.log(median), sigma))))

    prompt, answer = LENGTHS[name]["prompt"], LENGTHS[name]["answer"]
    return [(draw(*prompt), draw(*answer), draw(*answer)) for _ in range(n)]


def file_lengths(path, n):
    """n (prompt, chosen, rejected) lengths of pairs drawn at random (a fixed seed) from a preference file's rows,
    tokenised and cut to block_size as the training scripts do (data.encode_pair_rows); cycling through the rows
    the file has when they are fewer than n. Only the rows drawn are tokenised (a large file's BPE would take
    long)."""
    rows, _, _ = load_splits(path, "pairs", "", "train", "", "", False)
    tok = Tokenizer("gpt2" if size.startswith("gpt2") else "byte")
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    found = []
    for i in order:
        if len(found) == n:
            break
        # rows with an empty answer or chosen == rejected are skipped, as in training
        encoded, _ = encode_pair_rows([rows[i]], tok, block_size, source=path)
        found += [(len(p), len(c), len(r)) for p, c, r in encoded]
    if not found:
        raise UserError(f"{path}: no usable pair (every row was skipped)")
    return [found[i % len(found)] for i in range(n)]


if lengths:
    try:
        if lengths in LENGTHS:
            all_lengths = drawn_lengths(lengths, n_batches * B)
        elif os.path.exists(lengths) or os.path.splitext(lengths)[1] or "/" in lengths:
            all_lengths = file_lengths(lengths, n_batches * B)
        else:
            raise UserError(f"neither a named distribution ({', '.join(LENGTHS)}) nor a file")
    except UserError as e:
        sys.exit(f"error: lengths='{lengths}': {e}")
    NB = n_batches
else:  # today's fixed shape: one batch, every pair alike
    all_lengths, NB = [(P, R, R)] * B, 1
BATCH_LENGTHS = [all_lengths[i * B:(i + 1) * B] for i in range(NB)]
T_plain = max(p + max(c, r) - 1 for p, c, r in all_lengths)  # the longest row [prompt | response], shifted by one
T_packed = max(p + c + r - 2 for p, c, r in all_lengths)      # [prompt | chosen | rejected], each EOS only a target
PACKED_BASES = {k.split("_")[0] for k in KINDS if k.endswith("_packed")}  # the layouts some packed kind runs
longest_segment = max([T_plain] * bool(PACKED_BASES & {"sft", "dpo"}) + [T_packed] * ("prefix" in PACKED_BASES),
                      default=0)
if 0 < pack_tokens < longest_segment:
    sys.exit(f"error: pack_tokens={pack_tokens} cannot hold the longest row the packed kinds run, "
             f"{longest_segment} tokens: use --pack_tokens={longest_segment} or more (0: one row a step)")

rt = runtime.setup(device, dtype, seed=1)


def sync():
    if rt.device_type == "cuda":
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------------------------------------
# Model, data, FLOP counts

# packed rows are longer than plain ones but their positions are not (rejected positions restart at P): the
# position table only needs to cover the longest plain row (and grows past the size's block_size to fit it)
cfg = GPTConfig(block_size=max(block_size, T_plain), vocab_size=vocab_size, n_layer=n_layer,
                n_head=n_head, n_embd=n_embd, dropout=0.0)
torch.manual_seed(1)
policy = GPT(cfg).to(rt.device)
# the reference differs from the policy a little, so the DPO loss is not log 2 at every configuration and the
# agreement check below can see a difference between them
reference = copy.deepcopy(policy)
with torch.no_grad():
    for p in reference.parameters():
        p.add_(0.01 * torch.randn_like(p))
reference.eval().requires_grad_(False)
initial_state = copy.deepcopy(policy.state_dict())
N = policy.get_num_params()
flops_per_token = policy.flops_per_token
HEAD_FLOPS = 2 * n_embd * vocab_size  # the LM head's forward FLOPs per token (a matmul with the (V, C) weight)

g = torch.Generator().manual_seed(0)
rand = lambda n: torch.randint(0, vocab_size - 2, (n,), generator=g).tolist()
EOS, PAD = vocab_size - 2, vocab_size - 1
# random token ids at the drawn lengths (without --lengths the same pairs as ever: the generator's first draws)
BATCH_PAIRS = [[(rand(p), rand(c - 1) + [EOS], rand(r - 1) + [EOS]) for p, c, r in ls] for ls in BATCH_LENGTHS]
# packed kinds' attention: FlexAttention on CUDA, as dpo.py and sft.py choose it by default; model.Segments on a CPU
PACKING = Packing(pack_tokens, flex=runtime.use_flex_attention("auto", True, rt))


def to_device(d):
    return {k: v.to(rt.device) if torch.is_tensor(v) else v for k, v in d.items()}


def collate_rows(base, pairs):
    """One batch of pairs in a padded layout, a dict of CPU tensors: 'sft', 2B sequences [prompt | chosen] then
    [prompt | rejected] (the same token count as the DPO policy pass); 'dpo', the concatenated 2B rows, chosen
    then rejected (collate_pairs); 'prefix', one [prompt | chosen | rejected] row per pair."""
    if base == "prefix":
        return collate_prefix_shared(pairs, PAD)
    if base == "sft":
        idx, targets, mask = collate([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], PAD)
    else:
        idx, targets, mask = collate_pairs(pairs, PAD)  # (2B, T): chosen rows, then rejected rows
    return {"idx": idx, "targets": targets, "mask": mask}


def segment_lengths(base, pairs):
    """Each row's real length in a layout (as logprobs.packed_logps and completion_logps give them to data.pack):
    a row of n tokens runs n - 1 (input, next token) positions; a prefix-shared row holds P + C + R - 2."""
    if base == "prefix":
        return [len(p) + len(c) + len(r) - 2 for p, c, r in pairs]
    return [len(p) + len(c) - 1 for p, c, _ in pairs] + [len(p) + len(r) - 1 for p, _, r in pairs]


# Per batch, every layout a kind may run, on the device: 'sft', 'dpo', 'prefix' (padded rows), '<base>_cols'
# (the chunked kinds: only the columns whose target is scored, logprobs.scored_columns, timed with the collation)
# and '<base>_packed' (data.pack's rows with their attention, logprobs.packed_batch, timed with the collation),
# with each layout's host time (ms), the rows' real lengths per base and the scored tokens (responses + EOS)
LAYOUTS, LAYOUT_MS, SEGMENTS, SCORED = [], [], [], []
for pairs in BATCH_PAIRS:
    layouts, ms = {}, {}
    for base in ("sft", "dpo", "prefix"):
        layouts[base], ms[base] = timed(lambda: collate_rows(base, pairs))
        layouts[base + "_cols"], ms[base + "_cols"] = timed(lambda: scored_columns(collate_rows(base, pairs)))
        layouts[base], layouts[base + "_cols"] = to_device(layouts[base]), to_device(layouts[base + "_cols"])
        if base in PACKED_BASES:  # packed_batch moves its batch to the device itself
            layouts[base + "_packed"], ms[base + "_packed"] = timed(lambda: packed_batch(
                collate_rows(base, pairs), segment_lengths(base, pairs), PAD, rt.device, 1, PACKING))
    LAYOUTS.append(layouts)
    LAYOUT_MS.append(ms)
    SEGMENTS.append({base: segment_lengths(base, pairs) for base in ("sft", "dpo", "prefix")})
    SCORED.append(sum(len(c) + len(r) for _, c, r in pairs))  # SFT's 2B rows score the same tokens


def layout_of(kind):
    """The layout a kind's step runs: 'dpo_live_chunked' -> 'dpo_cols', 'prefix_live_packed' -> 'prefix_packed'."""
    base = kind.split("_")[0]
    if kind.endswith("_packed"):
        return base + "_packed"
    return base + "_cols" if "chunked" in kind else base


def collate_ms(kind):
    """A kind's host time to build its batch, the mean over the batches (a chunked kind's: its padded rows' and
    the scored columns', as ever)."""
    layout = layout_of(kind)
    base = layout.split("_")[0]
    extra = base if layout.endswith("_cols") else None
    return statistics.fmean(ms[layout] + (ms[extra] if extra else 0) for ms in LAYOUT_MS)


train_model = torch.compile(policy, dynamic=False) if compile else policy
ref_model = torch.compile(reference, dynamic=False) if compile else reference


def response_logps(model, batch, chunked=False):
    """The summed log-probs and token counts of a batch's 2B responses, (2B,) each, as dpo.py / sft.py compute
    them: SFT's 2B sequences, or a DPO batch's chosen responses then its rejected ones. The batch says the path:
    packed (data.pack's 'ids'; chunked: the LM head at the scored tokens only), chunked padded (scored_columns'
    'cols'), prefix-shared rows ('first_index') or plain padded rows."""
    if "ids" in batch:  # packed rows: per-token log-probs (R, K), summed by whose response each token is
        per_token, _ = packed_batch_logps(model, batch, "chunked" if chunked else "plain", logprob_chunk)
        return sums_by_id(per_token, batch["ids"], batch["n_sums"])
    if "cols" in batch:  # the chunked path on padded rows (plain or prefix-shared): (rows, K)
        per_token = model(batch["idx"], pos=batch.get("pos"), attn_mask=batch.get("attn_mask"),
                          score=(batch["cols"], batch["targets"]), chunk=logprob_chunk)
        # a prefix-shared row's two branches (its first rejected token is the extra last column, in rejected_mask)
        masks = [batch["mask"]] if "mask" in batch else [batch["chosen_mask"], batch["rejected_mask"]]
        sums = [summed_logps(per_token, m) for m in masks]
        return torch.cat([s for s, _ in sums]), torch.cat([n for _, n in sums])
    if "first_index" in batch:  # prefix-shared rows, the plain path
        logits = model(batch["idx"], pos=batch["pos"], attn_mask=batch["attn_mask"])
        chosen, rejected, chosen_n, rejected_n = prefix_shared_row_logps(logits, batch)
        return torch.cat([chosen, rejected]), torch.cat([chosen_n, rejected_n])
    logits = model(batch["idx"])  # the concatenated forward (or SFT's rows)
    return summed_logps(token_logps(logits, batch["targets"]), batch["mask"])


# the reference log-probs for the precomputed kinds: one pass over the data before training, as a dataset
# column would hold them; the same numbers serve every layout of a batch (only made where a precomputed kind runs:
# at the gpt2 sizes on a CPU each pass takes seconds)
if any("precomputed" in k for k in ([peak_memory_kind] if peak_memory_kind else KINDS)):
    for layouts in LAYOUTS:
        with torch.no_grad(), rt.autocast():
            ref_logps = response_logps(ref_model, layouts["dpo"])[0]
        for name, batch in layouts.items():
            if not name.startswith("sft"):
                batch.update(ref_chosen=ref_logps[:B], ref_rejected=ref_logps[B:])


def step_loss(kind, batch):
    """The loss of `kind`'s step on `batch` (its layout of one batch of pairs)."""
    chunked = "chunked" in kind
    if kind.startswith("sft"):
        return sft_loss(*response_logps(train_model, batch, chunked))
    # live: the reference first, as dpo.py runs it: its temporaries go before the policy's activations grow
    if "live" in kind:
        with torch.no_grad():
            ref_logps = response_logps(ref_model, batch, chunked)[0]
        ref_chosen, ref_rejected = ref_logps[:B], ref_logps[B:]
    else:
        ref_chosen, ref_rejected = batch["ref_chosen"], batch["ref_rejected"]
    logps = response_logps(train_model, batch, chunked)[0]
    return dpo_loss(logps[:B], logps[B:], ref_chosen, ref_rejected, beta)[0]


def model_flops(rows, live, chunked, scored):
    """A step's model FLOPs (nanoGPT's count, as the module docstring says): the trunk runs rows, [(tokens, T)],
    tokens at attention length T, forward and backward (plus a forward-only reference pass when live); chunked:
    the LM head (2VC FLOPs a token forward, 6VC trained) runs at `scored` positions only."""
    tokens = sum(n for n, _ in rows)
    flops = sum(n * (flops_per_token(T, True) + live * flops_per_token(T, False)) for n, T in rows)
    if chunked:
        flops -= HEAD_FLOPS * (3 + live) * (tokens - scored)
    return flops


def step_counts(kind, i):
    """FLOPs and tokens of kind's step on batch i: useful (every row or segment at its own length), executed
    (what the layout runs: padded rows at their padded length; packed segments at their lengths and the packed
    padding at 6N a token), executed with the logits a chunked backward makes again, the rows and their length."""
    layout = LAYOUTS[i][layout_of(kind)]
    segments = SEGMENTS[i][kind.split("_")[0]]
    live, chunked = "live" in kind, "chunked" in kind
    rows, row_len = layout["idx"].shape
    row_tokens = rows * row_len
    useful = model_flops([(n, n) for n in segments], live, chunked, SCORED[i])
    if kind.endswith("_packed"):
        executed_rows = [(n, n) for n in segments] + [(row_tokens - sum(segments), 0)]
    else:
        executed_rows = [(row_tokens, row_len)]
    scored = layout["cols"].numel() if chunked else 0  # the columns the LM head runs at, padding included
    executed = model_flops(executed_rows, live, chunked, scored)
    recomputed = chunked * (logprob_chunk > 0) * HEAD_FLOPS * scored  # a chunked backward makes its logits again
    return {"useful": useful, "flops": executed, "executed": executed + recomputed, "rows": rows,
            "row_len": row_len, "tokens": row_tokens, "useful_tokens": sum(segments)}


def padding_fraction(kind):
    """The share of a kind's row tokens that are padding, the mean over the batches."""
    return statistics.fmean(1 - c["useful_tokens"] / c["tokens"] for c in (step_counts(kind, i) for i in range(NB)))


STEP_COUNT = dict.fromkeys(KINDS, 0)  # steps run per kind: step j runs batch j % NB


def train_step(kind, optimizer):
    """One optimizer step of `kind` on its next batch: forward (under autocast), backward, clipping, AdamW."""
    i = STEP_COUNT[kind] % NB
    STEP_COUNT[kind] += 1
    set_grad_checkpoint(policy, grad_checkpoint if "chunked" in kind else False)
    with rt.autocast():
        loss = step_loss(kind, LAYOUTS[i][layout_of(kind)])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_memory(kind):
    """measure.step_peak_memory of a step of `kind`, after a warm-up step (which makes AdamW's state); with
    several batches the largest peak over one measured step of each (the warm-up runs batch 0, then batches
    1, ..., NB - 1, 0 are measured)."""
    optimizer = configure_optimizer(policy, 0.1, 1e-5, (0.9, 0.99), rt.device_type)
    STEP_COUNT[kind] = 0
    return step_peak_memory(partial(train_step, kind, optimizer), rt.device_type, repeats=NB)


if peak_memory_kind:  # a fresh process measuring one kind for the peak-memory table below: JSON on stdout, exit
    print(json.dumps(step_memory(peak_memory_kind)))
    sys.exit(0)

# -----------------------------------------------------------------------------------------------------------
# Agreement: every DPO configuration computes the same loss (and the same policy log-probs) from the same weights,
# every SFT one the same SFT loss, and each packed kind its padded twin's; on the first batch

with torch.no_grad(), rt.autocast():
    first = LAYOUTS[0]
    init_losses = {k: step_loss(k, first[layout_of(k)]).item() for k in DPO_KINDS}
    sft_losses = {k: step_loss(k, first[layout_of(k)]).item() for k in KINDS if k.startswith("sft")}
    # the packed kinds' padded twins' losses: computed here where this run does not time the twin
    twin_losses = {**init_losses, **sft_losses}
    for kind in KINDS:
        twin = kind.removesuffix("_packed")
        if twin not in twin_losses:
            twin_losses[twin] = step_loss(twin, first[layout_of(twin)]).item()
    plain_pol, plain_n = response_logps(policy, first["dpo"])
    plain_ref = response_logps(reference, first["dpo"])[0]
    # what every DPO kind computes: the plain live step's loss (dpo_live's), from the concatenated rows; and every
    # SFT kind, plain sft's, from the same rows (SFT's 2B sequences are the concatenated rows)
    dpo_reference_loss = dpo_loss(plain_pol[:B], plain_pol[B:], plain_ref[:B], plain_ref[B:], beta)[0].item()
    sft_reference_loss = sft_loss(plain_pol, plain_n).item()
    prefix_pol = response_logps(policy, first["prefix"])[0]
    logps_diff = (plain_pol - prefix_pol).abs().max().item()  # summed log-probs: relative to their size below
    logps_rel_diff = logps_diff / plain_pol.abs().max().item()
    packing_diff = None
    if "dpo_packed" in first:  # the same sums from the concatenated rows packed
        packing_diff = (plain_pol - response_logps(policy, first["dpo_packed"])[0]).abs().max().item()
# bf16 / fp16 activations round at ~1e-3 relative. In float32 the summed log-probs of long responses (hundreds of
# tokens, sums in the thousands) still differ between paths at ~1e-7 of their size, which moves the loss by up to
# beta x that margin: the tolerance grows with the largest summed log-prob, at 1e-6 of it (1e-5 at least)
largest_logps = max(plain_pol.abs().max().item(), plain_ref.abs().max().item())
tolerance = max(1e-5, beta * 1e-6 * largest_logps) if rt.dtype == "float32" else 1e-2
loss_diff = max((abs(v - dpo_reference_loss) for v in init_losses.values()), default=0.0)
sft_loss_diff = max((abs(v - sft_reference_loss) for v in sft_losses.values()), default=0.0)
packed_loss_diff = max((abs(v - twin_losses[k.removesuffix("_packed")])
                        for k, v in {**init_losses, **sft_losses}.items() if k.endswith("_packed")), default=0.0)
agreement = {"losses": init_losses, "loss_max_abs_diff": loss_diff, "policy_logps_max_abs_diff": logps_diff,
             "policy_logps_max_rel_diff": logps_rel_diff, "tolerance": tolerance,
             "tolerance_rule": "float32: max(1e-5, beta * 1e-6 * largest |summed log-prob|); else 1e-2",
             "ok": max(loss_diff, sft_loss_diff, packed_loss_diff) <= tolerance,
             "sft_losses": sft_losses, "sft_loss_max_abs_diff": sft_loss_diff,
             "packed_loss_max_abs_diff": packed_loss_diff, "packed_policy_logps_max_abs_diff": packing_diff}


def length_stats(values):
    return f"mean {statistics.fmean(values):.0f}, median {statistics.median(values):.0f}, max {max(values)}"


mean_pad = {layout: statistics.fmean(1 - sum(SEGMENTS[i][layout.split("_")[0]]) / LAYOUTS[i][layout]["idx"].numel()
                                     for i in range(NB))
            for layout in LAYOUTS[0] if not layout.endswith("_cols")}
print(f"{size}: {N / 1e6:.2f}M parameters (n_layer={n_layer}, n_head={n_head}, n_embd={n_embd}, vocab={vocab_size}),"
      + (f" {B} pairs of {P} prompt + {R} response tokens; rows: plain {T_plain}, prefix-shared {T_packed} tokens; "
         if not lengths else f" {NB} batches of {B} pairs, lengths '{lengths}'; ")
      + f"{rt.device} {rt.dtype}{' compiled' if compile else ''}, {torch.get_num_threads()} threads")
if lengths:
    print(f"lengths ({lengths}{': ' + str(LENGTHS[lengths]) if lengths in LENGTHS else ''}): prompts "
          f"{length_stats([p for p, _, _ in all_lengths])}; answers (EOS included) "
          f"{length_stats([x for _, c, r in all_lengths for x in (c, r)])}; longest rows: plain {T_plain}, "
          f"prefix-shared {T_packed} tokens; position table {cfg.block_size}")
    print("padding, the share of the row tokens (mean over the batches): "
          + ", ".join(f"{name} {mean_pad[layout]:.1%}" for name, layout in (
              ("concatenated DPO rows", "dpo"), ("prefix-shared rows", "prefix"), ("SFT rows", "sft"),
              ("packed SFT rows", "sft_packed"), ("packed concatenated rows", "dpo_packed"),
              ("packed prefix-shared rows", "prefix_packed"))
              if layout in mean_pad))
print(f"loss agreement: DPO losses at the initial weights {', '.join(f'{k} {v:.7f}' for k, v in init_losses.items())}"
      f"; max |diff| {loss_diff:.2e}; summed policy log-probs, plain vs prefix-shared: max |diff| {logps_diff:.2e} "
      f"(relative {logps_rel_diff:.1e})"
      + (f"; SFT losses {', '.join(f'{k} {v:.7f}' for k, v in sft_losses.items())}, max |diff| {sft_loss_diff:.2e}"
         if sft_losses else "")
      + (f"; packed vs padded twin: max |loss diff| {packed_loss_diff:.2e}" if PACKED_BASES else "")
      + (f", summed log-probs max |diff| {packing_diff:.2e}" if packing_diff is not None else "")
      + f" -> {'OK' if agreement['ok'] else 'MISMATCH'} (tolerance {tolerance:g})")

# -----------------------------------------------------------------------------------------------------------
# Peak memory per step kind: on CUDA in this process, kind after kind (the peak is reset before each step); on a
# CPU in a fresh process per kind, where no other kind's freed memory can hide its peak
memory_results = {k: step_memory(k) if rt.device_type == "cuda" else in_fresh_process(f"--peak_memory_kind={k}")
                  for k in KINDS} if peak_memory else None
packed_memory = {}  # packed kind -> its peak over its padded twin's, where both were measured
if memory_results:
    print(memory_table(memory_results, rt.device_type))
    for kind in KINDS:
        twin = memory_results.get(kind.removesuffix("_packed"), {}).get("peak_mb")
        if kind.endswith("_packed") and twin and memory_results[kind]["peak_mb"]:
            packed_memory[kind] = memory_results[kind]["peak_mb"] / twin
lengths_report = {"source": lengths or "fixed", "n_batches": NB, "distribution": LENGTHS.get(lengths),
                  "pairs": [list(x) for x in all_lengths],
                  "longest_row": {"plain": T_plain, "prefix_shared": T_packed},
                  "position_table": cfg.block_size}
if not timing:
    write_json(out, {"config": config, "size": size, "batch_pairs": B, "prompt_len": P, "response_len": R,
                     "loss_agreement": agreement, "peak_memory": memory_results, "lengths": lengths_report,
                     "padding_fraction": mean_pad, "packed_memory_ratio_vs_padded": packed_memory})
    sys.exit(0)

# -----------------------------------------------------------------------------------------------------------
# Timing

peak, peak_cpu, peak_note = peak_flops(rt, sizes=(1024, 1536, 2048), repeats=8)  # (CPU: by wall, CPU time)
print(f"peak: {peak / 1e9:,.1f} GFLOP/s ({peak_note})" if peak else f"peak: unknown ({peak_note})")
if peak_cpu:
    print(f"      {peak_cpu / 1e9:,.1f} GFLOP/s by CPU time (all threads busy; the peak for mfu_cpu_time)")


# All steps train the same policy, from the same initial weights; each kind has its own AdamW state; every kind's
# step j runs batch j % NB (the warm-up steps included)
policy.load_state_dict(initial_state)
STEP_COUNT.update(dict.fromkeys(KINDS, 0))
optimizers = {k: configure_optimizer(policy, 0.1, 1e-5, (0.9, 0.99), rt.device_type) for k in KINDS}
all_times, all_cpu_times, all_faults = time_in_turns({k: partial(train_step, k, optimizers[k]) for k in KINDS},
                                                     warmup, steps, sync)
if rt.device_type == "cpu":  # measured again after the steps, keeping the best: a busy moment lowers one reading
    peak, peak_cpu = (max(x, y) for x, y in zip((peak, peak_cpu), measure_matmul_flops()))
    print(f"peak after the steps: {peak / 1e9:,.1f} GFLOP/s (best of both), {peak_cpu / 1e9:,.1f} by CPU time")
TIMED_BATCHES = [(warmup + s) % NB for s in range(steps)]  # the batch each timed step ran
BATCHES_TIMED = sorted(set(TIMED_BATCHES))


def per_step(values):
    """A kind's value per step from its timed steps' values: each batch's median (robust to another process
    taking the CPU for a moment), then the mean over the batches; one batch: the median, as ever."""
    return statistics.fmean(statistics.median(v for v, i in zip(values, TIMED_BATCHES) if i == b)
                            for b in BATCHES_TIMED)


def mean_count(kind, key):
    """A step_counts value of kind, the mean over the batches the timed steps ran (as per_step weighs them)."""
    return statistics.mean(step_counts(kind, i)[key] for i in BATCHES_TIMED)  # (ints stay ints: one batch)


results = {}
for kind in KINDS:
    times = all_times[kind]
    ms = per_step(times)
    cpu_ms = per_step(all_cpu_times[kind])  # all threads; near threads x ms when quiet
    examples = 2 * B if kind.startswith("sft") else B
    flops, useful, executed = (mean_count(kind, key) for key in ("flops", "useful", "executed"))
    results[kind] = {
        "example": "sequence" if kind.startswith("sft") else "pair", "rows": mean_count(kind, "rows"),
        "row_len": mean_count(kind, "row_len"),
        "examples": examples, "executed_flops_per_example": executed / examples,
        "ms_per_step": ms, "ms_mean": statistics.fmean(times), "ms_min": min(times),
        "ms_per_example": ms / examples, "tokens_per_s": mean_count(kind, "tokens") / ms * 1000,
        "flops_per_step": flops, "flops_per_example": flops / examples, "flops_per_s": flops / ms * 1000,
        "mfu": flops / ms * 1000 / peak if peak else None, "collate_ms": collate_ms(kind),
        "cpu_ms_per_step": cpu_ms,
        # MFU by CPU time: what the step would reach with the cores to itself (a busy machine barely moves it)
        "mfu_cpu_time": (flops / (cpu_ms / torch.get_num_threads()) * 1000 / peak_cpu) if peak_cpu else None,
        "page_faults_per_step": statistics.median(all_faults[kind]),
        # the padding (variable lengths): what of the step is real rows, and how fast the real part ran
        "padding_fraction": padding_fraction(kind),
        "useful_tokens_per_s": mean_count(kind, "useful_tokens") / ms * 1000,
        "useful_flops_per_step": useful, "useful_flops_per_example": useful / examples,
        "useful_mfu": useful / ms * 1000 / peak if peak else None}

# per example: DPO per pair against SFT per sequence, time next to FLOPs (16/6 live, 12/6 precomputed when plain),
# against the SFT kind with the same path and layout where this run has it, else the nearest one it has
for kind in DPO_KINDS:
    r = results[kind]
    suffix = "".join(f"_{s}" for s in ("chunked", "packed") if s in kind.split("_"))
    sft_kind = next((k for k in ("sft" + suffix, "sft_packed" if "packed" in kind else "sft",
                                 "sft_chunked" if "chunked" in kind else "sft", "sft") if k in results), None)
    if sft_kind:
        sft = results[sft_kind]
        r["sft_kind"] = sft_kind
        r["time_ratio_vs_sft"] = r["ms_per_example"] / sft["ms_per_example"]
        r["flop_ratio_vs_sft"] = r["flops_per_example"] / sft["flops_per_example"]
        r["time_over_flop_ratio"] = r["time_ratio_vs_sft"] / r["flop_ratio_vs_sft"]
    if "dpo_live" in results:
        r["speedup_vs_dpo_live"] = results["dpo_live"]["ms_per_example"] / r["ms_per_example"]
        # what the FLOP count predicts for that speed-up (the recomputed logits included)
        r["flop_speedup_vs_dpo_live"] = (results["dpo_live"]["executed_flops_per_example"]
                                         / r["executed_flops_per_example"])
# packed kinds against their padded twins: time (where the twin ran), FLOPs (always), peak memory (where measured)
for kind in KINDS:
    if kind.endswith("_packed"):
        r, twin = results[kind], kind.removesuffix("_packed")
        r["padded_twin"] = twin
        twin_executed = statistics.fmean(step_counts(twin, i)["executed"] for i in BATCHES_TIMED)
        r["ceiling_speedup"] = twin_executed / r["examples"] / r["executed_flops_per_example"]
        if twin in results:
            r["speedup_vs_padded"] = results[twin]["ms_per_example"] / r["ms_per_example"]
        if kind in packed_memory:
            r["memory_ratio_vs_padded"] = packed_memory[kind]
fastest = min(DPO_KINDS, key=lambda k: results[k]["ms_per_example"]) if DPO_KINDS else None


def cell(value, width, fmt):
    return f"{'-' if value is None else format(value, fmt):>{width}}"


print(f"{'step':<34}{'ms/step':>10}{'ms/ex':>10}{'tok/s':>9}{'GFLOP/s':>9}{'MFU':>7}{'MFUcpu':>7}{'t/SFT':>7}"
      f"{'F/SFT':>7}{'t/F':>6}{'speedup':>8}{'F-pred':>7}{'pad%':>7}{'uMFU':>7}{'vs-pad':>8}{'ceil':>7}"
      f"{'collate':>9}{'faults':>8}")
for kind in KINDS:
    r = results[kind]
    print(f"{kind:<34}{r['ms_per_step']:>10.1f}{r['ms_per_example']:>10.2f}{r['tokens_per_s']:>9,.0f}"
          f"{r['flops_per_s'] / 1e9:>9.1f}{cell(r['mfu'], 7, '.1%')}{cell(r['mfu_cpu_time'], 7, '.1%')}"
          f"{cell(r.get('time_ratio_vs_sft'), 7, '.2f')}{cell(r.get('flop_ratio_vs_sft'), 7, '.2f')}"
          f"{cell(r.get('time_over_flop_ratio'), 6, '.2f')}{cell(r.get('speedup_vs_dpo_live'), 7, '.2f')}"
          f"{'x' if 'speedup_vs_dpo_live' in r else ' '}{cell(r.get('flop_speedup_vs_dpo_live'), 6, '.2f')}"
          f"{'x' if 'flop_speedup_vs_dpo_live' in r else ' '}{r['padding_fraction']:>7.1%}"
          f"{cell(r['useful_mfu'], 7, '.1%')}{cell(r.get('speedup_vs_padded'), 7, '.2f')}"
          f"{'x' if 'speedup_vs_padded' in r else ' '}{cell(r.get('ceiling_speedup'), 6, '.2f')}"
          f"{'x' if 'ceiling_speedup' in r else ' '}{r['collate_ms']:>7.1f}ms{r['page_faults_per_step']:>8.0f}")
print("ms/ex: per pair for DPO, per sequence for SFT; t/SFT, F/SFT: time and FLOPs per example over SFT's "
      "(16/6 = 2.67 live, 12/6 = 2.00 precomputed; *_chunked against sft_chunked, *_packed against the SFT kind "
      "packed alike, their FLOPs with the LM head only where scored); t/F: their quotient; speedup: per pair vs "
      "dpo_live; F-pred: the speedup the FLOPs executed predict (a chunked backward makes its logits again); "
      "pad%: padding's share of the row tokens; uMFU: MFU of the useful FLOPs (no padding counted); vs-pad: a "
      "packed kind's speed-up per example over its padded twin; ceil: the speed-up the FLOPs executed allow it; "
      "collate: host time to build the batch (not in ms/step); faults: minor page faults per step; MFUcpu: MFU "
      "by CPU time (not inflated by other processes; threads spin-waiting count against it)")
busy = None
if rt.device_type == "cpu":
    busy = statistics.fmean(results[k]["cpu_ms_per_step"] / (torch.get_num_threads() * results[k]["ms_per_step"])
                           for k in KINDS)
    # on a quiet machine every thread computes all the time (share ~1); far below, other processes took the cores
    print(f"cpu share: the process used {busy:.0%} of {torch.get_num_threads()} threads x wall time"
          f"{' -- the machine is busy, times are inflated: rerun on a quiet machine' if busy < 0.85 else ''}")
if fastest and "speedup_vs_dpo_live" in results[fastest]:
    print(f"fastest DPO configuration: {fastest}, {results[fastest]['speedup_vs_dpo_live']:.2f}x faster per pair "
          f"than dpo_live")
elif fastest:
    print(f"fastest DPO configuration: {fastest}, {results[fastest]['ms_per_example']:.2f} ms per pair")

# -----------------------------------------------------------------------------------------------------------
# Generation: the KV cache against re-running the whole sequence per new token (greedy, no EOS: full length)

generation_results = None
if generation:
    prompts = [p for p, _, _ in BATCH_PAIRS[0]]
    # new tokens: a response's length less its EOS (with --lengths the first batch's median chosen answer), as
    # many as the position table leaves after the longest prompt
    new_tokens = R - 1 if not lengths else round(statistics.median(len(c) for _, c, _ in BATCH_PAIRS[0])) - 1
    new_tokens = max(1, min(new_tokens, cfg.block_size - max(len(p) for p in prompts)))
    # (EOS + 2 is outside the vocabulary: no row stops early; prompt + new tokens fit the position table)
    gen = generation_results = time_generation(policy, prompts, new_tokens, EOS + 2, PAD, rt)
    print(f"generate {B} x {new_tokens} new tokens after "
          + (f"{P}-token prompts" if not lengths else f"prompts of {length_stats([len(p) for p in prompts])} tokens")
          + f" (greedy): KV cache {gen['ms_cache']:,.0f} ms ({gen['new_tokens_per_s_cache']:,.0f} tok/s), no cache "
          f"{gen['ms_no_cache']:,.0f} ms ({gen['new_tokens_per_s_no_cache']:,.0f} tok/s): {gen['speedup']:.1f}x; "
          f"outputs {'identical' if gen['same_outputs'] else 'DIFFER'}")


# the issue's targets, meant for a CPU run of the small shape on a quiet machine: (value, met?); each where the
# run has the kinds it needs
targets = {}
mfus = [results[k]["mfu"] for k in DPO_KINDS if results[k]["mfu"] is not None]
if mfus:
    targets["min DPO MFU >= 0.65"] = (min(mfus), min(mfus) >= 0.65)
plain_t_over_f = [results[k]["time_over_flop_ratio"] for k in ("dpo_live", "dpo_precomputed")
                  if "time_over_flop_ratio" in results.get(k, {})]
if plain_t_over_f:
    targets["plain DPO time/FLOP ratio vs SFT <= 1.15"] = (max(plain_t_over_f), max(plain_t_over_f) <= 1.15)
if fastest and "speedup_vs_dpo_live" in results[fastest]:
    targets["fastest DPO speed-up per pair >= 1.6"] = (results[fastest]["speedup_vs_dpo_live"],
                                                       results[fastest]["speedup_vs_dpo_live"] >= 1.6)
targets["losses agree"] = (max(loss_diff, sft_loss_diff, packed_loss_diff), agreement["ok"])
# issue 14's, for the gpt2 shape on a CPU (memory: at 8 pairs of 256 + 256 tokens)
for name, kind, floor in (("chunked live DPO", "dpo_live_chunked", 1.15), ("fastest DPO", fastest, 2.1)):
    if kind in results and "speedup_vs_dpo_live" in results[kind]:
        targets[f"{name} speed-up per pair >= {floor}"] = (results[kind]["speedup_vs_dpo_live"],
                                                           results[kind]["speedup_vs_dpo_live"] >= floor)
live = [k for k in ("dpo_live_chunked", "prefix_live_chunked") if k in (memory_results or {})]
if live and memory_results.get("dpo_live", {}).get("peak_mb"):  # the leanest live DPO step against today's
    best = min(live, key=lambda k: memory_results[k]["peak_mb"])
    ratio = memory_results[best]["peak_mb"] / memory_results["dpo_live"]["peak_mb"]
    targets[f"live DPO peak memory ({best}) / dpo_live <= 0.5"] = (ratio, ratio <= 0.5)
# the packing issue's, for the gpt2 shape on a CPU with --lengths=hh: packed live chunked DPO against its padded twin
packed_live = results.get("dpo_live_chunked_packed", {})
if "speedup_vs_padded" in packed_live:
    targets["packed live chunked DPO speed-up per pair vs padded >= 1.5"] = (
        packed_live["speedup_vs_padded"], packed_live["speedup_vs_padded"] >= 1.5)
if "dpo_live_chunked_packed" in packed_memory:
    ratio = packed_memory["dpo_live_chunked_packed"]
    targets["packed live chunked DPO peak memory / padded <= 0.8"] = (ratio, ratio <= 0.8)
print("targets: " + "; ".join(f"{k}: {'-' if v is None else f'{v:.3g}'} {'ok' if ok else 'MISSED'}"
                              for k, (v, ok) in targets.items()))

# JSON: run settings, model shape, environment, the peak(s), per kind in "steps" the timings, FLOPs, MFU and
# (DPO kinds) ratios against SFT and dpo_live, (packed kinds) against their padded twins, the lengths, the padding
# per layout, the loss agreement check and the issue's targets
report = {
    "config": config, "size": size, "batch_pairs": B,
    # with --lengths: the mean prompt and answer lengths drawn
    "prompt_len": statistics.fmean(p for p, _, _ in all_lengths) if lengths else P,
    "response_len": statistics.fmean(x for _, c, r in all_lengths for x in (c, r)) if lengths else R,
    "row_len": {"plain": T_plain, "packed": T_packed},  # the longest rows; 'packed' is the prefix-shared one
    "model": {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "vocab_size": vocab_size,
              "block_size": cfg.block_size, "n_params": N},
    "env": {"device": rt.device, "device_name": device_name(rt), "dtype": rt.dtype, "compile": compile,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "malloc": {k: os.environ.get(k) for k in MALLOC_ENV}},
    "peak_flops": peak, "peak_flops_cpu_time": peak_cpu, "peak_note": peak_note, "cpu_share": busy,
    "steps": results, "fastest_dpo": fastest,
    "fastest_dpo_speedup_vs_dpo_live": results[fastest].get("speedup_vs_dpo_live") if fastest else None,
    "loss_agreement": agreement, "generation": generation_results, "peak_memory": memory_results,
    "targets": {k: {"value": v, "ok": ok} for k, (v, ok) in targets.items()},
    "lengths": lengths_report, "padding_fraction": mean_pad, "packed_memory_ratio_vs_padded": packed_memory,
}
write_json(out, report)
