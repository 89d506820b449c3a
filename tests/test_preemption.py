"""Runs that survive preemption and a full disk. SIGTERM (or a first Ctrl-C) sent mid-run makes the
script save a checkpoint after the step it interrupts, print one line and exit with code 75; run again
with --init_from=resume, it ends with the same weights and the same metrics.jsonl, bit for bit, as a
run nobody stopped: dpo.py alone and under 2-process torchrun, sft.py on Ctrl-C, the online rounds. A
second Ctrl-C stops at once. A checkpoint write that fails midway leaves the previous checkpoint
loadable and ends the run with one line naming the path and the cause.

The reference is always an uninterrupted run of the real script."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from nanopo import checkpoint, runtime
from configurator import UserError
from model import GPT, GPTConfig
from test_resume import assert_same_final_state, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=8", "--n_eval=50",
            "--device=cpu"]
# long enough (a few ms a step) that the signal lands mid-run, short enough for the suite
DPO_ARGS = ["--n_pairs=64", "--batch_size=8", "--max_iters=200", "--eval_interval=50",
            "--log_interval=1", "--n_eval=50", "--device=cpu"]


def launcher(torchrun=False):
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return [sys.executable]


def finish(args, cwd, env, torchrun=False):
    proc = subprocess.run(launcher(torchrun) + args, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def interrupt(args, cwd, env, when, signals, torchrun=False, pause=0.0):
    """Start a run, wait until its stdout has a line starting with `when`, send it `signals` (`pause`
    seconds apart) and wait for it to end: (exit code, stdout, stderr)."""
    log = cwd / f"log{time.monotonic_ns()}.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(launcher(torchrun) + args, cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while not any(line.startswith(when) for line in log.read_text().splitlines()):
            assert proc.poll() is None, f"it ended first: {log.read_text()[-2000:]}"
            assert time.time() < deadline
            time.sleep(0.005)
        for k, sig in enumerate(signals):
            if k:
                time.sleep(pause)
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=240)
    return proc.returncode, log.read_text(), err


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory, script_env):
    root = tmp_path_factory.mktemp("sft")
    finish([os.path.join(REPO, "sft.py"), *SFT_TINY, "--max_iters=20", "--eval_interval=100",
            f"--out_dir={root / 'out'}"], root, script_env)
    return str(root / "out" / "ckpt.pt")


def assert_stopped(code, out, err, name):
    """The stopped run's one line, its exit code, no traceback; returns the iteration it saved."""
    assert code == runtime.STOPPED_EXIT_CODE, out[-2000:] + err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in out.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {name} at iter ")
    assert lines[0].endswith("--init_from=resume to continue")
    return int(lines[0].split("at iter ")[1].split("/")[0])


