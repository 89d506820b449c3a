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

and the peak memory of one step of each kind after a warm-up step: on CUDA max_memory_allocated,
reset before the step; on a CPU the peak RSS of a fresh process running that kind alone, its peak
mark reset before (bench/measure.py); and generation: the B prompts continued greedily by
response_len - 1 tokens with model.generate, with its KV cache and without, the outputs checked
equal.

Every step is what dpo.py / sft.py run: model.GPT, nanopo.runtime.configure_optimizer (AdamW),
losses.dpo_loss / losses.sft_loss, data.collate_pairs / data.collate_prefix_shared, gradient
clipping at 1.0. Batches are collated and moved to the device before timing (collation is timed on
its own: collate_ms). The kinds take turns step by step; ms/step is the median over the timed
steps.

FLOPs are counted as nanoGPT's estimate_mfu does: a token of fwd + bwd costs 6N + 12*L*H*Q*T (N = parameters
without the position table, L layers, H heads, Q head size, T the row length), a forward-only token a third of
that. Per example, live DPO costs 2 sequences x (fwd + bwd) + 2 x fwd = 16N against SFT's 6N for one sequence
(ratio 16/6), precomputed 12N/6N; the prefix-shared steps run fewer tokens per pair. MFU is achieved FLOP/s over
a peak: on CUDA a per-GPU bf16 table below, on CPU the float32 matmul rate this script measures in the same run.

$ python -m bench.step_time --size=tiny --steps=20
$ python -m bench.step_time --size=small --steps=20 --out=out/bench_small.json
$ python -m bench.step_time --size=gpt2 --device=cuda --batch_size=8 --prompt_len=256 --response_len=256 --compile=True
$ python -m bench.step_time --size=gpt2 --device=cpu --batch_size=8 --prompt_len=256 --response_len=256 --timing=False \
      --kinds=dpo_live,dpo_live_chunked,prefix_live_chunked --grad_checkpoint=selective   # peak memory only
$ python -m bench.step_time --memory=True --size=gpt2   # bench/memory.py: LoRA, checkpointing

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
import statistics
from functools import partial

import torch

from nanopo import runtime
from configurator import apply_overrides, overridden
from data import collate, collate_pairs, collate_prefix_shared
from nanopo.logger import measure_matmul_flops, peak_flops
from logprobs import packed_row_logps, scored_columns, summed_logps, token_logps
from losses import dpo_loss, sft_loss
from bench.measure import (device_name, in_fresh_process, memory_table, step_peak_memory, time_generation, time_in_turns,
                     timed, write_json)
from model import GPT, GPTConfig, set_grad_checkpoint
from nanopo.runtime import configure_optimizer

# -----------------------------------------------------------------------------------------------------------
size = "small"            # 'tiny', 'small' or 'gpt2' (see SIZES)
batch_size = 0            # pairs per step (SFT steps take 2x this many sequences); 0 = the size's default
prompt_len = 0            # prompt tokens; 0 = the size's default
response_len = 0          # tokens per response, EOS included (chosen and rejected alike); 0 = the size's default
steps = 20                # timed steps per kind
warmup = 3                # untimed steps per kind before them
device = "auto"
dtype = "auto"            # 'auto' = bfloat16 on CUDA when supported, else float32
compile = False
beta = 0.1
generation = True         # also time model.generate with and without its KV cache
logprob_chunk = 1024      # the *_chunked kinds: rows of logits made at a time; 0: all, kept for backward
grad_checkpoint = False   # the *_chunked kinds: True (whole blocks) or 'selective' activation checkpointing (model.py)
kinds = ""                # comma-separated step kinds to run ('' = all of KINDS; timing needs sft and dpo_live)
timing = True             # False: only the peak memory per kind (no timing, generation or targets)
peak_memory = True        # the peak memory of a step of each kind (CUDA: in this run; CPU: a fresh process per kind)
peak_memory_kind = ""     # (set by this script: the kind a fresh process measures the peak of)
out = "out/bench.json"    # '' = print only
memory = False            # True: bench/memory.py instead (full vs LoRA, +/- checkpointing)
lora_rank = 8             # memory benchmark: the adapters' rank
logprobs = "plain"        # memory benchmark: the log-prob path, 'plain' or 'chunked' (logprob_chunk rows at a time)
# -----------------------------------------------------------------------------------------------------------
config = apply_overrides(globals())
# -----------------------------------------------------------------------------------------------------------

