"""--report_to: a tiny dpo.py run reports to TensorBoard, wandb (offline) and Trackio (local) at once,
and each tracker's own files, read back with its own reader (wandb's: its record format, parsed
here), hold metrics.jsonl's values at the same iterations, the settings and the summary. A tracker
that raises mid-run costs one warning line, not the run or a record of metrics.jsonl. No network."""

import glob
import json
import math
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from configurator import UserError
from nanopo import trackers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_ARGS = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=8", "--n_eval=50",
            "--device=cpu", "--max_iters=10", "--eval_interval=100"]
DPO_ARGS = ["--n_pairs=64", "--batch_size=8", "--max_iters=8", "--eval_interval=4",
            "--log_interval=1", "--n_eval=50", "--device=cpu"]


def run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def env(tmp_path_factory, script_env):
    root = tmp_path_factory.mktemp("trackers")
    return dict(script_env, WANDB_MODE="offline", TRACKIO_DIR=str(root / "trackio"),
                WANDB_SILENT="true")


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory, script_env):
    root = tmp_path_factory.mktemp("sft")
    run([sys.executable, os.path.join(REPO, "sft.py"), *SFT_ARGS, f"--out_dir={root / 'out'}"],
        root, script_env)
    return str(root / "out" / "ckpt.pt")


