"""
Measuring tools for the benchmark scripts (bench/): host time of a function, steps timed in turns
(wall and CPU time, page faults), the peak memory of one step (allocated memory on CUDA, resident
memory on a CPU), a fresh process for a measurement, generation with and without the KV cache, the
device's name and the JSON report.

Peak memory on a CPU: the kernel keeps a process's peak resident set size (VmHWM in /proc/self/status) and lets
a process set it back to the current size (writing 5 to /proc/self/clear_refs, Linux >= 4.0). Memory that malloc
holds free still counts as resident, so reset_peak_rss first hands it back (glibc's malloc_trim); then the peak
mark after a step is what that step needed on top of what was live before it.
"""

import json
import os
import platform
import subprocess
import sys
import time

import torch


def timed(fn, repeats=5):
    """(result, best wall time in ms) of a host-side function such as a collate."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return result, best * 1000


def minor_faults():
    """Minor page faults of this process so far (0 where the resource module is missing, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_in_turns(steps, warmup, timed_steps, sync=lambda: None):
    """{name: step function} -> per name, lists over the timed steps of: wall ms, CPU ms (all threads), minor page
    faults. The steps take turns, one each per round (the order rotating), so a change in the machine's load during
    the run slows every one alike instead of the one running then; the first `warmup` rounds are not timed."""
    names = list(steps)
    times, cpu_times, faults = {k: [] for k in names}, {k: [] for k in names}, {k: [] for k in names}
    for i in range(warmup + timed_steps):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            sync()
            f0, c0, t0 = minor_faults(), time.process_time(), time.perf_counter()
            steps[name]()
            sync()
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1000)
                cpu_times[name].append((time.process_time() - c0) * 1000)
                faults[name].append(minor_faults() - f0)
    return times, cpu_times, faults


def rss_mb(key="VmRSS"):
    """This process's resident memory in MB from /proc/self/status (Linux; None elsewhere): VmRSS, now, or VmHWM,
    the peak since the process started or since reset_peak_rss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024
    except (OSError, StopIteration):
        return None


def reset_peak_rss():
    """Start a new peak-RSS measurement (the module docstring). Returns whether the peak mark could be reset."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except (OSError, AttributeError):
        return False


def step_peak_memory(step, device_type, repeats=1):
    """Run step() once as a warm-up, then once more -> {'peak_mb': the peak memory while it ran, 'step_mb': that
    peak over the memory before it}, in MB: CUDA allocated memory (torch.cuda.max_memory_allocated, reset before),
    a CPU's resident memory (None for both where /proc is missing). repeats > 1: that many steps measured after
    the one warm-up, each on its own (for a step that cycles through batches of different lengths): the largest
    peak, with its step_mb, and every measured step's peak in 'peaks_mb'."""
    step()
    if repeats == 1:
        return _measured_step(step, device_type)
    found = [_measured_step(step, device_type) for _ in range(repeats)]
    largest = max(found, key=lambda m: m["peak_mb"] or 0)
    return dict(largest, peaks_mb=[m["peak_mb"] for m in found])


def _measured_step(step, device_type):
    """step_peak_memory's measurement of one step() (after the warm-up)."""
    if device_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        before = rss_mb() if reset_peak_rss() else None
        step()
        peak = before and rss_mb("VmHWM")
    return {"peak_mb": peak, "step_mb": peak and peak - before}


def memory_table(found, device_type):
    """step_peak_memory's numbers per kind {kind: {'peak_mb', 'step_mb'}} as lines of text; a '<kind>_chunked' is
    also shown over its plain '<kind>', a '<kind>_packed' over its padded '<kind>', and every kind over dpo_live's
    peak (the plain live DPO step), each where both were measured."""
    live = found.get("dpo_live", {}).get("peak_mb")

    def over(kind, suffix):  # a kind's peak over its twin's without `suffix`, or '' where either is missing
        twin = found.get(kind.removesuffix(suffix), {}).get("peak_mb") if kind.endswith(suffix) else None
        return f"{found[kind]['peak_mb'] / twin:.2f}" if twin and found[kind]["peak_mb"] else ""

    lines = [(f"peak memory of a step, MB ({'allocated' if device_type == 'cuda' else 'resident'}; step: over the "
              "memory before it; /plain: a *_chunked kind's peak over its plain kind's; /padded: a *_packed kind's "
              "over its padded twin's; /dpo_live: over dpo_live's)"),
             f"  {'kind':<34}{'peak':>10}{'step':>10}{'/plain':>8}{'/padded':>8}{'/dpo_live':>10}"]
    for kind, m in found.items():
        lines.append(f"  {kind:<34}{m['peak_mb'] or 0:>10,.0f}{m['step_mb'] or 0:>10,.0f}"
                     f"{over(kind, '_chunked'):>8}{over(kind, '_packed'):>8}"
                     + (f"{m['peak_mb'] / live:>10.2f}" if live and m["peak_mb"] else ""))
    return "\n".join(lines)


def this_command():
    """The command line that started this process: `python -m bench.step_time ...` when run as a module (so
    the repository root stays on sys.path), else `python path ...`."""
    spec = sys.modules["__main__"].__spec__
    if spec is not None:
        return [sys.executable, "-m", spec.name, *sys.argv[1:]]
    return [sys.executable, *sys.argv]


def in_fresh_process(*args):
    """Run this script again, as it was started plus `args`, in a new process, and return the JSON object its last
    line of stdout holds; a failure ends this process with the other's error."""
    run = subprocess.run(this_command() + list(args), capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"error: {' '.join(args)} failed in its own process:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.splitlines()[-1])


def time_generation(model, prompts, new_tokens, eos_id, pad_id, rt):
    """Greedy generation of new_tokens after each prompt with the KV cache and without (re-running the sequence
    per token), after a short warm-up each: wall times, tokens/s, speed-up, and whether the outputs agree."""
    ms, outs = {}, {}
    model.eval()
    for use_cache in (True, False):
        with rt.autocast():
            model.generate(prompts[:2], 4, eos_id, pad_id, use_cache=use_cache)  # warm-up
            if rt.device_type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs[use_cache] = model.generate(prompts, new_tokens, eos_id, pad_id, use_cache=use_cache)
            if rt.device_type == "cuda":
                torch.cuda.synchronize()
        ms[use_cache] = (time.perf_counter() - t0) * 1000
    n = len(prompts) * new_tokens
    return {"prompts": len(prompts), "prompt_len": len(prompts[0]), "new_tokens": new_tokens,
            "ms_cache": ms[True], "ms_no_cache": ms[False], "new_tokens_per_s_cache": n / ms[True] * 1000,
            "new_tokens_per_s_no_cache": n / ms[False] * 1000, "speedup": ms[False] / ms[True],
            "same_outputs": outs[True] == outs[False]}


def device_name(rt):
    """The GPU's name, or the CPU model's (Linux names it in /proc/cpuinfo; platform.processor() is often empty)."""
    if rt.device_type == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write_json(path, report):
    """The report as indented JSON at `path` ('' = nowhere), its folder made if needed."""
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}")
