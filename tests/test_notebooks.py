"""The tutorial notebooks run top to bottom and match their committed outputs; scripts/plot.py
reads metrics.jsonl exactly and writes the PNGs it promises."""

import copy
import math
import glob
import json
import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
CELL_TIMEOUT = 300  # seconds; the longest cells start the training runs (~1 min on a quiet 2-core CPU)


def figure_cells(nb):
    """Indices of the code cells that display a PNG figure."""
    return [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
            and any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, NOTEBOOKS


@pytest.fixture(scope="module", autouse=True)
def notebook_runs_in_a_temporary_folder(tmp_path_factory):
    """The notebooks' training runs (nbutil.OUT) go to a temporary folder shared by the notebooks of this module
    (they reuse one SFT checkpoint), not into the repo's out/; the kernels inherit the variable."""
    old = os.environ.get("NANOPO_NOTEBOOK_OUT")
    os.environ["NANOPO_NOTEBOOK_OUT"] = str(tmp_path_factory.mktemp("notebooks"))
    yield
    if old is None:
        del os.environ["NANOPO_NOTEBOOK_OUT"]
    else:
        os.environ["NANOPO_NOTEBOOK_OUT"] = old


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_and_matches_committed_outputs(path):
    committed = nbformat.read(path, as_version=4)
    code = [c for c in committed.cells if c.cell_type == "code"]
    # committed WITH outputs (so GitHub renders them), every cell executed once, in order
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "commit the executed notebook"
    assert figure_cells(committed), "a tutorial notebook should show at least one figure"
    for cell in code:
        assert not any(out.output_type == "error" for out in cell.outputs), "committed outputs hold an error"

    fresh = copy.deepcopy(committed)
    for cell in fresh.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # from notebooks/, as Jupyter would start it; the notebooks find the repo root themselves.
    # A failing cell raises CellExecutionError, which fails the test with the cell's traceback.
    NotebookClient(fresh, timeout=CELL_TIMEOUT, kernel_name=committed.metadata.get("kernelspec", {}).get(
        "name", "python3"), resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    # the committed outputs are of the same kind as a fresh run's: the same cells draw figures
    assert figure_cells(fresh) == figure_cells(committed)


# -----------------------------------------------------------------------------------------------------------
# scripts/plot.py

sys.path.insert(0, REPO)
from scripts import plot  # noqa: E402

# a hand-written metrics.jsonl: training lines, evaluation lines sharing an iter, a blank line, and a last line
# cut short (a run killed mid-write)
METRICS = """\
{"iter": 0, "task_accuracy": 0.25}
{"iter": 0, "loss": 0.6931, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0, "rewards/accuracies": 0.0, "lr": 5e-05}
{"iter": 5, "loss": 0.5, "rewards/chosen": 0.1, "rewards/rejected": -0.4, "rewards/margins": 0.5, "rewards/accuracies": 0.75, "lr": 5e-05}

{"iter": 10, "task_accuracy": 0.5}
{"iter": 10, "loss": 0.25, "rewards/chosen": -0.2, "rewards/rejected": -1.2, "rewards/margins": 1.0, "rewards/accuracies": 1.0, "lr": 5e-05}
{"iter": 15, "loss": 0.1, "rewards/ch"""


def write_run(root, name, text=METRICS):
    run = os.path.join(root, name)
    os.makedirs(run)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write(text)
    return run


def test_load_metrics_reads_every_series_and_skips_a_truncated_line(tmp_path):
    series = plot.load_metrics(os.path.join(write_run(str(tmp_path), "dpo"), "metrics.jsonl"))
    assert series == {
        "task_accuracy": ([0, 10], [0.25, 0.5]),
        "loss": ([0, 5, 10], [0.6931, 0.5, 0.25]),
        "rewards/chosen": ([0, 5, 10], [0.0, 0.1, -0.2]),
        "rewards/rejected": ([0, 5, 10], [0.0, -0.4, -1.2]),
        "rewards/margins": ([0, 5, 10], [0.0, 0.5, 1.0]),
        "rewards/accuracies": ([0, 5, 10], [0.0, 0.75, 1.0]),
        "lr": ([0, 5, 10], [5e-05, 5e-05, 5e-05]),
    }


def test_load_metrics_on_a_real_run_file_agrees_with_json(tmp_path):
    """Every numeric field of every complete line ends up in its series, in file order."""
    lines = [{"iter": i, "loss": 1.0 / (i + 1), "grad_norm": float(i)} for i in range(0, 50, 5)]
    lines.insert(3, {"iter": 10, "task_accuracy": 0.125})
    run = write_run(str(tmp_path), "r", "".join(json.dumps(r) + "\n" for r in lines))
    series = plot.load_metrics(os.path.join(run, "metrics.jsonl"))
    train = [r for r in lines if "loss" in r]
    assert series["loss"] == ([r["iter"] for r in train], [r["loss"] for r in train])
    assert series["grad_norm"][1] == [r["grad_norm"] for r in train]
    assert series["task_accuracy"] == ([10], [0.125])


def test_run_labels_are_folder_names_unless_they_clash():
    assert plot.run_labels(["out/dpo", "out/ipo/"]) == ["dpo", "ipo"]
    assert plot.run_labels(["a/dpo", "b/dpo", "c/kto"]) == [os.path.normpath("a/dpo"), os.path.normpath("b/dpo"), "kto"]


def run_plot(*args):
    return subprocess.run([sys.executable, "-m", "scripts.plot", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_plot_writes_the_pngs_it_prints(tmp_path):
    dpo = write_run(str(tmp_path), "dpo")
    # an SFT run logs no rewards: it joins the loss and task-accuracy figures only
    sft = write_run(str(tmp_path), "sft", '{"iter": 0, "loss": 2.0}\n{"iter": 10, "task_accuracy": 0.3}\n')
    out = tmp_path / "pngs"
    result = run_plot(dpo, sft, "--out", str(out), "--prefix", "cmp_")
    assert result.returncode == 0, result.stderr
    expected = [str(out / f"cmp_{name}.png") for name in ("loss", "rewards", "margins", "task_accuracy")]
    assert result.stdout.split() == expected
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in expected)
    for path in expected:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # one SFT run alone: nothing to draw rewards or margins from, so those figures are not written
    result = run_plot(sft)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [os.path.join(sft, "loss.png"), os.path.join(sft, "task_accuracy.png")]

    result = run_plot(dpo, "--out", str(tmp_path / "some"), "--figures", "task_accuracy,rewards")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "some" / f"{name}.png") for name in ("rewards", "task_accuracy")]
    result = run_plot(dpo, "--figures", "reward")
    assert result.returncode != 0 and result.stderr.startswith("error: unknown figure 'reward'")


def test_plot_rejects_a_missing_run_dir_with_one_line(tmp_path):
    dpo = write_run(str(tmp_path), "dpo")
    missing = str(tmp_path / "nope")
    result = run_plot(dpo, missing, "--out", str(tmp_path / "pngs"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: run folder {missing} does not exist"]
    assert not (tmp_path / "pngs").exists()  # nothing written when an input is wrong

    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_plot(str(empty))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: run folder {empty} has no metrics.jsonl"]


def test_best_of_n_keeps_the_best_of_the_first_n_by_hand():
    sys.path.insert(0, os.path.join(REPO, "notebooks"))
    import nbutil
    from data import Tokenizer
    from nanopo.tasks import AdditionTask

    task, tok = AdditionTask(n_digits=2, n_eval=50), Tokenizer("byte")
    offsets = [3, 1, 0, 5]  # draw k answers sum + offsets[k] for every prompt

    class Stub:
        draws = 0

        def eval(self):
            return self

        def generate(self, prompts, max_new_tokens, eos_id, pad_id, temperature, generator):
            k, Stub.draws = Stub.draws, Stub.draws + 1
            return [tok.encode(str(sum(task.parse(tok.decode(p))) + offsets[k])) for p in prompts]

    results = nbutil.best_of_n(Stub(), task, tok, [1, 2, 4], n_prompts=20)
    assert Stub.draws == 4
    assert results[1] == (-math.log(4), 0.0)  # the first draw: 3 off
    assert results[2] == (-math.log(2), 0.0)  # the better of 3 off and 1 off
    assert results[4] == (0.0, 1.0)           # the exact sum is among the first four