@pytest.fixture(scope="module")
def reported(tmp_path_factory, env, sft_ckpt):
    """One run reporting to all three: its out_dir, and metrics.jsonl's records."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("trackio")
    root = tmp_path_factory.mktemp("run")
    out_dir = root / "dpo"
    run([sys.executable, os.path.join(REPO, "dpo.py"), *DPO_ARGS, f"--sft_ckpt={sft_ckpt}",
         f"--out_dir={out_dir}", "--report_to=tensorboard,wandb,trackio", "--run_name=tiny",
         "--project=nanopo_test"], root, env)
    with open(out_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return out_dir, records


def expected(records):
    """{(name, iter): value} of every number in metrics.jsonl."""
    values = {}
    for record in records:
        for name, value in record.items():
            if name != "iter" and isinstance(value, (int, float)):
                values[(name, record["iter"])] = value
    return values


def test_tensorboard_events_hold_the_metrics(reported):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out_dir, records = reported
    events = EventAccumulator(str(out_dir / "tensorboard"))
    events.Reload()
    seen = {(tag, e.step): e.value for tag in events.Tags()["scalars"]
            for e in events.Scalars(tag)}
    want = expected(records)
    assert "rewards/margins" in {name for name, _ in want} and len(want) > 70
    # TensorBoard keeps scalars as float32: each value is metrics.jsonl's, so rounded
    assert seen == {key: float(np.float32(value)) for key, value in want.items()}
    def text(tag):
        return events.Tensors(tag)[0].tensor_proto.string_val[0].decode().strip("`\n")
    assert json.loads(text("settings/text_summary"))["beta"] == 1.0
    with open(out_dir / "summary.json") as f:
        written = json.load(f)
    assert json.loads(text("summary/text_summary"))["results"] == written["results"]


def read_wandb_records(path):
    """The protobuf records of a .wandb file: its 7-byte header (':W&B', a magic number, a version),
    then LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte header (CRC-32C,
    length, type: 1 whole record, 2 first, 3 middle, 4 last piece of one)."""
    from wandb.proto import wandb_internal_pb2
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_the_metrics_settings_and_summary(reported):
    out_dir, records = reported
    (path,) = glob.glob(str(out_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    seen, config, summary = {}, {}, {}
    for record in read_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            step = record.history.step.num
            for item in record.history.item:
                name = item.key or "/".join(item.nested_key)
                if not name.startswith("_"):
                    seen[(name, step)] = json.loads(item.value_json)
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "run":
            assert record.run.display_name == "tiny" and record.run.project == "nanopo_test"
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    assert seen == expected(records)  # the same doubles, through JSON
    assert config["beta"] == 1.0 and config["report_to"] == "tensorboard,wandb,trackio"
    with open(out_dir / "summary.json") as f:
        written = json.load(f)
    assert summary["results"] == written["results"] and summary["last_line"] == written["last_line"]


def test_trackio_project_holds_the_metrics(reported, env):
    _, records = reported
    # trackio reads TRACKIO_DIR when it is imported: its reader runs where the run's folder is set
    read = ("import json\nfrom trackio.sqlite_storage import SQLiteStorage as S\n"
            "print(json.dumps([S.get_logs('nanopo_test', 'tiny'), "
            "S.get_run_config('nanopo_test', 'tiny')]))")
    logs, config = json.loads(run([sys.executable, "-c", read], REPO, env).splitlines()[-1])
    seen = {}
    for entry in logs:
        for name, value in entry.items():
            if name not in ("step", "timestamp") and not name.startswith("summary/"):
                seen[(name, entry["step"])] = value
    assert seen == expected(records)
    assert any("summary/wall_s" in entry for entry in logs)
    assert config["beta"] == 1.0


def test_a_tracker_that_fails_mid_run_costs_one_warning(reported, sft_ckpt, tmp_path, env):
    """TensorBoard raises at iter 3 (a full disk, say): the run finishes, one warning says so, and
    metrics.jsonl is the same, record for record, as the run whose trackers all worked."""
    _, records = reported
    patch = textwrap.dedent("""
        from nanopo import trackers
        original = trackers.TensorBoardTracker.log
        def log(self, step, values):
            if step == 3:
                raise OSError(28, "No space left on device")
            return original(self, step, values)
        trackers.TensorBoardTracker.log = log
    """)
    out_dir = tmp_path / "dpo"
    args = [*DPO_ARGS, f"--sft_ckpt={sft_ckpt}", f"--out_dir={out_dir}",
            "--report_to=tensorboard"]
    code = patch + f"import runpy, sys\nsys.argv = {['dpo.py'] + args!r}\n" \
        f"runpy.run_path({os.path.join(REPO, 'dpo.py')!r}, run_name='__main__')\n"
    out = run([sys.executable, "-c", code], tmp_path, env)
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: tensorboard failed at iter 3 (OSError: [Errno 28] No space left "
                        "on device); it gets nothing more from this run, metrics.jsonl has every "
                        "record"]
    assert out.strip().splitlines()[-1].startswith("DPO done:")
    with open(out_dir / "metrics.jsonl") as f:
        assert [json.loads(line) for line in f] == records


def test_report_to_is_checked_before_the_run_starts(monkeypatch):
    assert trackers.parse_report_to("none") == [] and trackers.parse_report_to("") == []
    assert trackers.parse_report_to("wandb, tensorboard") == ["wandb", "tensorboard"]
    with pytest.raises(UserError, match="unknown report_to 'mlflow'"):
        trackers.check_report_to("tensorboard,mlflow")
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"^report_to=wandb needs the wandb package: pip install "
                                        r"wandb$"):
        trackers.check_report_to("wandb")


def test_only_finite_numbers_are_reported():
    record = {"loss": 0.5, "n": 3, "flag": True, "name": "dpo", "nan": math.nan, "inf": math.inf,
              "none": None}
    assert trackers.numbers(record) == {"loss": 0.5, "n": 3}


def test_a_missing_tracker_stops_the_script_in_one_line(tmp_path, script_env):
    """A script asked for a tracker that is not installed stops before reading any data."""
    code = ("import sys, importlib.util\nreal = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda name, *a: None if name == 'wandb' else real(name, *a)\n"
            f"sys.argv = ['sft.py', '--report_to=wandb', '--out_dir={tmp_path}']\n"
            f"import runpy\nrunpy.run_path({os.path.join(REPO, 'sft.py')!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=script_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("error: report_to=wandb needs the wandb "
                                                    "package: pip install wandb")
    assert "SFT data" not in proc.stdout