# model shape and default batch per size: (n_layer, n_head, n_embd, vocab_size, block_size, pairs, prompt, response)
SIZES = {
    "tiny": (2, 2, 64, 260, 64, 16, 16, 16),
    "small": (6, 6, 384, 260, 128, 16, 64, 64),
    "gpt2": (12, 12, 768, 50304, 1024, 8, 256, 256),  # GPT-2 124M, vocab padded to a multiple of 64
    "gpt2-medium": (24, 16, 1024, 50304, 1024, 8, 256, 256),  # GPT-2 355M's shape
}
KINDS = ["sft", "dpo_live", "dpo_precomputed", "prefix_live", "prefix_precomputed"]
KINDS += [k + "_chunked" for k in KINDS]  # the same steps with --logprobs=chunked
if kinds and (not set(kinds.split(",")) <= set(KINDS) or timing and not {"sft", "dpo_live"} <= set(kinds.split(","))):
    sys.exit(f"error: kinds='{kinds}': choose from {', '.join(KINDS)} (timing needs sft and dpo_live)")
KINDS = [k for k in KINDS if not kinds or k in kinds.split(",")]
DPO_KINDS = [k for k in KINDS if k not in ("sft", "sft_chunked")]
if grad_checkpoint not in (True, False, "selective"):
    sys.exit(f"error: grad_checkpoint={grad_checkpoint!r}: expected True, False or 'selective'")
if size not in SIZES:
    sys.exit(f"error: unknown size '{size}': expected one of {', '.join(SIZES)}")
n_layer, n_head, n_embd, vocab_size, block_size, B0, P0, R0 = SIZES[size]
B, P, R = batch_size or B0, prompt_len or P0, response_len or R0
if B < 1 or P < 1 or R < 1:
    sys.exit("error: batch_size, prompt_len and response_len must be positive")
if memory:  # bench/memory.py: a DPO step's peak memory and time per pair, a fresh process per kind
    from bench import memory as memory_bench
    memory_bench.main(config, dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                                   block_size=block_size), overridden)
    sys.exit(0)
rt = runtime.setup(device, dtype, seed=1)


def sync():
    if rt.device_type == "cuda":
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------------------------------------
# Model, data, FLOP counts

T_plain = P + R - 1          # a row [prompt | response] read shifted by one
T_packed = P + 2 * R - 2     # [prompt | chosen | rejected], each response's EOS only a target
# packed rows are longer than plain ones but their positions are not (rejected positions restart at P): the
# position table only needs to cover T_plain
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
pairs = [(rand(P), rand(R - 1) + [EOS], rand(R - 1) + [EOS]) for _ in range(B)]


def to_device(d):
    return {k: v.to(rt.device) if torch.is_tensor(v) else v for k, v in d.items()}


def collate_plain_batch():
    idx, targets, mask = collate_pairs(pairs, PAD)  # (2B, T_plain): chosen rows, then rejected rows
    return {"idx": idx, "targets": targets, "mask": mask}


def collate_sft_batch():  # 2B sequences: the same token count as the DPO policy pass
    idx, targets, mask = collate([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], PAD)
    return {"idx": idx, "targets": targets, "mask": mask}


