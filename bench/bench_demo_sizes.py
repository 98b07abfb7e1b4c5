"""How the demo's shipped FP32 models (models/demo/*.pt) score at the sizes ``qat.py demo --imgsz`` takes:
the evidence behind ``utils.demo.SHIPPED_SIZES``.

Each size draws its own images, never seen by the models (they trained on SHIPPED_DATA_SEED's): the
demo's validation images (its default seed, where the range was chosen) and a test set from another
seed (where it is reported), scored on the exported model's square input with 95% bootstrap
intervals over images (boxes, and masks for segmentation).

    python bench/bench_demo_sizes.py
    -> bench/results/demo-sizes/demo_sizes.md, and demo_shipped_min_map50_<task>.json: the lowest test
       mAP50 inside SHIPPED_SIZES, every size and split in its extra
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import write_record  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402

SIZES = (64, 96, 128, 160, 192, 256, 320)


def score(model, task: str, imgsz: int, seed: int, images: int, folder: Path) -> dict:
    """mAP50 and mAP50-95 with intervals, boxes (and masks), of the shipped ``task`` model at ``imgsz``."""
    import torch

    from utils.data.config import load_data_config
    from utils.data.synthetic import make_shapes_dataset
    from utils.deployment.validate import evaluate_exported
    from utils.evaluation import bootstrap

    data = make_shapes_dataset(folder / f"{task}-{imgsz}-{seed}", n_train=0, n_val=images, imgsz=imgsz, seed=seed,
                               masks=task == "segment")
    _, found = evaluate_exported(model, load_data_config(data), imgsz, 16, "val", "nms", conf_thres=0.001,
                                 iou_thres=0.7, max_det=300, workers=0, device=torch.device("cpu"))
    parts = {"boxes": found.per_image, **({"masks": found.mask_per_image} if task == "segment" else {})}
    return {part: {k: iv.to_dict() for k, iv in bootstrap.interval(stats).items()} for part, stats in parts.items()}


def to_markdown(rows: list[dict], sizes: tuple[int, int]) -> str:
    lines = [f"# The shipped demo models at each --imgsz (checked range {sizes[0]}-{sizes[1]} px)", "",
             "mAP50 [95% interval] on images the models never saw; val: the demo's default seed (where the range "
             "was chosen), test: another seed (where it is reported).", "",
             "| task | part | split | " + " | ".join(f"{s} px" for s in SIZES) + " |", "|---" * (3 + len(SIZES)) + "|"]
    for r in rows:
        cells = [f"{m['map50']['value']:.3f} [{m['map50']['ci95_low']:.3f}, {m['map50']['ci95_high']:.3f}]"
                 for m in (r["by_size"][str(s)] for s in SIZES)]
        lines.append(f"| {r['task']} | {r['part']} | {r['split']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Path]:
    from models.loading import model_from_checkpoint
    from utils.checkpoint import load_checkpoint
    from utils.demo import SHIPPED_SIZES, SHIPPED_WEIGHTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=75, help="images per size and split (the demo's val count)")
    p.add_argument("--val-seed", type=int, default=0, help="the demo's default --seed")
    p.add_argument("--test-seed", type=int, default=2)
    p.add_argument("--results-dir", default=str(ROOT / "bench/results/demo-sizes"))
    args = p.parse_args(argv)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, written = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for task in ("detect", "segment"):
            model = model_from_checkpoint(load_checkpoint(SHIPPED_WEIGHTS[task])).eval()
            for split, seed in (("val", args.val_seed), ("test", args.test_seed)):
                scores = {s: score(model, task, s, seed, args.images, Path(tmp)) for s in SIZES}
                for part in scores[SIZES[0]]:
                    rows.append({"task": task, "part": part, "split": split, "seed": seed,
                                 "by_size": {str(s): scores[s][part] for s in SIZES}})
    (out / "demo_sizes.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = to_markdown(rows, SHIPPED_SIZES)
    (out / "demo_sizes.md").write_text(md)
    inside = [s for s in SIZES if SHIPPED_SIZES[0] <= s <= SHIPPED_SIZES[1]]
    for task in ("detect", "segment"):
        tested = [r for r in rows if r["task"] == task and r["split"] == "test"]
        lowest = min(r["by_size"][str(s)]["map50"]["value"] for r in tested for s in inside)
        written.append(write_record(f"demo_shipped_min_map50_{task}", lowest, "mAP50",
                                    str(SHIPPED_WEIGHTS[task].relative_to(ROOT)),
                                    f"built-in shapes, {args.images} test images per size (seed {args.test_seed})",
                                    results_dir=out, extra={"sizes_checked": list(SHIPPED_SIZES), "rows": tested}))
    print(md)
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    run_cli(main)
