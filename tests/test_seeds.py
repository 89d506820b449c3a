"""scripts/seeds.py: its statistics against hand computations, its table, and a resumed runner that re-runs only
what is missing (with stand-in scripts that write a summary.json, so no model trains)."""

import json
import os

import pytest

from scripts import seeds


def test_t_interval_by_hand():
    # mean 2.5; sample sd sqrt(5/3) = 1.2910; se 0.6455; t(0.975, 3 df) = 3.182 -> half-width 2.054
    mean, half = seeds.t_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert half == pytest.approx(3.182 * (5 / 3) ** 0.5 / 2, rel=1e-12)
    assert half == pytest.approx(2.054, abs=1e-3)
    # one value has no interval; ten use 9 degrees of freedom (2.262)
    assert seeds.t_interval([0.7]) == (0.7, None)
    values = [0.1 * i for i in range(10)]
    assert seeds.t_interval(values)[1] == pytest.approx(2.262 * 0.302765 / 10 ** 0.5, rel=1e-5)


def test_paired_comparison_by_hand():
    first = {101: -0.05, 102: -0.09, 103: -0.04, 104: -0.10}
    second = {101: -0.03, 102: -0.19, 103: -0.19, 104: -0.10, 105: -0.5}  # 105: only one side ran
    out = seeds.compare(first, second)
    assert out["diffs"] == pytest.approx({101: -0.02, 102: 0.10, 103: 0.15, 104: 0.0})
    assert (out["n"], out["wins"], out["ties"], out["losses"]) == (4, 2, 1, 1)
    # mean 0.0575; differences' sd: deviations -0.0775, 0.0425, 0.0925, -0.0575
    sd = ((0.0775 ** 2 + 0.0425 ** 2 + 0.0925 ** 2 + 0.0575 ** 2) / 3) ** 0.5
    assert out["mean"] == pytest.approx(0.0575)
    assert out["half"] == pytest.approx(3.182 * sd / 2)


def test_parse_seeds():
    assert seeds.parse_seeds("101-110") == list(range(101, 111))
    assert seeds.parse_seeds("1,2,5") == [1, 2, 5]
    with pytest.raises(SystemExit, match="seeds='x'"):
        seeds.parse_seeds("x")


FAKE = """
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
seed = int(args["seed"])
os.makedirs(args["out_dir"], exist_ok=True)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.txt"), "a") as f:
    f.write(os.path.basename(sys.argv[0]) + " " + str(seed) + "\\n")
value = {"fake_sft.py": 0.4, "fake_a.py": 0.9, "fake_b.py": 0.8}[os.path.basename(sys.argv[0])] + seed / 1000
with open(os.path.join(args["out_dir"], "summary.json"), "w") as f:
    json.dump({"results": {"task_accuracy": value}, "wall_s": 2.0}, f)
print("done")
"""


def test_runner_resumes_and_writes_the_table(tmp_path):
    for name in ("fake_sft.py", "fake_a.py", "fake_b.py"):
        (tmp_path / name).write_text(FAKE)
    claim = seeds.Claim("a beats b", {"a": [str(tmp_path / "fake_a.py")], "b": [str(tmp_path / "fake_b.py")]},
                        metric="task_accuracy", compare=("a", "b"))
    out = str(tmp_path / "out")
    result = seeds.run_claim("fake", claim, [1, 2, 3], out, sft_command=[str(tmp_path / "fake_sft.py")])
    assert result["values"]["a"] == pytest.approx({1: 0.901, 2: 0.902, 3: 0.903})
    assert result["sft"] == pytest.approx({1: 0.401, 2: 0.402, 3: 0.403})
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert sorted(calls) == sorted(f"{s} {n}" for s in ("fake_sft.py", "fake_a.py", "fake_b.py") for n in (1, 2, 3))
    # a second run re-runs nothing; with one run's summary gone, only that run
    seeds.run_claim("fake", claim, [1, 2, 3], out, sft_command=[str(tmp_path / "fake_sft.py")])
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 9
    os.remove(os.path.join(out, "fake", "b_2", "summary.json"))
    seeds.run_claim("fake", claim, [1, 2, 3], out, sft_command=[str(tmp_path / "fake_sft.py")])
    assert (tmp_path / "calls.txt").read_text().splitlines()[9:] == ["fake_b.py 2"]
    markdown, diff = seeds.table("fake", claim, result, [1, 2, 3])
    assert (diff["wins"], diff["n"]) == (3, 3) and diff["mean"] == pytest.approx(0.1)
    assert "| 2 | 0.402 | 0.902 | 0.802 | +0.100 |" in markdown
    assert "a above b on 3 of 3 seeds; mean difference +0.100" in markdown


