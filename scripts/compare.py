"""
Compare runs at a glance: one row per run folder, read from its summary.json (which sft.py and dpo.py
write at the end): the loss, beta, the held-out result the run ended on and where it started, KL where a
run measured one, and the wall time. With --kl=N, a dpo.py run on the embedded task gets its KL to the SFT
model it started from, estimated now from samples on N held-out prompts (nanopo/tasks.py's sampled_kl, 4
draws each, on the CPU, seed 0; seconds per run for the embedded task's small models).

$ python -m scripts.compare out/dpo out/ipo out/simpo       # named folders
$ python -m scripts.compare out/sweep/*                      # a sweep: every run in it
$ python -m scripts.compare --kl=500 out/sft out/sweep/*     # and each run's sampled KL to its SFT model
"""

import json
import os
import sys

# the held-out result a row shows: the first of these that a run has
RESULT_KEYS = ("task_accuracy", "task_reward", "eval_rewards/accuracies", "eval_loss")


def load_summary(run_dir):
    """The summary.json of a run folder, or None when the run has none (not finished, or older)."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def format_value(key, value):
    """A table cell: accuracies as percentages, other values to 4 decimals, '-' when unknown."""
    if value is None:
        return "-"
    if key == "task_accuracy" or key.endswith("accuracies"):
        return f"{value:.1%}"
    return f"{value:.4f}"


def frontier_point(ckpt_path, n_prompts, draws=4, sft_path=None):
    """The reward-KL frontier point of a dpo.py, grpo.py or online-rounds policy on the embedded task: samples
    of the checkpoint's policy at temperature 1 on the first n_prompts held-out problems (`draws` each, on the
    CPU, seed 0), their mean true reward (the judge's hidden reward when the run was judged) and accuracy,
    and KL(policy || the SFT model the run started from), each with its standard error: tasks.sampled_kl's
    dict. None for any other run (an SFT run, one from scratch or on a dataset, one whose checkpoint or SFT
    checkpoint is gone). The SFT checkpoint is sft_path, by default the one the run's config names (an online
    round's names the previous round's policy, so scripts/online_dpo.py passes its own)."""
    import torch
    from data import Tokenizer
    from nanopo.checkpoint import load_checkpoint, model_from_checkpoint, task_settings
    from nanopo.tasks import AdditionTask, sampled_kl
    if not os.path.exists(ckpt_path):
        return None
    run = load_checkpoint(ckpt_path)
    if sft_path is None:
        sft_path = run["config"].get("sft_ckpt")
    if not sft_path or run["config"].get("dataset") or not os.path.exists(sft_path):
        return None
    sft = load_checkpoint(sft_path)
    if "n_digits" not in sft["config"]:
        return None
    reward = run["config"].get("judge_reward", "log_error")
    task = AdditionTask(**task_settings(sft["config"]), reward=reward)
    policy = model_from_checkpoint(run, ckpt_path, dropout=0.0)
    sft_model = model_from_checkpoint(sft, sft_path, dropout=0.0)
    with torch.no_grad():
        return sampled_kl(policy, sft_model, task, Tokenizer(sft["tokenizer"]), n_prompts,
                          task.max_new_tokens, draws=draws)


def sampled_kl_to_sft(run_dir, n_prompts, draws=4):
    """KL(policy || SFT model) in nats per answer for a run folder's final policy (frontier_point), as
    'kl±stderr'; None where frontier_point has no point."""
    point = frontier_point(os.path.join(run_dir, "ckpt.pt"), n_prompts, draws)
    if point is None:
        return None
    return f"{point['kl']:.3f}±{point['kl_stderr']:.3f}"


def table(run_dirs, kl_prompts=0):
    """The comparison table as a list of text lines: a header, then one row per run folder. With
    kl_prompts > 0, a run that measured no KL gets sampled_kl_to_sft's."""
    header = ["run", "loss", "beta", "held-out", "from", "kl", "time"]
    rows = []
    for run_dir in run_dirs:
        summary = load_summary(run_dir)
        name = os.path.normpath(run_dir)
        if summary is None:
            rows.append([name, "(no summary.json: unfinished?)", "", "", "", "", ""])
            continue
        config = summary.get("config", {})
        results = summary.get("results") or {}
        start = summary.get("start_results") or {}
        key = next((k for k in RESULT_KEYS if k in results), None)
        held_out = "-"
        started = "-"
        if key is not None:
            held_out = f"{key} {format_value(key, results[key])}"
            started = format_value(key, start.get(key))
        # KL to the reference where the run measured one (KTO's reference point, online rounds)
        kl = format_value("kl", results.get("kl", results.get("eval_kl")))
        if kl == "-" and kl_prompts > 0:
            kl = sampled_kl_to_sft(run_dir, kl_prompts) or "-"
        loss = config.get("loss_type", "sft (SFT run)")
        beta = config.get("beta", "-")
        rows.append([name, loss, str(beta), held_out, started, kl,
                     f"{summary.get('wall_s', 0):.0f} s"])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [header] + rows]
    return lines


if __name__ == "__main__":
    kl_prompts = 0
    run_dirs = []
    for arg in sys.argv[1:]:
        if arg.startswith("--kl"):
            value = arg.partition("=")[2]
            if not value.isdigit():
                sys.exit(f"error: --kl takes a number of prompts, --kl=500, not {arg!r}")
            kl_prompts = int(value)
        else:
            run_dirs.append(arg)
    if not run_dirs:
        sys.exit("usage: python -m scripts.compare [--kl=N] RUN_DIR [RUN_DIR ...]")
    print("\n".join(table(run_dirs, kl_prompts)))
