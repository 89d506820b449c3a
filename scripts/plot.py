"""
Turn training runs' metrics.jsonl into pictures: loss, rewards, margins / reward accuracy and task accuracy,
several runs overlaid, each labelled with its folder's name.

$ python -m scripts.plot out/dpo                                  # PNGs next to the run: out/dpo/loss.png, ...
$ python -m scripts.plot out/dpo out/ipo out/simpo --out out/cmp  # runs compared on shared axes
$ python -m scripts.plot out/dpo --out assets --prefix dpo_       # assets/dpo_loss.png, assets/dpo_rewards.png, ...
$ python -m scripts.plot out/dpo out/ipo --figures task_accuracy  # only some of the figures

A figure is written only when some run logged what it shows (an SFT run has no rewards, for example).
The paths of the PNGs written are printed, one per line.
"""

import argparse
import json
import os
import sys

import matplotlib
import matplotlib.pyplot as plt

DPI = 90  # small PNGs that still read well on GitHub


def load_metrics(path):
    """Read a metrics.jsonl into {metric: (iters, values)}, each a list in file order.

    Training lines and evaluation lines share the file (both have 'iter'); every other numeric key becomes a
    series. A line that is not valid JSON (a run killed mid-write leaves its last line cut short) or has no
    'iter' is skipped, so a crashed or running run can still be plotted."""
    series = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or "iter" not in record:
                continue
            for key, value in record.items():
                if key != "iter" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    iters, values = series.setdefault(key, ([], []))
                    iters.append(record["iter"])
                    values.append(float(value))
    return series


def run_labels(run_dirs):
    """A label per run: the folder's name, or its whole path where two runs share a name (a/dpo, b/dpo)."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return [n if names.count(n) == 1 else os.path.normpath(d) for n, d in zip(names, run_dirs)]


# Each figure: its file name and its panels; a panel is (title, [(metric, line style)]).
FIGURES = [
    ("loss", [("training loss", [("loss", "-")])]),
    ("rewards", [("implicit rewards (solid: chosen, dashed: rejected)",
                  [("rewards/chosen", "-"), ("rewards/rejected", "--")])]),
    ("margins", [("reward margin (chosen - rejected)", [("rewards/margins", "-")]),
                 ("reward accuracy (margin > 0)", [("rewards/accuracies", "-")])]),
    ("task_accuracy", [("held-out task accuracy", [("task_accuracy", "o-")])]),
]


def plot_runs(runs, out_dir, prefix="", figures=None):
    """runs: [(label, series)] with series from load_metrics. Writes one PNG per figure (of `figures`, default
    all) that has data and returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    paths = []
    for name, panels in FIGURES:
        if figures is not None and name not in figures:
            continue
        if not any(metric in series for _, series in runs for _, lines in panels for metric, _ in lines):
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
        for ax, (title, lines) in zip(axes[0], panels):
            for i, (label, series) in enumerate(runs):
                for j, (metric, style) in enumerate(lines):
                    if metric in series:
                        iters, values = series[metric]
                        # one colour per run; the legend names the run once, on its first line
                        ax.plot(iters, values, style, color=colors[i % len(colors)], markersize=3,
                                label=label if j == 0 else None)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}{name}.png")
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m scripts.plot",
                                     description="Plot runs' metrics.jsonl as PNGs.")
    parser.add_argument("runs", nargs="+", help="run folders, each holding a metrics.jsonl")
    parser.add_argument("--out", help="folder for the PNGs (default: the run's folder for one run, "
                                      "out/plots for several)")
    parser.add_argument("--prefix", default="", help="prepended to every file name, e.g. dpo_")
    names = [name for name, _ in FIGURES]
    parser.add_argument("--figures", default=",".join(names), help="comma-separated subset of " + ",".join(names))
    args = parser.parse_args(argv)
    figures = args.figures.split(",")
    unknown = [f for f in figures if f not in names]
    if unknown:
        print(f"error: unknown figure {unknown[0]!r}: expected some of {','.join(names)}", file=sys.stderr)
        return 2
    # files only, no display needed (servers, CI). Set here, not at import, so that a notebook importing
    # load_metrics keeps its inline backend.
    matplotlib.use("Agg")
    runs = []
    for run_dir in args.runs:
        path = os.path.join(run_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            what = "does not exist" if not os.path.exists(run_dir) else "has no metrics.jsonl"
            print(f"error: run folder {run_dir} {what}", file=sys.stderr)
            return 2
        runs.append(load_metrics(path))
    out_dir = args.out or (args.runs[0] if len(args.runs) == 1 else os.path.join("out", "plots"))
    paths = plot_runs(list(zip(run_labels(args.runs), runs)), out_dir, args.prefix, figures)
    if not paths:
        print("error: no plottable metrics in " + ", ".join(args.runs), file=sys.stderr)
        return 2
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