@pytest.mark.parametrize("torchrun", [False, True], ids=["alone", "torchrun"])
def test_dpo_sigterm_then_resume_equals_an_uninterrupted_run(sft_ckpt, tmp_path, script_env,
                                                             torchrun):
    """Under torchrun the signal goes to torchrun, as `kill` or a scheduler sends it; torchrun passes
    it on to both ranks (and exits 1 itself, with its own traceback), which stop after the same step.
    Two micro-batches per step: one per rank, or both in one process."""
    args = [os.path.join(REPO, "dpo.py"), *DPO_ARGS, f"--sft_ckpt={sft_ckpt}",
            "--gradient_accumulation_steps=2"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    finish(args + [f"--out_dir={full}"], tmp_path, script_env, torchrun)
    code, out, err = interrupt(args + [f"--out_dir={stopped}"], tmp_path, script_env, "iter 5/",
                               [signal.SIGTERM], torchrun)
    if torchrun:
        # torchrun's own traceback, of the signal it got; none from the ranks
        assert code == 1 and err.count("Traceback") == 1, out[-2000:] + err[-3000:]
        assert err.strip().endswith("got signal: 15")
        code, err = runtime.STOPPED_EXIT_CODE, ""
    it = assert_stopped(code, out, err, "SIGTERM")
    saved = checkpoint.load_checkpoint(str(stopped / "ckpt.pt"))
    assert saved["iter_num"] == it and 5 < it < 200
    resumed = finish(args + [f"--out_dir={stopped}", "--init_from=resume"], tmp_path, script_env,
                     torchrun)
    assert f"from iter {it}" in resumed
    assert (stopped / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    assert_same_final_state(full, stopped)


def test_sft_first_ctrl_c_saves_and_resumes_exactly(tmp_path, script_env):
    """SIGINT, as a Ctrl-C at the terminal sends it; dropout on, so the RNG must continue too."""
    args = [os.path.join(REPO, "sft.py"), *SFT_TINY, "--max_iters=200", "--eval_interval=60",
            "--log_interval=1", "--dropout=0.1"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    finish(args + [f"--out_dir={full}"], tmp_path, script_env)
    code, out, err = interrupt(args + [f"--out_dir={stopped}"], tmp_path, script_env, "iter 5/",
                               [signal.SIGINT])
    it = assert_stopped(code, out, err, "SIGINT")
    assert 5 < it < 200
    finish(args + [f"--out_dir={stopped}", "--init_from=resume"], tmp_path, script_env)
    assert (stopped / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    assert_same_final_state(full, stopped)
    # the starting evaluation survives the stop: summary.json has it as an uninterrupted run does
    assert read_metrics(stopped)[0] == read_metrics(full)[0]


def run_patched(patch, script, args, cwd, env):
    """Run a script with `patch` (Python source) executed first, in the same process."""
    code = patch + f"\nimport runpy, sys\nsys.argv = {[script] + args!r}\n" \
        f"runpy.run_path({script!r}, run_name='__main__')\n"
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_second_ctrl_c_stops_at_once(tmp_path, script_env):
    """The first Ctrl-C waits for the step to end, here behind a 20 s evaluation; the second stops
    the run within moments, saving nothing: one line, and the process dies of SIGINT (as Python's
    own Ctrl-C does, so a shell loop around it stops too)."""
    patch = textwrap.dedent("""
        import time
        from nanopo import tasks
        original = tasks.evaluate_task
        def slow_evaluation(*args, **kwargs):
            print("evaluating", flush=True)
            time.sleep(20)
            return original(*args, **kwargs)
        tasks.evaluate_task = slow_evaluation
    """)
    out_dir = tmp_path / "out"
    proc = run_patched(patch, os.path.join(REPO, "sft.py"),
                       SFT_TINY + ["--max_iters=10", f"--out_dir={out_dir}"], tmp_path, script_env)
    # wait for the evaluation, which runs inside the loop, where the stop handler is installed
    for line in proc.stdout:
        if line.startswith("evaluating"):
            break
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None, "the first Ctrl-C must wait for the step boundary"
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 10 and proc.returncode == -signal.SIGINT
    assert err.strip().splitlines()[-1] == ("interrupted: a second Ctrl-C: stopped at once; "
                                            "checkpoints written earlier, if any, are kept")
    assert not (out_dir / "ckpt.pt").exists()


def test_online_rounds_pass_sigterm_to_the_round(sft_ckpt, tmp_path, script_env):
    args = ["-m", "scripts.online_dpo", f"--sft_ckpt={sft_ckpt}", "--rounds=2", "--n_pairs=64",
            "--max_iters=300", "--frontier_prompts=0",
            "--dpo_args=--batch_size=8 --log_interval=1 --n_eval=50"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    env = dict(script_env, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, *args, f"--out_dir={full}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # the round's own lines come through this script's stdout
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *args, f"--out_dir={stopped}"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.PIPE, text=True)
        while "iter 5/" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    text = log.read_text()
    assert proc.returncode == runtime.STOPPED_EXIT_CODE, text[-2000:] + err[-2000:]
    assert "stopped by SIGTERM at iter" in text
    assert text.strip().splitlines()[-1] == ("online rounds stopped in round 1/2; run the same "
                                             "command again to continue")
    proc = subprocess.run([sys.executable, *args, f"--out_dir={stopped}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--init_from=resume" in proc.stdout
    for k in (1, 2):
        assert_same_final_state(full / f"round{k}", stopped / f"round{k}")


# ---------------------------------------------------------------------------------------------------
# A full disk

FAILING_SAVE = textwrap.dedent("""
    import errno, torch
    real_save = torch.save
    calls = []

    class FullDisk:
        # a file that takes the first 1,000 bytes, then has no space left
        def __init__(self, f):
            self.f, self.written = f, 0
        def write(self, data):
            if self.written + len(data) > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.f.write(data)
        def flush(self):
            return self.f.flush()

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == FAIL_AT:
            return real_save(obj, FullDisk(f), *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
""")


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, script_env):
    """The second checkpoint write (iter 4) runs out of space after 1,000 bytes: the run ends with
    one line naming the file and the cause, and the iter-2 checkpoint still loads and resumes."""
    out_dir = tmp_path / "out"
    args = SFT_TINY + ["--max_iters=6", "--eval_interval=100", "--checkpoint_interval=2",
                       f"--out_dir={out_dir}"]
    proc = run_patched("FAIL_AT = 2\n" + FAILING_SAVE, os.path.join(REPO, "sft.py"), args,
                       tmp_path, script_env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err
    path = os.path.join(str(out_dir), "ckpt.pt")
    assert err.strip().splitlines()[-1] == (f"error: could not save {path}: No space left on device "
                                            f"(errno {errno.ENOSPC}); the previous checkpoint "
                                            "there, if any, is intact")
    assert checkpoint.load_checkpoint(path)["iter_num"] == 2
    assert sorted(os.listdir(out_dir)) == ["ckpt.pt", "metrics.jsonl"]  # no partial file left
    finish([os.path.join(REPO, "sft.py"), *args, "--init_from=resume"], tmp_path, script_env)
    assert checkpoint.load_checkpoint(path)["iter_num"] == 6


def test_save_checkpoint_failing_midway_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, model, {"run": 1}, "byte", iter_num=1)
    before = open(path, "rb").read()
    real_save = torch.save

    def full_disk(obj, f):
        real_save(obj, f)  # half the file reaches the disk, then the disk is full
        f.truncate(len(before) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match=r"could not save .*ckpt.pt: No space left on device"):
        checkpoint.save_checkpoint(path, model, {"run": 2}, "byte", iter_num=2)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["ckpt.pt"]
    # a failure that is not the operating system's is a bug: its traceback stays
    monkeypatch.setattr(torch, "save", lambda obj, f: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        checkpoint.save_checkpoint(path, model, {"run": 3}, "byte", iter_num=3)


def test_one_press_counted_once_and_a_second_stops():
    """StopOnSignal with real signals to this process. Under torchrun (a DDP process), a SIGINT
    within SAME_PRESS_SECONDS of the first is torchrun's copy of it and does not escalate, nor does
    SIGTERM; alone, a second SIGINT always stops at once."""
    import dataclasses
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    alone = runtime.SINGLE_PROCESS_CPU
    under_torchrun = dataclasses.replace(alone, ddp=True)
    try:
        signals = runtime.StopOnSignal(under_torchrun)
        assert not signals.stop_requested(alone)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.stop_requested(alone) and signals.received == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)  # torchrun's copy, within the same press
        signals = runtime.StopOnSignal(alone)
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here at the latest
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
