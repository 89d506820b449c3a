"""Every config/*.py names only settings its script has, with the right types; sample.py prints what the models
generate."""

import ast
import glob
import os
import subprocess
import sys

import pytest

from configurator import ConfigError, parse_overrides


def script_defaults(path):
    """The settings of a script: its top-level simple assignments before `config = apply_overrides(...)`,
    evaluated without running the script."""
    with open(path) as f:
        tree = ast.parse(f.read())
    defaults = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            break  # config = apply_overrides(globals())
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            defaults[node.targets[0].id] = ast.literal_eval(node.value)
    return defaults


def script_for(config_path):
    """A config's header comment gives its command, 'python sft.py config/<name>' or 'python dpo.py config/<name>'."""
    with open(config_path) as f:
        header = "".join(line for line in f if line.startswith("#"))
    name = os.path.basename(config_path)
    found = [s for s in ("sft.py", "dpo.py") if f"python {s} config/{name}" in header]
    assert len(found) == 1, f"{name}: its header should give the command that uses it"
    return found[0]


CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "config", "*.py")))


def test_there_are_configs():
    assert len(CONFIGS) >= 6


@pytest.mark.parametrize("config_path", CONFIGS, ids=os.path.basename)
def test_config_fits_its_script(config_path, repo_root):
    defaults = script_defaults(os.path.join(repo_root, script_for(config_path)))
    assert "learning_rate" in defaults and "out_dir" in defaults  # the parser above read the real globals
    updates = parse_overrides(defaults, [config_path])  # raises ConfigError on an unknown or ill-typed key
    assert updates


def test_a_config_with_a_wrong_key_is_caught(tmp_path, repo_root):
    bad = tmp_path / "bad.py"
    bad.write_text("learnign_rate = 1e-3\n")
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        parse_overrides(script_defaults(os.path.join(repo_root, "dpo.py")), [str(bad)])


def test_sample_prints_both_models_greedy_answers(tmp_path, repo_root, script_env):
    from nanopo import checkpoint
    from data import Tokenizer

    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    tiny = ["--max_iters=2", "--eval_interval=100", "--log_interval=1", "--batch_size=8"]
    for cmd in (["sft.py", "--n_layer=1", "--n_head=2", "--n_embd=32", "--n_eval=20", f"--out_dir={sft_dir}"],
                ["dpo.py", f"--sft_ckpt={sft_dir / 'ckpt.pt'}", "--n_pairs=16", "--n_samples=0",
                 f"--out_dir={dpo_dir}"]):
        subprocess.run([sys.executable, *cmd, *tiny], cwd=repo_root, env=script_env, check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "sample.py", f"--ckpt={dpo_dir / 'ckpt.pt'}", "--prompts=12+34=|99+1=",
                           "--max_new_tokens=4"], cwd=repo_root, env=script_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("'")]
    assert len(lines) == 2
    # the columns are the models' own greedy completions, computed here independently
    tok = Tokenizer("byte")
    for path, column in ((sft_dir / "ckpt.pt", 1), (dpo_dir / "ckpt.pt", 2)):
        model = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(str(path)), str(path)).eval()
        outs = model.generate([tok.encode("12+34="), tok.encode("99+1=")], 4, tok.eos_id, tok.pad_id)
        for line, out in zip(lines, outs):
            assert repr(tok.decode(out)) in line
