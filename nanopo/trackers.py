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

from configurator import UserError

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


def numbers(record):
    """The entries of a record a tracker can plot: finite ints and floats, not booleans."""
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
            and abs(v) != float("inf")}


class WandbTracker:
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
    def __init__(self, out_dir, run_name, project, config, start_iter):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: a resumed run hides the events its killed predecessor wrote past the checkpoint
        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                    purge_step=start_iter or None)
        self.writer.add_text("settings", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log(self, step, values):
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def summary(self, record):
        self.writer.add_text("summary", "```\n" + json.dumps(record, indent=2) + "\n```")

    def finish(self):
        self.writer.close()


class TrackioTracker:
    def __init__(self, out_dir, run_name, project, config, start_iter):
        import trackio
        self.trackio = trackio
        self.run = trackio.init(project=project, name=run_name, config=config)

    def log(self, step, values):
        self.run.log(values, step=step)

    def summary(self, record):
        # Trackio has no run summary: the numbers go in as metrics named summary/..., at the last
        # logged step
        self.run.log({f"summary/{k}": v for k, v in numbers(record).items()})

    def finish(self):
        # trackio's own finish(), which also forgets the run (else it finishes it again at exit)
        self.trackio.finish()


OPENERS = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker, "trackio": TrackioTracker}


class Trackers:
    """The trackers --report_to names, on rank 0 (none elsewhere). log() takes metrics.jsonl's
    records, {"iter": N, name: value, ...}; close() sends the summary and closes them."""

    def __init__(self, report_to, out_dir, run_name, project, config, start_iter, master):
        self.open = {}
        if not master:
            return
        for name in parse_report_to(report_to):
            try:
                opener = OPENERS[name]
                self.open[name] = opener(out_dir, run_name or out_dir, project, config, start_iter)
            except ImportError:
                raise UserError(f"report_to={name} needs the {name} package: pip install "
                                f"{name}") from None
            except Exception as e:
                # at the start nothing is lost yet: stop, and say why (no login, no network, ...)
                message = " ".join(str(e).split())[:200]
                raise UserError(f"report_to={name}: could not start a run: {type(e).__name__}: "
                                f"{message}") from None

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
