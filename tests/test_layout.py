"""The shape of the code, as the README describes it: modules import downwards only and importing one changes
nothing; the scripts stay within their size budgets; the line numbers the README's "Read the code" cites point
at what it says they do."""

import ast
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# lowest first: a module may import only modules listed before it (the README's "import downwards only")
LAYERS = ["configurator", "model", "nanopo.lora", "data", "nanopo.tasks", "nanopo.formats",
          "logprobs", "losses", "nanopo.runtime", "nanopo.kto", "nanopo.objectives",
          "nanopo.logger", "bench.measure", "nanopo.evaluation", "nanopo.checkpoint", "nanopo.reference"]
SCRIPTS = ["sft.py", "dpo.py", "scripts/online_dpo.py", "sample.py", "scripts/export_hf.py", "bench/step_time.py",
           "bench/memory.py", "bench/threads.py", "scripts/plot.py"]
PACKAGES = ["nanopo", "bench", "scripts"]


def module_path(name):
    return os.path.join(REPO, name.replace(".", os.sep) + ".py")


def repo_imports(path):
    """The repo modules a file imports, anywhere in it (top level or inside functions), as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names & set(LAYERS)


def python_files():
    """Every .py file at the top level and in the packages, relative to the repository root."""
    found = {f for f in os.listdir(REPO) if f.endswith(".py")}
    for package in PACKAGES:
        found |= {f"{package}/{f}" for f in os.listdir(os.path.join(REPO, package))
                  if f.endswith(".py") and f != "__init__.py"}
    return found


def test_every_module_is_in_the_layer_list():
    modules = {f[:-3].replace("/", ".") for f in python_files() - set(SCRIPTS)}
    assert modules == set(LAYERS)


@pytest.mark.parametrize("module", LAYERS)
def test_modules_import_downwards_only(module):
    higher = repo_imports(module_path(module)) - set(LAYERS[:LAYERS.index(module)])
    assert not higher, f"{module}.py imports {sorted(higher)}, which sit above it"


def test_importing_a_module_has_no_side_effects():
    """Every module imported in a fresh interpreter: nothing printed, sys.excepthook untouched, no thread count
    or RNG state changed."""
    code = ("import sys, torch; before = (sys.excepthook, torch.get_num_threads(), torch.random.get_rng_state()); "
            f"import {', '.join(LAYERS)}; "
            "after = (sys.excepthook, torch.get_num_threads(), torch.random.get_rng_state()); "
            "assert before[:2] == after[:2] and torch.equal(before[2], after[2]), 'changed'")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == ""


def if_statements(path):
    return sum(isinstance(n, ast.If) for n in ast.walk(ast.parse(open(path).read())))


def lines(path):
    with open(path) as f:
        return len(f.read().splitlines())


def test_size_budgets():
    """The readable-core budgets: dpo.py at most 320 lines and 30 if statements, sft.py at most 200 lines, no
    module over 450 lines."""
    assert lines(os.path.join(REPO, "dpo.py")) <= 320
    assert if_statements(os.path.join(REPO, "dpo.py")) <= 30
    assert lines(os.path.join(REPO, "sft.py")) <= 200
    for f in os.listdir(REPO):
        if f.endswith(".py"):
            assert lines(os.path.join(REPO, f)) <= 450, f


def test_the_readme_line_numbers_point_at_what_they_name():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Read the code"):readme.index("## The pipeline, file by file")]
    dpo = open(os.path.join(REPO, "dpo.py")).read().splitlines()

    # "`name` (line N)" in the text: line N of losses.py or logprobs.py defines `name`
    sources = {f: open(os.path.join(REPO, f)).read().splitlines() for f in ("losses.py", "logprobs.py", "nanopo/objectives.py")}
    cited = re.findall(r"`(\w+)` \(line (\d+)\)", section)
    assert len(cited) >= 4
    for name, line in cited:
        assert any(len(src) >= int(line) and src[int(line) - 1].startswith(f"def {name}(") for src in sources.values()), \
            f"no `def {name}` at line {line}"
    # the table of dpo.py's core: each range holds what its row names
    expected = {"copy.deepcopy(policy)": "reference = copy.deepcopy(policy)", "the pairs": "task.build_pairs(",
                "reference_logps": "def reference_logps(", "compute_loss": "def compute_loss(",
                "the training loop": "for it in range(start_iter"}
    rows = re.findall(r"^   \| (\d+)–(\d+) \| (.*) \|$", section, re.M)
    assert len(rows) == len(expected)
    for (start, end, text), (key, code) in zip(rows, expected.items()):
        assert key in text
        span = "\n".join(dpo[int(start) - 1:int(end)])
        assert code in span, (start, end, code)
        first = dpo[int(start) - 1]
        assert first.startswith("#") or code in first, f"line {start} should open the section"
    backward, step = map(int, re.search(r"\(line (\d+)\), clipping.*\(line (\d+)\)", section).groups())
    assert ".backward()" in dpo[backward - 1] and "scaler.step(optimizer)" in dpo[step - 1]
