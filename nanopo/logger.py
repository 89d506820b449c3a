"""
What a run reports: one JSON object per logged step in out_dir/metrics.jsonl, and on stdout one line per log
interval with the step's metrics, its speed (ms/iter, tok/s, MFU) and progress (iter N/M, elapsed, eta), plus
progress lines for any other loop long enough to wonder about (building pairs, evaluation).

MFU (model FLOPs utilisation) = model FLOPs per second / the device's peak FLOP/s. Model FLOPs are counted as
nanoGPT does: 6N per trained token for forward and backward and 2N per forward-only token (N parameters, plus
the attention term 12*L*H*Q*T), padding not counted. The peak is a bf16 table on GPUs and, on a CPU, the float32
matmul rate measured at the start of the run.
"""

import json
import math
import os
import sys
import time

import torch

from nanopo.runtime import all_reduce_sum, compiled_graphs
# re-exported: the scripts open the trackers and hand them to Logger
from nanopo.trackers import Trackers, check_report_to  # noqa: F401

PROGRESS_AFTER = 3.0   # seconds a loop runs before it prints progress lines
PROGRESS_EVERY = 5.0   # seconds between them


def duration(seconds):
    """1:05 for 65 s, 1:02:03 past an hour."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress of a long loop on stdout (rank 0): nothing for loops that finish within PROGRESS_AFTER seconds,
    then a line at most every PROGRESS_EVERY seconds, e.g. 'building pairs: 1,500/6,000, 0:04 elapsed, eta 0:12'."""

    def __init__(self, label, total, master=True):
        self.label, self.total, self.master = label, total, master
        self.t0 = self.last = time.time()

    def update(self, done):
        """`done` of the total are finished: print a progress line if the loop is slow enough to need one."""
        now = time.time()
        if not self.master or now - self.t0 < PROGRESS_AFTER or now - self.last < PROGRESS_EVERY or not done:
            return
        self.last = now
        eta = (now - self.t0) / done * (self.total - done)
        print(f"{self.label}: {done:,}/{self.total:,}, {duration(now - self.t0)} elapsed, eta {duration(eta)}",
              flush=True)


