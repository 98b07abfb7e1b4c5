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
SEG_STUDY_BLOCK = re.compile(r"(<!-- seg-study -->)(.*?)(<!-- /seg-study -->)", re.S)
CONFORMANCE_VARIANTS = ("raw", "nms", "topk")  # bench/conformance.py's order
SEG_STUDY_MODELS = ("gelan-c-seg", "yolov9-c-dseg")  # bench/study_seg.py's
SEG_BAR = -0.003  # issue 12: the QAT mask delta and ONNX Runtime - QAT mask delta bars
# The BCCD study's models, in README's order (a model is shown once its QAT record exists).
STUDY_MODELS = ("gelan-t", "gelan-s", "gelan-m", "gelan-c", "gelan-e", "yolov9-s-converted")
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


def _interval(rec: dict) -> str:
    """' [low, high]' when the record carries a 95% interval, else nothing."""
    extra = rec.get("extra") or {}
    return f" [{extra['ci95_low']:.4f}, {extra['ci95_high']:.4f}]" if "ci95_low" in extra else ""


def _value(rec: dict) -> str:
    v = rec["value"]
    return (f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}") + _interval(rec)


def render(records: list[dict]) -> str:
    rows = ["| figure | value | unit | model | dataset | machine | date | command |",
            "| --- | ---: | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        cmd = r["command"].replace("|", "\\|")
        rows.append(f"| `{r['name']}` | {_value(r)} | {r['unit']} | {r['model']} | {r['dataset']} | "
                    f"{r['machine']} | {r['date']} | `{cmd}` |")
    return "\n".join(rows)


def render_study(records: list[dict]) -> str:
    """README's summary of the BCCD study: one row per model, each delta with its interval where
    the record has one, '-' where a figure was not measured."""
    by_name = {r["name"]: r for r in records}

    def cell(name: str, signed: bool = True) -> str:
        rec = by_name.get(name)
        if rec is None:
            return "-"
        return f"{rec['value']:+.4f}{_interval(rec)}" if signed else f"{rec['value']:.4f}{_interval(rec)}"

    rows = ["| model | FP32 mAP50-95 | FP32 converged | chosen on | PTQ - FP32 | QAT - FP32 | QAT - control "
            "| ONNX Runtime INT8 - QAT | INT8 agreement, BCCD test | INT8 agreement, COCO128 | QAT step / FP32 step |",
            "|---|---:|---|---|---|---|---|---|---|---|---:|"]
    for model in STUDY_MODELS:
        qat = by_name.get(f"qat_delta_map50_95_{model}")
        if qat is None:
            continue
        extra = qat["extra"]
        check = by_name.get(f"fp32_val_map50_95_{model}", {}).get("extra", {})
        converged = ("yes" if check["converged"] else "no") if "converged" in check else "-"
        ptq = by_name.get(f"ptq_delta_map50_95_{model}") or _auto_pick(records, model)
        step = by_name.get(f"qat_step_time_ratio_{model}")
        cells = [model, f"{extra['fp32_map50_95']:.4f}", converged, extra.get("selected_on", extra.get("split", "-")),
                 f"{ptq['value']:+.4f}{_interval(ptq)} ({ptq['extra']['method']})" if ptq else "-",
                 cell(f"qat_delta_map50_95_{model}"),
                 cell(f"qat_minus_control_map50_95_{model}"), cell(f"ort_int8_minus_qat_map50_95_{model}"),
                 cell(f"int8_agreement_map50_95_{model}", signed=False),
                 cell(f"int8_agreement_coco128_map50_95_{model}", signed=False),
                 f"{step['value']:.2f}" if step else "-"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _auto_pick(records: list[dict], model: str) -> dict | None:
    """The first study's PTQ record of the method --calib-method auto kept (one record per method)."""
    for r in records:
        if r["name"].startswith(f"ptq_delta_map50_95_{model}_") and r.get("extra", {}).get("chosen_by_auto"):
            return {**r, "extra": {**r["extra"], "method": r["name"].rsplit("_", 1)[1]}}
    return None


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
        f"median {score['median']:.2g}, p99 {score['p99']:.2g}, max {score['max']:.2g} (bound {bounds['score']})"
        + (f"; segmentation masks over {dist['mask']['cases']} cases: probabilities median "
           f"{dist['mask']['median']:.2g}, "
           f"max {dist['mask']['max']:.2g} (bound {bounds['mask']}, mean bound {bounds['mask_mean']})"
           if dist.get("mask") else "") + "."])


