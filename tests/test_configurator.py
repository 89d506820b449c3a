"""Tests for configurator.py: --key=value parsing and type rules, config files, and the one-line errors a user
sees for a misspelt key, a wrong type or a missing file (also end to end, through sft.py)."""

import ast
import os
import re
import subprocess
import sys

import pytest

from configurator import ConfigError, apply_overrides, parse_overrides

DEFAULTS = {"beta": 0.1, "out_dir": "out/dpo", "compile": False, "max_iters": 100, "learning_rate": 5e-5,
            "lr_decay_iters": 0, "sft_ckpt": None}


def test_literal_parsing_keeps_types():
    got = parse_overrides(DEFAULTS, ["--beta=0.5", "--out_dir=out/x", "--compile=True", "--max_iters=7"])
    assert got == {"beta": 0.5, "out_dir": "out/x", "compile": True, "max_iters": 7}
    assert type(got["beta"]) is float and type(got["compile"]) is bool and type(got["max_iters"]) is int


def test_int_stands_for_float_and_strings_stay_strings():
    got = parse_overrides(DEFAULTS, ["--learning_rate=1", "--out_dir=123", "--beta=1e-2"])
    assert got == {"learning_rate": 1.0, "out_dir": "123", "beta": 0.01}
    assert type(got["learning_rate"]) is float and type(got["out_dir"]) is str
    # a value with '=' in it, and a quoted string literal
    assert parse_overrides(DEFAULTS, ["--out_dir=a=b"]) == {"out_dir": "a=b"}
    assert parse_overrides(DEFAULTS, ["--out_dir='x y'"]) == {"out_dir": "x y"}


def test_none_default_takes_any_value():
    assert parse_overrides(DEFAULTS, ["--sft_ckpt=out/sft/ckpt.pt"]) == {"sft_ckpt": "out/sft/ckpt.pt"}
    assert parse_overrides(DEFAULTS, ["--sft_ckpt=3"]) == {"sft_ckpt": 3}


def test_grad_checkpoint_takes_true_false_or_selective():
    from configurator import check_config
    from configurator import UserError
    defaults = {"grad_checkpoint": False}
    for arg, value in (("True", True), ("False", False), ("selective", "selective")):
        assert parse_overrides(defaults, [f"--grad_checkpoint={arg}"]) == {"grad_checkpoint": value}
        check_config({"grad_checkpoint": value})
    with pytest.raises(UserError, match="grad_checkpoint='sometimes' makes no sense: expected True, False or"):
        check_config(parse_overrides(defaults, ["--grad_checkpoint=sometimes"]))
    with pytest.raises(ConfigError, match="'compile' expects bool"):  # only the settings named may take a word
        parse_overrides(DEFAULTS, ["--compile=selective"])


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError) as e:
        parse_overrides(DEFAULTS, ["--learnig_rate=1"])
    msg = str(e.value)
    assert "unknown config key 'learnig_rate'" in msg and "did you mean 'learning_rate'" in msg
    with pytest.raises(ConfigError) as e:  # nothing close: no suggestion
        parse_overrides(DEFAULTS, ["--zzzz=1"])
    assert "did you mean" not in str(e.value)


@pytest.mark.parametrize("arg, expects", [("--max_iters=abc", "int"), ("--compile=1", "bool"),
                                           ("--max_iters=1.5", "int"), ("--beta=True", "float"),
                                           ("--compile=yes", "bool")])
def test_type_mismatch_is_an_error(arg, expects):
    key = arg[2:].split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}' expects {expects}"):
        parse_overrides(DEFAULTS, [arg])


def test_argument_without_value_is_an_error():
    with pytest.raises(ConfigError, match="expected --key=value"):
        parse_overrides(DEFAULTS, ["--compile"])