class Logger:
    """metrics.jsonl and the stdout lines of a training loop. A fresh run starts a fresh file; a resumed run keeps
    the records from before its checkpoint (iter < start_iter) and drops any logged after it, so the file reads
    as one uninterrupted run. The schema is in the README. Every rank calls every method (the metrics are
    all-reduced on log steps); only rank 0 writes and prints. `trackers` (nanopo/trackers.py, --report_to)
    get every record metrics.jsonl gets, and the summary."""

    def __init__(self, out_dir, rt, start_iter, max_iters, log_interval, flops_per_token=0.0, compile=False,
                 trackers=None):
        self.rt, self.start_iter, self.max_iters, self.log_interval = rt, start_iter, max_iters, log_interval
        self.flops_per_token, self.compile, self.trackers = flops_per_token, compile, trackers
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if rt.master:
            os.makedirs(out_dir, exist_ok=True)
            kept = []
            if start_iter > 0 and os.path.exists(self.path):
                with open(self.path) as f:
                    for line in f:
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError:
                            continue  # a line cut short by a kill
                        if record.get("iter", 0) < start_iter:
                            kept.append(line if line.endswith("\n") else line + "\n")
            with open(self.path, "w") as f:
                f.writelines(kept)
        self.peak, self.peak_measured = None, rt.device_type == "cpu"
        if rt.master and flops_per_token:
            self.peak, _, note = peak_flops(rt)
            if self.peak:
                print(f"mfu = model FLOPs per second (6N per trained token, 2N per forward-only token) / peak "
                      f"{self.peak / 1e9:,.1f} GFLOP/s ({note})")
        self.t_start, self.sums, self.names, self.tokens, self.step_ms = time.time(), None, [], 0, []
        self.graphs = None
        # for summary.json: the evaluation before the first step (the starting model), and the tokens and
        # step seconds of every logged step, over all ranks
        self.start_results = None
        self.run_tokens = 0.0
        self.run_seconds = 0.0
        if rt.master and start_iter > 0:
            # a resumed run: the starting evaluation is the kept record of iter 0 without a step's "lr"
            for line in kept:
                record = json.loads(line)
                if record.get("iter") == 0 and "lr" not in record:
                    self.start_results = {k: v for k, v in record.items() if k != "iter"}

    def log(self, record):
        """Append one record to metrics.jsonl (rank 0); a non-finite value is written as null, not NaN."""
        if self.rt.master:
            record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.trackers is not None:
                self.trackers.log(record)

    def progress(self, it):
        """'iter 50/100 ... 0:03 elapsed, eta 0:04': the eta from the wall time per step so far (evaluations and
        checkpoints included, as they recur)."""
        elapsed, done = time.time() - self.t_start, it - self.start_iter
        eta = f", eta {duration(elapsed / done * (self.max_iters - it))}" if done else ""
        return f"{duration(elapsed)} elapsed{eta}"

    def eval(self, it, results):
        """Log and print held-out results (nothing when there are none)."""
        if not results:
            return
        if it == 0:
            self.start_results = dict(results)
        self.log({"iter": it, **results})
        if self.rt.master:
            shown = ", ".join(f"{k} {v:.1%}" if k == "task_accuracy" else f"{k} {v:.4f}" for k, v in results.items())
            print(f"eval {it}/{self.max_iters}: {shown} | {self.progress(it)}", flush=True)

    def add(self, loss, metrics, share, tokens):
        """One micro-batch: its loss and metrics (means over its rows), weighted by its share of the step's
        rows (or tokens), so the step's record is the mean over all of them however the step was split."""
        values = torch.stack([loss.detach().float()] + [v.detach().float() for v in metrics.values()]) * share
        self.sums = values if self.sums is None else self.sums + values
        self.names = ["loss", *metrics]
        self.tokens += tokens

    def step(self, it, lr, grad_norm, dt, nonfinite_skipped=0):
        """End of a step: on log steps (every log_interval and the last) reduce the metrics over the ranks,
        write the record and print the line; then start the next step's sums."""
        self.step_ms.append(dt * 1000)
        if self.compile and it == self.start_iter:  # the first step pays for compilation: say so once
            self.graphs = compiled_graphs()
            if self.rt.master:
                print(f"torch.compile: first step took {dt:.1f} s ({self.graphs} graphs)")
        if it % self.log_interval == 0 or it == self.max_iters - 1:
            totals = all_reduce_sum(torch.cat([self.sums, torch.tensor([float(self.tokens)],
                                                                        device=self.sums.device)]), self.rt)
            record = {"iter": it, **dict(zip(self.names, totals[:-1].tolist())), "grad_norm": grad_norm.item(),
                      "lr": lr}
            if nonfinite_skipped:
                record["nonfinite_skipped"] = nonfinite_skipped
            self.log(record)
            if self.rt.master:
                print(self.line(record, totals[-1].item()), flush=True)
            self.run_tokens += totals[-1].item()
            self.run_seconds += sum(self.step_ms) / 1000
            self.tokens, self.step_ms = 0, []
        self.sums = None

    def line(self, r, tokens):
        """The stdout line of a logged step."""
        text = f"iter {r['iter']}/{self.max_iters}: loss {r['loss']:.4f}"
        for key, short, fmt in (("rewards/chosen", "rewards/chosen", "+.3f"), ("rewards/rejected", "rewards/rejected",
                                "+.3f"), ("rewards/margins", "margins", "+.3f"), ("rewards/accuracies", "accuracies",
                                ".2f"), ("kl", "kl", ".3f"), ("reward", "reward", "+.3f"),
                                ("sampled_accuracy", "sampled acc", ".2f")):
            if key in r:
                text += f", {short} {r[key]:{fmt}}"
        ms = sum(self.step_ms) / len(self.step_ms)
        text += f", lr {r['lr']:.2e} | {ms:.1f} ms/iter, {tokens / len(self.step_ms) / ms * 1000:,.0f} tok/s"
        if self.peak:
            text += self.mfu(tokens * self.flops_per_token / (sum(self.step_ms) / 1000) / self.rt.world_size)
        return text + f" | {self.progress(r['iter'] + 1)}"

    def mfu(self, achieved):
        """', mfu 61.2%', never over 100%: an achieved rate above a CPU peak measured at a busy moment makes the
        peak be measured again (the better one counts); if it still falls short, the figure is left out."""
        if achieved > self.peak and self.peak_measured:
            self.peak = max(self.peak, measure_matmul_flops(sizes=(1024,), repeats=4)[0])
        if achieved > self.peak:
            return ", mfu n/a (CPU peak measured while busy)"
        return f", mfu {achieved / self.peak:.1%}"

    def finish(self, nonfinite_skipped=0):
        """After the last step: how many graphs torch.compile built after the first step (0 = no recompiles),
        and how many updates were skipped."""
        if self.compile and self.graphs is not None and self.rt.master:
            print(f"torch.compile: {compiled_graphs() - self.graphs} recompiles after the first step")
        if nonfinite_skipped and self.rt.master:
            print(f"{nonfinite_skipped} update(s) skipped for non-finite values")


    def write_summary(self, out_dir, config, results, last_line, wall_s, **extra):
        """out_dir/summary.json (rank 0), one file to read a run by: the final held-out results and the
        starting ones (the evaluation before the first step), wall time, peak memory, tokens per second
        and MFU over the timed steps, the settings, the code's git commit, and the run's last stdout
        line. Written atomically: a reader never sees half a file."""
        if not self.rt.master:
            return
        tokens_per_s = self.run_tokens / self.run_seconds if self.run_seconds else None
        mfu = None
        if tokens_per_s and self.peak:
            mfu = tokens_per_s * self.flops_per_token / self.rt.world_size / self.peak
        summary_record = {"results": results, "start_results": self.start_results,
                          "wall_s": round(wall_s, 1), "peak_rss_mb": round(peak_rss_mb()),
                          "tokens_per_s": tokens_per_s, "mfu": mfu, **extra,
                          "git_commit": git_commit(), "config": config, "last_line": last_line}
        path = os.path.join(out_dir, "summary.json")
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(summary_record, f, indent=2)
        os.replace(tmp, path)
        return summary_record

    def close_trackers(self, summary_record=None):
        """The trackers get the summary (without the settings, which they got at the start) and are
        closed: their last records written, their runs marked finished."""
        if self.trackers is None:
            return
        if summary_record is not None:
            summary_record = {k: v for k, v in summary_record.items() if k != "config"}
        self.trackers.close(summary_record)


