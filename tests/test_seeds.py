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


def test_a_failing_run_stops_with_one_line(tmp_path):
    (tmp_path / "bad.py").write_text("import sys; print('boom'); sys.exit(3)")
    claim = seeds.Claim("x", {"a": [str(tmp_path / "bad.py")]}, metric="task_accuracy", compare=("a", "a"))
    with pytest.raises(SystemExit, match=r"bad.py .* failed \(exit 3\); its output is in"):
        seeds.run_claim("x", claim, [1], str(tmp_path / "out"), sft_command=[str(tmp_path / "bad.py")])


def test_the_claims_name_real_scripts_and_configs(repo_root):
    for claim in seeds.CLAIMS.values():
        assert claim.compare[0] in claim.methods and claim.compare[1] in claim.methods
        for command in claim.methods.values():
            for part in command:
                if part.endswith(".py"):
                    assert os.path.exists(os.path.join(repo_root, part)), part
    json.dumps({name: claim.methods for name, claim in seeds.CLAIMS.items()})


def test_the_readme_quotes_the_report_seeds_table(repo_root):
    """Every number the README quotes from the report seeds is in docs/report_seeds.md, the runner's tables."""
    import re
    with open(os.path.join(repo_root, "README.md")) as f:
        readme = " ".join(f.read().split())
    start = readme.index("](docs/report_seeds.md) (")
    quoted = readme[start:readme.index(")", start + len("](docs/report_seeds.md) ("))]
    numbers = re.findall(r"\d+ of \d+|[+−-]?\d+\.\d+", quoted)
    assert len(numbers) >= 2, quoted
    with open(os.path.join(repo_root, "docs", "report_seeds.md")) as f:
        table = f.read()
    for number in numbers:
        assert number.replace("−", "-") in table, number
