"""Time of the paired bootstrap interval (utils.evaluation.bootstrap.paired_delta) against
recomputing mAP from scratch for every resample, on the same resamples.

    python bench/bench_bootstrap.py --data-dir ../shared/datasets/coco128 --copies 4
    -> bench/results/bootstrap_time_ratio.json

Two made-up detectors (bench.synthetic_detections: jittered copies of the real labels plus false
positives, different seeds) are evaluated on the split, ``--copies`` times over under other image
names for a larger test set; their scores are rounded to 2 decimals by default, so an image holds
tied detections whose matches differ, the case a resample must rank by the concatenation's order.
The baseline draws the same resamples and ranks each with ``ap_per_class``. The record's value is
our time over the baseline's; its extra says whether the intervals agree to 1e-12.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.record import write_record  # noqa: E402
from bench.synthetic_detections import jittered_detections, load_yolo_split  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.evaluation import bootstrap  # noqa: E402
from utils.evaluation.metrics import DetectionStats, PerImageStats, ap_per_class  # noqa: E402


def evaluation(data_dir: Path, split: str, seed: int, copies: int, decimals: int) -> PerImageStats:
    """One made-up detector's matches on ``copies`` copies of the split."""
    labelled = load_yolo_split(data_dir, split)
    stats = DetectionStats()
    for copy in range(copies):
        detections = jittered_detections(labelled, seed=seed + 1000 * copy)
        for file, det, lab in zip(labelled.files, detections, labelled.labels):
            det = det.copy()
            det[:, 4] = np.round(det[:, 4], decimals)
            stats.add(det, lab, image=file.with_name(f"{copy}_{file.name}"))
    return stats.per_image()


def brute_force_map(stats: PerImageStats, images) -> np.ndarray:
    """mAP50-95 and mAP50 of the images at ``images`` (with repeats), concatenated and ranked again
    by ``ap_per_class``: what a resample's figures are by definition."""
    result = ap_per_class(*stats.concatenated(images))
    return np.array([result.map50_95, result.map50])


def brute_force_delta(model: PerImageStats, reference: PerImageStats, resamples: int, seed: int) -> dict:
    """The paired interval with every resample scored by ``brute_force_map``."""
    n = len(model)
    everything = brute_force_map(model, range(n)) - brute_force_map(reference, range(n))
    rows = bootstrap.resample_indices(n, resamples, seed)
    draws = np.stack([brute_force_map(model, row) - brute_force_map(reference, row) for row in rows])
    low, high = np.percentile(draws, bootstrap.PERCENTILES, axis=0)
    return {name: bootstrap.Interval(float(everything[i]), float(low[i]), float(high[i]))
            for i, name in enumerate(bootstrap.METRIC_NAMES)}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/coco128")
    p.add_argument("--split", default="train2017")
    p.add_argument("--copies", type=int, default=4, help="the split this many times over, as one test set")
    p.add_argument("--decimals", type=int, default=2, help="scores rounded to this many decimals (ties)")
    p.add_argument("--resamples", type=int, default=bootstrap.RESAMPLES)
    p.add_argument("--results-dir", type=Path, default=None)
    opt = p.parse_args(argv)
    if not (opt.data_dir / "images" / opt.split).is_dir():
        raise UserError(f"{opt.data_dir / 'images' / opt.split}: no such image folder")
    if opt.copies < 1 or opt.resamples < 1:
        raise UserError(f"--copies {opt.copies} --resamples {opt.resamples}: both must be at least 1")
    model, reference = (evaluation(opt.data_dir, opt.split, seed, opt.copies, opt.decimals) for seed in (1, 2))

    start = time.perf_counter()
    ours = bootstrap.paired_delta(model, reference, opt.resamples)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    baseline = brute_force_delta(model, reference, opt.resamples, bootstrap.SEED)
    baseline_s = time.perf_counter() - start
    agree = all(abs(a - b) <= 1e-12 for m in ours for a, b in zip(
        (ours[m].value, ours[m].low, ours[m].high), (baseline[m].value, baseline[m].low, baseline[m].high)))

    tp, _, _, target_cls = model.concatenated()
    ratio = ours_s / baseline_s
    path = write_record("bootstrap_time_ratio", ratio, "ratio (paired_delta / brute-force recomputation, seconds)",
                        "made-up detectors (bench/synthetic_detections.py)",
                        f"{opt.data_dir.name} {opt.split} x{opt.copies}",
                        extra={"seconds": {"ours": round(ours_s, 3), "brute_force": round(baseline_s, 3)},
                               "images": len(model), "classes": int(len(np.unique(target_cls))),
                               "detections": int(len(tp)), "resamples": opt.resamples,
                               "score_decimals": opt.decimals, "intervals_agree_to_1e-12": agree,
                               "interval": {m: iv.to_dict() for m, iv in ours.items()}},
                        results_dir=opt.results_dir)
    print(f"{len(model)} images, {len(tp)} detections, {opt.resamples} resamples: {ours_s:.2f} s against "
          f"{baseline_s:.2f} s brute force (ratio {ratio:.4f}); intervals agree: {agree}")
    return path


if __name__ == "__main__":
    run_cli(main)