sft_batch, sft_collate_ms = timed(collate_sft_batch)
plain_batch, plain_collate_ms = timed(collate_plain_batch)
packed_batch, packed_collate_ms = timed(lambda: collate_prefix_shared(pairs, PAD))
# the chunked kinds' batches: only the columns whose target is scored (logprobs.scored_columns), timed with it
sft_cols, sft_cols_ms = timed(lambda: scored_columns(collate_sft_batch()))
plain_cols, plain_cols_ms = timed(lambda: scored_columns(collate_plain_batch()))
packed_cols, packed_cols_ms = timed(lambda: scored_columns(collate_prefix_shared(pairs, PAD)))
sft_batch, plain_batch, packed_batch = to_device(sft_batch), to_device(plain_batch), to_device(packed_batch)
sft_cols, plain_cols, packed_cols = to_device(sft_cols), to_device(plain_cols), to_device(packed_cols)

train_model = torch.compile(policy, dynamic=False) if compile else policy
ref_model = torch.compile(reference, dynamic=False) if compile else reference


def plain_logps(model, batch):
    """The concatenated forward, as dpo.py runs it -> (chosen_logps, rejected_logps), each (B,)."""
    logits = model(batch["idx"])
    logps, _ = summed_logps(token_logps(logits, batch["targets"]), batch["mask"])
    return logps[:B], logps[B:]


def packed_logps(model, batch):
    logits = model(batch["idx"], pos=batch["pos"], attn_mask=batch["attn_mask"])
    return packed_row_logps(logits, batch)[:2]


def chunked_logps(model, batch):
    """The chunked path, as dpo.py runs it with --logprobs=chunked, on a batch from scored_columns (plain rows or
    packed ones) -> (chosen_logps, rejected_logps), or the summed log-probs and token counts of SFT's rows."""
    per_token = model(batch["idx"], pos=batch.get("pos"), attn_mask=batch.get("attn_mask"),
                      score=(batch["cols"], batch["targets"]), chunk=logprob_chunk)  # (rows, K)
    if "mask" not in batch:
        return summed_logps(per_token, batch["chosen_mask"])[0], summed_logps(per_token, batch["rejected_mask"])[0]
    logps, n_tokens = summed_logps(per_token, batch["mask"])
    return (logps, n_tokens) if batch is sft_cols else (logps[:B], logps[B:])


# the reference log-probs for the precomputed kinds: one pass over the data before training, as a dataset
# column would hold them; the same numbers serve both layouts
with torch.no_grad(), rt.autocast():
    ref_chosen, ref_rejected = plain_logps(ref_model, plain_batch)
for batch in (plain_batch, packed_batch, plain_cols, packed_cols):
    batch.update(ref_chosen=ref_chosen, ref_rejected=ref_rejected)


def sft_step_loss(batch):
    if "cols" in batch:  # sft_chunked
        return sft_loss(*chunked_logps(train_model, batch))
    logits = train_model(batch["idx"])
    logps, n_tokens = summed_logps(token_logps(logits, batch["targets"]), batch["mask"])
    return sft_loss(logps, n_tokens)


def dpo_step_loss(logps_fn, live):
    def loss_fn(batch):
        if live:  # the reference first, as dpo.py runs it: its temporaries go before the policy's activations grow
            with torch.no_grad():
                rc, rr = logps_fn(ref_model, batch)
        else:
            rc, rr = batch["ref_chosen"], batch["ref_rejected"]
        return dpo_loss(*logps_fn(train_model, batch), rc, rr, beta)[0]
    return loss_fn


# kind -> (loss function, batch, rows in the batch, row length, examples per step, trained and ref-forward tokens)
STEPS = {
    "sft": (sft_step_loss, sft_batch, 2 * B, T_plain, 2 * B, 2 * B * T_plain, 0),
    "dpo_live": (dpo_step_loss(plain_logps, True), plain_batch, 2 * B, T_plain, B, 2 * B * T_plain, 2 * B * T_plain),
    "dpo_precomputed": (dpo_step_loss(plain_logps, False), plain_batch, 2 * B, T_plain, B, 2 * B * T_plain, 0),
    "prefix_live": (dpo_step_loss(packed_logps, True), packed_batch, B, T_packed, B, B * T_packed, B * T_packed),
    "prefix_precomputed": (dpo_step_loss(packed_logps, False), packed_batch, B, T_packed, B, B * T_packed, 0),
}
COLLATE_MS = {"sft": sft_collate_ms, "dpo_live": plain_collate_ms, "dpo_precomputed": plain_collate_ms,
              "prefix_live": packed_collate_ms, "prefix_precomputed": packed_collate_ms}
