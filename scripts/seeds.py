"""
Comparative claims re-measured on seeds nobody tuned on.

The recipes in config/ and the README's comparisons were chosen while looking at seeds 1-3: those are the
design seeds. A comparison that holds only there says little, so each claim in CLAIMS is re-run here on the
report seeds, 101-110 by default, which no recipe was chosen on. Per seed the runner trains one SFT model (every
claim reuses it), runs each method of the claim from it, reads the claim's metric from each run's summary.json,
and writes a table: the value per seed, each method's mean with a 95% interval (Student's t over the seeds),
and for the two methods compared, the paired difference per seed, its mean and 95% t-interval, and wins out
of N (a claim against the SFT model instead: each method's gain, its smallest, and the seeds above a
threshold). A metric of the reward-KL frontier (sampled reward, KL to the SFT model) that a run's summary lacks
is sampled from its checkpoint once and kept beside it.

$ python -m scripts.seeds --list_claims=True                  # the claims and their commands
$ python -m scripts.seeds --claims=judged --seeds=101-110     # one claim on the 10 report seeds
$ python -m scripts.seeds --claims=judged,verified_sft --seeds=101-103 --out=out/report_seeds
$ python -m scripts.seeds --claims=all --seeds=101-110        # every claim in CLAIMS
$ python -m scripts.seeds --why=judged --seeds=101-110        # why the judged claim goes either way, per seed

Resumable: a run whose out_dir already holds summary.json is kept (if it was made with the same command), so a
stopped runner continues where it stopped and a second claim reuses the first one's SFT models. Tables go to
<out>/<claim>.md and .json; docs/report_seeds.md quotes them.
"""

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time

from configurator import apply_overrides

# --------------------------------------------------------------------------------------------------
claims = ""               # comma-separated names from CLAIMS, or 'all' ('' = list them)
seeds = "101-110"         # 'a-b' or 'a,b,c'; 1-3 are the design seeds, 101-110 the report seeds
out = "out/report_seeds"  # SFT models, runs and tables go here
list_claims = False       # print the claims and their commands, run nothing
why = ""                  # 'judged' or 'judged_t1': that claim's diagnostics from its finished runs (<why>_why.md)
# --------------------------------------------------------------------------------------------------

# every claim's SFT model: the quick start's recipe with the seed changed
SFT_COMMAND = ["sft.py"]


class Claim:
    """A comparison: its methods (name -> a script and its arguments, run with --seed, --sft_ckpt and --out_dir
    added; a command may start with '-m' for a module), the metric read from each run's summary.json
    ('results'), and the two methods compared (first minus second, paired by seed). compare=None compares every
    method with the seed's SFT model instead, and counts the seeds where the gain is above `threshold`. `extra`
    names more metrics the table shows beside the first (KL, where the claim is a point of the reward-KL
    frontier). Runs go to <out>/<folder>/<method>_<seed>; a claim that reads other metrics of another claim's
    runs names that claim's folder. The sentence is what the docs claim, to hold against the numbers."""

    def __init__(self, sentence, methods, metric, compare, threshold=None, extra=(), folder=None):
        self.sentence = sentence
        self.methods = methods
        self.metric = metric
        self.compare = compare
        self.threshold = threshold
        self.extra = extra
        self.folder = folder


# a frontier metric a run's summary.json lacks is measured from its ckpt.pt (scripts/compare.py's frontier_point,
# 1,000 held-out prompts x 4 samples) and kept in the run's folder as frontier.json
FRONTIER_KEYS = ("sampled_reward", "sampled_reward_stderr", "sampled_accuracy", "kl", "kl_stderr")
FRONTIER_PROMPTS = 1000

