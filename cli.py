"""What every script shares at its edges: the error type for a problem with the user's inputs or environment,
and the wrapper that reports it as one line and an exit status instead of a traceback."""
from __future__ import annotations

import contextlib
import os
import sys

DEBUG_ENV = "MPQ_DEBUG"          # MPQ_DEBUG=1: show tracebacks instead of one-line errors


class UserError(Exception):
    """A problem with the user's inputs or environment, reported as one line that names the culprit."""


@contextlib.contextmanager
def reported_errors(*also: type[BaseException], status: int = 1):
    """Run a script's work: a UserError (or one of `also`) prints `error: <message>` to stderr and exits with
    `status`; Ctrl-C prints one line and exits 130. With MPQ_DEBUG=1 in the environment both propagate with
    their tracebacks."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        yield
    except (UserError, *also) as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(status)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted; rerunning resumes from what was cached", file=sys.stderr)
        sys.exit(130)