def test_a_changed_recipe_does_not_reuse_a_finished_run(tmp_path):
    """A finished run is kept only for the command it was made with: the same folder asked for with other
    arguments stops with one line naming both commands."""
    for name in ("fake_sft.py", "fake_a.py"):
        (tmp_path / name).write_text(FAKE)
    out, sft = str(tmp_path / "out"), [str(tmp_path / "fake_sft.py")]
    claim = seeds.Claim("a", {"a": [str(tmp_path / "fake_a.py")]}, metric="task_accuracy", compare=("a", "a"))
    seeds.run_claim("c", claim, [1], out, sft_command=sft)
    seeds.run_claim("c", claim, [1], out, sft_command=sft)  # the same command: kept
    changed = seeds.Claim("a", {"a": [str(tmp_path / "fake_a.py"), "--beta=2"]}, metric="task_accuracy",
                          compare=("a", "a"))
    with pytest.raises(SystemExit, match=r"a_1 was run as 'python .*fake_a.py --seed=1 .*', not 'python "
                                         r".*fake_a.py --beta=2 --seed=1 .*': remove the folder"):
        seeds.run_claim("c", changed, [1], out, sft_command=sft)
    # the diagnostics name the claim to run first when its runs are missing
    with pytest.raises(SystemExit, match="has no finished run: run --claims=judged on these seeds first"):
        seeds.why_judged("judged", [1], out)


def test_a_failing_run_stops_with_one_line(tmp_path):
    (tmp_path / "bad.py").write_text("import sys; print('boom'); sys.exit(3)")
    claim = seeds.Claim("x", {"a": [str(tmp_path / "bad.py")]}, metric="task_accuracy", compare=("a", "a"))
    with pytest.raises(SystemExit, match=r"bad.py .* failed \(exit 3\); its output is in"):
        seeds.run_claim("x", claim, [1], str(tmp_path / "out"), sft_command=[str(tmp_path / "bad.py")])


def test_gains_over_sft_by_hand():
    """A claim against the SFT model: per method the mean gain, the smallest gain and its seed, and the seeds
    above the threshold, on a small table worked by hand."""
    claim = seeds.Claim("every method gains 0.30", {"a": [], "b": []}, metric="task_accuracy", compare=None,
                        threshold=0.30)
    result = {"values": {"a": {1: 0.91, 2: 0.80, 3: 0.96}, "b": {1: 0.70, 2: 0.85, 3: 0.60}},
              "sft_metric": {1: 0.50, 2: 0.40, 3: 0.55}, "sft": {1: 0.50, 2: 0.40, 3: 0.55}, "extra": {}}
    markdown, gains = seeds.table("g", claim, result, [1, 2, 3])
    # a gains 0.41, 0.40, 0.41: mean 0.4067, smallest 0.40 (seed 2); b gains 0.20, 0.45, 0.05: mean 0.2333, smallest 0.05 (seed 3)
    assert gains["a"]["mean"] == pytest.approx(1.22 / 3)
    assert gains["a"]["half"] == pytest.approx(4.303 * (0.0001 / 3) ** 0.5 / 3 ** 0.5, rel=1e-6)
    sd_b = ((0.0333333 ** 2 + 0.2166667 ** 2 + 0.1833333 ** 2) / 2) ** 0.5
    assert gains["b"]["mean"] == pytest.approx(0.7 / 3) and gains["b"]["half"] == pytest.approx(4.303 * sd_b / 3 ** 0.5,
                                                                                                 rel=1e-5)
    assert "| a | 0.890 ± 0.203 | +0.407 ± 0.014 | +0.400 (2) | 3 of 3 |" in markdown
    assert "| b | 0.717 ± 0.313 | +0.233 ± 0.502 | +0.050 (3) | 1 of 3 |" in markdown
    assert "1 of 2 methods gain more than 0.30 on every seed; not on every seed: b." in markdown


