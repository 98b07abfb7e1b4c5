"""One way for every command-line entry point to report bad input.

Users feed these tools files from many places; a traceback hides the one fact they need.
Library code raises ``UserError`` with a sentence naming the file and the problem, and
``run_cli`` turns it into a single ``error: ...`` line on stderr and exit code 2.
"""
from __future__ import annotations

import sys
from typing import Callable, NoReturn

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad input the user can fix: a missing file, a wrong yaml, a device that is not there."""


def fail(message: str) -> NoReturn:
    """Print one error line and exit with the bad-input code."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


def run_cli(main: Callable[[], object]) -> None:
    """Call ``main``; a ``UserError`` becomes one line on stderr and exit code 2."""
    try:
        main()
    except UserError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted")
