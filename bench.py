"""
Step-time benchmark: how much does a preference-optimisation step cost next to an SFT step, and what do the
faster DPO configurations buy? Times, after warm-up, five kinds of optimizer step on random tokens:

  sft                 fwd + bwd + AdamW on 2B sequences [prompt | response]          (per example: a sequence)
  dpo_live            policy fwd + bwd on the concatenated 2B rows (chosen, rejected),
                      reference fwd on the same rows under no_grad                     (per example: a pair)
  dpo_precomputed     as dpo_live, the reference log-probs computed once beforehand   (per example: a pair)
  prefix_live         one packed row [prompt | chosen | rejected] per pair (data.collate_prefix_shared):
                      B rows instead of 2B, the prompt run once, for policy and reference
  prefix_precomputed  packed rows, precomputed reference log-probs

and then generation (what building on-policy pairs and task evaluation run): the B prompts continued greedily
by response_len - 1 tokens with model.generate, with its KV cache and without (every step re-running the
sequence), the outputs checked equal.

Every step is what dpo.py / sft.py run: model.GPT, optim.configure_optimizer (AdamW), losses.dpo_loss /
losses.sft_loss, data.collate_pairs / data.collate_prefix_shared, gradient clipping at 1.0. Batches are collated
and moved to the device before timing (collation is timed on its own and reported as collate_ms). The kinds
take turns step by step; ms/step is the median over the timed steps.

FLOPs are counted as nanoGPT's estimate_mfu does: a token of fwd + bwd costs 6N + 12*L*H*Q*T (N = parameters
without the position table, L layers, H heads, Q head size, T the row length), a forward-only token a third of
that. Per example, live DPO costs 2 sequences x (fwd + bwd) + 2 x fwd = 16N against SFT's 6N for one sequence
(ratio 16/6), precomputed 12N/6N; the prefix-shared steps run fewer tokens per pair. MFU is achieved FLOP/s over
a peak: on CUDA a per-GPU bf16 table below, on CPU the float32 matmul rate this script measures in the same run.

$ python bench.py --size=tiny --steps=20
$ python bench.py --size=small --steps=20 --out=out/bench_small.json
$ python bench.py --size=gpt2 --device=cuda --batch_size=8 --prompt_len=256 --response_len=256 --compile=True
$ python bench.py --memory=True --size=gpt2   # peak memory: full vs LoRA, +/- activation checkpointing (bench_memory)

Memory allocator (CPU): glibc's malloc serves blocks above its mmap threshold (128 KiB, rising dynamically to
at most 32 MiB) with mmap and returns freed memory to the kernel above its trim threshold, so a step's large
activations are page-faulted in afresh (zero-filled) on every step. MALLOC_MMAP_THRESHOLD_=4294967296 and
MALLOC_TRIM_THRESHOLD_=4294967296 keep blocks up to 4 GiB in the heap for reuse. Some older glibc versions
ignore mmap thresholds above 32 MiB; glibc 2.36 accepts 4 GiB (a 64 MiB malloc then reports 0 mmapped bytes in
mallinfo2), and a small-size fwd + bwd here drops from ~13,000 to ~3,000 minor page faults (0 once warm). When
neither variable is set, bench.py re-executes itself once with both set, so numbers do not depend on the
caller's shell; set either variable yourself (any value) to opt out.

OpenMP threads: as in sft.py and dpo.py, GOMP_SPINCOUNT=1000 unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set
(bench_threads.py and the README's "CPU threads" say why), so the steps timed here run as training runs them.
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
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})

import copy
import json
import statistics
import time

import torch

import runtime
from configurator import apply_overrides, overridden
from data import collate, collate_pairs, collate_prefix_shared
from logger import measure_matmul_flops, peak_flops
from logprobs import packed_row_logps, summed_logps, token_logps
from losses import dpo_loss, sft_loss
from model import GPT, GPTConfig
from optim import configure_optimizer

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
out = "out/bench.json"    # '' = print only
memory = False            # True: the memory benchmark instead (bench_memory.py: full vs LoRA, +/- checkpointing)
lora_rank = 8             # memory benchmark: the adapters' rank
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
# dense bf16 peak FLOP/s per GPU (no sparsity), matched against torch.cuda.get_device_name()
KINDS = ["sft", "dpo_live", "dpo_precomputed", "prefix_live", "prefix_precomputed"]
DPO_KINDS = KINDS[1:]

if size not in SIZES:
    sys.exit(f"error: unknown size '{size}': expected one of {', '.join(SIZES)}")
n_layer, n_head, n_embd, vocab_size, block_size, B0, P0, R0 = SIZES[size]
B, P, R = batch_size or B0, prompt_len or P0, response_len or R0
if B < 1 or P < 1 or R < 1:
    sys.exit("error: batch_size, prompt_len and response_len must be positive")
if memory:  # one live DPO step's peak memory and time per pair, each kind in a fresh process (bench_memory.py)
    import bench_memory
    bench_memory.main(config, dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                                   block_size=block_size), overridden)
    sys.exit(0)
rt = runtime.setup(device, dtype, seed=1)


def sync():
    if rt.device_type == "cuda":
        torch.cuda.synchronize()


def device_peak_flops():
    """(peak FLOP/s, peak FLOP/s by CPU time or None, where they come from) for this run's device."""
    return peak_flops(rt, sizes=(1024, 1536, 2048), repeats=8)


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
Q = n_embd // n_head


