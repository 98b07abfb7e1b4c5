"""The quantization report: Origin / PTQ / QAT rows with deltas, as markdown and JSON.

The report is a plain dict so that it travels inside checkpoints (a resumed run keeps its
history) and is written unchanged as JSON; the markdown is rendered from it.
"""
from __future__ import annotations

import json
from pathlib import Path

from utils.evaluation.evaluator import EvalResult

METRICS = (("map50_95", "AP50-95"), ("map50", "AP50"), ("precision", "P"), ("recall", "R"))


def metrics(result: EvalResult) -> dict:
    """The four headline figures of an evaluation, plus fitness."""
    return {"map50_95": result.map50_95, "map50": result.map50, "precision": result.precision,
            "recall": result.recall, "fitness": result.fitness}


def new_report(weights: str, data: str, task: str) -> dict:
    return {"weights": str(weights), "data": str(data), "task": task, "origin": None, "ptq": None,
            "calibration": [], "skip_layers": [], "qat_best": None, "epochs": []}


def _row(name: str, m: dict | None, origin: dict | None) -> str:
    if m is None:
        return f"| {name} |" + " - |" * (2 * len(METRICS))
    cells = [f"{m[k]:.4f}" for k, _ in METRICS]
    deltas = [f"{m[k] - origin[k]:+.4f}" if origin else "-" for k, _ in METRICS]
    return f"| {name} | " + " | ".join(cells + deltas) + " |"


def to_markdown(report: dict) -> str:
    """Origin / PTQ / QAT table, then calibration trials and the per-epoch history."""
    origin = report.get("origin")
    head = [label for _, label in METRICS] + [f"d{label}" for _, label in METRICS]
    lines = [f"# Quantization report: {report['weights']}", "",
             f"Data {report['data']} ({report['task']} split). Deltas are against Origin (FP32).", "",
             "| Model | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|",
             _row("Origin", origin, None)]
    ptq = report.get("ptq")
    ptq_name = f"PTQ ({ptq['method']})" if ptq else "PTQ"
    lines += [_row(ptq_name, ptq, origin), _row("QAT (best)", report.get("qat_best"), origin), ""]
    if report.get("skip_layers"):
        lines += [f"Layers kept in floating point: {', '.join(map(str, report['skip_layers']))}", ""]
    if report.get("calibration"):
        lines += ["## Calibration", "", "| Method | AP50-95 | AP50 | chosen |", "|---|---|---|---|"]
        lines += [f"| {c['method']} | {c['map50_95']:.4f} | {c['map50']:.4f} | {'yes' if c.get('chosen') else ''} |"
                  for c in report["calibration"]]
        lines.append("")
    if report.get("epochs"):
        lines += ["## QAT epochs", "", "| Epoch | AP50-95 | AP50 | box | cls | dfl | distill error | s/iter "
                  "| train s | eval s |", "|---" * 10 + "|"]
        lines += [f"| {e['epoch']} | {e['map50_95']:.4f} | {e['map50']:.4f} | {e['box']:.4f} | {e['cls']:.4f} | "
                  f"{e['dfl']:.4f} | {e['distill_error']:.2e} | {e['seconds_per_iter']:.3f} | "
                  f"{e.get('train_seconds', float('nan')):.1f} | {e.get('eval_seconds', float('nan')):.1f} |"
                  for e in report["epochs"]]
        lines.append("")
    lines += _time_lines(report)
    return "\n".join(lines)


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