def git_commit():
    """The commit of the code that runs (with '+changes' when the checkout has uncommitted edits), or
    None outside a git checkout."""
    import subprocess
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    if status.stdout.strip():
        commit += "+changes"
    return commit


# -----------------------------------------------------------------------------------------------------------
# FLOPs and peak FLOP/s, for MFU

def model_flops_per_token(model, rows, forward_only=0, logprobs="plain"):
    """Model FLOPs per trained token, as nanoGPT counts them: 6N plus the attention term for the forward and
    backward of a row of the data's mean length (prompt + response), plus a third of that for each forward-only
    pass per trained token (a live reference, ...). With logprobs='chunked' the LM head counts only at the
    response tokens, where it runs (its recomputation in backward is not counted: these are model FLOPs)."""
    mean_len = sum(len(row[0]) + len(row[1]) for row in rows) / len(rows)
    flops = model.flops_per_token(mean_len) + forward_only * model.flops_per_token(mean_len, train=False)
    if logprobs == "chunked":  # the head's 2VC forward FLOPs (4VC, 6VC trained) skipped at prompt positions
        head = model.lm_head.weight.numel() * (2 * forward_only + (6 if model.lm_head.weight.requires_grad else 4))
        flops -= head * sum(len(row[0]) for row in rows) / sum(len(row[0]) + len(row[1]) for row in rows)
    return flops


GPU_PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L4", 121e12),
                 ("RTX 4090", 165e12)]  # dense bf16 tensor-core peaks per GPU (vendor data sheets)


def measure_matmul_flops(dtype=torch.float32, sizes=(1024, 1536, 2048), repeats=8):
    """The best FLOP/s of square torch.mm over a few sizes (best of `repeats` timings each): the CPU's
    practical peak for the dtype, measured with the threads and allocator this run uses. Returns it twice:
    by wall time, and by CPU time per thread (which other processes on a busy machine do not inflate)."""
    best_wall, best_cpu = 0.0, 0.0
    g = torch.Generator().manual_seed(0)  # its own generator: a run's (possibly restored) RNG stream is untouched
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, generator=g), torch.randn(n, n, dtype=dtype, generator=g)
        c = torch.mm(a, b)  # warm-up
        for _ in range(repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            torch.mm(a, b, out=c)
            wall, cpu = time.perf_counter() - t0, (time.process_time() - c0) / torch.get_num_threads()
            best_wall, best_cpu = max(best_wall, 2 * n ** 3 / wall), max(best_cpu, 2 * n ** 3 / max(cpu, 1e-9))
    return best_wall, best_cpu


def peak_flops(rt, sizes=(1024,), repeats=4):
    """(peak FLOP/s or None, peak by CPU time or None, where it comes from): on CUDA the bf16 table above, on a
    CPU the float32 matmul rate measured now (a fraction of a second with the default sizes)."""
    if rt.device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK_BF16:
            if key in name:
                note = f"{name}: dense bf16 peak from the table"
                if rt.dtype != "bfloat16":
                    note += f" (this run uses {rt.dtype}: MFU is against the bf16 peak)"
                return flops, None, note
        return None, None, f"{name}: not in the peak table, no MFU (add it to GPU_PEAK_BF16)"
    if rt.device_type == "cpu":
        return (*measure_matmul_flops(sizes=sizes, repeats=repeats),
                f"CPU: measured float32 torch.mm rate (best of {'..'.join(map(str, sizes))} squares)")
    return None, None, f"{rt.device_type}: no peak known, no MFU"


def peak_rss_mb():
    """This process's peak resident memory in MB (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def summary(results, start_accuracy=None):
    """The evaluation results as a fragment of a script's last line: 'held-out task_accuracy 44.0% (SFT) -> 96.0%'
    when the accuracy the run started from is given."""
    if not results:
        return "no held-out evaluation (no checkable task; held-out rows come from --eval_dataset or --eval_split)"
    shown = [f"{k} {v:.1%}" if k == "task_accuracy" else f"{k} {v:.4f}" for k, v in results.items()]
    if start_accuracy is not None and "task_accuracy" in results:
        shown[0] = f"task_accuracy {start_accuracy:.1%} (SFT) -> {results['task_accuracy']:.1%}"
    return "held-out " + ", ".join(shown)
