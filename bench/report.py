"""Render the measured-figures table of BENCHMARKS.md, and README's results table, from
bench/results/*.json.

Each figure is written once, as a JSON record, by the command that measured it; the markdown
tables are generated from those records so they can never disagree. A test checks that both
files hold exactly this rendering; ``--write`` refreshes them.

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
README = HERE.parent / "README.md"
BLOCK = re.compile(r"(<!-- results -->)(.*?)(<!-- /results -->)", re.S)
README_BLOCK = re.compile(r"(<!-- readme-results -->)(.*?)(<!-- /readme-results -->)", re.S)
CONFORMANCE_BLOCK = re.compile(r"(<!-- conformance -->)(.*?)(<!-- /conformance -->)", re.S)
CONFORMANCE_VARIANTS = ("raw", "nms", "topk")  # bench/conformance.py's order
STUDY_MODELS = ("gelan-s", "gelan-c")  # the BCCD study's models, in README's order
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


def render_study(records: list[dict]) -> str:
    """README's summary of the BCCD study: FP32, best PTQ, QAT, ONNX Runtime and step-time figures."""
    by_name = {r["name"]: r for r in records}
    rows = ["| model | FP32 mAP50-95 | best PTQ | QAT | QAT - FP32 | ONNX Runtime INT8 - PyTorch QAT "
            "| QAT step / FP32 step |", "|---|---:|---:|---:|---:|---:|---:|"]
    for model in STUDY_MODELS:
        qat = by_name[f"qat_delta_map50_95_{model}"]
        ptqs = [r for name, r in by_name.items() if name.startswith(f"ptq_delta_map50_95_{model}_")]
        best = max(ptqs, key=lambda r: r["extra"]["ptq_map50_95"])
        method = best["name"].rsplit("_", 1)[1]
        rows.append(f"| {model} | {qat['extra']['fp32_map50_95']:.4f} | {best['extra']['ptq_map50_95']:.4f} ({method}) "
                    f"| {qat['extra']['qat_map50_95']:.4f} | {qat['value']:+.4f} "
                    f"| {by_name[f'ort_int8_minus_qat_map50_95_{model}']['value']:+.4f} "
                    f"| {by_name[f'qat_step_time_ratio_{model}']['value']:.2f} |")
    return "\n".join(rows)


def conformance_table(by_config_nc_variant: dict) -> str:
    """Cases by config (rows) and nc x variant (columns), 'passed/total' in each cell."""
    ncs = sorted({nc for row in by_config_nc_variant.values() for nc in row}, key=int)
    cols = [(nc, v) for nc in ncs for v in CONFORMANCE_VARIANTS]
    lines = ["| config | " + " | ".join(f"nc={nc} {v}" for nc, v in cols) + " |",
             "| --- |" + " ---: |" * len(cols)]
    for cfg, row in by_config_nc_variant.items():
        cells = [row.get(nc, {}).get(v) for nc, v in cols]
        lines.append(f"| {cfg} | " + " | ".join("-" if c is None else f"{c['passed']}/{c['passed'] + c['failed']}"
                                               for c in cells) + " |")
    return "\n".join(lines)


def render_conformance(records: list[dict]) -> str:
    """BENCHMARKS.md's export-conformance section body, from the two conformance records."""
    by_name = {r["name"]: r for r in records}
    cases, failures = by_name.get("conformance_cases_total"), by_name.get("conformance_failures_total")
    if cases is None or failures is None:
        return "No records yet: run `nice python bench/bench_conformance.py`."
    dist = failures["extra"]["error_distribution"]
    box, score, bounds = dist["box_px"], dist["score"], dist["bounds"]
    failed = failures["extra"]["failed_cases"]
    return "\n".join([
        f"{cases['model']}; {cases['dataset']}. **{cases['value']:.0f} cases, {failures['value']:.0f} failed**"
        + (f" ({', '.join(failed)})" if failed else "") + f". Command `{cases['command']}`, {cases['machine']}, "
        f"{cases['date']}. Each cell: cases passed / cases (2 batch modes x 2 input shapes).", "",
        conformance_table(cases["extra"]["by_config_nc_variant"]), "",
        f"|ONNX Runtime - PyTorch| over the {box['cases']} raw and plugin-input cases (max per case): boxes median "
        f"{box['median']:.2g} px, p99 {box['p99']:.2g}, max {box['max']:.2g} (bound {bounds['box_px']}); scores "
        f"median {score['median']:.2g}, p99 {score['p99']:.2g}, max {score['max']:.2g} (bound {bounds['score']})."])


def _fill(block: re.Pattern, text: str, body: str) -> str:
    return block.sub(lambda m: m.group(1) + "\n" + body + "\n" + m.group(3), text)


def refreshed(text: str, records: list[dict]) -> str:
    """BENCHMARKS.md with its records table and its export-conformance section re-rendered."""
    return _fill(CONFORMANCE_BLOCK, _fill(BLOCK, text, render(records)), render_conformance(records))


def refreshed_readme(text: str, records: list[dict]) -> str:
    """README.md with its results table re-rendered."""
    return _fill(README_BLOCK, text, render_study(records))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite BENCHMARKS.md and README.md in place")
    args = ap.parse_args()
    records = load_records()
    stale = []
    for path, refresh in ((BENCHMARKS, refreshed), (README, refreshed_readme)):
        text = path.read_text()
        new = refresh(text, records)
        if args.write:
            path.write_text(new)
        elif new != text:
            stale.append(path.name)
    if stale:
        print(f"{', '.join(stale)} stale: run python bench/report.py --write")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
