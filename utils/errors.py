"""One way for every command-line entry point to report bad input.

Users feed these tools files from many places; a traceback hides the one fact they need.
Library code raises ``UserError`` with a sentence naming the file and the problem, and
``run_cli`` turns it into a single ``error: ...`` line on stderr and exit code 2. Ctrl-C is not bad
input: it exits 130 (128 + SIGINT, what shells report) with one ``interrupted`` line, which says
how to continue when the run left a checkpoint. A run folder that a failed run leaves empty is
removed (utils.paths), so failures leave nothing half-made behind.

A Ctrl-C that lands while Python runs a finalizer (a ``__del__``, a weakref callback: garbage
collection runs them between any two lines) is printed as "Exception ignored" and lost; a run
then trained on to its last epoch. Under ``run_cli`` the signal is also recorded, and the training
loop raises it again at its next batch (``raise_if_interrupted``).
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Iterator, NoReturn

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Bad input the user can fix: a missing file, a wrong yaml, a device that is not there."""


def yaml_problem(exc: Exception) -> str:
    """Where and what a YAML parse error is ("line 3, column 5: mapping values are not allowed here")."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    what = getattr(exc, "problem", None) or getattr(exc, "context", None) or \
        (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark else what


def fail(message: str) -> NoReturn:
    """Print one error line and exit with the bad-input code."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


class _Interrupts:
    """Whether a SIGINT arrived while ``interrupts_kept`` was active; one per process."""
    pending = False


def _interrupt(signum: int, frame: object) -> None:
    _Interrupts.pending = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_kept() -> Iterator[None]:
    """Record every SIGINT as well as raising it, for ``raise_if_interrupted``. Only where Python's own
    handler is in place: an ignored SIGINT (a background job) or a caller's handler is left alone."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _Interrupts.pending = False


def raise_if_interrupted() -> None:
    """Raise the Ctrl-C a finalizer swallowed; called where stopping is safe (between batches)."""
    if _Interrupts.pending:
        raise KeyboardInterrupt


def run_cli(main: Callable[[], object]) -> None:
    """Call ``main``; a ``UserError`` becomes one line on stderr and exit code 2, Ctrl-C exit code 130.

    A ``KeyboardInterrupt`` raised with a message (the trainer's "continue with ...") keeps it.
    """
    from utils.paths import empty_run_dirs_removed

    try:
        with interrupts_kept(), empty_run_dirs_removed():
            main()
    except UserError as exc:
        fail(str(exc))
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
