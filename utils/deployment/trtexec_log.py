"""Read the 'Performance summary' of a TensorRT 10 ``trtexec`` log into a ``BatchTiming`` row.

trtexec prints its timings as text only; the sweep in ``scripts/benchmark_trt.sh`` keeps one log
per batch size, and this parser turns each into the row that ``val_trt.py --benchmark`` also
produces. With ``--noDataTransfers`` the 'Latency' line equals the GPU compute time per call.
"""
from __future__ import annotations

import re
from pathlib import Path

from utils.deployment.benchmark_report import BatchTiming
from utils.errors import UserError

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_THROUGHPUT = re.compile(rf"\bThroughput:\s*{_NUMBER}\s*qps")
_LATENCY = re.compile(r"\]\s*Latency:\s*(.*)$|^\s*Latency:\s*(.*)$", re.MULTILINE)
_STAT = re.compile(rf"(min|max|mean|median|percentile\(([0-9.]+)%\))\s*=\s*{_NUMBER}\s*ms")
# Where trtexec states the input shape it timed, most specific first.
_SHAPE_SOURCES = (
    re.compile(r"Input inference shapes?\s*:\s*[^=\s]+=(\d+)x"),
    re.compile(r"--shapes=[^:\s]+:(\d+)x"),
    re.compile(r"--optShapes=[^:\s]+:(\d+)x"),
)


def parse_latency_stats(line: str) -> dict[str, float]:
    """``{'min':..,'max':..,'mean':..,'median':..,'p90':..,'p95':..,'p99':..}`` from one stats line."""
    stats = {}
    for key, pct, value in _STAT.findall(line):
        stats[f"p{pct}" if pct else key] = float(value)
    return stats


def parse_trtexec_log(text: str, batch: int | None = None, source: str = "trtexec log") -> BatchTiming:
    """The timing row of one trtexec run; ``batch`` overrides the shape found in the log."""
    start = text.find("=== Performance summary ===")
    if start < 0:
        raise UserError(f"{source}: no '=== Performance summary ===' section (did trtexec fail or skip inference?)")
    summary = text[start:]
    throughput = _THROUGHPUT.search(summary)
    latency = _LATENCY.search(summary)
    if throughput is None or latency is None:
        raise UserError(f"{source}: the performance summary has no Throughput or Latency line")
    stats = parse_latency_stats(latency.group(1) or latency.group(2))
    missing = {"mean", "median", "p99"} - stats.keys()
    if missing:
        raise UserError(f"{source}: Latency line lacks {sorted(missing)}")
    if batch is None:
        batch = _batch_from_shapes(text)
        if batch is None:
            raise UserError(f"{source}: no input shape found; pass the batch size explicitly")
    return BatchTiming(batch, stats["mean"], stats["median"], stats["p99"], float(throughput.group(1)))


def parse_trtexec_file(path: str | Path, batch: int | None = None) -> BatchTiming:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: trtexec log not found")
    return parse_trtexec_log(path.read_text(errors="replace"), batch, source=str(path))


def _batch_from_shapes(text: str) -> int | None:
    for pattern in _SHAPE_SOURCES:
        m = pattern.search(text)
        if m:
            return int(m.group(1))
    return None