def render_seg_study(records: list[dict]) -> str:
    """BENCHMARKS.md's segmentation study section: per model, FP32 box and mask mAP50-95 on test,
    the QAT deltas with their intervals and ONNX Runtime - QAT against the bar, where measured."""
    by_name = {r["name"]: r for r in records}
    rows = ["| model | FP32 box / mask mAP50-95 (test) | QAT - FP32, boxes | QAT - FP32, masks | QAT - control, masks "
            "| ONNX Runtime INT8 - QAT, masks (val) | bars (>= -0.003) | training | machine, date |",
            "|---|---|---:|---:|---:|---:|---|---|---|"]
    commands = set()
    for model in SEG_STUDY_MODELS:
        mask = by_name.get(f"seg_qat_delta_mask_map50_95_{model}")
        box = by_name.get(f"seg_qat_delta_box_map50_95_{model}")
        ort = by_name.get(f"seg_ort_int8_minus_qat_mask_map50_95_{model}")
        control = by_name.get(f"seg_qat_minus_control_mask_map50_95_{model}")
        if not (mask and box and ort):
            continue
        extra = mask["extra"]
        sizes = extra["sizes"]
        stopped = extra.get("training_stopped_after_epoch")
        training = (f"{stopped if stopped else sizes['epochs']} epochs of {sizes['images']} images, "
                    f"{sizes['imgsz']} px" + (" (time budget)" if stopped else "") + _flatness(extra))
        bars = "pass" if min(mask["value"], ort["value"]) >= SEG_BAR else "**fail**"
        versus_control = f"{control['value']:+.4f}{_interval(control)}" if control else "not run"
        rows.append(f"| {mask['model']} | {extra['fp32']['map50_95']:.4f} / {extra['fp32']['mask_map50_95']:.4f} | "
                    f"{box['value']:+.4f}{_interval(box)} | {mask['value']:+.4f}{_interval(mask)} | {versus_control} | "
                    f"{ort['value']:+.4f} | {bars} | {training} | "
                    f"{mask['machine']}, {mask['date']} |")
        commands.add(mask["command"])
    if len(rows) == 2:
        return "No records yet: run `python bench/study_seg.py --out <folder>` on a GPU machine."
    return "\n".join(rows + ["", "Command: " + ", ".join(f"`{c}`" for c in sorted(commands)) + "."])


def _flatness(extra: dict) -> str:
    """The FP32 convergence check in words, where the record has one (runs before 2026-11-30 20:00 do not)."""
    check = extra.get("convergence")
    if not check:
        return ""
    if "trend_rise" not in check:
        return f"; convergence not judged ({check['reason']})"
    verdict = "flat" if check["converged"] else "**not flat**"
    return (f"; val mask mAP50-95 {verdict} over the last {check['window_epochs']} (trend "
            f"{check['trend_rise']:+.4f}, tolerance {check['tolerance']})")


def _fill(block: re.Pattern, text: str, body: str) -> str:
    return block.sub(lambda m: m.group(1) + "\n" + body + "\n" + m.group(3), text)


def refreshed(text: str, records: list[dict]) -> str:
    """BENCHMARKS.md with its records table, export-conformance and segmentation study sections re-rendered."""
    text = _fill(CONFORMANCE_BLOCK, _fill(BLOCK, text, render(records)), render_conformance(records))
    return _fill(SEG_STUDY_BLOCK, text, render_seg_study(records))


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