# every loss of docs/results.md's two tables with its recipe, on verified pairs
LOSS_RECIPES = {
    "dpo": ["dpo.py"],
    "ipo": ["dpo.py", "config/ipo.py"],
    "hinge": ["dpo.py", "config/hinge.py"],
    "simpo": ["dpo.py", "config/simpo.py"],
    "orpo": ["dpo.py", "config/orpo.py"],
    "kto": ["dpo.py", "config/kto.py"],
    "dpo_norm": ["dpo.py", "config/dpo_norm.py"],
    "robust": ["dpo.py", "config/robust.py"],
    "exo": ["dpo.py", "--loss_type=exo"],
    "nca": ["dpo.py", "--loss_type=nca"],
    "bco": ["dpo.py", "--loss_type=bco"],
    "sppo_hard": ["dpo.py", "config/sppo_hard.py"],
    "aot": ["dpo.py", "config/aot.py"],
    "aot_unpaired": ["dpo.py", "--loss_type=aot_unpaired"],
    "apo_zero": ["dpo.py", "--loss_type=apo_zero"],
    "apo_down": ["dpo.py", "--loss_type=apo_down"],
    "discopop": ["dpo.py", "--loss_type=discopop"],
}

# the dynamics options of docs/results.md, each on the default DPO run
OPTIONS = {
    "mpo": ["dpo.py", "--loss_type=dpo+bco+sft", "--loss_weights=0.8,0.2,1.0"],
    "wpo": ["dpo.py", "--use_weighting=True"],
    "ld_dpo": ["dpo.py", "--ld_alpha=0.5"],
    "tr_dpo": ["dpo.py", "--ref_sync_steps=25", "--ref_mixup_alpha=0.6"],
    "forward_kl": ["dpo.py", "--f_divergence_type=forward_kl"],
    "js": ["dpo.py", "--f_divergence_type=js"],
}

# the losses and options of docs/judged_pairs.md's loss-family table, on judged pairs sampled at temperature 1
JUDGED_T1 = ["--pairs=judged", "--n_samples=4"]
JUDGED_FAMILY = {name: LOSS_RECIPES[name] + JUDGED_T1
                 for name in ("dpo", "dpo_norm", "robust", "exo", "nca", "bco", "sppo_hard", "aot", "aot_unpaired",
                              "apo_zero", "apo_down", "discopop")}
JUDGED_FAMILY.update({name: command + JUDGED_T1 for name, command in OPTIONS.items()})

