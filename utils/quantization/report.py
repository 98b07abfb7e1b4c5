"""The quantization report: Origin / PTQ / QAT (/ control) rows with deltas, as markdown and JSON.

The report is a plain dict so that it travels inside checkpoints (a resumed run keeps its
history) and is written unchanged as JSON; the markdown is rendered from it. Two splits appear:
the one that chose (the best epoch, auto's calibration method) and the one the rows are reported
on, with a bootstrap interval for each delta, so that a choice never flatters the figure it made.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the type alone: qat.py builds its parser from modules that do not load torch
    from utils.evaluation.evaluator import EvalResult

METRICS = (("map50_95", "AP50-95"), ("map50", "AP50"), ("precision", "P"), ("recall", "R"))
# Row key -> label; the control row exists only with --control.
ROWS = (("origin", "Origin"), ("ptq", "PTQ"), ("qat_best", "QAT (best)"), ("control_best", "Control (best)"))
# Reported row -> its interval against Origin.
ORIGIN_DELTAS = {"ptq": "ptq_minus_origin", "qat_best": "qat_minus_origin", "control_best": "control_minus_origin"}
MASK_PREFIX = "mask_"  # a segmentation model's mask figures sit beside the box ones: mask_map50_95, ...


def metrics(result: EvalResult) -> dict:
    """The four headline figures of an evaluation (boxes; and masks, prefixed, for segmentation), plus fitness."""
    out = {"map50_95": result.map50_95, "map50": result.map50, "precision": result.precision,
           "recall": result.recall, "fitness": result.fitness}
    if result.mask is not None:
        out.update({MASK_PREFIX + k: float(result.mask[k]) for k, _ in METRICS})
    return out


def headline(m: dict) -> dict:
    """The figures of ``metrics`` that ``m`` holds (a report row keeps these, not an epoch's losses)."""
    keys = [k for k, _ in METRICS] + [MASK_PREFIX + k for k, _ in METRICS] + ["fitness"]
    return {k: m[k] for k in keys if k in m}


def score(m: dict) -> float:
    """What a run selects by (calibration method, layers to skip, the best QAT epoch): box mAP50-95,
    plus mask mAP50-95 for a segmentation model, whose masks matter as much as its boxes."""
    return m["map50_95"] + m.get(MASK_PREFIX + "map50_95", 0.0)


def is_segment_report(report: dict) -> bool:
    return any(MASK_PREFIX + "map50_95" in (report.get(k) or {}) for k in ("origin", "ptq", "qat_best"))


def new_report(weights: str, data: str, selected_on: str, reported_on: str | None = None) -> dict:
    """An empty report; its rows are reported on ``selected_on`` too unless another split is named."""
    return {"weights": str(weights), "data": str(data), "selected_on": selected_on,
            "reported_on": reported_on or selected_on,
            "origin": None, "ptq": None, "calibration": [], "skip_layers": [], "qat_best": None, "epochs": []}


# A fine-tune's epoch 0 is the model it started from (kept as the best when no epoch beat it).
STARTS = {"qat_best": "the PTQ model", "control_best": "the FP32 model"}


def _label(key: str, label: str, m: dict) -> str:
    if key == "ptq" and m.get("method"):
        return f"PTQ ({m['method']})"
    if m.get("epoch") == 0 and key in STARTS:
        return f"{label[:-1]}: {STARTS[key]}, no epoch beat it)"
    return f"{label[:-1]}, epoch {m['epoch']})" if "epoch" in m else label


def _row(name: str, m: dict | None, origin: dict | None, prefix: str = "") -> str:
    if m is None or prefix + "map50_95" not in m:
        return f"| {name} |" + " - |" * (2 * len(METRICS))
    cells = [f"{m[prefix + k]:.4f}" for k, _ in METRICS]
    deltas = [f"{m[prefix + k] - origin[prefix + k]:+.4f}" if origin else "-" for k, _ in METRICS]
    return f"| {name} | " + " | ".join(cells + deltas) + " |"


def _rows(name: str, m: dict | None, origin: dict | None, masks: bool) -> list[str]:
    """A model's row; a segmentation model's box row and mask row."""
    if not masks:
        return [_row(name, m, origin)]
    return [_row(f"{name}, boxes", m, origin), _row(f"{name}, masks", m, origin, MASK_PREFIX)]


def _interval(iv: dict | None) -> str:
    return f"[{iv['ci95_low']:+.4f}, {iv['ci95_high']:+.4f}]" if iv else "-"


def _reported_table(report: dict) -> list[str]:
    """The headline table: every row on the report split, deltas with their 95% intervals."""
    reported, intervals = report["reported"], report.get("intervals", {})
    boot = report.get("bootstrap", {})
    if reported["split"] == report["selected_on"]:
        where = (f"chosen and reported on the same **{reported['split']}** split (the data has no other, or "
                 f"--report-task none), so the chosen rows are a little optimistic")
    else:
        where = f"chosen on the **{report['selected_on']}** split, reported on the **{reported['split']}** split"
    lines = [f"The best epochs and --calib-method auto's method were {where} ({reported['images']} images). "
             f"Deltas are against Origin (FP32); [low, high] is a 95% paired bootstrap interval over images "
             f"({boot.get('resamples', '?')} resamples, seed {boot.get('seed', '?')}).", "",
             "| Model | AP50-95 | AP50 | dAP50-95 | 95% interval | dAP50 | 95% interval |", "|---" * 7 + "|"]
    origin = reported.get("origin")
    for key, label in ROWS:
        m = reported.get(key)
        if m is None:
            continue
        iv = intervals.get(ORIGIN_DELTAS.get(key), {})
        deltas = (f"{m['map50_95'] - origin['map50_95']:+.4f} | {_interval(iv.get('map50_95'))} | "
                  f"{m['map50'] - origin['map50']:+.4f} | {_interval(iv.get('map50'))}") if origin else "- | - | - | -"
        lines.append(f"| {_label(key, label, m)} | {m['map50_95']:.4f} | {m['map50']:.4f} | {deltas} |")
    if is_segment_report(report):  # the same images resampled, scored by their mask matches
        lines += ["", "Masks (deltas against Origin, 95% intervals as above):", "",
                  "| Model | mask AP50-95 | mask AP50 | dAP50-95 | 95% interval | dAP50 | 95% interval |",
                  "|---" * 7 + "|"]
        for key, label in ROWS:
            m = reported.get(key)
            if m is None or MASK_PREFIX + "map50_95" not in m:
                continue
            iv = intervals.get(ORIGIN_DELTAS.get(key), {})
            deltas = " | ".join(f"{m[MASK_PREFIX + k] - origin[MASK_PREFIX + k]:+.4f} | "
                                f"{_interval(iv.get(MASK_PREFIX + k))}" if origin else "- | -"
                                for k in ("map50_95", "map50"))
            lines.append(f"| {_label(key, label, m)} | {m[MASK_PREFIX + 'map50_95']:.4f} | "
                         f"{m[MASK_PREFIX + 'map50']:.4f} | {deltas} |")
    lines.append("")
    control = intervals.get("qat_minus_control")
    if control:
        figures = ", ".join(f"{name} {control[key]['value']:+.4f} {_interval(control[key])}"
                            for prefix, kind in (("", ""), (MASK_PREFIX, "mask ")) for key, name in
                            ((prefix + "map50_95", kind + "AP50-95"), (prefix + "map50", kind + "AP50"))
                            if key in control)
        lines += [f"QAT - control (what quantization itself costs, the fine-tuning both had taken out): {figures}.",
                  ""]
    return lines


def to_markdown(report: dict) -> str:
    """Reported rows with intervals, the rows on the selection split, calibration trials and each epoch."""
    selected_on = report.get("selected_on", report.get("task"))  # reports written before the split was named
    lines = [f"# Quantization report: {report['weights']}", "", f"Data {report['data']}.", ""]
    if report.get("reported"):
        lines += _reported_table(report)
    origin = report.get("origin")
    head = [label for _, label in METRICS] + [f"d{label}" for _, label in METRICS]
    lines += [f"## On the {selected_on} split (where the choices were made)", "",
              "| Model | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    masks = is_segment_report(report)
    for key, label in ROWS:
        if key != "control_best" or report.get(key):
            lines += _rows(_label(key, label, report.get(key) or {}), report.get(key),
                           None if key == "origin" else origin, masks)
    lines.append("")
    if report.get("skip_layers"):
        lines += [f"Layers kept in floating point: {', '.join(map(str, report['skip_layers']))}", ""]
    if report.get("calibration"):
        lines += ["## Calibration", "", "| Method | AP50-95 | AP50 | chosen |", "|---|---|---|---|"]
        lines += [f"| {c['method']} | {c['map50_95']:.4f} | {c['map50']:.4f} | {'yes' if c.get('chosen') else ''} |"
                  for c in report["calibration"]]
        lines.append("")
    for key, title in (("epochs", "QAT epochs"), ("control_epochs", "Control epochs (FP32, no distillation)")):
        if report.get(key):
            lines += _epoch_table(title, report[key])
    lines += _time_lines(report)
    return "\n".join(lines)


def _epoch_table(title: str, epochs: list[dict]) -> list[str]:
    """One row per epoch; a segmentation run's rows add mask mAP and the mask loss."""
    seg = "seg" in epochs[0]
    nan = float("nan")
    lines = [f"## {title}", "", "| Epoch | AP50-95 | AP50 |" + (" mask AP50-95 | mask AP50 | seg |" if seg else "")
             + " box | cls | dfl | distill error | images | s/iter | train s | eval s |",
             "|---" * (14 if seg else 11) + "|"]
    lines += [f"| {e['epoch']} | {e.get('map50_95', nan):.4f} | {e.get('map50', nan):.4f} | "
              + (f"{e.get('mask_map50_95', nan):.4f} | {e.get('mask_map50', nan):.4f} | "
                 f"{e['seg']:.4f} | " if seg else "")
              + f"{e['box']:.4f} | {e['cls']:.4f} | {e['dfl']:.4f} | {e['distill_error']:.2e} | "
              f"{e.get('train_images', '-')} | {e['seconds_per_iter']:.3f} | {e.get('train_seconds', nan):.1f} | "
              f"{e.get('eval_seconds', nan):.1f} |" for e in epochs]
    return lines + [""]


def _time_lines(report: dict) -> list[str]:
    """Where the time to ``qat_best.pt`` went; absent from reports of older runs.

    A resumed run ran in several processes, each with its own clock; they are listed one by one,
    never added up, as the pause between them is not run time.
    """
    seconds = report.get("seconds")
    if not seconds or "seconds_to_qat_best" not in report:
        return []
    first = (f"Loading and the Origin evaluation {seconds['load_and_origin']:.1f} s; PTQ (calibration, every "
             f"method's evaluation, ptq.pt) {seconds.get('ptq', 0.0):.1f} s")
    sessions = report.get("sessions", [])
    if len(sessions) <= 1:
        return ["## Time", "", f"{first}; then the QAT epochs above; qat_best.pt written "
                f"{report['seconds_to_qat_best']:.1f} s after the start.", ""]
    ends = [s["first_epoch"] - 1 for s in sessions[1:]] + [report["epochs"][-1]["epoch"]]
    lines = ["## Time", "", f"The run was resumed: it ran in {len(sessions)} processes, each timed from its own "
             "start (the pauses between them are not counted).", ""]
    for i, (session, end) in enumerate(zip(sessions, ends), 1):
        setup = first[0].lower() + first[1:] if i == 1 else f"loading {session['setup_seconds']:.1f} s"
        lines.append(f"- process {i}: {setup}; then QAT epochs {session['first_epoch']}-{end}")
    best = report.get("qat_best") or {}
    lines += ["", f"qat_best.pt (epoch {best.get('epoch', '?')}) written {report['seconds_to_qat_best']:.1f} s after "
              f"process {report.get('qat_best_session', len(sessions))} started.", ""]
    return lines


def write_report(report: dict, save_dir: Path) -> tuple[Path, Path]:
    """``report.md`` and ``report.json`` in ``save_dir``."""
    md, js = save_dir / "report.md", save_dir / "report.json"
    md.write_text(to_markdown(report))
    js.write_text(json.dumps(report, indent=2) + "\n")
    return md, js
