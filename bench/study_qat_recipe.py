"""QAT recipes side by side on one trained FP32 model (issue 13: why QAT did no better than PTQ).

Each variant (learning rate, distillation weight, epochs, optionally warm-up epochs) is a whole
``qat.py quantize --control`` run: its best epoch chosen on val (the PTQ start counting as epoch 0),
every row reported on test with 95% paired bootstrap intervals. The table shows each variant's
val path, which variant val would pick, and what test says of each, so a recipe is judged on
images that chose nothing.

On a CPU, with the demo's model (gelan-demo, trained by ``qat.py demo`` in about two minutes) and
the demo's shapes (same seed, so the same train and val images) plus a test split of their own:

    python qat.py demo --project /tmp/recipe_demo
    python bench/study_qat_recipe.py --weights /tmp/recipe_demo/exp/train/weights/best.pt --shapes 300 \\
        --variants 1e-4:1:3,1e-4:0:3,1e-4:30:3,1e-3:1:3,1e-5:1:3,1e-4:1:10
    -> bench/results/qat-recipe/<model>.md and .json, and qat_recipe_delta_map50_95_<model>_<variant>.json
       (QAT - FP32 on test, with its interval) there

Any other checkpoint and data: ``--weights W --data D --imgsz N --batch-size B --device 0``.
The segmentation demo's shipped model, one calibration method per run (QAT - FP32 is of boxes; the
runs' report.md files hold the mask rows too):

    python bench/study_qat_recipe.py --weights models/demo/gelan-demo-seg.pt --shapes 300 --task segment \
        --calib-method auto --variants 1e-4:1:2 --model gelan-demo-seg-auto --project /tmp/seg_auto
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import write_record  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402


def parse_variants(text: str) -> list[tuple[float, float, int, float, float]]:
    """``lr:distill_weight:epochs[:warmup_epochs[:ema_decay]],...`` -> [(lr, weight, epochs, warmup, ema), ...]."""
    variants = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        fields = item.split(":")
        try:
            optional = [float(f) for f in fields[3:5]] + [0.0] * (5 - max(len(fields), 3))
            variant = (float(fields[0]), float(fields[1]), int(fields[2]), *optional)
        except (ValueError, IndexError):
            variant = None
        if variant is None or len(fields) > 5 or not variant[0] > 0 or variant[1] < 0 or variant[2] < 1 \
                or variant[3] < 0 or not 0 <= variant[4] < 1:
            raise UserError(f"--variants {item!r}: give lr:distill_weight:epochs[:warmup_epochs[:ema_decay]], e.g. "
                            "1e-4:1:3, 1e-4:1:3:1 or 1e-4:1:3:0:0.9 (lr > 0, weight >= 0, epochs >= 1, warm-up >= 0, "
                            "0 <= decay < 1)")
        variants.append(variant)
    if not variants:
        raise UserError("--variants: name at least one lr:distill_weight:epochs")
    return variants


def variant_name(lr: float, weight: float, epochs: int, warmup: float = 0.0, ema: float = 0.0) -> str:
    return f"lr{lr:g}-dw{weight:g}-ep{epochs}" + (f"-wu{warmup:g}" if warmup else "") + (f"-ema{ema:g}" if ema else "")


def hyp_with_warmup(warmup: float, folder: Path) -> Path:
    """data/hyps/hyp.qat.yaml with the learning rate ramped up over ``warmup`` epochs."""
    import yaml

    hyp = yaml.safe_load((ROOT / "data/hyps/hyp.qat.yaml").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"hyp.qat.warmup{warmup:g}.yaml"
    path.write_text(yaml.safe_dump({**hyp, "warmup_epochs": warmup}, sort_keys=False))
    return path


def demo_shapes(out: Path, n_test: int, task: str = "detect") -> tuple[Path, int, int]:
    """The demo's shapes dataset for ``task`` (its defaults: the same train and val images) with
    ``n_test`` test images of its own; returns the data yaml, the demo's image size and its QAT batch."""
    from utils.data.synthetic import make_shapes_dataset
    from utils.demo import RECIPES, add_args

    p = argparse.ArgumentParser()
    add_args(p)
    demo = p.parse_args([])
    data = make_shapes_dataset(out, n_train=demo.images, n_val=max(demo.images // 4, 1), imgsz=demo.imgsz,
                               seed=demo.seed, n_test=n_test, masks=task == "segment")
    return data, demo.imgsz, RECIPES[task].batch_size


def _demo_model(task: str) -> str:
    from utils.demo import CFGS

    return Path(CFGS[task]).stem


def run_variant(args: argparse.Namespace, data: Path, lr: float, weight: float, epochs: int, warmup: float,
                ema: float) -> dict:
    import qat

    name = variant_name(lr, weight, epochs, warmup, ema)
    hyp = ["--hyp", str(hyp_with_warmup(warmup, Path(args.project)))] if warmup else []
    t = time.perf_counter()
    run = qat.main(["quantize", "--weights", args.weights, "--data", str(data), "--imgsz", str(args.imgsz),
                    "--batch-size", str(args.batch_size), "--device", args.device, "--workers", str(args.workers),
                    "--epochs", str(epochs), "--iters", str(args.iters), "--calib-batches", str(args.calib_batches),
                    "--calib-method", args.calib_method, "--lr", f"{lr:g}", "--distill-weight", f"{weight:g}",
                    "--control", "--seed", str(args.seed), "--project", str(args.project), "--name", name,
                    "--ema-decay", f"{ema:g}", "--auto-skip", str(args.auto_skip), "--exist-ok", *hyp])
    report = json.loads((run / "report.json").read_text())
    intervals = {k: v["map50_95"] for k, v in report["intervals"].items()}
    return {"variant": name, "lr": lr, "distill_weight": weight, "epochs": epochs, "warmup_epochs": warmup,
            "ema_decay": ema, "auto_skip": args.auto_skip, "skip_layers": report["skip_layers"],
            "run": str(run),
            "seconds": time.perf_counter() - t, "selected_on": report["selected_on"],
            "reported_on": report["reported"]["split"], "test_images": report["reported"]["images"],
            "val_origin": report["origin"]["map50_95"], "val_ptq": report["ptq"]["map50_95"],
            "val_qat_epochs": [e["map50_95"] for e in report["epochs"]],
            "val_control_epochs": [e["map50_95"] for e in report["control_epochs"]],
            "val_qat_best": report["qat_best"]["map50_95"], "best_epoch": report["qat_best"]["epoch"],
            "test": intervals}


def _delta(iv: dict) -> str:
    return f"{iv['value']:+.4f} [{iv['ci95_low']:+.4f}, {iv['ci95_high']:+.4f}]"


def to_markdown(rows: list[dict], model: str, chosen: str) -> str:
    first = rows[0]
    lines = [f"# QAT recipes on {model}", "",
             f"Chosen on {first['selected_on']} (val mAP50-95 of the FP32 model {first['val_origin']:.4f}); reported "
             f"on {first['reported_on']} ({first['test_images']} images), deltas against the FP32 model with 95% "
             f"paired bootstrap intervals. Val would pick **{chosen}** (the highest best-epoch val score).", "",
             "| variant | val: PTQ start, then each QAT epoch | best epoch | test: PTQ - FP32 | test: QAT - FP32 | "
             "test: control - FP32 | test: QAT - control | s |", "|---" * 8 + "|"]
    for r in rows:
        path = ", ".join(f"{x:.4f}" for x in [r["val_ptq"], *r["val_qat_epochs"]])
        t = r["test"]
        lines.append(f"| {r['variant']} | {path} | {r['best_epoch']} | {_delta(t['ptq_minus_origin'])} | "
                     f"{_delta(t['qat_minus_origin'])} | {_delta(t['control_minus_origin'])} | "
                     f"{_delta(t['qat_minus_control'])} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="trained FP32 checkpoint")
    p.add_argument("--data", default="", help="data yaml with val and test splits (or --shapes)")
    p.add_argument("--shapes", type=int, default=0, help="draw the demo's shapes with this many test images")
    p.add_argument("--task", choices=("detect", "segment"), default="detect",
                   help="with --shapes: boxes, or boxes and masks (the segmentation demo's data)")
    p.add_argument("--variants", default="1e-4:1:3",
                   help="lr:distill_weight:epochs[:warmup_epochs[:ema_decay]], comma separated")
    p.add_argument("--model", default="", help="name in the records (default: gelan-demo with --shapes, else the "
                   "checkpoint's file name)")
    p.add_argument("--imgsz", type=int, default=None, help="default: the demo's with --shapes")
    p.add_argument("--batch-size", type=int, default=None, help="default: the demo's QAT batch with --shapes")
    p.add_argument("--iters", type=int, default=100, help="at most this many batches per QAT epoch")
    p.add_argument("--calib-method", default="auto")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--auto-skip", type=int, default=0,
                   help="every variant keeps the K layers most sensitive on val in floating point")
    p.add_argument("--project", default=str(ROOT / "runs/qat-recipe"), help="the quantize runs go here")
    p.add_argument("--results-dir", default=str(ROOT / "bench/results/qat-recipe"))
    args = p.parse_args(argv)
    variants = parse_variants(args.variants)
    if not Path(args.weights).is_file():
        raise UserError(f"--weights {args.weights}: no such file")
    if bool(args.data) == bool(args.shapes):
        raise UserError("name the data: --data D (with a test split) or --shapes N, not both or neither")
    if args.shapes:
        data, imgsz, batch = demo_shapes(Path(args.project) / "data", args.shapes, args.task)
        args.imgsz, args.batch_size = args.imgsz or imgsz, args.batch_size or batch
        dataset = f"demo shapes, val + {args.shapes} test images"
    else:
        data, dataset = Path(args.data), Path(args.data).stem
    if args.imgsz is None or args.batch_size is None:
        raise UserError("--imgsz and --batch-size are needed with --data")
    model = args.model or (_demo_model(args.task) if args.shapes else Path(args.weights).stem)
    rows = [run_variant(args, data, *v) for v in variants]
    chosen = max(rows, key=lambda r: r["val_qat_best"])["variant"]  # the first of equals
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{model}.json").write_text(json.dumps({"chosen_on_val": chosen, "variants": rows}, indent=2) + "\n")
    md = to_markdown(rows, model, chosen)
    (out / f"{model}.md").write_text(md)
    for r in rows:
        q = r["test"]["qat_minus_origin"]
        write_record(f"qat_recipe_delta_map50_95_{model}_{r['variant']}", q["value"], "mAP50-95 (QAT - FP32)", model,
                     f"{dataset}, {r['reported_on']}", results_dir=out,
                     extra={"ci95_low": q["ci95_low"], "ci95_high": q["ci95_high"],
                            "chosen_on_val": r["variant"] == chosen, **{k: v for k, v in r.items() if k != "test"},
                            "intervals": r["test"]})
    print(md)
    return rows


if __name__ == "__main__":
    run_cli(main)
