"""Evaluator benchmarks.

Default (CPU, ~1 min): time our metrics and pycocotools' COCOeval on the same detections over
COCO128 val, in one process, median of several repeats, and check that both give the same mAP:

    python bench/bench_eval.py --dataset ../shared/datasets/coco128
    -> bench/results/eval_time_ratio_vs_pycocotools.json

--throughput (GPU, ~2-4 min on one H100): images/s of a whole val.run pass (decode, letterbox,
model, NMS, metrics) for a model built from --cfg (random weights) or loaded from --weights:

    python bench/bench_eval.py --throughput --cfg models/detect/gelan-c.yaml --batch-size 32 --imgsz 640 \
        --data data/coco128.yaml --half
    -> bench/results/val_throughput_gelan-c.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import machine_name, write_record  # noqa: E402
from bench.synthetic_detections import jittered_detections, load_yolo_split  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402


def _timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls and the last call's value."""
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def bench_metrics(dataset: Path, repeats: int, false_positives: int, seed: int, results_dir: Path | None) -> Path:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from utils.evaluation.coco import (
        COCO_NAMES,
        category_ids,
        coco_evaluate,
        ground_truth_to_coco,
        image_ids,
        predictions_to_coco,
    )
    from utils.evaluation.metrics import DetectionStats

    split = load_yolo_split(dataset, "val2017")
    dets = jittered_detections(split, seed=seed, false_positives=false_positives)
    cat_ids, img_ids = category_ids({"names": list(COCO_NAMES)}), image_ids(split.files)
    gt_json = ground_truth_to_coco(split.labels, split.shapes, img_ids, cat_ids, COCO_NAMES, split.files)
    t_json, pred_json = _timed(lambda: predictions_to_coco(dets, img_ids, cat_ids), repeats)

    def ours():
        stats = DetectionStats()
        for d, lab in zip(dets, split.labels):
            stats.add(d, lab)
        return stats.compute()

    def faster():
        return coco_evaluate(gt_json, pred_json, backend="faster-coco-eval")

    def pycocotools():
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = gt_json
            gt.createIndex()
            evaluator = COCOeval(gt, gt.loadRes(pred_json), "bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return evaluator.stats

    ours()  # warm caches and lazy imports before timing either side
    # Interleaved rounds: load from other processes on a shared CPU then slows all three alike.
    rounds = [[_timed(fn, 1) for fn in (ours, pycocotools, faster)] for _ in range(repeats)]
    (t_ours, ap), (t_coco, stats), (t_fast, fast) = [
        (statistics.median(r[i][0] for r in rounds), rounds[-1][i][1]) for i in range(3)]
    if abs(ap.map50_95 - stats[0]) > 1e-3 or abs(ap.map50 - stats[1]) > 1e-3:
        raise SystemExit(f"mAP disagrees: ours {ap.map50_95:.5f}/{ap.map50:.5f}, pycocotools {stats[0]:.5f}/{stats[1]:.5f}")
    n_det = sum(len(d) for d in dets)
    print(f"{len(dets)} images, {n_det} detections ({n_det / len(dets):.0f}/image), median of {repeats}:")
    print(f"  ours {t_ours * 1e3:.1f} ms | pycocotools {t_coco * 1e3:.1f} ms | faster-coco-eval {t_fast * 1e3:.1f} ms"
          f" | building COCO result JSON {t_json * 1e3:.1f} ms")
    print(f"  mAP50-95 ours {ap.map50_95:.6f} pycocotools {stats[0]:.6f}; mAP50 ours {ap.map50:.6f} "
          f"pycocotools {stats[1]:.6f}")
    return write_record(
        "eval_time_ratio_vs_pycocotools", t_ours / t_coco, "ratio (our time / pycocotools time; lower is faster)",
        model="synthetic detections: jittered COCO128 val ground truth + false positives",
        dataset=f"coco128 val2017 ({len(dets)} images)", results_dir=results_dir,
        machine=machine_name(),
        extra={"ours_ms": t_ours * 1e3, "pycocotools_ms": t_coco * 1e3, "faster_coco_eval_ms": t_fast * 1e3,
               "coco_json_build_ms": t_json * 1e3, "repeats": repeats, "detections": n_det,
               "load_avg_1min": os.getloadavg()[0],  # other processes on the CPU slow both sides alike
               "map50_95": {"ours": ap.map50_95, "pycocotools": stats[0], "faster-coco-eval": fast["map50_95"]},
               "map50": {"ours": ap.map50, "pycocotools": stats[1], "faster-coco-eval": fast["map50"]},
               "pycocotools_scope": "COCO index + loadRes + evaluate + accumulate + summarize, from in-memory dicts",
               "ours_scope": "per-image matching + AP from per-image arrays"})


def bench_throughput(opt) -> Path:
    import torch

    from utils.data.config import load_data_config, require_split
    from utils.data.dataset import create_dataloader
    from utils.evaluation.validate import run as validate
    from utils.torch_utils import select_device

    device = select_device(opt.device)
    data = load_data_config(opt.data)
    if opt.weights:
        from models.loading import attempt_load

        model, source = attempt_load(opt.weights, device=device, fuse=True), Path(opt.weights).name
    else:
        from models.yolo import DetectionModel

        model, source = DetectionModel(opt.cfg, nc=data["nc"]).fuse().to(device).eval(), "random weights"
    stride = max(int(model.stride.max()), 32)
    loader = create_dataloader(require_split(data, "val"), opt.imgsz, opt.batch_size, stride, rect=True, pad=0.5,
                               workers=opt.workers, prefix="val: ", nc=data["nc"])[0]
    n_images = len(loader.dataset)

    def one_pass():
        return validate(data, model=model, dataloader=loader, batch_size=opt.batch_size, half=opt.half, plots=False,
                       conf_thres=opt.conf_thres)

    one_pass()  # warm-up: cuDNN autotune, worker start-up, page cache
    seconds, result = _timed(one_pass, opt.repeats)
    ips = n_images / seconds
    name = Path(opt.weights or opt.cfg).stem
    print(f"{name}: {ips:.1f} images/s ({n_images} images, batch {opt.batch_size}, imgsz {opt.imgsz}, "
          f"{'FP16' if opt.half else 'FP32'}, median of {opt.repeats} passes); speed/image {result.speed_ms}")
    return write_record(
        f"val_throughput_{name}", ips, "images/s (whole val.run pass)", model=f"{name} ({source})",
        dataset=f"{Path(data['path']).name} {Path(str(data['val'])).name} ({n_images} images)",
        results_dir=opt.results_dir,
        extra={"batch_size": opt.batch_size, "imgsz": opt.imgsz, "half": opt.half, "repeats": opt.repeats,
               "pass_seconds": seconds, "speed_ms_per_image": result.speed_ms, "workers": opt.workers,
               "conf_thres": opt.conf_thres, "map50_95": result.map50_95, "torch": torch.__version__})


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared/datasets/coco128",
                        help="YOLO-layout folder with images/val2017 and labels/val2017 (metrics mode)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--false-positives", type=int, default=250,
                        help="mean random boxes per image; ~250 gives the ~300 boxes/image of a conf-0.001 val")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--throughput", action="store_true", help="time val.run on a GPU instead")
    parser.add_argument("--cfg", type=str, default=str(ROOT / "models/detect/gelan-c.yaml"))
    parser.add_argument("--weights", type=str, default=None, help="a checkpoint instead of random weights")
    parser.add_argument("--data", type=str, default=str(ROOT / "data/coco128.yaml"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--conf-thres", type=float, default=0.001)
    parser.add_argument("--device", default="")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--half", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=None, help="default bench/results")
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    opt = parse_args(argv)
    if opt.repeats < 1:
        raise UserError(f"--repeats {opt.repeats}: must be at least 1")
    path = bench_throughput(opt) if opt.throughput else bench_metrics(opt.dataset, opt.repeats, opt.false_positives,
                                                                      opt.seed, opt.results_dir)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_cli(main)
