"""``python qat.py demo``: the whole INT8 workflow on a built-in dataset, on a CPU, in minutes.

Nothing is downloaded: a deterministic shapes dataset is drawn into the run folder, and a narrow
GELAN (models/demo/gelan-demo.yaml) that this repo ships trained on other images of the same kind
(models/demo/gelan-demo.pt, made by tools/make_demo_weights.py) is quantized (PTQ, QAT), exported
to a Q/DQ ONNX and validated with ONNX Runtime (TensorRT when importable). ``--train`` trains that
model here from scratch first, as a user trains theirs; on a 2-core CPU without bf16 that alone
takes minutes more than everything else. ``--task segment`` draws the shapes with their exact masks
(polygon labels) and runs the same steps with a Segment head (models/demo/gelan-demo-seg.yaml);
every row then has boxes and masks. Each step is the library function its own command uses, so the
demo proves the real pipeline rather than a copy of it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import yaml

from utils.data.synthetic import make_shapes_dataset
from utils.logs import LOGGER
from utils.paths import ROOT, increment_path
from utils.quantization.report import MASK_PREFIX, METRICS, metrics

if TYPE_CHECKING:  # torch itself loads in run_demo: qat.py builds this parser for every subcommand
    import torch

CFGS = {"detect": ROOT / "models/demo/gelan-demo.yaml", "segment": ROOT / "models/demo/gelan-demo-seg.yaml"}
# The FP32 models the demo quantizes unless --train: each CFGS model trained on shapes drawn from a
# seed the demo's own data does not use by default (tools/make_demo_weights.py; the file records how).
SHIPPED_WEIGHTS = {task: cfg.with_suffix(".pt") for task, cfg in CFGS.items()}
SHIPPED_DATA_SEED = 1000  # drew their training images (tools/make_demo_weights.py's default; the files record it)
# Image sizes the shipped models were checked at (tests/test_demo.py): trained at 128 with objects scaled
# +/-50%, both score mAP50 >= 0.83 from 96 to 256 px on the demo's images; at 64 and 320 they fall to
# 0.45-0.84 (BENCHMARKS.md, "Demo, twelfth session").
SHIPPED_SIZES = (96, 256)

# A few hundred optimizer steps from scratch (e.g. 40 epochs of 19 batches): AdamW converges in that
# many where SGD would still be warming up, so its learning rate (the recipe's lr0) replaces SGD's,
# and the bias warmup too (SGD's would start Adam at 0.1). No mosaic: it shrinks the small shapes below
# the stride-8 grid. The loss weights are upstream's.
TRAIN_OPTIMIZER = "AdamW"
TRAIN_HYP_CHANGES = {"lrf": 0.05, "warmup_epochs": 1.0, "mosaic": 0.0, "mixup": 0.0, "scale": 0.3, "translate": 0.1}
# What the detection demo's training does beyond train.py's defaults to fit minutes on 2 CPU cores:
# bf16 autocast where the CPU computes bf16 natively, channels-last convolutions and AdamW's
# multi-tensor step (utils/training/acceleration.py); one validation, after the last epoch (the
# cosine schedule ends at 5% of lr0, so the last epoch's EMA is the one to keep), no plots, and no
# checkpoint of the epochs between the first and the last (the demo offers no resume).
QUICK_TRAINING = {"cpu_speedups": True, "noval": True, "plots": False, "save_every_epoch": False}
@dataclass(frozen=True)
class Recipe:
    """What ``qat.py demo`` does per --task beyond its flags."""

    epochs: int  # FP32 epochs when --epochs is not given
    qat_lr: float  # qat.py quantize --lr
    calib_method: str  # qat.py quantize --calib-method
    quick: bool  # train with QUICK_TRAINING
    batch_size: int = 16  # --batch-size when not given
    lr0: float = 0.003  # AdamW's FP32 learning rate at that batch
    control: bool = False  # qat.py quantize --control: the fine-tune without quantizers, for a study
    hold_lr: int = 0  # train.py --hold-lr: last FP32 epochs at the final LR, a study's convergence window


# Detection, toward the 3-minute goal on 2 CPU cores: 32 quick epochs of batch 32, which costs 30% less
# per image than batch 16 on one CPU thread, at twice batch 16's learning rate (half as many steps:
# at 0.003 they lost 0.04-0.05 FP32 mAP50-95; 0.009 lost QAT 0.011 against FP32 on seed 0, 0.006 stayed
# within 0.01 on seeds 0-2; BENCHMARKS.md, "The demo"); QAT at qat.py quantize's own
# rate (hyp.qat.yaml), which kept QAT closer to FP32 than 0.001 on the 40-epoch model (-0.0098 vs
# -0.0133); auto calibration, since max alone lost 0.11 mAP50-95 on one quick-trained model (seed 0,
# 40 epochs: an outlier range) where entropy lost 0.008, for about 6 s of evaluations.
# Segmentation quantizes the same way: on the shipped model val chose auto + 1e-4 over max + 1e-3, and on
# test QAT - FP32 was -0.004 / -0.008 (boxes / masks) against -0.017 / -0.011 (BENCHMARKS.md, "Demo,
# twelfth session").
RECIPES = {"detect": Recipe(epochs=32, qat_lr=0.0001, calib_method="auto", quick=True, batch_size=32, lr0=0.006),
           "segment": Recipe(epochs=40, qat_lr=0.0001, calib_method="auto", quick=False)}

SAME_INPUT_NOTE = ("\nThe first three rows are qat.py's evaluation (rectangular batches, as val.py); the last two "
                   "feed the exported model's fixed square input to both runtimes, so they differ by the runtime "
                   "alone.\n")


def add_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``qat.py demo``; the defaults finish in minutes on two CPU cores."""
    p.add_argument("--project", default=str(ROOT / "runs/demo"), help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--task", choices=tuple(CFGS), default="detect",
                   help="detect: boxes; segment: boxes and instance masks (polygon labels, a Segment head)")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of numbering a new one")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=128, help="image size (multiple of 32)")
    p.add_argument("--train", action="store_true",
                   help="train the FP32 model here from scratch instead of starting from the shipped "
                        "models/demo/*.pt (minutes more on a CPU)")
    per_task = ", ".join(f"{task} {recipe.epochs}" for task, recipe in RECIPES.items())
    p.add_argument("--epochs", type=int, default=None, help=f"FP32 training epochs with --train (default: {per_task})")
    # 2: on both shipped models a QAT epoch outscored PTQ on val within them (BENCHMARKS.md, "Demo, twelfth
    # session"); a model --train trained needed a third, ~10 s more on the 2-core machine ("The demo")
    p.add_argument("--qat-epochs", type=int, default=2,
                   help="QAT fine-tuning epochs (with --train, 3 took QAT past PTQ for ~10 s more)")
    p.add_argument("--qat-iters", type=int, default=100, help="at most this many batches per QAT epoch")
    p.add_argument("--images", type=int, default=300,
                   help="training images to draw (a quarter as many for val); QAT and --train use them")
    batches = ", ".join(f"{task} {recipe.batch_size}" for task, recipe in RECIPES.items())
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"training and QAT batch; evaluation uses twice it (default: {batches})")
    p.add_argument("--device", default="cpu", help="cpu, or a cuda device such as 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="dataloader workers")
    p.add_argument("--threads", type=int, default=1,
                   help="PyTorch CPU threads; more only pays on an idle machine with cores to spare")


def _train_hyp(lr0: float) -> dict:
    hyp = yaml.safe_load((ROOT / "data/hyps/hyp.scratch-high.yaml").read_text())
    return {**hyp, **TRAIN_HYP_CHANGES, "lr0": lr0, "warmup_bias_lr": lr0}


def _quantize_options(opt: argparse.Namespace, weights: Path, data: Path, project: Path,
                      recipe: Recipe) -> argparse.Namespace:
    """``qat.py quantize``'s own defaults, sized for the demo; parsing them keeps every option present."""
    from utils.quantization.options import quantize_options

    return quantize_options(["--weights", str(weights), "--data", str(data), "--imgsz", str(opt.imgsz),
                       "--batch-size", str(opt.batch_size), "--device", opt.device, "--workers", str(opt.workers),
                       "--epochs", str(opt.qat_epochs), "--iters", str(opt.qat_iters), "--calib-batches", "8",
                       "--calib-method", recipe.calib_method, *(["--control"] if recipe.control else []),
                       "--seed", str(opt.seed), "--lr", str(recipe.qat_lr), "--project", str(project),
                       "--name", "qat", "--exist-ok"])


def start_note(qat_best: dict | None) -> str:
    """Why the QAT row can equal the PTQ row: the fine-tune's epoch 0 is the PTQ model itself."""
    if not qat_best or qat_best.get("epoch") != 0:
        return ""
    return ("\nQAT (best) is the PTQ model itself: no QAT epoch scored higher on the validation split, and "
            "qat.py keeps the model a fine-tune started from unless one does.\n")


def table(rows: dict[str, dict | None]) -> str:
    """Markdown table of AP50-95, AP50, P, R per model (a dash where a step did not run); a
    segmentation model's rows come in pairs, boxes then masks."""
    masks = any(m and MASK_PREFIX + "map50_95" in m for m in rows.values())
    lines = ["| Model | " + " | ".join(label for _, label in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, m in rows.items():
        for suffix, prefix in ((", boxes", ""), (", masks", MASK_PREFIX)) if masks else (("", ""),):
            cells = [f"{m[prefix + k]:.4f}" for k, _ in METRICS] if m else ["-"] * len(METRICS)
            lines.append(f"| {name}{suffix} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_demo(opt: argparse.Namespace) -> Path:
    """Data -> FP32 training -> PTQ + QAT -> Q/DQ ONNX -> ONNX Runtime / TensorRT check; returns the run folder."""
    import torch

    from utils.torch_utils import cpu_threads, flush_denormals, select_device

    device = select_device(opt.device)  # a missing GPU is reported before anything is written
    # This model's convolutions are too small to split across threads: on a 2-core machine that
    # other jobs shared, two threads slowed training 5-7x while one held steady.
    on_cpu = device.type == "cpu"
    with cpu_threads(opt.threads if on_cpu else torch.get_num_threads()), \
            flush_denormals() if on_cpu else contextlib.nullcontext():
        return _run_demo(opt, device)


def _run_demo(opt: argparse.Namespace, device: torch.device) -> Path:
    from utils.errors import UserError
    from utils.options import check_flags

    recipe = RECIPES[opt.task]
    if opt.epochs is not None and not opt.train:
        raise UserError(f"--epochs {opt.epochs}: FP32 epochs only count with --train (the demo otherwise starts "
                        f"from {SHIPPED_WEIGHTS[opt.task].relative_to(ROOT)})")
    opt.epochs = recipe.epochs if opt.epochs is None else opt.epochs
    opt.batch_size = recipe.batch_size if opt.batch_size is None else opt.batch_size
    check_flags(vars(opt))
    if opt.imgsz < 64:
        raise UserError(f"--imgsz {opt.imgsz}: the demo draws its shapes on images of at least 64 pixels")
    shipped = SHIPPED_WEIGHTS[opt.task]
    if not opt.train and not shipped.is_file():
        raise UserError(f"{shipped}: the demo's trained model is missing; pass --train to train one here, "
                        f"or make it with tools/make_demo_weights.py --task {opt.task}")
    t0 = time.perf_counter()
    save_dir = increment_path(Path(opt.project) / opt.name, opt.exist_ok)
    LOGGER.info(f"demo: drawing {opt.images} + {max(opt.images // 4, 1)} shape images into {save_dir / 'data'}")
    data = make_shapes_dataset(save_dir / "data", n_train=opt.images, n_val=max(opt.images // 4, 1),
                               imgsz=opt.imgsz, seed=opt.seed, masks=opt.task == "segment")
    if opt.train:
        rows, written, _ = run_workflow(CFGS[opt.task], data, opt, save_dir, device, recipe=recipe)
    else:
        LOGGER.info(f"demo: starting from {shipped.relative_to(ROOT)}, trained by this repo on other shape "
                    f"images (--train trains it here)")
        low, high = SHIPPED_SIZES
        if not low <= opt.imgsz <= high:
            LOGGER.warning(f"demo: the shipped model was checked at {low}-{high} px; at --imgsz {opt.imgsz} it "
                           f"finds fewer shapes (--train trains a model at this size)")
        if opt.seed == SHIPPED_DATA_SEED:
            LOGGER.warning(f"demo: --seed {opt.seed} draws the images the shipped model was trained on, so its "
                           f"scores are not on new images; another seed draws new ones")
        rows, written, _ = quantize_and_check(shipped, data, opt, save_dir, device, recipe=recipe)
    md = table(rows) + SAME_INPUT_NOTE + start_note(rows["QAT (best)"])
    seconds = time.perf_counter() - t0
    (save_dir / "demo.md").write_text(f"# qat.py demo --task {opt.task} ({seconds:.0f} s, imgsz {opt.imgsz})\n\n{md}")
    (save_dir / "demo.json").write_text(json.dumps({"rows": rows, "seconds": seconds, "imgsz": opt.imgsz,
                                                    "task": opt.task, "files": {k: str(v) for k, v in written.items()}},
                                                   indent=2) + "\n")
    print(f"\nqat.py demo finished in {seconds:.0f} s (validation split of {data.parent.name}, imgsz {opt.imgsz})\n")
    print(md)
    print("Wrote:")
    for key, path in {**written, "table": save_dir / "demo.md"}.items():
        print(f"  {key:13s} {path}")
    return save_dir


def run_workflow(cfg: str | Path, data: Path, opt: argparse.Namespace, save_dir: Path, device: torch.device,
                 convert: Callable[[Path], Path] | None = None,
                 on_epoch_end: Callable[[int, dict], None] | None = None, *,
                 recipe: Recipe) -> tuple[dict, dict, dict]:
    """Train ``cfg`` from scratch on ``data``, quantize the best weights (PTQ + QAT), export the QAT
    model to a raw Q/DQ ONNX and evaluate it on ONNX Runtime (TensorRT where usable), and the QAT
    model in PyTorch on the very same input. ``convert`` turns the trained weights into the ones to
    quantize (e.g. a dual model reparameterized); ``on_epoch_end`` is the trainer's hook; ``recipe``
    says how to train and quantize beyond ``opt``'s sizes.

    Returns the table rows (``report.metrics`` dicts), the files written and each stage's seconds.
    """
    t = time.perf_counter()
    train_dir = train_fp32(cfg, data, opt, save_dir, recipe=recipe, on_epoch_end=on_epoch_end)
    train_seconds = time.perf_counter() - t
    rows, written, seconds = quantize_and_check(train_dir / "weights" / "best.pt", data, opt, save_dir, device, convert,
                                                recipe=recipe)
    return rows, {"train": train_dir, **written}, {"train": train_seconds, **seconds}


def train_fp32(cfg: str | Path, data: Path, opt: argparse.Namespace, save_dir: Path, *, recipe: Recipe,
               on_epoch_end: Callable[[int, dict], None] | None = None, hyp_changes: dict | None = None) -> Path:
    """Train ``cfg`` from scratch on ``data`` with the demo's recipe (``opt``'s sizes, ``hyp_changes``
    over the recipe's hyperparameters); returns the run folder, ``save_dir/train``."""
    from utils.training.trainer import train

    return train(cfg=str(cfg), data=str(data), hyp={**_train_hyp(recipe.lr0), **(hyp_changes or {})},
                 epochs=opt.epochs, batch_size=opt.batch_size, imgsz=opt.imgsz, device=opt.device,
                 workers=opt.workers, project=str(save_dir), name="train", exist_ok=True, seed=opt.seed, patience=0,
                 cos_lr=True, optimizer=TRAIN_OPTIMIZER, nominal_batch=opt.batch_size, min_warmup_iters=0,
                 on_epoch_end=on_epoch_end, hold_lr=recipe.hold_lr, **(QUICK_TRAINING if recipe.quick else {}))


def quantize_and_check(fp32: Path, data: Path, opt: argparse.Namespace, save_dir: Path, device: torch.device,
                       convert: Callable[[Path], Path] | None = None, *, recipe: Recipe
                       ) -> tuple[dict, dict, dict]:
    """``run_workflow`` after training: (convert,) PTQ + QAT, export, ONNX Runtime / PyTorch checks."""
    from utils.data.config import load_data_config
    from utils.deployment import backends
    from utils.deployment.export import export_checkpoint
    from utils.deployment.validate import evaluate_exported
    from utils.deployment.validate import run as validate_exported
    from utils.quantization.checkpoint import load_quantized
    from utils.quantization.pipeline import run_quantize

    seconds, t = {}, time.perf_counter()
    if convert is not None:
        fp32 = convert(fp32)
    qat_dir = run_quantize(_quantize_options(opt, fp32, data, save_dir, recipe))
    report = json.loads((qat_dir / "report.json").read_text())
    seconds["quantize"], t = time.perf_counter() - t, time.perf_counter()

    qat_best = qat_dir / "weights" / ("qat_best.pt" if opt.qat_epochs > 0 else "ptq.pt")
    onnx = export_checkpoint(qat_best, include=("onnx",), imgsz=opt.imgsz, device="cpu",
                             exist_ok=opt.exist_ok)[0].path
    backend = "tensorrt" if backends.have_tensorrt() and opt.device != "cpu" else "onnxruntime"
    checked = validate_exported(onnx=onnx, data=data, imgsz=opt.imgsz, batch_size=opt.batch_size, backend=backend,
                                device="" if opt.device == "cpu" else opt.device, workers=opt.workers,
                                project=save_dir, name="onnx_int8", exist_ok=True)
    same_input, _ = evaluate_exported(load_quantized(qat_best, device)[0], load_data_config(data), opt.imgsz,
                                      opt.batch_size, "val", "nms", conf_thres=0.001, iou_thres=0.7,
                                      max_det=300, workers=opt.workers, device=device)
    seconds["export_and_check"] = time.perf_counter() - t
    square = f"{opt.imgsz}x{opt.imgsz} input"
    rows = {"Origin (FP32)": report["origin"], f"PTQ ({report['ptq']['method']})" if report["ptq"] else "PTQ":
            report["ptq"], "QAT (best)": report["qat_best"],
            f"QAT in PyTorch, {square}": metrics(same_input),
            f"ONNX INT8 ({checked['backend']}), {square}": metrics(checked["eval"])}
    written = {"data": data, "fp32_weights": fp32,
               "ptq_weights": qat_dir / "weights" / "ptq.pt", "qat_weights": qat_best,
               "qat_report": qat_dir / "report.md",
               "onnx": onnx, "onnx_eval": Path(checked["save_dir"]) / "results.md"}
    return rows, written, seconds