flops_per_token = policy.flops_per_token


g = torch.Generator().manual_seed(0)
rand = lambda n: torch.randint(0, vocab_size - 2, (n,), generator=g).tolist()
EOS, PAD = vocab_size - 2, vocab_size - 1
pairs = [(rand(P), rand(R - 1) + [EOS], rand(R - 1) + [EOS]) for _ in range(B)]


def to_device(d):
    return {k: v.to(rt.device) if torch.is_tensor(v) else v for k, v in d.items()}


def timed(fn, repeats=5):
    """(result, best wall time in ms) of a host-side function such as a collate."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return result, best * 1000


def collate_plain_batch():
    idx, targets, mask = collate_pairs(pairs, PAD)  # (2B, T_plain): chosen rows, then rejected rows
    return {"idx": idx, "targets": targets, "mask": mask}


def collate_sft_batch():  # 2B sequences: the same token count as the DPO policy pass
    idx, targets, mask = collate([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], PAD)
    return {"idx": idx, "targets": targets, "mask": mask}


sft_batch, sft_collate_ms = timed(collate_sft_batch)
plain_batch, plain_collate_ms = timed(collate_plain_batch)
packed_batch, packed_collate_ms = timed(lambda: collate_prefix_shared(pairs, PAD))
sft_batch, plain_batch, packed_batch = to_device(sft_batch), to_device(plain_batch), to_device(packed_batch)

train_model = torch.compile(policy, dynamic=False) if compile else policy
ref_model = torch.compile(reference, dynamic=False) if compile else reference


def plain_logps(model, batch):
    """The concatenated forward, as dpo.py runs it -> (chosen_logps, rejected_logps), each (B,)."""
    logits, _ = model(batch["idx"])
    logps, _ = summed_logps(token_logps(logits, batch["targets"]), batch["mask"])
    return logps[:B], logps[B:]


def packed_logps(model, batch):
    logits, _ = model(batch["idx"], pos=batch["pos"], attn_mask=batch["attn_mask"])
    return packed_row_logps(logits, batch)[:2]


# the reference log-probs for the precomputed kinds: one pass over the data before training, as a dataset
# column would hold them; the same numbers serve both layouts
with torch.no_grad(), rt.autocast():
    ref_chosen, ref_rejected = plain_logps(ref_model, plain_batch)
plain_batch.update(ref_chosen=ref_chosen, ref_rejected=ref_rejected)
packed_batch.update(ref_chosen=ref_chosen, ref_rejected=ref_rejected)


def sft_step_loss(batch):
    logits, _ = train_model(batch["idx"])
    logps, n_tokens = summed_logps(token_logps(logits, batch["targets"]), batch["mask"])
    return sft_loss(logps, n_tokens)


def dpo_step_loss(logps_fn, live):
    def loss_fn(batch):
        policy_chosen, policy_rejected = logps_fn(train_model, batch)
        if live:
            with torch.no_grad():
                rc, rr = logps_fn(ref_model, batch)
        else:
            rc, rr = batch["ref_chosen"], batch["ref_rejected"]
        return dpo_loss(policy_chosen, policy_rejected, rc, rr, beta)[0]
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

# -----------------------------------------------------------------------------------------------------------
# Agreement: every DPO configuration computes the same loss (and the same policy log-probs) from the same weights

with torch.no_grad(), rt.autocast():
    init_losses = {k: STEPS[k][0](STEPS[k][1]).item() for k in DPO_KINDS}
    plain_pol, packed_pol = torch.cat(plain_logps(policy, plain_batch)), torch.cat(packed_logps(policy, packed_batch))
    logps_diff = (plain_pol - packed_pol).abs().max().item()  # summed log-probs: relative to their size below
    logps_rel_diff = logps_diff / plain_pol.abs().max().item()
tolerance = 1e-5 if rt.dtype == "float32" else 1e-2  # bf16 / fp16 activations round at ~1e-3 relative
loss_diff = max(abs(v - init_losses["dpo_live"]) for v in init_losses.values())
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
# Timing

peak, peak_cpu, peak_note = device_peak_flops()
print(f"peak: {peak / 1e9:,.1f} GFLOP/s ({peak_note})" if peak else f"peak: unknown ({peak_note})")
if peak_cpu:
    print(f"      {peak_cpu / 1e9:,.1f} GFLOP/s by CPU time (all threads busy; the peak for mfu_cpu_time)")


def minor_faults():
    """Minor page faults of this process so far (0 where the resource module is missing, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_kinds():
    """Per kind, lists over the timed steps of: wall ms, CPU ms (all threads), minor page faults.
    The kinds take turns, one step each per round (the order rotating), so a change in the machine's load during
    the run slows every kind alike instead of the one running then. All steps train the same policy; each kind
    has its own AdamW state."""
    policy.load_state_dict(initial_state)
    optimizers = {k: configure_optimizer(policy, 0.1, 1e-5, (0.9, 0.99), rt.device_type) for k in KINDS}
    times, cpu_times, faults = {k: [] for k in KINDS}, {k: [] for k in KINDS}, {k: [] for k in KINDS}
    for i in range(warmup + steps):
        for j in range(len(KINDS)):
            kind = KINDS[(i + j) % len(KINDS)]
            loss_fn, batch, optimizer = STEPS[kind][0], STEPS[kind][1], optimizers[kind]
            sync()
            f0, c0, t0 = minor_faults(), time.process_time(), time.perf_counter()
            with rt.autocast():
                loss = loss_fn(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if i >= warmup:
                times[kind].append((time.perf_counter() - t0) * 1000)
                cpu_times[kind].append((time.process_time() - c0) * 1000)
                faults[kind].append(minor_faults() - f0)
    return times, cpu_times, faults


all_times, all_cpu_times, all_faults = time_kinds()
if rt.device_type == "cpu":  # measured again after the steps, keeping the best: a busy moment lowers one reading
    peak, peak_cpu = (max(x, y) for x, y in zip((peak, peak_cpu), measure_matmul_flops()))
    print(f"peak after the steps: {peak / 1e9:,.1f} GFLOP/s (best of both), {peak_cpu / 1e9:,.1f} by CPU time")
results = {}
for kind in KINDS:
    _, _, rows, T, examples, train_tokens, ref_tokens = STEPS[kind]
    times = all_times[kind]
    ms = statistics.median(times)  # the median: robust to another process taking the CPU for a moment
    flops = train_tokens * flops_per_token(T, True) + ref_tokens * flops_per_token(T, False)
    results[kind] = {
        "example": "sequence" if kind == "sft" else "pair", "rows": rows, "row_len": T, "examples": examples,
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
sft = results["sft"]
for kind in DPO_KINDS:
    r = results[kind]
    r["time_ratio_vs_sft"] = r["ms_per_example"] / sft["ms_per_example"]
    r["flop_ratio_vs_sft"] = r["flops_per_example"] / sft["flops_per_example"]
    r["time_over_flop_ratio"] = r["time_ratio_vs_sft"] / r["flop_ratio_vs_sft"]
    r["speedup_vs_dpo_live"] = results["dpo_live"]["ms_per_example"] / r["ms_per_example"]
fastest = min(DPO_KINDS, key=lambda k: results[k]["ms_per_example"])

print(f"{'step':<19}{'ms/step':>10}{'ms/ex':>10}{'tok/s':>9}{'GFLOP/s':>9}{'MFU':>7}{'MFUcpu':>7}{'t/SFT':>7}"
      f"{'F/SFT':>7}{'t/F':>6}{'speedup':>8}{'collate':>9}{'faults':>8}")
for kind in KINDS:
    r = results[kind]
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    mfu_cpu = f"{r['mfu_cpu_time']:.1%}" if r["mfu_cpu_time"] is not None else "-"
    ratios = (f"{r['time_ratio_vs_sft']:>7.2f}{r['flop_ratio_vs_sft']:>7.2f}{r['time_over_flop_ratio']:>6.2f}"
              f"{r['speedup_vs_dpo_live']:>7.2f}x") if kind != "sft" else f"{'':>28}"
    print(f"{kind:<19}{r['ms_per_step']:>10.1f}{r['ms_per_example']:>10.2f}{r['tokens_per_s']:>9,.0f}"
          f"{r['flops_per_s'] / 1e9:>9.1f}{mfu:>7}{mfu_cpu:>7}{ratios}{r['collate_ms']:>7.1f}ms"
          f"{r['page_faults_per_step']:>8.0f}")
print("ms/ex: per pair for DPO, per sequence for SFT; t/SFT, F/SFT: time and FLOPs per example over SFT's "
      "(16/6 = 2.67 live, 12/6 = 2.00 precomputed); t/F: their quotient; speedup: per pair vs dpo_live; "
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
    prompts, new_tokens = [p for p, _, _ in pairs], R - 1  # prompt + new tokens fit the position table
    policy.eval()
    gen_ms, gen_out = {}, {}
    for use_cache in (True, False):
        with rt.autocast():
            policy.generate(prompts[:2], 4, EOS + 2, PAD, use_cache=use_cache)  # warm-up
            sync()
            t0 = time.perf_counter()
            gen_out[use_cache] = policy.generate(prompts, new_tokens, EOS + 2, PAD, use_cache=use_cache)
            sync()
        gen_ms[use_cache] = (time.perf_counter() - t0) * 1000
    generation_results = {
        "prompts": B, "prompt_len": P, "new_tokens": new_tokens,
        "ms_cache": gen_ms[True], "ms_no_cache": gen_ms[False],
        "new_tokens_per_s_cache": B * new_tokens / gen_ms[True] * 1000,
        "new_tokens_per_s_no_cache": B * new_tokens / gen_ms[False] * 1000,
        "speedup": gen_ms[False] / gen_ms[True], "same_outputs": gen_out[True] == gen_out[False]}
    gen = generation_results
    print(f"generate {B} x {new_tokens} new tokens after {P}-token prompts (greedy): KV cache "
          f"{gen['ms_cache']:,.0f} ms ({gen['new_tokens_per_s_cache']:,.0f} tok/s), no cache "
          f"{gen['ms_no_cache']:,.0f} ms ({gen['new_tokens_per_s_no_cache']:,.0f} tok/s): {gen['speedup']:.1f}x; "
          f"outputs {'identical' if gen['same_outputs'] else 'DIFFER'}")


def device_name():
    if rt.device_type == "cuda":
        return torch.cuda.get_device_name()
    try:  # Linux names the CPU model here; platform.processor() is often empty
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# the issue's targets, meant for a CPU run of the small shape on a quiet machine: (value, met?)
mfus = [results[k]["mfu"] for k in DPO_KINDS if results[k]["mfu"] is not None]
plain_t_over_f = max(results[k]["time_over_flop_ratio"] for k in ("dpo_live", "dpo_precomputed"))
targets = {
    "min DPO MFU >= 0.65": (min(mfus) if mfus else None, bool(mfus) and min(mfus) >= 0.65),
    "plain DPO time/FLOP ratio vs SFT <= 1.15": (plain_t_over_f, plain_t_over_f <= 1.15),
    "fastest DPO speed-up per pair >= 1.6": (results[fastest]["speedup_vs_dpo_live"],
                                             results[fastest]["speedup_vs_dpo_live"] >= 1.6),
    "losses agree": (loss_diff, agreement["ok"]),
}
print("targets: " + "; ".join(f"{k}: {'-' if v is None else f'{v:.3g}'} {'ok' if ok else 'MISSED'}"
                              for k, (v, ok) in targets.items()))

# JSON: run settings, model shape, environment, the peak(s), per kind in "steps" the timings, FLOPs, MFU and
# (DPO kinds) ratios against SFT and dpo_live, the loss agreement check and the issue's targets
report = {
    "config": config, "size": size, "batch_pairs": B, "prompt_len": P, "response_len": R,
    "row_len": {"plain": T_plain, "packed": T_packed},
    "model": {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "vocab_size": vocab_size,
              "block_size": cfg.block_size, "n_params": N},
    "env": {"device": rt.device, "device_name": device_name(), "dtype": rt.dtype, "compile": compile,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "malloc": {k: os.environ.get(k) for k in MALLOC_ENV}},
    "peak_flops": peak, "peak_flops_cpu_time": peak_cpu, "peak_note": peak_note, "cpu_share": busy,
    "steps": results, "fastest_dpo": fastest,
    "fastest_dpo_speedup_vs_dpo_live": results[fastest]["speedup_vs_dpo_live"],
    "loss_agreement": agreement, "generation": generation_results,
    "targets": {k: {"value": v, "ok": ok} for k, (v, ok) in targets.items()},
}
if out:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out}")
