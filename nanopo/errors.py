"""
Bad input ends a run with one line that names the file, row, key or setting, never with a traceback.

Every module raises UserError for a problem with the user's data or settings; the scripts call
install_error_handler() first, so such an error prints as `error: ...` (exit code 1) while a bug in the code
still shows its whole traceback. Importing this module changes nothing.
"""

import sys


class UserError(Exception):
    """A problem with the user's input or settings: reported as one line, never as a traceback."""


def _report_user_errors(exc_type, exc, tb):
    if issubclass(exc_type, UserError):
        print(f"error: {exc}", file=sys.stderr)
    else:
        sys.__excepthook__(exc_type, exc, tb)


def install_error_handler():
    """From now on an uncaught UserError prints one line on stderr; anything else keeps its traceback."""
    sys.excepthook = _report_user_errors
