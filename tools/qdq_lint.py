"""Check a Q/DQ ONNX graph for what an executor would refuse and for placements that keep TensorRT out of INT8.

    python tools/qdq_lint.py runs/qat/exp/weights/qat_best.onnx --json lint.json

Prints the markdown report of utils/deployment/qdq_lint.py's rules (their categories are listed
there) and exits 1 when anything is found, so a script or CI step can gate on it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.deployment.qdq_lint import lint, to_json, to_markdown  # noqa: E402
from utils.errors import run_cli  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("onnx", type=Path, help="Q/DQ ONNX model to check")
    p.add_argument("--json", type=Path, help="also write the findings as JSON here")
    p.add_argument("--markdown", type=Path, help="also write the markdown report here")
    p.add_argument("--skip", nargs="*", default=[], help="Conv node names kept in floating point on purpose")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI: print the markdown report; exit 1 when anything is found."""
    opt = parse_args(argv)
    findings = lint(opt.onnx, set(opt.skip))
    report = to_markdown(findings, opt.onnx.name)
    print(report, end="")
    if opt.json:
        opt.json.write_text(json.dumps(to_json(findings, str(opt.onnx)), indent=2) + "\n")
    if opt.markdown:
        opt.markdown.write_text(report)
    return 1 if findings else 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
