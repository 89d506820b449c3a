"""
Compare runs at a glance: one row per run folder, read from its summary.json (which sft.py and dpo.py
write at the end): the loss, beta, the held-out result the run ended on and where it started, KL where a
run measured one, and the wall time.

$ python -m scripts.compare out/dpo out/ipo out/simpo       # named folders
$ python -m scripts.compare out/sweep/*                      # a sweep: every run in it
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


def table(run_dirs):
    """The comparison table as a list of text lines: a header, then one row per run folder."""
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
        kl = results.get("kl", results.get("eval_kl"))
        loss = config.get("loss_type", "sft (SFT run)")
        beta = config.get("beta", "-")
        rows.append([name, loss, str(beta), held_out, started, format_value("kl", kl),
                     f"{summary.get('wall_s', 0):.0f} s"])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [header] + rows]
    return lines


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m scripts.compare RUN_DIR [RUN_DIR ...]")
    print("\n".join(table(sys.argv[1:])))
