"""
Comparative claims re-measured on seeds nobody tuned on.

The recipes in config/ and the README's comparisons were chosen while looking at seeds 1-3: those are the
design seeds. A comparison that holds only there says little, so each claim in CLAIMS is re-run here on the
report seeds, 101-110 by default, which no recipe was chosen on. Per seed the runner trains one SFT model (every
claim reuses it), runs each method of the claim from it, reads the claim's metric from each run's summary.json,
and writes a table: the value per seed, each method's mean with a 95% interval (Student's t over the seeds),
and for the two methods compared, the paired difference per seed, its mean and 95% t-interval, and wins out
of N.

$ python -m scripts.seeds --list_claims=True                  # the claims and their commands
$ python -m scripts.seeds --claims=judged --seeds=101-110     # one claim on the 10 report seeds
$ python -m scripts.seeds --claims=judged,verified_sft --seeds=101-103 --out=out/report_seeds

Resumable: a run whose out_dir already holds summary.json is kept, so a stopped runner continues where it
stopped and a second claim reuses the first one's SFT models. Tables go to <out>/<claim>.md and .json.
"""

import json
import math
import os
import platform
import subprocess
import sys
import time

from configurator import apply_overrides

# --------------------------------------------------------------------------------------------------
claims = ""               # comma-separated names from CLAIMS ('' = list them)
seeds = "101-110"         # 'a-b' or 'a,b,c'; 1-3 are the design seeds, 101-110 the report seeds
out = "out/report_seeds"  # SFT models, runs and tables go here
list_claims = False       # print the claims and their commands, run nothing
# --------------------------------------------------------------------------------------------------

# every claim's SFT model: the quick start's recipe with the seed changed
SFT_COMMAND = ["sft.py"]


class Claim:
    """A comparison: its methods (name -> a script and its arguments, run with --seed, --sft_ckpt and --out_dir
    added), the metric read from each run's summary.json ('results'), and the two methods compared (first minus
    second, paired by seed). The sentence is what the docs claim, to hold against the numbers."""

    def __init__(self, sentence, methods, metric, compare):
        self.sentence = sentence
        self.methods = methods
        self.metric = metric
        self.compare = compare


CLAIMS = {
    "judged": Claim(
        "on judged pairs, DPO's held-out reward is higher than Preferred-FT's (docs/judged_pairs.md)",
        {"dpo": ["dpo.py", "config/judged_dpo.py"],
         "preferred_ft": ["dpo.py", "config/judged_dpo.py", "--loss_type=sft"]},
        metric="task_reward", compare=("dpo", "preferred_ft")),
    "verified_sft": Claim(
        "on verified pairs, continued SFT on the chosen answers beats DPO (docs/results.md)",
        {"sft_chosen": ["dpo.py", "config/sft_baseline.py"], "dpo": ["dpo.py"]},
        metric="task_accuracy", compare=("sft_chosen", "dpo")),
    "lora": Claim(
        "rank-8 LoRA adapters do as well as full fine-tuning in DPO (docs/lora_and_checkpointing.md)",
        {"lora": ["dpo.py", "config/lora.py"], "dpo": ["dpo.py"]},
        metric="task_accuracy", compare=("lora", "dpo")),
}


# --------------------------------------------------------------------------------------------------
# Statistics

