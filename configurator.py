"""
nanoGPT-style configuration. A script defines its settings as plain module globals, then calls

    apply_overrides(globals())

which reads sys.argv: a bare argument is a Python config file (e.g. config/dpo_tiny.py) whose assignments
override the defaults; `--key=value` overrides one setting, the value parsed as a Python literal with a plain
string as fallback (--out_dir=out/x, --beta=0.5, --compile=True). Every key must already exist and keep its
type (an int may stand for a float; a setting whose default is None takes any value). Mistakes end the run
with one line that names the problem and, for a misspelt key, the closest known key.
"""

import ast
import difflib
import sys

SIMPLE_TYPES = (int, float, bool, str, type(None))
overridden = {}  # what the last apply_overrides set from the command line or a config file: {key: value}


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
        if type(value) is not type(default):
            raise ConfigError(f"{where}: '{key}' expects {type(default).__name__}, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        return str(value)  # --out_dir=123 means the folder "123"
    if type(value) is not type(default):
        raise ConfigError(f"{where}: '{key}' expects {type(default).__name__}, got {type(value).__name__} {value!r}")
    return value


def parse_overrides(defaults, argv):
    """defaults: {key: value}; argv: the command-line arguments after the script name.
    Returns {key: new value} for every overridden key, in order; raises ConfigError on any mistake."""
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
                if key.startswith("_") or not isinstance(value, SIMPLE_TYPES):
                    continue  # imports and helpers inside a config file are not settings
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


def apply_overrides(g, argv=None):
    """Override the script's globals `g` in place from sys.argv (or argv); exit with one line on a mistake.
    Returns the final config as a dict (what checkpoints and logs record)."""
    keys = config_keys(g)
    defaults = {k: g[k] for k in keys}
    try:
        updates = parse_overrides(defaults, sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    for k, v in updates.items():
        print(f"config: {k} = {v!r}")
        g[k] = v
    overridden.clear()
    overridden.update(updates)
    return {k: g[k] for k in keys}
