"""Render the measured-figures table of BENCHMARKS.md from bench/results/*.json.

Each figure is written once, as a JSON record, by the command that measured it; the markdown
table is generated from those records so the two can never disagree. A test checks that
BENCHMARKS.md holds exactly this rendering; ``--write`` refreshes it.

Usage:  python bench/report.py [--write]
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
BENCHMARKS = HERE.parent / "BENCHMARKS.md"
BLOCK = re.compile(r"(<!-- results -->)(.*?)(<!-- /results -->)", re.S)
FIELDS = ("name", "value", "unit", "model", "dataset", "command", "machine", "date")


def load_records(results_dir: Path = RESULTS_DIR) -> list[dict]:
    """Every record, sorted by name; a record missing a required field is an error."""
    records = []
    for path in sorted(results_dir.glob("*.json")):
        rec = json.loads(path.read_text())
        missing = [f for f in FIELDS if f not in rec]
        if missing:
            raise ValueError(f"{path}: record lacks {', '.join(missing)}")
        records.append(rec)
    return records


def _value(rec: dict) -> str:
    v = rec["value"]
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"


def render(records: list[dict]) -> str:
    rows = ["| figure | value | unit | model | dataset | machine | date | command |",
            "| --- | ---: | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        cmd = r["command"].replace("|", "\\|")
        rows.append(f"| `{r['name']}` | {_value(r)} | {r['unit']} | {r['model']} | {r['dataset']} | "
                    f"{r['machine']} | {r['date']} | `{cmd}` |")
    return "\n".join(rows)


def refreshed(text: str, records: list[dict]) -> str:
    return BLOCK.sub(lambda m: m.group(1) + "\n" + render(records) + "\n" + m.group(3), text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite BENCHMARKS.md in place")
    args = ap.parse_args()
    text = BENCHMARKS.read_text()
    new = refreshed(text, load_records())
    if args.write:
        BENCHMARKS.write_text(new)
    elif new != text:
        print("BENCHMARKS.md is stale: run python bench/report.py --write")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
