"""
Experiment trackers, for --report_to: Weights & Biases, TensorBoard and Trackio (Hugging Face's
local-first tracker). A run sends each one what it writes to metrics.jsonl, under the same names
(TRL's: rewards/margins, logps/chosen, ...) at the same iteration, plus its settings at the start and
summary.json's contents at the end. metrics.jsonl stays the record the project's own tools read; a
tracker is a view of it.

Each tracker is imported only when a run asks for it, so none of them is a dependency: a missing one
stops the run at its start with one line naming the pip command. Only rank 0 reports. A tracker that
fails later (network, disk) prints one warning and is dropped; the run and metrics.jsonl go on.

Where each one writes: wandb to out_dir/wandb (online, or offline with WANDB_MODE=offline, then
`wandb sync`); TensorBoard to out_dir/tensorboard (`tensorboard --logdir out`); Trackio to its own
folder, TRACKIO_DIR or ~/.cache/huggingface/trackio (`trackio show --project nanopo`).
"""

import importlib.util
import json
import os

import torch

from configurator import UserError
from nanopo.runtime import all_reduce_sum

TRACKERS = ("wandb", "tensorboard", "trackio")


def parse_report_to(report_to):
    """'wandb,tensorboard' -> ['wandb', 'tensorboard']; 'none' or '' -> []."""
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"unknown report_to '{name}': expected 'none' or any of "
                            f"{', '.join(TRACKERS)}, comma-separated")
    return names


def check_report_to(report_to):
    """Stop at the start, in one line, if --report_to names an unknown tracker or one whose package
    is not installed (each is imported under its own name: wandb, tensorboard, trackio)."""
    for name in parse_report_to(report_to):
        if importlib.util.find_spec(name) is None:
            raise UserError(f"report_to={name} needs the {name} package: pip install {name}")


def numbers(record, prefix=""):
    """The entries of a record a tracker can plot: finite ints and floats, not booleans; a nested
    dict's under its key, {"results": {"task_accuracy": x}} -> {"results/task_accuracy": x}."""
    found = {}
    for k, v in record.items():
        if isinstance(v, dict):
            found.update(numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < float("inf"):
            found[prefix + k] = v
    return found


class WandbTracker:
    """A wandb run in out_dir/wandb: metrics by step, the settings as its config, the summary."""

    def __init__(self, out_dir, run_name, project, config, start_iter):
        import wandb
        # a resumed run is a new wandb run of the same name, logging from the iteration it resumed at
        self.run = wandb.init(project=project, name=run_name, config=config, dir=out_dir)

    def log(self, step, values):
        self.run.log(values, step=step)

    def summary(self, record):
        self.run.summary.update(record)

    def finish(self):
        self.run.finish()


class TensorBoardTracker:
    """Event files in out_dir/tensorboard: a scalar per metric, the settings and summary as text."""

    def __init__(self, out_dir, run_name, project, config, start_iter):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: the events an earlier run in this folder wrote from this iteration on are
        # hidden (all of them for a fresh run; past the checkpoint for a resumed one)
        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start_iter)
        self.writer.add_text("settings", "```\n" + json.dumps(config, indent=2) + "\n```",
                             start_iter)
        self.step = start_iter

    def log(self, step, values):
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        self.step = step

    def summary(self, record):
        self.writer.add_text("summary", "```\n" + json.dumps(record, indent=2) + "\n```",
                             self.step)

    def finish(self):
        self.writer.close()


class TrackioTracker:
    """A Trackio run in its local database (TRACKIO_DIR): metrics by step, the settings as config."""

    def __init__(self, out_dir, run_name, project, config, start_iter):
        import trackio
        self.trackio = trackio
        self.run = trackio.init(project=project, name=run_name, config=config)

    def log(self, step, values):
        self.run.log(values, step=step)

    def summary(self, record):
        # Trackio has no run summary: its numbers go in as metrics named summary/..., one step
        # after the last logged one
        self.run.log({f"summary/{k}": v for k, v in numbers(record).items()})

    def finish(self):
        # trackio's own finish(), which also forgets the run (else it finishes it again at exit)
        self.trackio.finish()


OPENERS = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker, "trackio": TrackioTracker}


class Trackers:
    """The trackers --report_to names, on rank 0 (none elsewhere). log() takes metrics.jsonl's
    records, {"iter": N, name: value, ...}; close() sends the summary and closes them. Every rank
    constructs it: a tracker that cannot start stops every rank, in one line."""

    def __init__(self, report_to, out_dir, run_name, project, config, start_iter, rt):
        self.open = {}
        problem = None
        for name in parse_report_to(report_to) if rt.master else []:
            try:
                opener = OPENERS[name]
                self.open[name] = opener(out_dir, run_name or out_dir, project, config, start_iter)
            except ImportError:
                problem = f"report_to={name} needs the {name} package: pip install {name}"
            except Exception as e:
                # at the start nothing is lost yet: stop, and say why (no login, no network, ...)
                message = " ".join(str(e).split())[:200]
                problem = f"report_to={name}: could not start a run: {type(e).__name__}: {message}"
            if problem:
                break
        # the other ranks learn that rank 0 could not start its trackers, and stop with it
        failed = all_reduce_sum(torch.tensor([float(problem is not None)], device=rt.device), rt)
        if failed.item() > 0:
            raise UserError(problem or "rank 0 could not start its trackers (its line says why)")

    def _each(self, what, call):
        """call(tracker) for each open tracker; one that raises is reported once and dropped."""
        for name, tracker in list(self.open.items()):
            try:
                call(tracker)
            except Exception as e:
                del self.open[name]
                message = " ".join(str(e).split())[:200]
                print(f"warning: {name} failed {what} ({type(e).__name__}: {message}); it gets "
                      "nothing more from this run, metrics.jsonl has every record", flush=True)

    def log(self, record):
        values = numbers({k: v for k, v in record.items() if k != "iter"})
        self._each(f"at iter {record['iter']}", lambda tracker: tracker.log(record["iter"], values))

    def close(self, summary=None):
        if summary is not None:
            self._each("with the summary", lambda tracker: tracker.summary(summary))
        self._each("closing", lambda tracker: tracker.finish())
        self.open = {}
