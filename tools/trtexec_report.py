"""Turn the trtexec logs of a batch-size sweep into the table, JSON and plot of val_trt --benchmark.

    python tools/trtexec_report.py runs/bench/gelan-s/trtexec_bs*.log --out runs/bench/gelan-s
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.deployment.benchmark_report import to_markdown, write_report  # noqa: E402
from utils.deployment.trtexec_log import parse_trtexec_file  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+", type=Path, help="one trtexec log per batch size")
    p.add_argument("--out", type=Path, required=True, help="folder for <stem>.md/.json/.png")
    p.add_argument("--stem", default="trtexec_benchmark")
    p.add_argument("--title", default="")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    opt = parse_args(argv)
    rows = [parse_trtexec_file(log) for log in opt.logs]
    batches = [r.batch for r in rows]
    if len(set(batches)) != len(batches):
        raise UserError(f"{opt.out}: several logs report the same batch size {sorted(batches)}")
    paths = write_report(rows, opt.out, opt.stem, opt.title,
                         meta={"source": "trtexec", "logs": [str(p) for p in opt.logs]})
    print(to_markdown(sorted(rows, key=lambda r: r.batch), opt.title), end="")
    return paths


if __name__ == "__main__":
    run_cli(main)
