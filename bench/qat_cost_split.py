"""Where a quantized model's accuracy cost comes from: its INT8 weights or its INT8 activations.

Takes a ``qat.py quantize`` run folder and scores, on one split, the FP32 model and the PTQ and best
QAT models three ways: every quantizer on (what deploys), the weights' quantizers only (activations
in float), and none (the same weights in float). With a float control in the run, the control too,
and the control quantized after the fact the way the run's PTQ was (same calibration method,
batches and seed): QAT against that row is what training with the quantizers in place gains over
fine-tuning first and quantizing afterwards. What the activations cost, and QAT against the late
PTQ, come with 95% paired bootstrap intervals over the images.

    python bench/qat_cost_split.py --run runs/qat-recipe/lr0.0001-dw1-ep3 --split test
    -> <out>/cost_split.md and .json (default: the run folder)

A diagnosis tool: it writes no record.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from utils.errors import UserError, run_cli  # noqa: E402

MODES = {"all": "every quantizer on", "weights": "INT8 weights only", "none": "no quantizer"}
QAT_VS_LATE = "QAT - (control, then PTQ)"  # training with the quantizers against quantizing after training


def score_three_ways(model: torch.nn.Module, evaluate, per_image: dict) -> dict[str, float]:
    """mAP50-95 with every quantizer on, with the activations' quantizers off, and with none; each
    mode's per-image matches go into ``per_image`` for the paired intervals."""
    from models.quantize import quantization_disabled

    def scored(mode: str) -> float:
        result, matches = evaluate.scored(model)
        per_image[mode] = matches[""]
        return result.map50_95

    out = {"all": scored("all")}
    with quantization_disabled(model, activations_only=True):
        out["weights"] = scored("weights")
    with quantization_disabled(model):
        out["none"] = scored("none")
    return out


def quantized_like_ptq(float_model: torch.nn.Module, ptq: torch.nn.Module, batches) -> torch.nn.Module:
    """``float_model`` prepared (the same layers left in float) and calibrated as the run's ``ptq`` was."""
    from copy import deepcopy

    from models.quantize import calibrate, prepare

    model = prepare(deepcopy(float_model), ptq.quant_info.skip_layers)
    calibrate(model, batches, ptq.quant_info.calibration["method"], ptq.quant_info.calibration["percentile"])
    return model.eval()


def to_markdown(run: Path, split: str, images: int, rows: dict, intervals: dict) -> str:
    lines = [f"# Quantization cost split: {run}", "",
             f"mAP50-95 on {split} ({images} images). Activations cost = weights only - every quantizer on, "
             "with its 95% paired bootstrap interval over the images.", "",
             "| model | " + " | ".join(MODES.values()) + " | activations cost |", "|---" * 5 + "|"]
    for name, r in rows.items():
        if "all" in r:
            cells = [f"{r[m]:.4f}" for m in MODES] + [str(intervals[f"{name}: activations cost"])]
        else:
            cells = ["-", "-", f"{r['none']:.4f}", "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if QAT_VS_LATE in intervals:
        lines += ["", f"{QAT_VS_LATE}, every quantizer on: {intervals[QAT_VS_LATE]}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a qat.py quantize run folder (report.json, weights/)")
    p.add_argument("--split", default="", help="val or test (default: the split the run reported on)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="", help="default: the run folder")
    args = p.parse_args(argv)

    from utils.data.config import load_data_config
    from utils.evaluation.bootstrap import method, paired_delta
    from utils.quantization.checkpoint import load_quantized
    from utils.quantization.pipeline import image_batches, load_float_model, make_evaluator, make_loader
    from utils.torch_utils import select_device

    run = Path(args.run)
    weights = run / "weights"
    if not (run / "report.json").is_file() or not (weights / "ptq.pt").is_file():
        raise UserError(f"--run {run}: not a qat.py quantize run folder (no report.json or weights/ptq.pt)")
    report = json.loads((run / "report.json").read_text())
    split = args.split or report.get("reported_on") or "val"
    device = select_device(args.device)
    ptq, ckpt = load_quantized(weights / "ptq.pt", device)
    opt = argparse.Namespace(**{**ckpt["opt"], "workers": args.workers})
    data = load_data_config(opt.data)
    stride = max(int(ptq.stride.max()), 32)
    evaluate = make_evaluator(opt, data, ptq, split)
    rows = {"FP32": {"none": evaluate(load_float_model(opt.weights, device)).map50_95}}
    per_image: dict[str, dict] = {"PTQ": {}}
    rows["PTQ"] = score_three_ways(ptq, evaluate, per_image["PTQ"])
    if (weights / "control_best.pt").is_file():
        control = load_float_model(weights / "control_best.pt", device)
        rows["control"] = {"none": evaluate(control).map50_95}
        calibration = make_loader(data, "train", opt.imgsz, opt.batch_size, stride, args.workers, shuffle=True,
                                  seed=opt.seed, model=control, weights=opt.weights)
        per_image["control, then PTQ"] = {}
        rows["control, then PTQ"] = score_three_ways(
            quantized_like_ptq(control, ptq, image_batches(calibration, device, opt.calib_batches)), evaluate,
            per_image["control, then PTQ"])
    if (weights / "qat_best.pt").is_file():
        per_image["QAT (best epoch)"] = {}
        rows["QAT (best epoch)"] = score_three_ways(load_quantized(weights / "qat_best.pt", device)[0], evaluate,
                                                    per_image["QAT (best epoch)"])
    intervals = {f"{name}: activations cost": paired_delta(m["weights"], m["all"])["map50_95"]
                 for name, m in per_image.items()}
    if {"QAT (best epoch)", "control, then PTQ"} <= set(per_image):
        intervals[QAT_VS_LATE] = paired_delta(per_image["QAT (best epoch)"]["all"],
                                              per_image["control, then PTQ"]["all"])["map50_95"]
    out = Path(args.out or run)
    out.mkdir(parents=True, exist_ok=True)
    images = len(evaluate.loader.dataset)
    (out / "cost_split.json").write_text(json.dumps(
        {"run": str(run), "split": split, "images": images, "map50_95": rows,
         "intervals": {k: v.to_dict() for k, v in intervals.items()}, "bootstrap": method()}, indent=2) + "\n")
    md = to_markdown(run, split, images, rows, intervals)
    (out / "cost_split.md").write_text(md)
    print(md)
    return rows


if __name__ == "__main__":
    run_cli(main)