def test_config_file_overrides(tmp_path):
    cfg = tmp_path / "tiny.py"
    cfg.write_text("import math\n_helper = 3\nbeta = 0.25\nmax_iters = 2 * 5\nout_dir = 'out/tiny'\n"
                   "def f():\n    return 1\n")
    got = parse_overrides(DEFAULTS, [str(cfg)])
    assert got == {"beta": 0.25, "max_iters": 10, "out_dir": "out/tiny"}  # imports, helpers, functions ignored
    # later arguments win over earlier ones
    assert parse_overrides(DEFAULTS, [str(cfg), "--beta=0.5"])["beta"] == 0.5
    assert parse_overrides(DEFAULTS, ["--beta=0.5", str(cfg)])["beta"] == 0.25


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*nope.py'"):
        parse_overrides(DEFAULTS, [str(tmp_path / "nope.py")])
    bad = tmp_path / "bad.py"
    bad.write_text("max_itres = 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'max_itres'; did you mean 'max_iters'"):
        parse_overrides(DEFAULTS, [str(bad)])
    broken = tmp_path / "broken.py"
    broken.write_text("beta = (\n")
    with pytest.raises(ConfigError, match="SyntaxError"):
        parse_overrides(DEFAULTS, [str(broken)])


def test_apply_overrides_updates_globals_and_exits_with_one_line():
    g = {"beta": 0.1, "max_iters": 5, "torch": pytest, "_private": 1}  # a module object is not a setting
    config = apply_overrides(g, ["--beta=0.3"])
    assert g["beta"] == 0.3 and config == {"beta": 0.3, "max_iters": 5}
    with pytest.raises(SystemExit) as e:
        apply_overrides(g, ["--bta=1"])
    assert str(e.value).startswith("error: ") and "'beta'" in str(e.value)


def test_script_with_misspelt_key_exits_with_one_line(repo_root, script_env):
    run = subprocess.run([sys.executable, "sft.py", "--learnig_rate=1"], cwd=repo_root, env=script_env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error:") and "'learnig_rate'" in lines[0] and "'learning_rate'" in lines[0]
    assert "Traceback" not in run.stderr


def test_script_with_bad_setting_value_exits_with_one_line(repo_root, script_env):
    """A value every key accepts by type but the script rejects (a UserError raised at import time)."""
    run = subprocess.run([sys.executable, "dpo.py", "--loss_type=foo"], cwd=repo_root, env=script_env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown loss_type 'foo'"), run.stderr


def script_settings(path):
    """A script's settings read independently of configurator: the module-level `name = literal`
    assignments above its apply_overrides call, with their values."""
    tree = ast.parse(open(path).read())
    settings = {}
    for node in tree.body:
        if not isinstance(node, (ast.Import, ast.ImportFrom)) and "apply_overrides(" in ast.unparse(node):
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            if not name.startswith("_") and isinstance(value, (int, float, bool, str, type(None))):
                settings[name] = value
    return settings


@pytest.mark.parametrize("script", ["sft.py", "dpo.py", "grpo.py", "sample.py",
                                    "scripts/online_dpo.py", "scripts/seeds.py",
                                    "bench/step_time.py", "bench/threads.py", "bench/packed_attention.py"])
def test_help_lists_every_setting_with_its_default(script, repo_root, script_env, tmp_path):
    """--help prints every setting with its default (and its comment), under the script's own group
    headers, and exits 0 without starting a run."""
    command = [sys.executable, script] if script.count("/") == 0 else \
        [sys.executable, "-m", script[:-3].replace("/", ".")]
    run = subprocess.run(command + ["--help"], cwd=repo_root, env=script_env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("usage: python ")
    settings = script_settings(os.path.join(repo_root, script))
    assert len(settings) >= 2
    shown = re.findall(r"^    --(\w+)=(.*?)(?: {2,}|$)", run.stdout, re.M)
    assert {name: ast.literal_eval(value) for name, value in shown} == settings
    # nothing was overridden (no "config: key = value" line) and no run started
    assert not re.search(r"^config: ", run.stdout, re.M)
    if script == "dpo.py":
        # a comment and a group header from the script itself
        assert re.search(r"--beta=1.0\s+KL strength", run.stdout) and "\n  the loss\n" in run.stdout