CHUNKED = {"sft": (sft_cols, sft_cols_ms), "dpo": (plain_cols, plain_cols_ms), "prefix": (packed_cols, packed_cols_ms)}
for kind, (loss_fn, _, *sizes) in list(STEPS.items()):  # the *_chunked kinds: the same steps on chunked batches
    cols, cols_ms = CHUNKED[kind.split("_")[0]]
    loss_fn = loss_fn if kind == "sft" else dpo_step_loss(chunked_logps, "live" in kind)
    STEPS[kind + "_chunked"], COLLATE_MS[kind + "_chunked"] = (loss_fn, cols, *sizes), COLLATE_MS[kind] + cols_ms
# scored tokens per step (response tokens + EOS; the chunked kinds run the LM head at these only), trained, reference
SCORED = {k: (2 * B * R, 2 * B * R if "live" in k else 0) for k in KINDS}


def train_step(kind, optimizer):
    """One optimizer step of `kind`: forward (under autocast), backward, clipping, AdamW."""
    set_grad_checkpoint(policy, grad_checkpoint if kind.endswith("_chunked") else False)
    with rt.autocast():
        loss = STEPS[kind][0](STEPS[kind][1])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_memory(kind):
    """measure.step_peak_memory of a step of `kind`, after a warm-up step (which makes AdamW's state)."""
    optimizer = configure_optimizer(policy, 0.1, 1e-5, (0.9, 0.99), rt.device_type)
    return step_peak_memory(partial(train_step, kind, optimizer), rt.device_type)


if peak_memory_kind:  # a fresh process measuring one kind for the peak-memory table below: JSON on stdout, exit
    print(json.dumps(step_memory(peak_memory_kind)))
    sys.exit(0)

# -----------------------------------------------------------------------------------------------------------
# Agreement: every DPO configuration computes the same loss (and the same policy log-probs) from the same weights

with torch.no_grad(), rt.autocast():
    init_losses = {k: STEPS[k][0](STEPS[k][1]).item() for k in DPO_KINDS}
    plain_pol, packed_pol = torch.cat(plain_logps(policy, plain_batch)), torch.cat(packed_logps(policy, packed_batch))
    logps_diff = (plain_pol - packed_pol).abs().max().item()  # summed log-probs: relative to their size below
    logps_rel_diff = logps_diff / plain_pol.abs().max().item()
tolerance = 1e-5 if rt.dtype == "float32" else 1e-2  # bf16 / fp16 activations round at ~1e-3 relative
loss_diff = max(abs(v - init_losses.get("dpo_live", v)) for v in init_losses.values()) if init_losses else 0.0
agreement = {"losses": init_losses, "loss_max_abs_diff": loss_diff, "policy_logps_max_abs_diff": logps_diff,
             "policy_logps_max_rel_diff": logps_rel_diff, "tolerance": tolerance, "ok": loss_diff <= tolerance}
print(f"{size}: {N / 1e6:.2f}M parameters (n_layer={n_layer}, n_head={n_head}, n_embd={n_embd}, vocab={vocab_size}),"
      f" {B} pairs of {P} prompt + {R} response tokens; rows: plain {T_plain}, packed {T_packed} tokens; "
      f"{rt.device} {rt.dtype}{' compiled' if compile else ''}, {torch.get_num_threads()} threads")
print(f"loss agreement: DPO losses at the initial weights {', '.join(f'{k} {v:.7f}' for k, v in init_losses.items())}"
      f"; max |diff| {loss_diff:.2e}; summed policy log-probs, plain vs packed: max |diff| {logps_diff:.2e} "
      f"(relative {logps_rel_diff:.1e}) "
      f"-> {'OK' if agreement['ok'] else 'MISMATCH'} (tolerance {tolerance:g})")