CLAIMS = {
    "judged": Claim(
        "on judged pairs, DPO's held-out reward is higher than Preferred-FT's (docs/judged_pairs.md)",
        {"dpo": ["dpo.py", "config/judged_dpo.py"],
         "preferred_ft": ["dpo.py", "config/judged_dpo.py", "--loss_type=sft"]},
        metric="task_reward", compare=("dpo", "preferred_ft")),
    "judged_frontier": Claim(
        "on judged pairs, DPO's samples earn more reward than Preferred-FT's at less KL to the SFT model (the "
        "judged claim's runs, and DPO at beta 2: its KL was below Preferred-FT's on design seed 1)",
        {"dpo": ["dpo.py", "config/judged_dpo.py"],
         "dpo_beta2": ["dpo.py", "config/judged_dpo.py", "--beta=2.0"],
         "preferred_ft": ["dpo.py", "config/judged_dpo.py", "--loss_type=sft"]},
        metric="sampled_reward", compare=("dpo_beta2", "preferred_ft"), extra=("kl",), folder="judged"),
    "judged_t1": Claim(
        "on judged pairs sampled at temperature 1 and judged with tau 1 (the loss-family table's pairs, the chosen "
        "answer right about nine times in ten), Preferred-FT beats DPO (docs/judged_pairs.md)",
        {"preferred_ft": ["dpo.py", "config/sft_baseline.py"] + JUDGED_T1, "dpo": ["dpo.py"] + JUDGED_T1},
        metric="task_accuracy", compare=("preferred_ft", "dpo")),
    "online": Claim(
        "four online rounds with the previous round as reference earn more sampled reward than one offline round "
        "at the same KL (beta 0.5) and budget (docs/judged_pairs.md)",
        {"online": ["-m", "scripts.online_dpo", "--dpo_args=config/judged_dpo.py", "--reference=previous"],
         "offline": ["-m", "scripts.online_dpo", "--dpo_args=config/judged_dpo.py --beta=0.5", "--rounds=1"]},
        metric="sampled_reward", compare=("online", "offline"), extra=("kl",)),
    "grpo": Claim(
        "GRPO on the judge's hidden reward earns more sampled reward than DPO on its verdicts, at about the same "
        "KL and number of sampled answers (beta 0.2: its KL matched DPO's on design seed 1; 32 steps: 8,192 "
        "answers against DPO's 8,000) (docs/dpo_or_rl.md)",
        {"grpo": ["grpo.py", "--beta=0.2", "--max_iters=32"],
         "dpo": ["dpo.py", "config/judged_dpo.py"]},
        metric="sampled_reward", compare=("grpo", "dpo"), extra=("kl",)),
    "verified_sft": Claim(
        "on verified pairs, continued SFT on the chosen answers beats DPO (docs/results.md)",
        {"sft_chosen": ["dpo.py", "config/sft_baseline.py"], "dpo": ["dpo.py"]},
        metric="task_accuracy", compare=("sft_chosen", "dpo")),
    "lora": Claim(
        "rank-8 LoRA adapters do as well as full fine-tuning in DPO (docs/lora_and_checkpointing.md)",
        {"lora": ["dpo.py", "config/lora.py"], "dpo": ["dpo.py"]},
        metric="task_accuracy", compare=("lora", "dpo")),
    "every_loss": Claim(
        "every loss but apo_down beats the SFT model by more than 30 points of accuracy (docs/results.md's "
        "second table; its first claims at least 26 points)",
        LOSS_RECIPES, metric="task_accuracy", compare=None, threshold=0.30),
    "judged_family": Claim(
        "on judged pairs sampled at temperature 1 and judged with tau 1, every loss and option but apo_down, robust, "
        "exo and aot_unpaired gains more than 10 points of accuracy over the SFT model (docs/judged_pairs.md)",
        JUDGED_FAMILY, metric="task_accuracy", compare=None, threshold=0.10, folder="judged_t1"),
    "every_option": Claim(
        "every dynamics option on DPO beats the SFT model by more than 36 points of accuracy (docs/results.md)",
        OPTIONS, metric="task_accuracy", compare=None, threshold=0.36),
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


# the runs this invocation made (not found finished), for the tables' footers
RUNS_MADE = []


def ensure_run(command, out_dir, log):
    """Run `command` (a list, the script or '-m module' first) with its out_dir unless out_dir/summary.json
    exists; returns the summary."""
    summary_path = os.path.join(out_dir, "summary.json")
    # the command a finished run was made with, kept beside it: a recipe changed since must not reuse it
    command_path = os.path.join(out_dir, "seeds_command.json")
    if os.path.exists(summary_path) and os.path.exists(command_path):
        with open(command_path) as f:
            before = json.load(f)
        if before != command:
            sys.exit(f"error: {out_dir} was run as 'python {shlex.join(before)}', not 'python "
                     f"{shlex.join(command)}': remove the folder to run it again")
    if not os.path.exists(summary_path):
        argv = [sys.executable] + command + [f"--out_dir={out_dir}"]
        shown = "python " + shlex.join(argv[1:])
        print("$ " + shown, flush=True)
        t0 = time.time()
        proc = subprocess.run(argv, capture_output=True, text=True)
        with open(log, "a") as f:
            f.write(f"$ {shown}\n{proc.stdout}{proc.stderr}\n")
        if proc.returncode != 0:
            sys.exit(f"error: {shown} failed (exit {proc.returncode}); its output is in {log}")
        with open(command_path, "w") as f:
            json.dump(command, f)
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        print(f"  {time.time() - t0:.0f} s: {last}", flush=True)
        RUNS_MADE.append(out_dir)
    with open(summary_path) as f:
        return json.load(f)


def run_metrics(summary, run_dir, names):
    """{name: value} of the metrics `names` for one run: from its summary.json's results, or for a frontier
    metric it lacks, measured from the run's ckpt.pt once and kept in run_dir/frontier.json."""
    results = dict(summary["results"])
    if any(n in FRONTIER_KEYS and n not in results for n in names):
        path = os.path.join(run_dir, "frontier.json")
        if not os.path.exists(path):
            from scripts.compare import frontier_point
            point = frontier_point(os.path.join(run_dir, "ckpt.pt"), FRONTIER_PROMPTS)
            if point is None:
                sys.exit(f"error: {run_dir} has no checkpoint on the embedded task to sample a frontier point from")
            with open(path, "w") as f:
                json.dump(point, f, indent=1)
        with open(path) as f:
            results.update(json.load(f))
    missing = [n for n in names if n not in results]
    if missing:
        sys.exit(f"error: {run_dir}/summary.json has no '{missing[0]}' in its results ({', '.join(results)})")
    return {n: results[n] for n in names}


def run_claim(name, claim, seed_list, out_root, sft_command=SFT_COMMAND):
    """Every method of `claim` on every seed (training each seed's SFT model first, once for all claims) ->
    {'values': {method: {seed: metric}}, 'extra': {metric: {method: {seed: value}}},
    'wall_s': {method: {seed: s}}, 'sft': {seed: the SFT model's accuracy},
    'sft_metric': {seed: the SFT model's value of the claim's metric, None if it has none}}."""
    os.makedirs(out_root, exist_ok=True)
    log = os.path.join(out_root, "log.txt")
    values = {m: {} for m in claim.methods}
    extra = {e: {m: {} for m in claim.methods} for e in claim.extra}
    wall = {m: {} for m in claim.methods}
    sft, sft_metric = {}, {}
    for seed in seed_list:
        sft_dir = os.path.join(out_root, f"sft_{seed}")
        sft_summary = ensure_run(sft_command + [f"--seed={seed}"], sft_dir, log)
        sft[seed] = sft_summary["results"].get("task_accuracy")
        sft_metric[seed] = sft_summary["results"].get(claim.metric)
        if claim.compare is None and sft_metric[seed] is None:
            sys.exit(f"error: {sft_dir}/summary.json has no '{claim.metric}' to measure the claim's gains from")
        for method, command in claim.methods.items():
            run_dir = os.path.join(out_root, claim.folder or name, f"{method}_{seed}")
            command = command + [f"--seed={seed}", f"--sft_ckpt={os.path.join(sft_dir, 'ckpt.pt')}"]
            summary = ensure_run(command, run_dir, log)
            metrics = run_metrics(summary, run_dir, (claim.metric, *claim.extra))
            values[method][seed] = metrics[claim.metric]
            for e in claim.extra:
                extra[e][method][seed] = metrics[e]
            wall[method][seed] = summary.get("wall_s")
    return {"values": values, "extra": extra, "wall_s": wall, "sft": sft, "sft_metric": sft_metric}


# --------------------------------------------------------------------------------------------------
# Why the judged claim goes one way or the other on a seed

def pair_stats(pairs_path, task, n_prompts):
    """What the judge handed DPO and Preferred-FT on one seed, from the run's pairs.jsonl: how many pairs, the
    share whose chosen answer is exactly right, whose rejected answer is exactly right (a right answer pushed
    down), whose order agrees with the true reward (chosen better), goes against it (rejected better) or is a tie;
    and the share of the n_prompts prompts that gave a pair at all (the samples' diversity: a prompt whose
    samples are all alike gives none)."""
    with open(pairs_path) as f:
        rows = [json.loads(line) for line in f]
    n = len(rows)
    better = worse = 0
    for r in rows:
        gap = task.reward(r["prompt"], r["chosen"]) - task.reward(r["prompt"], r["rejected"])
        better += gap > 0
        worse += gap < 0
    return {"pairs": n,
            "chosen_right": sum(task.is_correct(r["prompt"], r["chosen"]) for r in rows) / n,
            "rejected_right": sum(task.is_correct(r["prompt"], r["rejected"]) for r in rows) / n,
            "order_right": better / n, "order_wrong": worse / n, "ties": (n - better - worse) / n,
            "pair_share": n / n_prompts}


def sft_sampled_reward(sft_dir):
    """The SFT model's own samples' mean true reward (temperature 1, the frontier's prompts and draws): the
    reward-KL frontier's point at KL 0. Measured once, kept in sft_dir/frontier.json."""
    path = os.path.join(sft_dir, "frontier.json")
    if not os.path.exists(path):
        from scripts.compare import frontier_point
        ckpt = os.path.join(sft_dir, "ckpt.pt")
        # the SFT model against itself: KL 0, and the reward of its own samples
        point = frontier_point(ckpt, FRONTIER_PROMPTS, sft_path=ckpt)
        if point is None:
            sys.exit(f"error: {sft_dir} has no SFT checkpoint on the embedded task to sample from")
        with open(path, "w") as f:
            json.dump(point, f, indent=1)
    with open(path) as f:
        return json.load(f)["sampled_reward"]


def pearson(xs, ys):
    """The correlation coefficient of two equally long lists (None when either is constant)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


WHY_COLUMNS = ["sft_accuracy", "sft_sampled_reward", "chosen_right", "rejected_right", "order_right",
               "order_wrong", "ties", "pair_share", "kl_dpo", "kl_preferred_ft", "sampled_diff"]


def why_judged(name, seed_list, out_root):
    """Per seed of a judged claim's finished runs (`name`: 'judged' or 'judged_t1', whose methods are 'dpo' and
    'preferred_ft' on the same pairs): the pairs' statistics (pair_stats), the SFT model's sampled reward, both
    policies' KL, and DPO - Preferred-FT in greedy reward (the judged claim) and in sampled reward (judged_frontier;
    a policy's frontier point not sampled yet is sampled now); then, over 5 seeds or more, each column's
    correlation with the greedy difference. Trains nothing. Returns the markdown and the rows."""
    from nanopo.checkpoint import load_checkpoint, task_settings
    from nanopo.tasks import AdditionTask
    rows = {}
    for seed in seed_list:
        sft_dir = os.path.join(out_root, f"sft_{seed}")
        runs = {m: os.path.join(out_root, name, f"{m}_{seed}") for m in ("dpo", "preferred_ft")}
        summaries, points = {}, {}
        for method, run_dir in runs.items():
            if not os.path.exists(os.path.join(run_dir, "summary.json")):
                sys.exit(f"error: {run_dir} has no finished run: run --claims={name} on these seeds first")
            with open(os.path.join(run_dir, "summary.json")) as f:
                summaries[method] = json.load(f)
            points[method] = run_metrics(summaries[method], run_dir, ("sampled_reward", "kl"))
        sft = load_checkpoint(os.path.join(sft_dir, "ckpt.pt"))
        task = AdditionTask(**task_settings(sft["config"]))
        row = {"sft_accuracy": sft["task_accuracy"], "sft_sampled_reward": sft_sampled_reward(sft_dir)}
        # dpo.py's n_pairs is the number of training prompts sampled from; Preferred-FT ran on the same pairs
        # (same seed and SFT model), so DPO's pairs.jsonl stands for both
        n_prompts = summaries["dpo"]["config"]["n_pairs"]
        row.update(pair_stats(os.path.join(runs["dpo"], "pairs.jsonl"), task, n_prompts))
        row["kl_dpo"], row["kl_preferred_ft"] = points["dpo"]["kl"], points["preferred_ft"]["kl"]
        row["greedy_diff"] = (summaries["dpo"]["results"]["task_reward"]
                              - summaries["preferred_ft"]["results"]["task_reward"])
        row["sampled_diff"] = points["dpo"]["sampled_reward"] - points["preferred_ft"]["sampled_reward"]
        rows[seed] = row
    heads = ["seed", "pairs", *WHY_COLUMNS, "greedy_diff"]
    lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    for seed, row in rows.items():
        cells = [str(seed), str(row["pairs"])] + [fmt(row[c]) for c in WHY_COLUMNS + ["greedy_diff"]]
        lines.append("| " + " | ".join(cells) + " |")
    if len(rows) >= 5:
        greedy = [row["greedy_diff"] for row in rows.values()]
        cells = ["r with greedy_diff", ""]
        for c in WHY_COLUMNS:
            r = pearson([row[c] for row in rows.values()], greedy)
            cells.append(fmt(r, signed=True))
        lines.append("| " + " | ".join(cells + [""]) + " |")
    lines += ["", "chosen_right / rejected_right: the share of pairs whose chosen / rejected answer is exactly "
                  "right; order_right / order_wrong / ties: the chosen answer's true reward above / below / equal "
                  "to the rejected one's; pair_share: the share of prompts whose samples were not all alike; "
                  "kl_*: KL(policy || SFT) of each policy's samples; sampled_diff and greedy_diff: DPO - "
                  "Preferred-FT in the mean true reward of samples (temperature 1) and of greedy answers; r: "
                  f"Pearson's correlation over the seeds. Machine: {machine()}."]
    return "\n".join(lines), rows


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
    """The claim's markdown table: a row per seed, each method's mean +- 95% interval, the paired difference
    (and the extra metrics' values), and a sentence with wins out of N. A claim against the SFT model gets
    gains_table's instead. Returns (markdown, the paired comparison: compare's dict, or gains_table's)."""
    if claim.compare is None:
        return gains_table(name, claim, result, seed_list)
    first, second = claim.compare
    methods = list(claim.methods)
    diff = compare(result["values"][first], result["values"][second])
    extra_heads = [f"{e} {m}" for e in claim.extra for m in methods]
    lines = [f"**{name}**: {claim.sentence}. Metric: `{claim.metric}` (held out); seeds "
             f"{', '.join(str(s) for s in seed_list)}; 95% intervals: Student's t over the seeds.", "",
             "| seed | SFT accuracy | " + " | ".join(methods) + f" | {first} − {second} | "
             + "".join(f"{h} | " for h in extra_heads),
             "|---" * (len(methods) + 3 + len(extra_heads)) + "|"]
    for seed in seed_list:
        row = [str(seed), fmt(result["sft"].get(seed))]
        row += [fmt(result["values"][m].get(seed)) for m in methods]
        row.append(fmt(diff["diffs"].get(seed), signed=True))
        row += [fmt(result["extra"][e][m].get(seed)) for e in claim.extra for m in methods]
        lines.append("| " + " | ".join(row) + " |")
    means = [mean_cell(result["values"][m]) for m in methods]
    means.append(f"{fmt(diff['mean'], signed=True)} ± {fmt(diff['half'])}")
    means += [mean_cell(result["extra"][e][m]) for e in claim.extra for m in methods]
    lines.append("| mean ± 95% | | " + " | ".join(means) + " |")
    ties = ""
    if diff["ties"]:
        ties = f" ({diff['ties']} tied)"
    low, high = None, None
    if diff["half"] is not None:
        low, high = diff["mean"] - diff["half"], diff["mean"] + diff["half"]
    lines += ["", f"{first} above {second} on {diff['wins']} of {diff['n']} seeds{ties}; mean difference "
                  f"{fmt(diff['mean'], signed=True)} (95% interval {fmt(low, signed=True)} to "
                  f"{fmt(high, signed=True)})."]
    for e in claim.extra:
        extra_diff = compare(result["extra"][e][first], result["extra"][e][second])
        lines[-1] += (f" {e}: {first} − {second} {fmt(extra_diff['mean'], signed=True)} ± "
                      f"{fmt(extra_diff['half'])} ({first} lower on {extra_diff['losses']} of "
                      f"{extra_diff['n']} seeds).")
    return "\n".join(lines), diff


def gains_table(name, claim, result, seed_list):
    """A claim against the SFT model: a row per method with its mean +- 95% interval, its gain over the seed's
    SFT model (mean +- 95%, paired by seed), the smallest gain and its seed, and the seeds whose gain is above
    the claim's threshold. Returns (markdown, {method: compare's dict of the gains})."""
    gains = {m: compare(result["values"][m], result["sft_metric"]) for m in claim.methods}
    head = f"gain > {claim.threshold:+.2f}"
    lines = [f"**{name}**: {claim.sentence}. Metric: `{claim.metric}` (held out), gain = the method's minus "
             f"its seed's SFT model's; seeds {', '.join(str(s) for s in seed_list)}; 95% intervals: Student's t "
             "over the seeds.", "",
             f"| method | {claim.metric}, mean ± 95% | gain, mean ± 95% | smallest gain (seed) | {head} |",
             "|---|---|---|---|---|",
             f"| SFT model | {mean_cell(result['sft_metric'])} | | | |"]
    holding = []
    for method, gain in gains.items():
        seed, smallest = min(gain["diffs"].items(), key=lambda item: item[1])
        above = sum(d > claim.threshold for d in gain["diffs"].values())
        if above == gain["n"]:
            holding.append(method)
        lines.append(f"| {method} | {mean_cell(result['values'][method])} | {fmt(gain['mean'], signed=True)} ± "
                     f"{fmt(gain['half'])} | {fmt(smallest, signed=True)} ({seed}) | {above} of {gain['n']} |")
    failing = [m for m in gains if m not in holding]
    lines += ["", f"{len(holding)} of {len(gains)} methods gain more than {claim.threshold:.2f} on every seed; "
                  f"not on every seed: {', '.join(failing) or 'none'}."]
    return "\n".join(lines), gains


def mean_cell(values):
    """'mean ± half-width' of a {seed: value} dict, as the tables print it."""
    mean, half = t_interval(list(values.values()))
    return f"{fmt(mean)} ± {fmt(half)}"


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
    if names == ["all"]:
        names = list(CLAIMS)
    if config["list_claims"] or (not names and not config["why"]):
        for name, claim in CLAIMS.items():
            against = "each vs the SFT model"
            if claim.compare is not None:
                against = f"{claim.compare[0]} vs {claim.compare[1]}"
            print(f"{name}: {claim.sentence}; metric {claim.metric}, {against}")
            for method, command in claim.methods.items():
                print(f"    {method}: python {shlex.join(command)} --seed=S --sft_ckpt=<sft_S>/ckpt.pt")
        return
    if config["why"]:
        if names:
            sys.exit("error: why runs alone: drop --claims, or run the claims first")
        if config["why"] not in ("judged", "judged_t1"):
            sys.exit(f"error: why='{config['why']}': expected 'judged' or 'judged_t1'")
        markdown, rows = why_judged(config["why"], parse_seeds(config["seeds"]), config["out"])
        with open(os.path.join(config["out"], f"{config['why']}_why.md"), "w") as f:
            f.write(markdown + "\n")
        with open(os.path.join(config["out"], f"{config['why']}_why.json"), "w") as f:
            json.dump(rows, f, indent=1)
        print(markdown)
        return
    unknown = [n for n in names if n not in CLAIMS]
    if unknown:
        sys.exit(f"error: unknown claim '{unknown[0]}': expected one of {', '.join(CLAIMS)}")
    seed_list = parse_seeds(config["seeds"])
    for name in names:
        t0 = time.time()
        claim = CLAIMS[name]
        made_before = len(RUNS_MADE)
        result = run_claim(name, claim, seed_list, config["out"])
        markdown, diff = table(name, claim, result, seed_list)
        walls = [s or 0 for runs in result["wall_s"].values() for s in runs.values()]
        markdown += (f" Machine: {machine()}; the {len(walls)} runs it reads took {sum(walls) / 60:.1f} min "
                     f"(their summary.json's wall_s); this invocation made {len(RUNS_MADE) - made_before} runs "
                     f"(SFT models included) in {(time.time() - t0) / 60:.1f} min.")
        with open(os.path.join(config["out"], f"{name}.md"), "w") as f:
            f.write(markdown + "\n")
        with open(os.path.join(config["out"], f"{name}.json"), "w") as f:
            record = {"claim": name, "sentence": claim.sentence, "metric": claim.metric, "seeds": seed_list,
                      "compare": claim.compare, "machine": machine(), "wall_s": result["wall_s"],
                      "values": result["values"], "sft_accuracy": result["sft"],
                      "extra": result["extra"], "sft_metric": result["sft_metric"], "paired": diff,
                      "commands": {m: "python " + shlex.join(c) for m, c in claim.methods.items()}}
            json.dump(record, f, indent=1)
        print(markdown, flush=True)


if __name__ == "__main__":
    main()