# Student's t, the 0.975 quantile, for 1..30 degrees of freedom (then the normal's 1.96 is within 2%)
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t_interval(values):
    """(mean, half-width of the 95% t-interval) of a list of numbers; the half-width is None for fewer than 2."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T_975[n - 2] if n - 1 <= len(T_975) else 1.96
    return mean, t * sd / math.sqrt(n)


def compare(first, second):
    """Paired by seed: {seed: value} of two methods -> the differences first - second per seed, their mean and
    95% t-interval, and how many seeds the first wins, ties and loses."""
    common = sorted(set(first) & set(second))
    diffs = {s: first[s] - second[s] for s in common}
    mean, half = t_interval(list(diffs.values())) if diffs else (None, None)
    return {"diffs": diffs, "mean": mean, "half": half, "n": len(diffs),
            "wins": sum(d > 0 for d in diffs.values()), "ties": sum(d == 0 for d in diffs.values()),
            "losses": sum(d < 0 for d in diffs.values())}


# --------------------------------------------------------------------------------------------------
# Running

def parse_seeds(text):
    """'101-110' or '1,2,5' -> [101, ..., 110] or [1, 2, 5]."""
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-"))
            return list(range(first, last + 1))
        return [int(x) for x in text.split(",")]
    except ValueError:
        sys.exit(f"error: seeds='{text}': expected 'a-b' or 'a,b,c'")


def ensure_run(command, out_dir, log):
    """Run `command` (a list, the script first) with its out_dir unless out_dir/summary.json exists; returns the
    summary."""
    summary_path = os.path.join(out_dir, "summary.json")
    if not os.path.exists(summary_path):
        argv = [sys.executable] + command + [f"--out_dir={out_dir}"]
        print("$ " + " ".join(argv[1:]), flush=True)
        t0 = time.time()
        proc = subprocess.run(argv, capture_output=True, text=True)
        with open(log, "a") as f:
            f.write(f"$ {' '.join(argv[1:])}\n{proc.stdout}{proc.stderr}\n")
        if proc.returncode != 0:
            sys.exit(f"error: {' '.join(argv[1:])} failed (exit {proc.returncode}); its output is in {log}")
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        print(f"  {time.time() - t0:.0f} s: {last}", flush=True)
    with open(summary_path) as f:
        return json.load(f)


def run_claim(name, claim, seed_list, out_root, sft_command=SFT_COMMAND):
    """Every method of `claim` on every seed (training each seed's SFT model first, once for all claims) ->
    {'values': {method: {seed: metric}}, 'wall_s': {method: {seed: s}}, 'sft': {seed: accuracy}}."""
    os.makedirs(out_root, exist_ok=True)
    log = os.path.join(out_root, "log.txt")
    values = {m: {} for m in claim.methods}
    wall = {m: {} for m in claim.methods}
    sft = {}
    for seed in seed_list:
        sft_dir = os.path.join(out_root, f"sft_{seed}")
        sft_summary = ensure_run(sft_command + [f"--seed={seed}"], sft_dir, log)
        sft[seed] = sft_summary["results"].get("task_accuracy")
        for method, command in claim.methods.items():
            run_dir = os.path.join(out_root, name, f"{method}_{seed}")
            command = command + [f"--seed={seed}", f"--sft_ckpt={os.path.join(sft_dir, 'ckpt.pt')}"]
            summary = ensure_run(command, run_dir, log)
            if claim.metric not in summary["results"]:
                sys.exit(f"error: {run_dir}/summary.json has no '{claim.metric}' in its results "
                         f"({', '.join(summary['results'])})")
            values[method][seed] = summary["results"][claim.metric]
            wall[method][seed] = summary.get("wall_s")
    return {"values": values, "wall_s": wall, "sft": sft}


def machine():
    """The CPU's model name (Linux), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(name, claim, result, seed_list):
    """The claim's markdown table: a row per seed, each method's mean +- 95% interval, the paired difference,
    and a sentence with wins out of N. Returns (markdown, the paired comparison)."""
    first, second = claim.compare
    methods = list(claim.methods)
    diff = compare(result["values"][first], result["values"][second])
    lines = [f"**{name}**: {claim.sentence}. Metric: `{claim.metric}` (held out); seeds "
             f"{', '.join(str(s) for s in seed_list)}; 95% intervals: Student's t over the seeds.", "",
             "| seed | SFT accuracy | " + " | ".join(methods) + f" | {first} − {second} |",
             "|---" * (len(methods) + 3) + "|"]
    for seed in seed_list:
        row = [str(seed), fmt(result["sft"].get(seed))]
        row += [fmt(result["values"][m].get(seed)) for m in methods]
        row.append(fmt(diff["diffs"].get(seed), signed=True))
        lines.append("| " + " | ".join(row) + " |")
    means = []
    for m in methods:
        mean, half = t_interval(list(result["values"][m].values()))
        means.append(f"{fmt(mean)} ± {fmt(half)}")
    lines.append("| mean ± 95% | | " + " | ".join(means)
                 + f" | {fmt(diff['mean'], signed=True)} ± {fmt(diff['half'])} |")
    ties = ""
    if diff["ties"]:
        ties = f" ({diff['ties']} tied)"
    low, high = None, None
    if diff["half"] is not None:
        low, high = diff["mean"] - diff["half"], diff["mean"] + diff["half"]
    lines += ["", f"{first} above {second} on {diff['wins']} of {diff['n']} seeds{ties}; mean difference "
                  f"{fmt(diff['mean'], signed=True)} (95% interval {fmt(low, signed=True)} to "
                  f"{fmt(high, signed=True)})."]
    return "\n".join(lines), diff


def fmt(value, signed=False):
    """A number as the tables print it: 3 decimals ('-' when missing)."""
    if value is None:
        return "-"
    if signed:
        return f"{value:+.3f}"
    return f"{value:.3f}"


def main():
    """Run the claims the settings name on their seeds and write each one's table (or list the claims)."""
    config = apply_overrides(globals())
    names = [c for c in config["claims"].split(",") if c]
    if config["list_claims"] or not names:
        for name, claim in CLAIMS.items():
            print(f"{name}: {claim.sentence}; metric {claim.metric}, {claim.compare[0]} vs {claim.compare[1]}")
            for method, command in claim.methods.items():
                print(f"    {method}: python {' '.join(command)} --seed=S --sft_ckpt=<sft_S>/ckpt.pt")
        return
    unknown = [n for n in names if n not in CLAIMS]
    if unknown:
        sys.exit(f"error: unknown claim '{unknown[0]}': expected one of {', '.join(CLAIMS)}")
    seed_list = parse_seeds(config["seeds"])
    t0 = time.time()
    for name in names:
        claim = CLAIMS[name]
        result = run_claim(name, claim, seed_list, config["out"])
        markdown, diff = table(name, claim, result, seed_list)
        wall = sum(s or 0 for runs in result["wall_s"].values() for s in runs.values())
        markdown += (f" Machine: {machine()}; the claim's runs took {wall / 60:.1f} min (summary.json's wall_s), "
                     f"this invocation {(time.time() - t0) / 60:.1f} min.")
        with open(os.path.join(config["out"], f"{name}.md"), "w") as f:
            f.write(markdown + "\n")
        with open(os.path.join(config["out"], f"{name}.json"), "w") as f:
            record = {"claim": name, "sentence": claim.sentence, "metric": claim.metric, "seeds": seed_list,
                      "compare": list(claim.compare), "machine": machine(), "wall_s": result["wall_s"],
                      "values": result["values"], "sft_accuracy": result["sft"],
                      "paired": {k: v for k, v in diff.items()},
                      "commands": {m: c for m, c in claim.methods.items()}}
            json.dump(record, f, indent=1)
        print(markdown, flush=True)


if __name__ == "__main__":
    main()
