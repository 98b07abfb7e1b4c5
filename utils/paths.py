"""Run folders that never overwrite earlier results, and are not left behind empty by a failed run."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]

_made_run_dirs: list[Path] = []  # folders increment_path created, newest last (see empty_run_dirs_removed)


def increment_path(path: str | Path, exist_ok: bool = False, mkdir: bool = True) -> Path:
    """Return ``path``, or ``path2``, ``path3``... when it exists, so earlier runs stay intact."""
    path = Path(path)
    if path.exists() and not exist_ok:
        n = 2
        while Path(f"{path}{n}").exists():
            n += 1
        path = Path(f"{path}{n}")
    if mkdir and not path.exists():
        top = path  # the outermost folder made here: a --project that did not exist goes with its run
        while not top.parent.exists():
            top = top.parent
        path.mkdir(parents=True)
        _made_run_dirs.append(top)
    return path


@contextlib.contextmanager
def empty_run_dirs_removed() -> Iterator[None]:
    """Remove the run folders made inside the block when the block fails and they hold no file.

    Tools check their inputs before making a folder; this catches the failures that come later
    (a corrupt image in the first batch, Ctrl-C during the first evaluation). A folder with any
    file in it (a checkpoint, a report) is kept: results are never deleted.
    """
    start = len(_made_run_dirs)
    try:
        yield
    except BaseException:
        for folder in reversed(_made_run_dirs[start:]):
            if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
                shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        del _made_run_dirs[start:]


def existing_file(path: str | Path, what: str = "file") -> Path:
    """Check that ``path`` is a readable file; raise ``UserError`` naming it otherwise."""
    from utils.errors import UserError

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: {what} not found")
    if not p.is_file():
        raise UserError(f"{p}: {what} is not a file")
    try:
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise UserError(f"{p}: cannot read {what} ({exc.strerror})") from exc
    return p