# -----------------------------------------------------------------------------------------------------------
# Peak memory per step kind: on CUDA in this process, kind after kind (the peak is reset before each step); on a
# CPU in a fresh process per kind, where no other kind's freed memory can hide its peak
memory_results = {k: step_memory(k) if rt.device_type == "cuda" else in_fresh_process(f"--peak_memory_kind={k}")
                  for k in KINDS} if peak_memory else None
if memory_results:
    print(memory_table(memory_results, rt.device_type))
if not timing:
    write_json(out, {"config": config, "size": size, "batch_pairs": B, "prompt_len": P, "response_len": R,
                     "loss_agreement": agreement, "peak_memory": memory_results})
    sys.exit(0)

# -----------------------------------------------------------------------------------------------------------
# Timing

peak, peak_cpu, peak_note = peak_flops(rt, sizes=(1024, 1536, 2048), repeats=8)  # (CPU: by wall, CPU time)
print(f"peak: {peak / 1e9:,.1f} GFLOP/s ({peak_note})" if peak else f"peak: unknown ({peak_note})")
if peak_cpu:
    print(f"      {peak_cpu / 1e9:,.1f} GFLOP/s by CPU time (all threads busy; the peak for mfu_cpu_time)")


# All steps train the same policy, from the same initial weights; each kind has its own AdamW state
policy.load_state_dict(initial_state)
optimizers = {k: configure_optimizer(policy, 0.1, 1e-5, (0.9, 0.99), rt.device_type) for k in KINDS}
all_times, all_cpu_times, all_faults = time_in_turns({k: partial(train_step, k, optimizers[k]) for k in KINDS},
                                                     warmup, steps, sync)
if rt.device_type == "cpu":  # measured again after the steps, keeping the best: a busy moment lowers one reading
    peak, peak_cpu = (max(x, y) for x, y in zip((peak, peak_cpu), measure_matmul_flops()))
    print(f"peak after the steps: {peak / 1e9:,.1f} GFLOP/s (best of both), {peak_cpu / 1e9:,.1f} by CPU time")
results = {}
for kind in KINDS:
    _, _, rows, T, examples, train_tokens, ref_tokens = STEPS[kind]
    times = all_times[kind]
    ms = statistics.median(times)  # the median: robust to another process taking the CPU for a moment
    flops = train_tokens * flops_per_token(T, True) + ref_tokens * flops_per_token(T, False)
    chunked = kind.endswith("_chunked")
    if chunked:  # the LM head (2VC FLOPs a token forward, 6VC trained) runs at the scored tokens only
        flops -= HEAD_FLOPS * (3 * (train_tokens - SCORED[kind][0]) + ref_tokens - SCORED[kind][1])
    executed = flops + chunked * (logprob_chunk > 0) * HEAD_FLOPS * SCORED[kind][0]  # + logits made again
    results[kind] = {
        "example": "sequence" if kind.startswith("sft") else "pair", "rows": rows, "row_len": T,
        "examples": examples, "executed_flops_per_example": executed / examples,
        "ms_per_step": ms, "ms_mean": statistics.fmean(times), "ms_min": min(times),
        "ms_per_example": ms / examples, "tokens_per_s": train_tokens / ms * 1000,
        "flops_per_step": flops, "flops_per_example": flops / examples, "flops_per_s": flops / ms * 1000,
        "mfu": flops / ms * 1000 / peak if peak else None, "collate_ms": COLLATE_MS[kind],
        "cpu_ms_per_step": statistics.median(all_cpu_times[kind]),  # all threads; near threads x ms when quiet
        # MFU by CPU time: what the step would reach with the cores to itself (a busy machine barely moves it)
        "mfu_cpu_time": (flops / (statistics.median(all_cpu_times[kind]) / torch.get_num_threads()) * 1000
                         / peak_cpu) if peak_cpu else None,
        "page_faults_per_step": statistics.median(all_faults[kind])}