def test_extra_metrics_and_a_cached_frontier_point(tmp_path):
    """A frontier metric a summary lacks is read from the run's frontier.json (measured once from its checkpoint);
    the table shows the extra metric per method and its paired difference."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "frontier.json").write_text(json.dumps({"sampled_reward": -0.2, "kl": 0.8}))
    got = seeds.run_metrics({"results": {"task_accuracy": 0.9}}, str(run_dir), ("sampled_reward", "kl"))
    assert got == {"sampled_reward": -0.2, "kl": 0.8}
    assert seeds.run_metrics({"results": {"kl": 0.5}}, str(tmp_path), ("kl",)) == {"kl": 0.5}
    # no checkpoint to sample from: one line naming the folder
    with pytest.raises(SystemExit, match="has no checkpoint on the embedded task"):
        seeds.run_metrics({"results": {}}, str(tmp_path / "empty"), ("sampled_reward",))
    claim = seeds.Claim("a beats b", {"a": [], "b": []}, metric="sampled_reward", compare=("a", "b"), extra=("kl",))
    result = {"values": {"a": {1: -0.10, 2: -0.30}, "b": {1: -0.20, 2: -0.25}}, "sft": {1: 0.4, 2: 0.5},
              "extra": {"kl": {"a": {1: 0.5, 2: 0.9}, "b": {1: 0.7, 2: 0.8}}}}
    markdown, diff = seeds.table("x", claim, result, [1, 2])
    assert "| 1 | 0.400 | -0.100 | -0.200 | +0.100 | 0.500 | 0.700 |" in markdown
    # KL a - b: -0.2 and +0.1, mean -0.05; a lower on 1 of 2
    assert "kl: a − b -0.050 ± " in markdown and "(a lower on 1 of 2 seeds)" in markdown
    assert (diff["wins"], diff["losses"]) == (1, 1)


def test_the_claims_name_real_scripts_and_configs(repo_root):
    for claim in seeds.CLAIMS.values():
        if claim.compare is not None:
            assert claim.compare[0] in claim.methods and claim.compare[1] in claim.methods
        else:
            assert claim.threshold is not None
        if claim.folder is not None:
            # a claim reading another's runs runs each method they share with the same command
            other = seeds.CLAIMS[claim.folder].methods
            assert all(claim.methods[m] == other[m] for m in claim.methods if m in other)
        for command in claim.methods.values():
            if command[0] == "-m":
                assert os.path.exists(os.path.join(repo_root, command[1].replace(".", "/") + ".py")), command
            # a script, a config, or a config inside a setting (--dpo_args=config/judged_dpo.py --beta=0.5)
            for part in " ".join(command).replace("=", " ").split():
                if part.endswith(".py"):
                    assert os.path.exists(os.path.join(repo_root, part)), part
    json.dumps({name: claim.methods for name, claim in seeds.CLAIMS.items()})


def test_the_readme_quotes_the_report_seeds_table(repo_root):
    """Every number the README quotes from the report seeds (the text after each link to docs/report_seeds.md, up
    to the parenthesis that closes it) is in docs/report_seeds.md, the runner's tables and what they say."""
    import re
    with open(os.path.join(repo_root, "README.md")) as f:
        readme = " ".join(f.read().split())
    with open(os.path.join(repo_root, "docs", "report_seeds.md")) as f:
        table = f.read()
    link = "](docs/report_seeds.md)"
    starts = [m.end() for m in re.finditer(re.escape(link), readme)]
    assert len(starts) >= 2
    for start in starts:
        quoted = readme[start:readme.index(")", start)]
        numbers = re.findall(r"\d+ of \d+|[+−-]?\d+\.\d+", quoted)
        assert len(numbers) >= 2, quoted
        for number in numbers:
            assert number.replace("−", "-") in table, (number, quoted)


def test_judged_pair_statistics_by_hand(tmp_path):
    """pair_stats on four pairs worked by hand (12+34=46): chosen right in 2 (46, 46), rejected right in 1; true
    order kept in 2, reversed in 1 (47 over 46), tied in 1 (45 against 47: both one off); 4 pairs of 5 prompts."""
    from nanopo.tasks import AdditionTask
    rows = [("46", "56"), ("46", "146"), ("47", "46"), ("45", "47")]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": "12+34=", "chosen": c, "rejected": r}) + "\n" for c, r in rows))
    stats = seeds.pair_stats(str(path), AdditionTask(), n_prompts=5)
    assert stats == {"pairs": 4, "chosen_right": 0.5, "rejected_right": 0.25, "order_right": 0.5,
                     "order_wrong": 0.25, "ties": 0.25, "pair_share": 0.8}


def test_pearson_by_hand():
    # x = 1, 2, 3; y = 2, 4, 5: deviations (-1, 0, 1) and (-5/3, 1/3, 4/3); sxy 3, sxx 2, syy 14/3
    assert seeds.pearson([1, 2, 3], [2, 4, 5]) == pytest.approx(3 / (2 * 14 / 3) ** 0.5)
    assert seeds.pearson([1, 2, 3], [6, 4, 2]) == pytest.approx(-1.0)
    assert seeds.pearson([1, 1, 1], [1, 2, 3]) is None
