"""Latency/throughput per batch size: one row type, one table, one JSON, one plot.

``val_trt.py --benchmark`` (timed in Python) and ``scripts/benchmark_trt.sh`` (timed by trtexec)
report through this module, so their numbers land in the same layout and can sit side by side.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class BatchTiming:
    """Timing of one batch size. Latency is per batch (one inference call), in milliseconds."""

    batch: int
    latency_mean_ms: float
    latency_median_ms: float
    latency_p99_ms: float
    qps: float  # inference calls per second

    @property
    def images_per_s(self) -> float:
        return self.qps * self.batch


def summarize(batch: int, latencies_ms: list[float] | np.ndarray) -> BatchTiming:
    """Row for measured per-call latencies; throughput from the mean, as a sequential loop runs."""
    lat = np.asarray(latencies_ms, dtype=np.float64)
    if lat.size == 0:
        raise ValueError("no latencies measured")
    return BatchTiming(batch, float(lat.mean()), float(np.median(lat)), float(np.percentile(lat, 99)),
                       1000.0 / float(lat.mean()))


def to_markdown(rows: list[BatchTiming], title: str = "") -> str:
    head = [f"### {title}", ""] if title else []
    lines = ["| batch | latency mean (ms) | median (ms) | p99 (ms) | qps | images/s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.batch} | {r.latency_mean_ms:.3f} | {r.latency_median_ms:.3f} | {r.latency_p99_ms:.3f} "
              f"| {r.qps:.1f} | {r.images_per_s:.1f} |" for r in rows]
    return "\n".join(head + lines) + "\n"


def to_json(rows: list[BatchTiming], meta: dict | None = None) -> dict:
    return {**(meta or {}), "rows": [{**asdict(r), "images_per_s": r.images_per_s} for r in rows]}


def plot(rows: list[BatchTiming], path: Path, title: str = "") -> Path:
    """PNG with images/s (left axis) and p99 latency (right axis) against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [r.batch for r in rows]
    fig, left = plt.subplots(figsize=(6, 4), dpi=120)
    left.plot(batches, [r.images_per_s for r in rows], "o-", color="tab:blue", label="images/s")
    left.set_xlabel("batch size")
    left.set_ylabel("images/s", color="tab:blue")
    right = left.twinx()
    right.plot(batches, [r.latency_p99_ms for r in rows], "s--", color="tab:red", label="p99 latency")
    right.set_ylabel("p99 latency per batch (ms)", color="tab:red")
    left.set_xticks(batches)
    left.grid(alpha=0.3)
    if title:
        left.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(rows: list[BatchTiming], out_dir: Path, stem: str = "benchmark", title: str = "",
                 meta: dict | None = None) -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.json`` and ``<stem>.png`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r.batch)
    paths = {"markdown": out_dir / f"{stem}.md", "json": out_dir / f"{stem}.json", "plot": out_dir / f"{stem}.png"}
    paths["markdown"].write_text(to_markdown(rows, title))
    paths["json"].write_text(json.dumps(to_json(rows, meta), indent=2) + "\n")
    plot(rows, paths["plot"], title)
    return paths