# per example: DPO per pair against SFT per sequence, time next to FLOPs (16/6 live, 12/6 precomputed when plain)
for kind in DPO_KINDS:
    r, sft = results[kind], results["sft_chunked" if "chunked" in kind and "sft_chunked" in results else "sft"]
    r["time_ratio_vs_sft"] = r["ms_per_example"] / sft["ms_per_example"]
    r["flop_ratio_vs_sft"] = r["flops_per_example"] / sft["flops_per_example"]
    r["time_over_flop_ratio"] = r["time_ratio_vs_sft"] / r["flop_ratio_vs_sft"]
    r["speedup_vs_dpo_live"] = results["dpo_live"]["ms_per_example"] / r["ms_per_example"]
    # what the FLOP count predicts for that speed-up (the recomputed logits included)
    r["flop_speedup_vs_dpo_live"] = results["dpo_live"]["executed_flops_per_example"] / r["executed_flops_per_example"]
fastest = min(DPO_KINDS, key=lambda k: results[k]["ms_per_example"])

print(f"{'step':<27}{'ms/step':>10}{'ms/ex':>10}{'tok/s':>9}{'GFLOP/s':>9}{'MFU':>7}{'MFUcpu':>7}{'t/SFT':>7}"
      f"{'F/SFT':>7}{'t/F':>6}{'speedup':>8}{'F-pred':>7}{'collate':>9}{'faults':>8}")
for kind in KINDS:
    r = results[kind]
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    mfu_cpu = f"{r['mfu_cpu_time']:.1%}" if r["mfu_cpu_time"] is not None else "-"
    ratios = (f"{r['time_ratio_vs_sft']:>7.2f}{r['flop_ratio_vs_sft']:>7.2f}{r['time_over_flop_ratio']:>6.2f}"
              f"{r['speedup_vs_dpo_live']:>7.2f}x{r['flop_speedup_vs_dpo_live']:>6.2f}x") if kind in DPO_KINDS \
        else f"{'':>35}"
    print(f"{kind:<27}{r['ms_per_step']:>10.1f}{r['ms_per_example']:>10.2f}{r['tokens_per_s']:>9,.0f}"
          f"{r['flops_per_s'] / 1e9:>9.1f}{mfu:>7}{mfu_cpu:>7}{ratios}{r['collate_ms']:>7.1f}ms"
          f"{r['page_faults_per_step']:>8.0f}")
print("ms/ex: per pair for DPO, per sequence for SFT; t/SFT, F/SFT: time and FLOPs per example over SFT's "
      "(16/6 = 2.67 live, 12/6 = 2.00 precomputed; *_chunked against sft_chunked, their FLOPs with the LM head "
      "only where scored); t/F: their quotient; speedup: per pair vs dpo_live; F-pred: the speedup the FLOPs "
      "executed predict (a chunked backward makes its logits again); "
      "collate: host time to build the batch (not in ms/step); faults: minor page faults per step; MFUcpu: MFU "
      "by CPU time (not inflated by other processes; threads spin-waiting count against it)")
busy = None
if rt.device_type == "cpu":
    busy = statistics.fmean(results[k]["cpu_ms_per_step"] / (torch.get_num_threads() * results[k]["ms_per_step"])
                           for k in KINDS)
    # on a quiet machine every thread computes all the time (share ~1); far below, other processes took the cores
    print(f"cpu share: the process used {busy:.0%} of {torch.get_num_threads()} threads x wall time"
          f"{' -- the machine is busy, times are inflated: rerun on a quiet machine' if busy < 0.85 else ''}")
print(f"fastest DPO configuration: {fastest}, {results[fastest]['speedup_vs_dpo_live']:.2f}x faster per pair "
      f"than dpo_live")

# -----------------------------------------------------------------------------------------------------------
# Generation: the KV cache against re-running the whole sequence per new token (greedy, no EOS: full length)

