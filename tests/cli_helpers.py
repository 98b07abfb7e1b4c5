"""Running a root script's ``__main__`` block in the test process, as ``python script.py`` would.

A subprocess pays 3-5 s of interpreter, torch and Model Optimizer start-up per call; tests about
what a script says and returns run it here instead. The tests whose subject is the process
boundary (an exit code reaching the shell, a real SIGINT, torchrun) still start processes.
"""
from __future__ import annotations

import runpy
import sys

from utils.paths import ROOT


def run_script(script: str, argv: list[str], capture, monkeypatch) -> tuple[int, str]:
    """Run ``script`` (relative to the project root) as ``__main__`` with ``argv``; return its exit
    code and what it wrote to stderr. ``capture``: pytest's capsys, or capfd for C++ output too."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    capture.readouterr()
    code = 0
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capture.readouterr().err
