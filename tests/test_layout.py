"""The shape of the code, as the README describes it: the top level holds the lesson and the package the
machinery; modules import downwards only and importing one changes nothing; the top-level files keep short
lines; dpo.py reaches a loss in one hop; the line numbers the README's "Read the code" cites point at what it
says they do."""

import ast
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# lowest first: a module may import only modules listed before it (the README's "import downwards only")
LAYERS = ["configurator", "model", "data", "logprobs", "losses", "nanopo.lora", "nanopo.runtime",
          "nanopo.trackers",
          "nanopo.logger", "nanopo.tasks", "nanopo.formats", "nanopo.kto", "nanopo.checkpoint",
          "bench.measure"]
SCRIPTS = ["sft.py", "dpo.py", "grpo.py", "sample.py", "scripts/online_dpo.py", "scripts/export_hf.py",
           "scripts/plot.py", "scripts/compare.py", "bench/step_time.py", "bench/memory.py",
           "bench/threads.py", "bench/packed_attention.py", "scripts/seeds.py"]
PACKAGES = ["nanopo", "bench", "scripts"]
# what a learner reads and runs: the only .py files at the top level
LESSON = {"model.py", "data.py", "losses.py", "logprobs.py", "sft.py", "dpo.py", "grpo.py",
          "configurator.py", "sample.py"}


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


def top_level_files():
    return {f for f in os.listdir(REPO) if f.endswith(".py")}


def python_files():
    """Every .py file at the top level and in the packages, relative to the repository root."""
    found = top_level_files()
    for package in PACKAGES:
        found |= {f"{package}/{f}" for f in os.listdir(os.path.join(REPO, package))
                  if f.endswith(".py") and f != "__init__.py"}
    return found


def test_the_top_level_is_the_lesson():
    assert top_level_files() == LESSON
    # the lesson's budget: 8 files, and grpo.py beside dpo.py, the road DPO avoids
    assert len(LESSON) <= 9
    for folder in PACKAGES + ["docs", "tests", "notebooks", "config"]:
        assert os.path.isdir(os.path.join(REPO, folder)), folder
    assert len([f for f in os.listdir(os.path.join(REPO, "docs")) if f.endswith(".md")]) >= 3


def test_the_readme_is_a_tutorial_of_at_most_450_lines():
    """Lab notes go to docs/; the README keeps the tutorial and a file tree."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert len(readme.splitlines()) <= 450
    assert "## The files" in readme and "├── dpo.py" in readme


def test_every_module_is_in_the_layer_list():
    modules = {f[:-3].replace("/", ".") for f in python_files() - set(SCRIPTS)}
    assert modules == set(LAYERS)


@pytest.mark.parametrize("module", LAYERS)
def test_modules_import_downwards_only(module):
    higher = repo_imports(module_path(module)) - set(LAYERS[:LAYERS.index(module)])
    assert not higher, f"{module}.py imports {sorted(higher)}, which sit above it"


def test_importing_a_module_has_no_side_effects():
    """Every module imported in a fresh interpreter: nothing printed, sys.excepthook untouched, no thread
    count or RNG state changed."""
    code = ("import sys, torch; "
            "before = (sys.excepthook, torch.get_num_threads(), torch.random.get_rng_state()); "
            f"import {', '.join(LAYERS)}; "
            "after = (sys.excepthook, torch.get_num_threads(), torch.random.get_rng_state()); "
            "assert before[:2] == after[:2] and torch.equal(before[2], after[2]), 'changed'")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == ""


def test_short_lines_in_the_lesson():
    """At most 10 lines over 100 characters in all the top-level files (a URL or a table may need one)."""
    long_lines = []
    for f in sorted(LESSON):
        with open(os.path.join(REPO, f)) as fh:
            long_lines += [f"{f}:{i}" for i, line in enumerate(fh.read().splitlines(), 1) if len(line) > 100]
    assert len(long_lines) <= 10, long_lines


def test_dpo_imports_at_most_ten_project_modules():
    imported = set()
    for node in ast.walk(ast.parse(open(os.path.join(REPO, "dpo.py")).read())):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "nanopo":
                imported |= {f"nanopo.{a.name}" for a in node.names}
            else:
                imported.add(node.module)
    project = {name for name in imported if name in LAYERS}
    assert len(project) <= 10, sorted(project)


def test_compute_loss_reaches_the_loss_in_one_call():
    """dpo.py's compute_loss calls losses.LOSSES[name] itself, and the table's 'dpo' is losses.dpo_loss: from
    compute_loss to dpo_loss is one hop, with no dispatcher in between."""
    import losses
    assert losses.LOSSES["dpo"] is losses.dpo_loss
    tree = ast.parse(open(os.path.join(REPO, "dpo.py")).read())
    compute_loss = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "compute_loss")
    source = ast.unparse(compute_loss)
    assert "losses.LOSSES[name]" in source
    # every pairwise loss with a reference is in the table; simpo, orpo, sft and kto are called in view
    assert set(losses.LOSSES) | {"simpo", "orpo", "sft", "kto"} == set(losses.LOSS_TYPES)
    for name in ("losses.simpo_loss", "losses.orpo_loss", "losses.sft_loss", "kto.batch_loss"):
        assert name in source, name


def test_the_readme_line_numbers_point_at_what_they_name():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    start = readme.index("## Read the code")
    section = readme[start:readme.index("\n## ", start + 1)]
    files = {}

    def source(name):
        if name not in files:
            with open(os.path.join(REPO, name)) as fh:
                files[name] = fh.read().splitlines()
        return files[name]

    # "`name` (file.py line N)": line N of that file defines `name`; "`code` (file.py line N)": line N
    # holds that code
    cited = re.findall(r"`([^`]+)` \((\w+\.py)\s+line\s+(\d+)\)", section)
    assert len(cited) >= 8
    for name, path, line in cited:
        text = source(path)[int(line) - 1]
        if re.fullmatch(r"\w+", name):
            assert re.match(rf"\s*(def|class) {name}\b|{name} = ", text), f"{path}:{line} is not `{name}`"
        else:
            code = text.split("#")[0]
            assert name in code, f"{path}:{line} does not hold `{name}` (outside a comment)"
    # the table of dpo.py's core: "| N–M | text with `code` |": lines N to M hold `code`, and N opens it
    rows = re.findall(r"^\| (\d+)–(\d+) \| (.*) \|$", section, re.M)
    assert len(rows) >= 6
    dpo = source("dpo.py")
    for first, last, text in rows:
        code = re.search(r"`([^`]+)`", text).group(1)
        span = "\n".join(dpo[int(first) - 1:int(last)])
        assert code in span, (first, last, code)
        assert dpo[int(first) - 1].startswith("#") or code in dpo[int(first) - 1], \
            f"line {first} should open the section"