generation_results = None
if generation:
    # (EOS + 2 is outside the vocabulary: no row stops early; prompt + new tokens fit the position table)
    gen = generation_results = time_generation(policy, [p for p, _, _ in pairs], R - 1, EOS + 2, PAD, rt)
    print(f"generate {B} x {R - 1} new tokens after {P}-token prompts (greedy): KV cache "
          f"{gen['ms_cache']:,.0f} ms ({gen['new_tokens_per_s_cache']:,.0f} tok/s), no cache "
          f"{gen['ms_no_cache']:,.0f} ms ({gen['new_tokens_per_s_no_cache']:,.0f} tok/s): {gen['speedup']:.1f}x; "
          f"outputs {'identical' if gen['same_outputs'] else 'DIFFER'}")


# the issue's targets, meant for a CPU run of the small shape on a quiet machine: (value, met?)
mfus = [results[k]["mfu"] for k in DPO_KINDS if results[k]["mfu"] is not None]
plain_t_over_f = max(results[k]["time_over_flop_ratio"] for k in ("dpo_live", "dpo_precomputed") if k in results)
targets = {
    "min DPO MFU >= 0.65": (min(mfus) if mfus else None, bool(mfus) and min(mfus) >= 0.65),
    "plain DPO time/FLOP ratio vs SFT <= 1.15": (plain_t_over_f, plain_t_over_f <= 1.15),
    "fastest DPO speed-up per pair >= 1.6": (results[fastest]["speedup_vs_dpo_live"],
                                             results[fastest]["speedup_vs_dpo_live"] >= 1.6),
    "losses agree": (loss_diff, agreement["ok"]),
}
# issue 14's, for the gpt2 shape on a CPU (memory: at 8 pairs of 256 + 256 tokens)
for name, kind, floor in (("chunked live DPO", "dpo_live_chunked", 1.15), ("fastest DPO", fastest, 2.1)):
    if kind in results:
        targets[f"{name} speed-up per pair >= {floor}"] = (results[kind]["speedup_vs_dpo_live"],
                                                           results[kind]["speedup_vs_dpo_live"] >= floor)
live = [k for k in ("dpo_live_chunked", "prefix_live_chunked") if k in (memory_results or {})]
if live and memory_results.get("dpo_live", {}).get("peak_mb"):  # the leanest live DPO step against today's
    best = min(live, key=lambda k: memory_results[k]["peak_mb"])
    ratio = memory_results[best]["peak_mb"] / memory_results["dpo_live"]["peak_mb"]
    targets[f"live DPO peak memory ({best}) / dpo_live <= 0.5"] = (ratio, ratio <= 0.5)
print("targets: " + "; ".join(f"{k}: {'-' if v is None else f'{v:.3g}'} {'ok' if ok else 'MISSED'}"
                              for k, (v, ok) in targets.items()))

# JSON: run settings, model shape, environment, the peak(s), per kind in "steps" the timings, FLOPs, MFU and
# (DPO kinds) ratios against SFT and dpo_live, the loss agreement check and the issue's targets
report = {
    "config": config, "size": size, "batch_pairs": B, "prompt_len": P, "response_len": R,
    "row_len": {"plain": T_plain, "packed": T_packed},
    "model": {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "vocab_size": vocab_size,
              "block_size": cfg.block_size, "n_params": N},
    "env": {"device": rt.device, "device_name": device_name(rt), "dtype": rt.dtype, "compile": compile,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "malloc": {k: os.environ.get(k) for k in MALLOC_ENV}},
    "peak_flops": peak, "peak_flops_cpu_time": peak_cpu, "peak_note": peak_note, "cpu_share": busy,
    "steps": results, "fastest_dpo": fastest,
    "fastest_dpo_speedup_vs_dpo_live": results[fastest]["speedup_vs_dpo_live"],
    "loss_agreement": agreement, "generation": generation_results, "peak_memory": memory_results,
    "targets": {k: {"value": v, "ok": ok} for k, (v, ok) in targets.items()},
}
write_json(out, report)
