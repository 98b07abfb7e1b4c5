"""Run folders that never overwrite earlier results."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def increment_path(path: str | Path, exist_ok: bool = False, mkdir: bool = True) -> Path:
    """Return ``path``, or ``path2``, ``path3``... when it exists, so earlier runs stay intact."""
    path = Path(path)
    if path.exists() and not exist_ok:
        n = 2
        while Path(f"{path}{n}").exists():
            n += 1
        path = Path(f"{path}{n}")
    if mkdir:
        path.mkdir(parents=True, exist_ok=True)
    return path


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
