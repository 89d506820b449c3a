"""
nanoGPT-style configuration. A script defines its settings as plain module globals, then calls

    apply_overrides(globals())

which reads sys.argv: a bare argument is a Python config file (e.g. config/dpo_tiny.py) whose
assignments override the defaults; `--key=value` overrides one setting, the value parsed as a Python
literal with a plain string as fallback (--out_dir=out/x, --beta=0.5, --compile=True). Every key
must already exist and keep its type (an int may stand for a float; a setting whose default is None
takes any value; one in BOOL_OR_WORD also takes a word, --grad_checkpoint=selective). Mistakes end
the run with one line that names the problem and, for a misspelt key, the closest known key.

It also holds how bad input ends a run: every module raises UserError for a problem with the user's
data or settings, and the scripts call install_error_handler() first, so such an error prints as one
line, `error: ...` (exit code 1), and a Ctrl-C that stops a run at once as `interrupted` (the
process then dies of SIGINT, code 130 in a shell), while a bug in the code still shows its whole
traceback. Importing this module changes nothing.
"""

import ast
import difflib
import os
import re
import signal
import sys


class UserError(Exception):
    """A problem with the user's input or settings: reported as one line, never as a traceback."""


def _report_user_errors(exc_type, exc, tb):
    if issubclass(exc_type, UserError):
        print(f"error: {exc}", file=sys.stderr)
    elif issubclass(exc_type, KeyboardInterrupt):
        # Ctrl-C where no checkpoint is pending (or a second one): one line, then die of SIGINT
        # itself, as Python does, so that a shell loop around the run stops too (exit code 130)
        print(f"interrupted{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    else:
        sys.__excepthook__(exc_type, exc, tb)


def install_error_handler():
    """From now on an uncaught UserError prints one line on stderr; anything else keeps its
    traceback."""
    sys.excepthook = _report_user_errors


# --------------------------------------------------------------------------------------------------
# Settings from the command line and config files

SIMPLE_TYPES = (int, float, bool, str, type(None))
# True / False settings that also take a word (RULES says which)
BOOL_OR_WORD = {"grad_checkpoint"}
# what the last apply_overrides set from the command line or a config file: {key: value}
overridden = {}
# the script's own values of every setting, before apply_overrides changed any
defaults = {}


class ConfigError(ValueError):
    pass


def config_keys(g):
    """The settings of a script: its public module globals of simple types."""
    return [k for k, v in g.items() if not k.startswith("_") and isinstance(v, SIMPLE_TYPES)]


def _check(key, value, defaults, where):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults.keys(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}: unknown config key '{key}'{hint}")
    default = defaults[key]
    if default is None:
        return value
    if value is None:
        raise ConfigError(f"{where}: '{key}' expects {type(default).__name__}, got None")
    if isinstance(default, bool) or isinstance(value, bool):
        # --grad_checkpoint=selective
        if isinstance(default, bool) and isinstance(value, str) and key in BOOL_OR_WORD:
            return value
        if type(value) is not type(default):
            raise ConfigError(f"{where}: '{key}' expects {type(default).__name__}, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        return str(value)  # --out_dir=123 means the folder "123"
    if type(value) is not type(default):
        raise ConfigError(f"{where}: '{key}' expects {type(default).__name__}, "
                          f"got {type(value).__name__} {value!r}")
    return value


def parse_overrides(defaults, argv):
    """defaults: {key: value}; argv: the command-line arguments after the script name.
    Returns {key: new value} for every overridden key, in order; raises ConfigError on any
    mistake."""
    updates = {}
    for arg in argv:
        if not arg.startswith("--"):
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                raise ConfigError(f"config file '{arg}': {e.strerror}") from None
            scope = {}
            try:
                exec(compile(source, arg, "exec"), scope)
            except Exception as e:
                raise ConfigError(f"config file '{arg}': {type(e).__name__}: {e}") from None
            for key, value in scope.items():
                # imports and helpers inside a config file are not settings
                if key.startswith("_") or not isinstance(value, SIMPLE_TYPES):
                    continue
                updates[key] = _check(key, value, defaults, f"config file '{arg}'")
        else:
            if "=" not in arg:
                raise ConfigError(f"argument '{arg}': expected --key=value")
            key, raw = arg[2:].split("=", 1)
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # not a Python literal: take it as a string
            if not isinstance(value, SIMPLE_TYPES):
                value = raw
            updates[key] = _check(key, value, defaults, f"argument '{arg}'")
    return updates


def settings_help(g):
    """The text `--help` prints: how to run the script, the first paragraph of its docstring, and
    every setting with its default and its comment, under the comment lines that group them in the
    script (read from the script's own source, so the help is the settings block itself)."""
    keys = config_keys(g)
    path = g.get("__file__", "")
    script = os.path.relpath(path) if path else "script.py"
    if g.get("__spec__") is not None and g["__spec__"].name != "__main__":
        script = f"-m {g['__spec__'].name}"
    lines = [f"usage: python {script} [config_file.py ...] [--key=value ...]", ""]
    docstring = (g.get("__doc__") or "").strip()
    if docstring:
        lines += [docstring.split("\n\n")[0], ""]
    lines.append("settings, with their defaults (a config file or --key=value overrides any):")
    source = []
    if path and os.path.exists(path):
        with open(path) as f:
            source = f.read().splitlines()
    setting = re.compile(r"^(\w+) = .*?(?:#\s?(.*))?$")
    shown = set()
    group = []
    for text in source:
        if re.match(r"^# -{10,}$", text):
            continue
        match = setting.match(text)
        if match and match.group(1) in keys and match.group(1) not in shown:
            name = match.group(1)
            # the comment lines just above a setting group it (the script's own section headers)
            if group:
                lines += ["", *("  " + c for c in group)]
                group = []
            line = f"    --{name}={g[name]!r}"
            if match.group(2):
                line = line.ljust(38) + "  " + match.group(2)
            lines.append(line)
            shown.add(name)
        elif text.startswith("# "):
            group.append(text[2:])
        else:
            group = []
    # settings whose line was not found in the source (none in the scripts here)
    for name in keys:
        if name not in shown:
            lines.append(f"    --{name}={g[name]!r}")
    return "\n".join(lines)


def apply_overrides(g, argv=None):
    """Override the script's globals `g` in place from sys.argv (or argv); exit with one line on a
    mistake. --help (or -h) prints every setting with its default and comment, then exits 0.
    Returns the final config as a dict (what checkpoints and logs record)."""
    keys = config_keys(g)
    script_defaults = {k: g[k] for k in keys}
    args = sys.argv[1:] if argv is None else argv
    if "--help" in args or "-h" in args:
        print(settings_help(g))
        sys.exit(0)
    try:
        updates = parse_overrides(script_defaults, args)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    for k, v in updates.items():
        print(f"config: {k} = {v!r}")
        g[k] = v
    overridden.clear()
    overridden.update(updates)
    defaults.clear()
    defaults.update(script_defaults)
    return {k: g[k] for k in keys}


# --------------------------------------------------------------------------------------------------
# Values that make no sense stop the run before any work, in one line naming the setting

# key: (holds for a sensible value, what the line says is expected)
RULES = {
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "max_iters": (lambda v: v >= 0, ">= 0"),
    "learning_rate": (lambda v: v > 0, "> 0"),
    "min_lr": (lambda v: v >= 0, ">= 0"),
    "warmup_iters": (lambda v: v >= 0, ">= 0"),
    "lr_decay_iters": (lambda v: v >= 0, ">= 0 (0 = max_iters)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "grad_clip": (lambda v: v >= 0, ">= 0 (0 = no clipping)"),
    "eval_interval": (lambda v: v >= 1, ">= 1"),
    "log_interval": (lambda v: v >= 1, ">= 1"),
    "checkpoint_interval": (lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    "keep_last": (lambda v: v >= 1, ">= 1"),
    "max_nonfinite": (lambda v: v >= 1, ">= 1"),
    "block_size": (lambda v: v >= 2, ">= 2"),
    "n_layer": (lambda v: v >= 1, ">= 1"),
    "n_head": (lambda v: v >= 1, ">= 1"),
    "n_embd": (lambda v: v >= 1, ">= 1"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "n_digits": (lambda v: v >= 1, ">= 1"),
    "n_eval": (lambda v: v >= 1, ">= 1"),
    "slip_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "beta": (lambda v: v > 0, "> 0"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "desirable_weight": (lambda v: v > 0, "> 0"),
    "undesirable_weight": (lambda v: v > 0, "> 0"),
    "rpo_alpha": (lambda v: v >= 0, ">= 0"),
    "discopop_tau": (lambda v: 0 < v <= 1, "in (0, 1] (above 1 its exponential part overflows)"),
    "f_alpha_divergence_coef": (lambda v: v > 0, "> 0"),
    "ld_alpha": (lambda v: 0 <= v <= 1, "in [0, 1] (1 = off)"),
    "ref_sync_steps": (lambda v: v >= 0, ">= 0 (0 = a frozen reference)"),
    "ref_mixup_alpha": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "n_pairs": (lambda v: v >= 1, ">= 1"),
    "n_samples": (lambda v: v >= 0, ">= 0"),
    "sample_temperature": (lambda v: v >= 0, ">= 0"),
    "pairs": (lambda v: v in ("verified", "judged"), "'verified' or 'judged'"),
    "judge_temperature": (lambda v: v > 0, "> 0"),
    "threads": (lambda v: v >= 0, ">= 0 (0 = the default)"),
    "dtype": (lambda v: v in ("auto", "float32", "bfloat16", "float16"),
              "'auto', 'float32', 'bfloat16' or 'float16'"),
    "compile": (lambda v: v in (True, False), "True, False or None (on with CUDA)"),
    "logprobs": (lambda v: v in ("auto", "chunked", "plain"), "'auto', 'chunked' or 'plain'"),
    "logprob_chunk": (lambda v: v >= 0, ">= 0 (0: no chunks)"),
    "grad_checkpoint": (lambda v: v in (True, False, "selective"), "True, False or 'selective'"),
    "packing": (lambda v: v in (True, False), "True or False"),
    "pack_tokens": (lambda v: v >= 0, ">= 0 (0 = one row per micro-batch)"),
    "lora_rank": (lambda v: v >= 0, ">= 0 (0 = no LoRA: every weight trains)"),
    "lora_alpha": (lambda v: v > 0, "> 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def check_config(cfg, exempt=()):
    """Check the settings a script has (rules only for keys present, and not for the keys in
    `exempt`, which the script checks itself) right after apply_overrides; a NaN fails every rule,
    since every comparison with it is False."""
    for key, (ok, expected) in RULES.items():
        if key in exempt:
            continue
        if key in cfg and cfg[key] is not None and not ok(cfg[key]):
            raise UserError(f"{key}={cfg[key]!r} makes no sense: expected {expected}")
    if cfg.get("ref_ckpt") and cfg.get("lora_rank"):
        raise UserError("ref_ckpt with lora_rank: "
                        "a LoRA policy's reference is its own base weights, adapters off")
    if cfg.get("pack_tokens") and not cfg.get("packing"):
        raise UserError(f"pack_tokens={cfg['pack_tokens']} without packing=True does nothing: "
                        "add --packing=True, or leave pack_tokens at 0")
    if cfg.get("n_head", 0) >= 1 and cfg.get("n_embd", 0) % cfg.get("n_head", 1) != 0:
        raise UserError(f"n_embd={cfg['n_embd']} is not divisible by n_head={cfg['n_head']}")
