"""What every script shares at its edges: the error type for a problem with the user's inputs or environment,
the argument parser that checks values when they are parsed, and the wrapper that reports any of these as one
line and an exit status instead of a traceback."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

DEBUG_ENV = "MPQ_DEBUG"          # MPQ_DEBUG=1 (or --debug): show tracebacks instead of one-line errors


class UserError(Exception):
    """A problem with the user's inputs or environment, reported as one line that names the culprit."""


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextlib.contextmanager
def reported_errors(*also: type[BaseException], status: int = 1):
    """Run a script's work: a UserError (or one of `also`) prints `error: <message>` to stderr and exits with
    `status`; Ctrl-C prints one line and exits 130. With MPQ_DEBUG=1 (--debug) both propagate with their
    tracebacks."""
    try:
        yield
    except (UserError, *also) as exc:
        if debugging():
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(status)
    except KeyboardInterrupt:
        if debugging():
            raise
        print("interrupted; rerunning resumes from what was cached", file=sys.stderr)
        sys.exit(130)


class Parser(argparse.ArgumentParser):
    """argparse with defaults in --help, a --debug flag, and a bad value reported like every other error: one
    line naming the flag, exit status `error_status` (1)."""

    def __init__(self, description: str, error_status: int = 1):
        super().__init__(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        self.error_status = error_status
        self.add_argument("--debug", action="store_true",
                          help=f"show the traceback of an error (as {DEBUG_ENV}=1 does)")

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(self.error_status)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if parsed.debug:
            os.environ[DEBUG_ENV] = "1"
        return parsed


# ---------------------------------------------------------------------------------------------------------
# Value types: each checks one flag's value when it is parsed
# ---------------------------------------------------------------------------------------------------------

def at_least(minimum: int):
    """An integer no smaller than `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small: at least {minimum}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def accepted_by(check, errors: tuple[type[Exception], ...] = (UserError,)):
    """The text as given, once `check(text)` accepts it; the error it raises becomes argparse's message (so a
    bad value is refused when the flags are parsed, in the words of the code that would have failed later)."""
    def parse(text: str) -> str:
        try:
            check(text)
        except errors as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    parse.__name__ = getattr(check, "__name__", "value")
    return parse


def positive_number(text: str) -> float:
    """A finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number above 0")
    return value


def output_file(suffix: str):
    """A path to write a file to: ending in `suffix`, not a directory, in a directory that exists or can be
    made and is writable."""
    def parse(text: str) -> str:
        path = Path(text)
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name ending in {suffix}")
        if path.suffix != suffix:
            raise argparse.ArgumentTypeError(f"{text!r} must end in {suffix}")
        parent = path.resolve().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: {parent} is not a writable directory")
        return text
    parse.__name__ = f"{suffix} file"
    return parse
