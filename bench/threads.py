"""
How the CPU thread settings hold up on a busy machine: under each setting, on an idle machine and with a competing
process that keeps one core busy (a spinning Python loop, like a browser tab or another training run on a
laptop), it times a short `sft.py` run (the median ms/iter of its training steps) and a whole default `dpo.py`
run (wall seconds: pair building and evaluation generate token by token, many small ops, which threads feel
differently from the training steps' large matmuls).

Why it matters: PyTorch runs a CPU op on one OpenMP thread per core, and a thread that finishes its share
spin-waits for the others a while before it sleeps (GNU OpenMP, which PyTorch's Linux wheels use: GOMP_SPINCOUNT
iterations, 300,000 by default). When another process holds one of the cores, the thread that shares it runs
late, and the others burn their cores spinning until it catches up. OMP_WAIT_POLICY=PASSIVE makes waiting threads
sleep at once, a short GOMP_SPINCOUNT makes them sleep soon (sft.py and dpo.py set 1000 unless you set either);
fewer threads (torch.set_num_threads, --threads) leave a core free.

$ python -m bench.threads                  # every setting, idle and busy (~8 minutes on 2 cores)
$ python -m bench.threads --iters=50 --repeats=1
"""

import os
import re
import statistics
import subprocess
import sys
import time

from configurator import apply_overrides

iters = 100       # SFT steps per timed run
repeats = 2       # runs per setting and load; the median over runs of each run's median ms/iter is shown
config = apply_overrides(globals())

# the repository root: sft.py and dpo.py live there
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# setting name -> (environment variables, extra sft.py arguments)
UNSET = {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": ""}  # '' = removed from the environment
SETTINGS = {  # (the scripts set GOMP_SPINCOUNT=1000 when neither variable is set: each row sets one)
    "GOMP_SPINCOUNT=300000 (OpenMP's own default)": (dict(UNSET, GOMP_SPINCOUNT="300000"), []),
    "OMP_WAIT_POLICY=PASSIVE (sleep at once)": (dict(UNSET, OMP_WAIT_POLICY="PASSIVE"), []),
    "GOMP_SPINCOUNT=1000 (nanoPO's default)": (dict(UNSET, GOMP_SPINCOUNT="1000"), []),
    "--threads=1 (and the default spin)": (UNSET, ["--threads=1"]),
}
OUT = os.path.join("out", "bench_threads")


def run(script, env, args):
    """Run one script with extra environment variables (a '' value removes one); its stdout and wall seconds."""
    env = {k: v for k, v in {**os.environ, **env}.items() if v != ""}
    t0 = time.time()
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=env, capture_output=True, text=True,
                         check=True).stdout
    return out, time.time() - t0


def sft_ms_per_iter(env, args):
    """The median ms/iter over a short sft.py run's training lines (the first, which pays for warm-up, left out)."""
    out, _ = run("sft.py", env, [f"--max_iters={iters}", "--eval_interval=100000", "--log_interval=10", "--n_eval=10",
                                 f"--out_dir={OUT}/sft_timed", *args])
    return statistics.median([float(m) for m in re.findall(r"\| ([\d.]+) ms/iter", out)][1:])


def dpo_seconds(env, args):
    """Wall seconds of a whole default dpo.py run (pair building, 3 evaluations, 100 steps)."""
    return run("dpo.py", env, [f"--sft_ckpt={OUT}/sft/ckpt.pt", f"--out_dir={OUT}/dpo", *args])[1]


def hog():
    """A process that keeps one core busy until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


if __name__ == "__main__":
    if not os.path.exists(f"{OUT}/sft/ckpt.pt"):  # an SFT model for the DPO runs (a short run does)
        run("sft.py", {}, ["--max_iters=300", "--n_eval=200", f"--out_dir={OUT}/sft"])
    results = {}
    for load in ("idle", "one core busy"):
        busy = hog() if load != "idle" else None
        time.sleep(0.5)
        try:
            for name, (env, args) in SETTINGS.items():
                sft = [sft_ms_per_iter(env, args) for _ in range(repeats)]
                dpo = [dpo_seconds(env, args) for _ in range(repeats)]
                results[name, load] = statistics.median(sft), statistics.median(dpo)
                print(f"{load:>13} | {name:<40} | sft {results[name, load][0]:6.1f} ms/iter (" +
                      ", ".join(f"{r:.1f}" for r in sft) + f") | dpo {results[name, load][1]:5.1f} s (" +
                      ", ".join(f"{r:.1f}" for r in dpo) + ")", flush=True)
        finally:
            if busy:
                busy.kill()
    print(f"\n{os.cpu_count()} logical cores; medians of {repeats} runs. SFT: ms/iter of the default model; DPO: "
          "wall seconds of `python dpo.py`")
    print("| setting | SFT idle | SFT, one core busy | DPO idle | DPO, one core busy |\n|---|---|---|---|---|")
    for name in SETTINGS:
        (s_idle, d_idle), (s_busy, d_busy) = results[name, "idle"], results[name, "one core busy"]
        print(f"| {name} | {s_idle:.1f} | {s_busy:.1f} ({s_busy / s_idle:.2f}x) | {d_idle:.1f} | "
              f"{d_busy:.1f} ({d_busy / d_idle:.2f}x) |")
