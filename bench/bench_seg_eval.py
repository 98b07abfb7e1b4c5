"""Our mask mAP against pycocotools' ``segm`` evaluation on coco128-seg (CPU, a few minutes).

No trained segmentation model exists here, so the predictions come from the ground truth with known
flaws (bench/synthetic_masks.py: jittered boxes, grown or shrunk masks, mixed-in instances, misses,
duplicates, false positives). They still take the evaluator's real path: NMS, coefficients @
prototypes, resizing to the original image, mask IoU. pycocotools then scores the same detections,
with our masks as RLE and the truth as the COCO polygons the labels came from:

    python bench/bench_seg_eval.py --dataset ../shared/datasets/coco128-seg
    -> bench/results/seg_eval_mask_map_diff_vs_pycocotools.json

The record's value is the larger absolute difference between ours and pycocotools' mask mAP50-95
and mask mAP50; the bar is 0.001.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import machine_name, write_record  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402

AGREEMENT = 1e-3


def compare(dataset: Path, split: str, imgsz: int, batch_size: int, seed: int, limit: int | None = None) -> dict:
    """Evaluate synthetic predictions on ``dataset``'s ``split`` with ours and pycocotools: box and mask mAPs."""
    import torch

    from bench.synthetic_masks import SyntheticSegmenter
    from utils.data.config import load_data_config
    from utils.data.dataset import create_dataloader
    from utils.evaluation.coco import coco_evaluate
    from utils.evaluation.evaluator import evaluate
    from utils.evaluation.validate import coco_json

    data = load_data_config(dataset / f"{dataset.name}.yaml")
    names = list(data["names"].values()) if isinstance(data["names"], dict) else list(data["names"])
    source = dataset / "images" / split
    if limit is not None:  # the first images, as a list file the loader reads
        source = Path(tempfile.mkdtemp()) / f"first_{limit}.txt"
        source.write_text("".join(f"{p.resolve()}\n" for p in sorted((dataset / "images" / split).iterdir())[:limit]))
    loader, _ = create_dataloader(str(source), imgsz, batch_size, 32, rect=True, pad=0.5, workers=0,
                                  prefix=f"{split}: ", nc=data["nc"], task="segment")
    model = SyntheticSegmenter(loader, nc=data["nc"], seed=seed)
    result, artifacts = evaluate(model, loader, names, device=torch.device("cpu"), keep_boxes=True)
    predictions, truth = coco_json(artifacts, data, names, single_cls=False)
    boxes = coco_evaluate(truth, predictions, iou_type="bbox")
    masks = coco_evaluate(truth, predictions, iou_type="segm")
    return {"images": result.images, "instances": result.instances, "detections": len(predictions),
            "ours": {"box_map50_95": result.map50_95, "box_map50": result.map50,
                     "mask_map50_95": result.mask["map50_95"], "mask_map50": result.mask["map50"]},
            "pycocotools": {"box_map50_95": boxes["map50_95"], "box_map50": boxes["map50"],
                            "mask_map50_95": masks["map50_95"], "mask_map50": masks["map50"]}}


def mask_difference(figures: dict) -> float:
    """The larger disagreement of the two mask mAPs."""
    ours, theirs = figures["ours"], figures["pycocotools"]
    return max(abs(ours[k] - theirs[k]) for k in ("mask_map50_95", "mask_map50"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, default=Path("../shared/datasets/coco128-seg"))
    p.add_argument("--split", default="val2017", help="which images/<split> of --dataset")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=None)
    opt = p.parse_args(argv)
    if not (opt.dataset / f"{opt.dataset.name}.yaml").is_file():
        raise UserError(f"--dataset {opt.dataset}: no {opt.dataset.name}.yaml there (expected coco128-seg's layout)")
    figures = compare(opt.dataset, opt.split, opt.imgsz, opt.batch_size, opt.seed)
    diff = mask_difference(figures)
    for side in ("ours", "pycocotools"):
        print(f"{side:>12}: " + ", ".join(f"{k} {v:.6f}" for k, v in figures[side].items()))
    print(f"mask mAP difference {diff:.6f} (bar {AGREEMENT}) over {figures['images']} images, "
          f"{figures['detections']} detections")
    path = write_record("seg_eval_mask_map_diff_vs_pycocotools", diff, "mAP (the larger absolute difference, ours "
                        "vs pycocotools, of mask mAP50-95 and mask mAP50)",
                        model="synthetic predictions from the ground truth with flaws (bench/synthetic_masks.py)",
                        dataset=f"coco128-seg {opt.split} ({figures['images']} images) at {opt.imgsz}",
                        machine=machine_name(), results_dir=opt.results_dir,
                        extra={**figures, "seed": opt.seed, "bar": AGREEMENT})
    print(path)
    if diff > AGREEMENT:
        raise SystemExit(f"mask mAP disagrees with pycocotools by {diff:.6f} (> {AGREEMENT})")


if __name__ == "__main__":
    run_cli(main)
