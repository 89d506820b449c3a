"""
What the notebooks share (they run from the repo root, with it and notebooks/ on sys.path): the short SFT
checkpoint they all start from, running sft.py / dpo.py as real subprocesses (a few at a time), loading a
checkpoint, best-of-N sampling, (from nanopo/tasks.py) the Monte-Carlo estimate of KL(policy || reference),
and the comparison of two measured accuracies that the notebooks' computed sentences use.
The notebooks print every command they run, so each run can be repeated from a shell.
"""

import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from nanopo.tasks import sampled_kl  # noqa: F401  (the notebooks call nbutil.sampled_kl)

# where the notebooks' runs go; the tests point it at a temporary folder
OUT = os.environ.get("NANOPO_NOTEBOOK_OUT", "out/notebooks")
# The shared SFT model: the full recipe (`python sft.py`) runs 1500 iterations; 500 give a model that
# answers in the right format but has learnt the demonstrations' carry slip, which is what DPO should fix.
# n_eval=500 held-out problems halves the cost of every evaluation in the DPO runs (they inherit it).
SFT_ARGS = {"max_iters": 500, "n_eval": 500, "eval_interval": 100, "log_interval": 50}
SFT_DIR = f"{OUT}/sft"


def command(scripts, args):
    """[python, 'dpo.py', 'config/ipo.py', '--k=v', ...]: a script (and config files), then the settings."""
    return [sys.executable, *scripts] + [f"--{k}={v}" for k, v in args.items()]


def show(cmd):
    """The command as one would type it (an argument with spaces quoted)."""
    return " ".join(["python"] + [shlex.quote(arg) for arg in cmd[1:]])


def _env():
    # One thread per run: several small runs side by side use the cores better than one run on all of them,
    # and a multi-threaded run on a busy machine can be many times slower (its threads wait on each other).
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def ensure_sft(args=None, out_dir=SFT_DIR):
    """Run an SFT (by default the short one notebooks 03 and 04 share) into out_dir unless a checkpoint made with
    the same settings is already there (the first notebook to ask pays for it: about a minute on a 2-core CPU).
    Returns the checkpoint's path."""
    from nanopo.checkpoint import load_checkpoint
    from configurator import UserError
    args = SFT_ARGS if args is None else args
    path = f"{out_dir}/ckpt.pt"
    try:
        cfg = load_checkpoint(path)["config"]
        if all(cfg.get(k) == v for k, v in dict(args, out_dir=out_dir).items()):
            print(f"reusing {path}")
            return path
    except UserError:  # missing, unreadable or of an older format: train it again
        pass
    run_all({"sft": (["sft.py"], dict(args, out_dir=out_dir))})
    return path


def parallel_lanes():
    """How many runs to start side by side: one per core this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores)


def run_all(jobs, lanes=None):
    """jobs: {name: ([script, config files...], settings)}, settings holding out_dir at least. Runs them as
    subprocesses, `lanes` at a time, each logging to its out_dir/log.txt; prints each command and the last
    line of its output. A failed run stops the others and raises with the end of its log."""
    lanes = min(lanes or parallel_lanes(), len(jobs))
    pending, running = list(jobs.items()), []
    t0 = time.time()
    while pending or running:
        while pending and len(running) < lanes:
            name, (scripts, args) = pending.pop(0)
            scripts = [scripts] if isinstance(scripts, str) else scripts
            os.makedirs(args["out_dir"], exist_ok=True)
            cmd = command(scripts, args)
            print("$ " + show(cmd), flush=True)
            log = open(os.path.join(args["out_dir"], "log.txt"), "w")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
            running.append((name, args, proc, log))
        for item in list(running):
            name, args, proc, log = item
            if proc.poll() is None:
                continue
            log.close()
            running.remove(item)
            lines = Path(args["out_dir"], "log.txt").read_text().strip().splitlines()
            if proc.returncode != 0:
                for _, _, other, _ in running:
                    other.kill()
                raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n" + "\n".join(lines[-15:]))
            print(f"  [{name}] {lines[-1] if lines else ''}", flush=True)
        time.sleep(0.2)
    print(f"{len(jobs)} run(s) in {time.time() - t0:.0f} s")


@torch.no_grad()
def best_of_n(model, task, tok, ns, n_prompts=500, max_new_tokens=8, seed=0):
    """Best-of-N sampling, the inference-time baseline: for each held-out prompt draw max(ns) answers from
    `model` at temperature 1, and for each N in ns keep the one of the first N with the highest true reward
    (task.reward: a perfect judge). Returns {N: (mean reward, accuracy)} of the kept answers. Its KL to `model`
    is at most log N - (N - 1) / N nats (Beirami et al., 2024), with no training at all, at N times the cost."""
    model.eval()
    problems = task.eval_problems[:n_prompts]
    texts = [task.prompt(a, b) for a, b in problems]
    prompts = [tok.encode(t) for t in texts]
    g = torch.Generator().manual_seed(seed)
    draws = [[tok.decode(o) for o in model.generate(prompts, max_new_tokens, tok.eos_id, tok.pad_id,
                                                    temperature=1.0, generator=g)] for _ in range(max(ns))]
    results = {}
    for n in ns:
        best = [max((d[i] for d in draws[:n]), key=lambda y: task.reward(t, y)) for i, t in enumerate(texts)]
        results[n] = (sum(task.reward(t, y) for t, y in zip(texts, best)) / len(texts),
                      sum(task.is_correct(t, y) for t, y in zip(texts, best)) / len(texts))
    return results



def versus(a, b, n):
    """How accuracy a compares with accuracy b, both measured on n problems: 'above', 'below', or 'level with'
    when they differ by less than two standard errors of the difference (binomial noise: n problems decide
    an accuracy only to about 1/sqrt(n)). For the notebooks' sentences, so that a word like 'better' is
    computed from the numbers, never typed next to them."""
    stderr = math.sqrt((a * (1 - a) + b * (1 - b)) / n)
    if abs(a - b) <= 2 * stderr:
        return "level with"
    return "above" if a > b else "below"


def load_model(path):
    """A GPT from a checkpoint (dropout off), its tokenizer and the task it was trained on."""
    from nanopo.checkpoint import load_checkpoint, model_from_checkpoint
    from data import Tokenizer
    from nanopo.tasks import AdditionTask
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path, dropout=0.0).eval()
    cfg = ckpt["config"]
    if "loss_type" in cfg and cfg.get("init_from") != "scratch":
        # a dpo.py checkpoint started from SFT: the task settings are those of its SFT checkpoint
        cfg = load_checkpoint(ckpt["sft_ckpt"])["config"]
    return model, Tokenizer(ckpt["tokenizer"]), AdditionTask(cfg["n_digits"], cfg["n_eval"], cfg["task_seed"])
