"""
Online (iterative) DPO: K rounds of "sample pairs from the current policy, have them judged, train on them".
Each round is one dpo.py run (--pairs=judged by default): its policy starts from the previous round's checkpoint
(the first round's from the SFT model), it samples and judges fresh pairs from that policy, and trains. The
reference either stays the SFT model in every round (--reference=sft, as RLHFlow's iterative recipe does) or is
the round's starting policy, the previous round's result (--reference=previous, as Iterative RPO does).

At the end it prints the final policy's point of the reward-KL frontier: the mean true reward (and accuracy) of
its samples at temperature 1 on held-out prompts, and KL(policy || SFT model) estimated from the same samples.
Greedy accuracy alone hides what rounds do to the policy's distribution (docs/judged_pairs.md). The same
results go to out_dir/summary.json, as dpo.py writes one (scripts/seeds.py reads it).

The budget is the offline run's: n_pairs judged pairs and max_iters optimizer steps in all, split evenly over
the rounds, so `--rounds=1` is the offline baseline at the same cost.

$ python -m scripts.online_dpo                                   # 4 rounds from out/sft/ckpt.pt into out/online
$ python -m scripts.online_dpo --rounds=1 --out_dir=out/offline  # one offline round at the same budget
$ python -m scripts.online_dpo --reference=previous              # each round's reference is the previous round's policy
$ python -m scripts.online_dpo --dpo_args="--loss_type=ipo --beta=0.5"   # any dpo.py setting, for every round
$ python -m scripts.online_dpo --nproc=2                         # each round under torchrun on 2 processes
Interrupted? Run the same command again: finished rounds are kept, an unfinished one resumes from its checkpoint.
SIGTERM or a first Ctrl-C reaches the running round, which saves a checkpoint after its current step; this script
then exits with code 75, as dpo.py does.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import torch

from configurator import UserError, apply_overrides, install_error_handler
from nanopo import runtime
from nanopo.checkpoint import load_checkpoint
from scripts.compare import frontier_point

install_error_handler()
# -----------------------------------------------------------------------------------------------------------
out_dir = "out/online"    # round k goes to out_dir/round<k>
sft_ckpt = "out/sft/ckpt.pt"
rounds = 4                # K; 1 = offline
reference = "sft"         # 'sft': the SFT model in every round; 'previous': the round's starting policy
pairs = "judged"          # dpo.py's --pairs: 'judged' (no answer shown) or 'verified'
n_pairs = 2000            # judged pairs in all, n_pairs / rounds per round
max_iters = 100           # optimizer steps in all, max_iters / rounds per round
seed = 1                  # round k uses seed + k - 1: other prompts, other samples
nproc = 1                 # > 1: run each round with torchrun --standalone --nproc_per_node=nproc
dpo_args = ""             # more dpo.py settings for every round, e.g. "config/judged_dpo.py --beta=0.5"
frontier_prompts = 1000   # held-out prompts for the final policy's sampled reward and KL to the SFT model; 0: skip
frontier_draws = 4        # samples per prompt for them
# -----------------------------------------------------------------------------------------------------------
config = apply_overrides(globals())
if reference not in ("sft", "previous"):
    raise UserError(f"unknown reference '{reference}': expected 'sft' or 'previous'")
if rounds < 1 or n_pairs < rounds or max_iters < rounds:
    raise UserError(f"rounds={rounds} must be >= 1 and at most n_pairs={n_pairs} and max_iters={max_iters}")
# the repository root, where dpo.py lives
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_round(command):
    """Run one round's dpo.py (or torchrun); return (its exit code, whether this script was asked to
    stop). The first SIGTERM or Ctrl-C sent here is passed on to the round as SIGTERM: the round
    saves a checkpoint after its current step and exits (75; torchrun: 1). A Ctrl-C at the
    terminal reaches the round itself too, and SIGTERM after it does not count as a second press.
    A second Ctrl-C here is passed on as SIGINT, which stops the round at once."""
    proc = subprocess.Popen(command)
    asked = []

    def pass_on(signum, frame):
        if asked and signum == signal.SIGINT:
            proc.send_signal(signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        asked.append(signum)

    before = {s: signal.signal(s, pass_on) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait(), bool(asked)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def finished(round_dir, iters):
    """Whether round_dir holds a checkpoint written at the end of the round."""
    path = os.path.join(round_dir, "ckpt.pt")
    return os.path.exists(path) and torch.load(path, map_location="cpu", weights_only=True)["iter_num"] >= iters


start, per_round = sft_ckpt, max_iters // rounds
for k in range(1, rounds + 1):
    round_dir = os.path.join(out_dir, f"round{k}")
    if finished(round_dir, per_round):
        print(f"round {k}/{rounds}: finished earlier, {round_dir}")
    else:
        resume = os.path.exists(os.path.join(round_dir, "ckpt.pt"))  # a checkpoint from within the round
        # dpo_args first: a config file among them must not override the round's own settings, which follow
        args = [*shlex.split(dpo_args), f"--init_from={'resume' if resume else 'sft'}", f"--sft_ckpt={start}",
                f"--out_dir={round_dir}", f"--ref_ckpt={sft_ckpt if reference == 'sft' and k > 1 else ''}",
                f"--pairs={pairs}", f"--n_pairs={n_pairs // rounds}", f"--max_iters={per_round}",
                f"--eval_interval={per_round}", f"--seed={seed + k - 1}"]
        launcher = [sys.executable] if nproc == 1 else ["torchrun", "--standalone", f"--nproc_per_node={nproc}"]
        print(f"round {k}/{rounds}: $ {' '.join(['python' if nproc == 1 else ' '.join(launcher), 'dpo.py', *args])}",
              flush=True)
        code, asked_to_stop = run_round(launcher + [os.path.join(root, "dpo.py"), *args])
        if asked_to_stop:
            # the round saved its checkpoint (or finished): stop here, whatever its exit code
            # (dpo.py's 75, torchrun's 1, 0 if the signal came in its last step)
            print(f"online rounds stopped in round {k}/{rounds}; run the same command again to continue")
            sys.exit(runtime.STOPPED_EXIT_CODE)
        if code != 0:
            raise UserError(f"round {k} failed (its output is above); run the same command again to resume it")
    start = os.path.join(round_dir, "ckpt.pt")  # the next round's policy starts here
final = torch.load(start, map_location="cpu", weights_only=True)
results = {key: final[key] for key in ("task_accuracy", "task_reward") if key in final}
shown = ", ".join(f"{key} {value:.1%}" if key == "task_accuracy" else f"{key} {value:.4f}"
                  for key, value in results.items())
t_frontier = time.time()
point = None
if frontier_prompts > 0:
    # the embedded task the rounds were judged on, both models on the CPU in fp32, dropout off; KL to the SFT
    # model (the last round's own config names the previous round as its start)
    point = frontier_point(start, frontier_prompts, draws=frontier_draws, sft_path=sft_ckpt)
if point is not None:
    results.update(point)
    n_prompts = min(frontier_prompts, int(load_checkpoint(sft_ckpt)["config"]["n_eval"]))
    shown += (f"; sampled (T 1, {frontier_draws} x {n_prompts} prompts): reward "
              f"{point['sampled_reward']:.3f} ± {point['sampled_reward_stderr']:.3f}, accuracy "
              f"{point['sampled_accuracy']:.1%}, KL to SFT {point['kl']:.3f} ± {point['kl_stderr']:.3f}")
last_line = f"ONLINE done: {rounds} round(s), reference {reference}: held-out {shown} -> {start}"
# out_dir/summary.json, as dpo.py writes one: the final policy's held-out results and frontier point, and the
# wall time of the rounds (each round's own summary.json) plus the frontier's sampling
round_walls = []
for k in range(1, rounds + 1):
    with open(os.path.join(out_dir, f"round{k}", "summary.json")) as f:
        round_walls.append(json.load(f)["wall_s"])
with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump({"results": results, "wall_s": sum(round_walls) + time.time() - t_frontier,
               "round_wall_s": round_walls, "ckpt": start, "config": config, "last_line": last_line}, f,
              indent=2)
print(last_line)
