"""What ``qat.py quantize / sensitive / eval`` do, as functions of the parsed options.

quantize: evaluate the float model (Origin), quantize and calibrate it (PTQ, ``ptq.pt``), then
fine-tune it with the training engine (QAT, ``qat_last.pt`` / ``qat_best.pt``), evaluating every
epoch, and write ``report.md`` / ``report.json``. With ``--control`` the float model is also
fine-tuned by the same recipe without quantizers (``control_best.pt``). Choices (the best epoch,
auto's calibration method) are made on the ``--task`` split; every row is then evaluated again on
the report split (test by default) with bootstrap intervals for the deltas. Under torchrun only
rank 0 calibrates and evaluates; the calibrated model is broadcast as plain state so every rank
trains the same scales.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
from tqdm import tqdm

from models.loading import ready_model
from models.quantize import (
    CALIB_METHODS,
    amax_state,
    build_quantized,
    collect_stats,
    load_amax,
    load_amax_state,
    parse_skip_layers,
    prepare,
    quant_state,
    set_trainable,
)
from utils.checkpoint import link_checkpoint, load_checkpoint, save_checkpoint
from utils.data.config import load_data_config, load_hyp, require_split
from utils.data.dataset import check_task, create_dataloader, model_task, set_epoch
from utils.errors import UserError
from utils.evaluation import bootstrap
from utils.evaluation.agreement import Agreement, check_reference_task, run_agreement
from utils.evaluation.cached_batches import CachedBatches
from utils.evaluation.evaluator import EvalResult, evaluate
from utils.evaluation.metrics import PerImageStats
from utils.logs import LOGGER
from utils.options import check_flags, check_imgsz, resume_options, typed_flags
from utils.paths import increment_path
from utils.quantization.checkpoint import (
    is_quantized_checkpoint,
    load_quantized,
    make_checkpoint,
    make_float_checkpoint,
)
from utils.quantization.distill import FeatureDistillation, supervised_layers
from utils.quantization.report import MASK_PREFIX, headline, metrics, new_report, score, write_report
from utils.quantization.sensitivity import layer_sensitivity, most_sensitive, quantizable_layers, write_sensitivity
from utils.seeding import epoch_seed, seed_everything
from utils.torch_utils import de_parallel, select_device
from utils.training.acceleration import channels_last, maybe_compile
from utils.training.cuda_graphs import graphs_wanted, maybe_graph, why_eager
from utils.training.distributed import DistInfo, broadcast_object, process_group, same_on_all_ranks
from utils.training.ema import ModelEMA
from utils.training.engine import make_precision, train_one_epoch
from utils.training.loss import build_loss
from utils.training.optim import Warmup, build_optimizer, lr_lambda

# What a resume cannot change: the teacher, the calibration and the evaluation that the report's
# Origin / PTQ rows were measured with, and the optimizer whose state the checkpoint holds.
FIXED_ON_RESUME = ("weights", "data", "imgsz", "task", "conf_thres", "iou_thres", "postprocess", "calib_method",
                   "percentile", "calib_batches", "skip_layers", "auto_skip", "no_eval_origin", "no_eval_ptq",
                   "optimizer")


# ----------------------------------------------------------------------------------------------
# Shared set-up
# ----------------------------------------------------------------------------------------------


def load_float_model(weights: str | Path, device: torch.device, unsafe: bool = False) -> nn.Module:
    """The trained FP32 model, fused (Conv+BN, RepConvN) and in eval mode."""
    ckpt = load_checkpoint(weights, unsafe=unsafe)
    if is_quantized_checkpoint(ckpt):
        raise UserError(f"{weights}: already a PTQ/QAT checkpoint; pass the trained FP32 weights")
    return ready_model(ckpt, weights, device=device, fuse=True).float().eval()


def make_loader(data: dict, split: str, imgsz: int, batch_size: int, stride: int, workers: int, *,
                hyp: dict | None = None, shuffle: bool = False, seed: int = 0, rank: int = -1,
                drop_last: bool = False, model: nn.Module | None = None, weights: str | Path = ""):
    """Evaluation loaders are rect-batched like val.py's; training / calibration ones are square.

    ``model``: the loader serves its task (a segmentation model's batches carry masks), and a
    dataset whose labels do not fit that task is refused, naming ``weights`` and the dataset."""
    evaluation = hyp is None and not shuffle
    task = model_task(model) if model is not None else "detect"
    loader, dataset = create_dataloader(require_split(data, split), imgsz, batch_size, stride, hyp=hyp,
                                        augment=hyp is not None, rect=evaluation, pad=0.5 if evaluation else 0.0,
                                        workers=workers, shuffle=shuffle, prefix=f"{split}: ", seed=seed, rank=rank,
                                        nc=data["nc"], drop_last=drop_last, task=task)
    if model is not None:
        check_task(dataset, str(weights), task)
    return loader


def image_batches(loader, device: torch.device, n: int) -> Iterator[torch.Tensor]:
    """The first ``n`` batches of ``loader`` as float images in [0, 1] on ``device``."""
    n = min(n, len(loader))
    for _, (imgs, *_rest) in tqdm(zip(range(n), loader), total=n, desc="calibration", leave=False):
        yield imgs.to(device, non_blocking=True).float() / 255


@dataclass
class Evaluator:
    """The evaluator on one fixed loader, so that every model of a run is measured on the same images
    (decoded once: ``CachedBatches``).

    Full precision on purpose: a half-precision pass would round the fake-quantized values again.
    """

    data: dict
    loader: object
    conf_thres: float = 0.001
    iou_thres: float = 0.7
    postprocess: str = "nms"

    def __call__(self, model: nn.Module) -> EvalResult:
        return self.scored(model)[0]

    def scored(self, model: nn.Module) -> tuple[EvalResult, dict[str, PerImageStats]]:
        """The result and the per-image matches that bootstrap intervals resample, by metric prefix:
        ``""`` for boxes and, for a segmentation model, ``"mask_"`` for masks."""
        model = de_parallel(model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                result, artifacts = evaluate(model, self.loader, self.data["names"], conf_thres=self.conf_thres,
                                             iou_thres=self.iou_thres, postprocess=self.postprocess)
        finally:
            model.train(was_training)
        LOGGER.info(result.table(per_class=False))
        matches = {"": artifacts.per_image}
        if artifacts.mask_per_image is not None:
            matches[MASK_PREFIX] = artifacts.mask_per_image
        return result, matches


class _StageClock:
    """Adds the wall time of ``with clock(name):`` blocks to ``seconds[name]``, the GPU's queue included."""

    def __init__(self, device: torch.device, seconds: dict):
        self.device, self.seconds = device, seconds

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def make_evaluator(opt: argparse.Namespace, data: dict, model: nn.Module, split: str | None = None) -> Evaluator:
    """The evaluator of ``split`` (default ``--task``) with the run's image size, batch and thresholds."""
    stride = max(int(model.stride.max()), 32)
    check_imgsz(opt.imgsz, stride)
    loader = make_loader(data, split or opt.task, opt.imgsz, opt.batch_size * 2, stride, opt.workers, model=model,
                         weights=opt.weights)
    return Evaluator(data, CachedBatches(loader), opt.conf_thres, opt.iou_thres, opt.postprocess)


def score_name(model: nn.Module) -> str:
    """What ``report.score`` adds up for this model."""
    return "box + mask mAP50-95" if model_task(model) == "segment" else "mAP50-95"


def report_split(task: str, report_task: str | None, data: dict) -> str:
    """The split every row is reported on: ``--report-task``, by default the test split when the
    data has one apart from the ``--task`` split that made the choices; 'none' reports on that one."""
    if report_task is None:
        return "test" if data.get("test") and data.get("test") != data.get(task) else task
    return task if report_task == "none" else report_task


def _run_dir(opt: argparse.Namespace, info: DistInfo) -> Path:
    save_dir = increment_path(Path(opt.project) / opt.name, opt.exist_ok) if info.is_main else None
    return Path(broadcast_object(str(save_dir) if save_dir else None, info))


def _check_classes(model: nn.Module, data: dict, weights) -> None:
    if int(model.nc) != int(data["nc"]):
        raise UserError(f"{weights}: model has {model.nc} classes but the data yaml has {data['nc']}")


# ----------------------------------------------------------------------------------------------
# PTQ
# ----------------------------------------------------------------------------------------------


def calibrate_ptq(model: nn.Module, batches, method: str, percentile: float,
                  evaluate: Evaluator | None, seconds: dict | None = None) -> tuple[str, list[dict]]:
    """Calibrate a prepared model with ``method``, or for 'auto' with each method in turn, keeping
    the one whose PTQ model scores the best mAP50-95. Returns the method used and the trials;
    ``seconds`` receives the time of the statistics pass, the range searches and the evaluations."""
    methods = CALIB_METHODS if method == "auto" else (method,)
    if method != "auto" and method not in CALIB_METHODS:
        raise UserError(f"--calib-method {method}: expected one of {', '.join(CALIB_METHODS)} or auto")
    if method == "auto" and evaluate is None:
        raise ValueError("auto calibration needs an evaluator to choose the method")
    clock = _StageClock(next(model.parameters()).device, seconds if seconds is not None else {})
    with clock("calibration"):
        n = collect_stats(model, batches)
    if n == 0:
        raise UserError("calibration: the training split gave no batches")
    trials = []
    for m in methods:
        with clock("range_search"):
            load_amax(model, m, percentile)
        if evaluate is not None:
            with clock("ptq_evaluation"):
                r = evaluate(model)
            trials.append({"method": m, **metrics(r)})
            LOGGER.info(f"PTQ with {m} calibration: mAP50-95 {r.map50_95:.4f}, mAP50 {r.map50:.4f}")
    chosen = max(trials, key=score)["method"] if len(methods) > 1 else method
    if len(methods) > 1:
        LOGGER.info(f"--calib-method auto: keeping {chosen} (best PTQ mAP50-95 of {', '.join(methods)})")
        load_amax(model, chosen, percentile)
    for t in trials:
        t["chosen"] = t["method"] == chosen
    model.quant_info.calibration = {"method": chosen, "percentile": percentile, "batches": n}
    return chosen, trials


def _auto_skip(float_model: nn.Module, calibrated: nn.Module, k: int, evaluate: Evaluator, ptq_map: float,
               save_dir: Path) -> list[int]:
    rows = layer_sensitivity(float_model, calibrated.quant_info.plan, amax_state(calibrated),
                             quantizable_layers(calibrated), lambda m: score(metrics(evaluate(m))), ptq_map,
                             measure_alone=False)
    write_sensitivity(rows, None, ptq_map, save_dir / "sensitivity", score_name(float_model))
    chosen = most_sensitive(rows, k)
    LOGGER.info(f"--auto-skip {k}: keeping layers {chosen} in floating point")
    return chosen


def run_ptq(opt: argparse.Namespace, float_model: nn.Module, data: dict, evaluate: Evaluator | None,
            report: dict, save_dir: Path, device: torch.device) -> nn.Module:
    """Prepare, calibrate (and with --auto-skip choose float layers), evaluate, save ``ptq.pt``."""
    stride = max(int(float_model.stride.max()), 32)
    loader = make_loader(data, "train", opt.imgsz, opt.batch_size, stride, opt.workers, shuffle=True, seed=opt.seed,
                         model=float_model, weights=opt.weights)
    skip = parse_skip_layers(opt.skip_layers, len(float_model.model))
    model = prepare(deepcopy(float_model), skip)
    method, trials = calibrate_ptq(model, image_batches(loader, device, opt.calib_batches), opt.calib_method,
                                   opt.percentile, evaluate if (evaluate and not opt.no_eval_ptq) else None,
                                   report.setdefault("seconds", {}))
    report["calibration"] = trials if len(trials) > 1 else []
    if opt.auto_skip:
        ptq_map = score(next(t for t in trials if t["chosen"]))
        extra = _auto_skip(float_model, model, opt.auto_skip, evaluate, ptq_map, save_dir)
        amax, calibration = amax_state(model), model.quant_info.calibration
        model = prepare(deepcopy(float_model), sorted(set(skip) | set(extra)), model.quant_info.plan)
        load_amax_state(model, amax)
        model.quant_info.calibration = calibration
    report["skip_layers"] = model.quant_info.skip_layers
    if evaluate is not None and not opt.no_eval_ptq:
        chosen = next(t for t in trials if t["chosen"])
        result = metrics(evaluate(model)) if opt.auto_skip else chosen  # skipping layers changed the model
        report["ptq"] = {**headline(result), "method": method}
    else:
        report["ptq"] = None
    ckpt = make_checkpoint(model, opt=vars(opt), report=report,
                           best_fitness=report["ptq"]["fitness"] if report["ptq"] else 0.0)
    save_checkpoint(ckpt, save_dir / "weights" / "ptq.pt")
    return model


# ----------------------------------------------------------------------------------------------
# QAT
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """A fine-tune the report follows: QAT itself, or the FP32 control trained by the same recipe."""

    name: str  # checkpoints <name>_last.pt / <name>_best.pt, report key <name>_best
    label: str
    history: str  # report key of its per-epoch rows
    distill: bool  # the FP32 model supervises the features
    checkpoint: Callable[..., dict]
    start: str  # report row of the model the fine-tune starts from: "epoch 0", a candidate for the best
    start_file: str | None  # that model's checkpoint in weights/, when the run already wrote it


QAT = Phase("qat", "QAT", "epochs", True, make_checkpoint, "ptq", "ptq.pt")
# Same data, epochs, lr, seed and engine, no quantizers and no teacher: QAT - control is what
# quantization itself costs, with the gain of fine-tuning a little longer taken out.
CONTROL = Phase("control", "Control", "control_epochs", False, make_float_checkpoint, "origin", None)


@dataclass
class ResumeState:
    """Where fine-tuning starts: a fresh run, or the epoch after a ``qat_last.pt``."""

    start_epoch: int = 0
    best_fitness: float = -1.0
    optimizer: dict | None = None
    started: float = 0.0  # perf_counter at the start of the command, for the time to qat_best.pt
    student: dict | None = None  # with --ema-decay: the trained weights (the checkpoint's model is their average)
    ema_updates: int = 0


def finetune(opt: argparse.Namespace, student: nn.Module, teacher: nn.Module, data: dict, hyp: dict,
             evaluate: Evaluator | None, report: dict, save_dir: Path, device: torch.device, info: DistInfo,
             state: ResumeState, phase: Phase = QAT) -> None:
    """QAT epochs with the training engine; the float model supervises through ``FeatureDistillation``
    (the control phase trains ``student``, a float copy, the same way without it)."""
    channels_last(set_trainable(student), device)
    stride = max(int(student.stride.max()), 32)
    batch_per_rank = opt.batch_size // info.world_size
    graphs = graphs_wanted(opt.cuda_graphs, device, compiled=opt.compile, distributed=info.distributed)
    # a compiled or replayed step sees one batch shape: the short last batch of an epoch would run eagerly,
    # beside the graphs' own memory (up to twice the step's), so it is dropped (a new shuffle each epoch)
    replayed = graphs and why_eager(device, info.distributed) is None
    loader = make_loader(data, "train", opt.imgsz, batch_per_rank, stride, opt.workers, hyp=hyp, shuffle=True,
                         seed=opt.seed, rank=info.rank, drop_last=opt.compile or replayed, model=student,
                         weights=opt.weights)
    loss_names = ("box", "seg", "cls", "dfl") if model_task(student) == "segment" else ("box", "cls", "dfl")
    lr0 = opt.lr if opt.lr is not None else hyp["lr0"]
    optimizer = build_optimizer(student, opt.optimizer, lr0, hyp["momentum"], hyp["weight_decay"])
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    lf = lr_lambda(opt.epochs, hyp["lrf"], cosine=True)
    warmup = _warmup(hyp, optimizer, lr0, len(loader))
    loss_fn = build_loss(student, hyp)
    # The average starts at the model the fine-tune starts from (copied before the distillation hooks
    # the student); on a resume that is the saved average, and the student takes back its own weights.
    ema = ModelEMA(student, opt.ema_decay, tau=0, updates=state.ema_updates) \
        if opt.ema_decay > 0 and info.is_main else None
    if state.student is not None:
        student.load_state_dict(state.student)
    shipped = ema.ema if ema is not None else student
    distill = None
    if phase.distill and opt.distill_weight > 0 and opt.supervision_stride > 0:
        layers = supervised_layers(len(student.model), opt.supervision_stride)
        distill = FeatureDistillation(student, teacher, layers, opt.distill_weight, compile=opt.compile,
                                      graphs=graphs)
    model = student
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    forward = maybe_graph(maybe_compile(model, device, opt.compile), device, graphs)
    precision = make_precision(device, opt.amp)
    weights = save_dir / "weights"
    best = state.best_fitness
    if info.is_main and state.start_epoch == 0:
        best = _start_as_best(opt, student, phase, report, weights, state)
    try:
        for epoch in range(state.start_epoch, opt.epochs):
            seed_everything(epoch_seed(opt.seed, epoch, info.rank))
            set_epoch(loader, epoch)
            for g in optimizer.param_groups:
                g["lr"] = lr0 * lf(epoch)
            stats = train_one_epoch(model, loader, loss_fn, optimizer, device=device, epoch=epoch, epochs=opt.epochs,
                                    precision=precision, max_iters=opt.iters, extra_loss_fn=distill,
                                    warmup=warmup, lr_factor=lf(epoch), world_size=info.world_size,
                                    progress=info.is_main, forward=forward, ema=ema)
            if not info.is_main:
                continue
            row = {"epoch": epoch + 1, **dict(zip(loss_names, stats.loss)),
                   "distill_error": distill.take_mean_error() if distill else 0.0,
                   "seconds_per_iter": stats.seconds / max(stats.iters, 1), "lr": lr0 * lf(epoch),
                   # over all processes (each sees as many); fewer than the split's when a replayed step
                   # dropped the short last batch
                   "train_images": stats.images * info.world_size, "train_seconds": stats.seconds}
            fitness = 0.0
            if evaluate is not None:
                t = time.perf_counter()
                r = evaluate(shipped)
                row.update(metrics(r), eval_seconds=time.perf_counter() - t)
                fitness = score(row)
            report[phase.history].append(row)
            improved = fitness > best
            if improved:
                best = fitness
                report[f"{phase.name}_best"] = {**headline(row), "epoch": epoch + 1}
                report[f"seconds_to_{phase.name}_best"] = time.perf_counter() - state.started
                if phase is QAT:
                    report["qat_best_session"] = len(report["sessions"])
            last_ckpt = phase.checkpoint(shipped, epoch=epoch, best_fitness=best, optimizer=optimizer, opt=vars(opt),
                                         report=report)
            if ema is not None:
                last_ckpt.update(updates=ema.updates, student=student.state_dict())
            save_checkpoint(last_ckpt, weights / f"{phase.name}_last.pt")
            if improved:
                save_checkpoint({**last_ckpt, "optimizer": None, "student": None}, weights / f"{phase.name}_best.pt")
            write_report(report, save_dir)
            LOGGER.info(f"{phase.label} epoch {epoch + 1}/{opt.epochs}: mAP50-95 "
                        f"{row.get('map50_95', float('nan')):.4f}, distillation error {row['distill_error']:.2e}")
    except KeyboardInterrupt:
        last = weights / "qat_last.pt"
        if info.is_main and last.is_file():
            raise KeyboardInterrupt(f"{last} holds the last finished QAT epoch; continue with "
                                    f"python qat.py quantize --resume {last}") from None
        raise
    finally:
        if distill is not None:
            distill.remove()


def _warmup(hyp: dict, optimizer: torch.optim.Optimizer, lr0: float, batches: int) -> Warmup | None:
    """The rate ramped up over the first ``warmup_epochs`` (hyp.qat.yaml: none), for recipes that try
    it: QAT's first steps pull the model below its PTQ start, which a warm-up did not prevent on the
    demo model (BENCHMARKS.md, the QAT recipe study)."""
    if hyp.get("warmup_epochs", 0) <= 0:
        return None
    for g in optimizer.param_groups:
        g["initial_lr"] = lr0
    return Warmup(round(hyp["warmup_epochs"] * batches), hyp["warmup_bias_lr"], hyp["warmup_momentum"],
                  hyp["momentum"])


def _start_as_best(opt: argparse.Namespace, student: nn.Module, phase: Phase, report: dict, weights: Path,
                   state: ResumeState) -> float:
    """The model a fine-tune starts from is its epoch 0: ``<phase>_best.pt`` until an epoch scores higher
    on the selection split, so fine-tuning never hands back a model worse there than the one it was given
    (on a small dataset a few epochs can lower the score). Returns the score to beat (-1 when the start
    was not evaluated, as with --no-eval-ptq: then the first epoch is the best so far)."""
    start = report.get(phase.start)
    if not start:
        return state.best_fitness
    best = score(start)
    report[f"{phase.name}_best"] = {**headline(start), "epoch": 0}
    report[f"seconds_to_{phase.name}_best"] = time.perf_counter() - state.started
    if phase is QAT:
        report["qat_best_session"] = 1
    path = weights / f"{phase.name}_best.pt"
    if phase.start_file:  # ptq.pt holds this very model: a second name for it, not a second write
        link_checkpoint(weights / phase.start_file, path)
    else:
        save_checkpoint(phase.checkpoint(student, best_fitness=best, opt=vars(opt), report=report), path)
    return best


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def _resume_options(opt: argparse.Namespace) -> tuple[argparse.Namespace, dict, Path]:
    """The interrupted run's options (with the flags typed again), its qat_last.pt and its folder."""
    path = Path(opt.resume) if isinstance(opt.resume, str) and opt.resume not in ("", "True") \
        else Path(opt.project) / opt.name / "weights" / "qat_last.pt"
    ckpt = load_checkpoint(path)
    if not is_quantized_checkpoint(ckpt):
        raise UserError(f"{path}: a float checkpoint, not a qat_last.pt; continue a train.py run with train.py "
                        f"--resume, or quantize these weights with qat.py quantize --weights {path}")
    if ckpt.get("optimizer") is None or not isinstance(ckpt.get("qat"), dict):
        raise UserError(f"{path}: holds no QAT training state (ptq.pt, qat_best.pt); resume from a qat_last.pt")
    merged = resume_options(ckpt["opt"], vars(opt), typed_flags(opt), FIXED_ON_RESUME, f"--resume {path}")
    return argparse.Namespace(**{**merged, "resume": str(path)}), ckpt, path.parent.parent


def run_quantize(opt: argparse.Namespace) -> Path:
    """``qat.py quantize``: Origin, PTQ and QAT with a report; returns the run folder."""
    t0 = time.perf_counter()
    # Inputs are checked and loaded before the run folder exists: a failed start leaves nothing behind.
    _check_quantize_flags(opt)
    ckpt = save_dir = None
    if opt.resume:  # before the device is chosen: a resume keeps the run's own --device unless typed again
        opt, ckpt, save_dir = _resume_options(opt)
        _check_quantize_flags(opt)
    elif not (opt.weights and opt.data):
        raise UserError("qat.py quantize: pass --weights and --data (or --resume a qat_last.pt)")
    device = select_device(opt.device)
    with process_group(device) as info:
        return _quantize(opt, ckpt, save_dir, device, info, t0)


def _check_ranges_agree(model: nn.Module, info: DistInfo) -> None:
    """Under torchrun, every rank must fine-tune with rank 0's calibrated ranges, bit for bit."""
    if not info.distributed:
        return
    digest = hashlib.sha256()
    for name, amax in sorted(amax_state(model).items()):
        digest.update(name.encode() + amax.detach().float().cpu().numpy().tobytes())
    if not same_on_all_ranks(digest.hexdigest(), info):
        raise RuntimeError("quantizer ranges differ between ranks after the broadcast from rank 0")
    if info.is_main:
        LOGGER.info(f"quantizer ranges identical on all {info.world_size} ranks")


def _check_quantize_flags(opt: argparse.Namespace) -> None:
    """Every flag of ``qat.py quantize`` that can be checked without the model, before any work."""
    check_flags(vars(opt), minimums={"epochs": 0})  # --epochs 0: PTQ only
    if opt.no_eval_ptq and opt.calib_method == "auto":
        raise UserError("--calib-method auto evaluates each method: it cannot be combined with --no-eval-ptq")
    if opt.no_eval_ptq and opt.auto_skip:
        raise UserError("--auto-skip ranks layers by PTQ mAP: it cannot be combined with --no-eval-ptq")


def _quantize(opt: argparse.Namespace, ckpt: dict | None, save_dir: Path | None, device: torch.device,
              info: DistInfo, t0: float) -> Path:
    if opt.batch_size % info.world_size:
        raise UserError(f"--batch-size {opt.batch_size}: must be a multiple of the {info.world_size} processes")
    seed_everything(opt.seed)
    data = load_data_config(opt.data)
    hyp = dict(opt.hyp) if isinstance(opt.hyp, dict) else load_hyp(opt.hyp)
    opt.hyp = hyp  # the checkpoint carries the values, not a path that may change
    teacher = load_float_model(opt.weights, device, opt.unsafe_load)
    _check_classes(teacher, data, opt.weights)
    parse_skip_layers(opt.skip_layers, len(teacher.model))  # before the evaluations, not after them
    if opt.auto_skip >= len(teacher.model):
        raise UserError(f"--auto-skip {opt.auto_skip}: the model has only {len(teacher.model)} layers")
    evaluate = make_evaluator(opt, data, teacher) if info.is_main else None
    if save_dir is None:
        save_dir = _run_dir(opt, info)
    reported_on = report_split(opt.task, opt.report_task, data)

    if ckpt is not None:
        report = {"selected_on": opt.task, "reported_on": reported_on, **ckpt["qat"]}  # older reports lack both
        student = build_quantized(ckpt["quant"], device)
        state = ResumeState(ckpt["epoch"] + 1, float(ckpt["best_fitness"]), ckpt["optimizer"], t0,
                            ckpt.get("student"), int(ckpt.get("updates") or 0))
        if state.start_epoch >= opt.epochs and not opt.control:
            raise UserError(f"{opt.resume}: all {opt.epochs} QAT epochs are done; nothing to resume")
    else:
        report = new_report(opt.weights, opt.data, opt.task, reported_on)
        if info.is_main and not opt.no_eval_origin:
            report["origin"] = metrics(evaluate(teacher))
        report["seconds"] = {"load_and_origin": time.perf_counter() - t0}
        shared = None
        if info.is_main:
            t = time.perf_counter()
            ptq = run_ptq(opt, teacher, data, evaluate, report, save_dir, device)
            report["seconds"]["ptq"] = time.perf_counter() - t
            shared = quant_state(ptq)
        shared = broadcast_object(shared, info)
        student = ptq if info.is_main else build_quantized(shared, device)
        state = ResumeState(started=t0)
    report = broadcast_object(report, info)
    student.to(device)
    _check_ranges_agree(student, info)
    if opt.epochs > 0:
        # Each process of a resumed run keeps its own clock: the pause between them is not run time.
        report.setdefault("sessions", []).append({"first_epoch": state.start_epoch + 1,
                                                  "setup_seconds": time.perf_counter() - t0})
        finetune(opt, student, teacher, data, hyp, evaluate, report, save_dir, device, info, state)
        if opt.control:  # a resumed run starts the control again from its first epoch
            report[CONTROL.history], report["control_best"] = [], None
            finetune(opt, deepcopy(teacher), teacher, data, hyp, evaluate, report, save_dir, device, info,
                     ResumeState(started=t0), CONTROL)
    if info.is_main:
        evaluate_reported_rows(opt, teacher, data, report, save_dir, device, evaluate)
        md, _ = write_report(report, save_dir)
        LOGGER.info(md.read_text())
    return save_dir


# Report row -> how to rebuild its model from the run folder (the teacher is the Origin row).
_ROW_MODELS = {
    "ptq": lambda weights, device: load_quantized(weights / "ptq.pt", device)[0],
    "qat_best": lambda weights, device: load_quantized(weights / "qat_best.pt", device)[0],
    "control_best": lambda weights, device: load_float_model(weights / "control_best.pt", device),
}
# Interval name -> (row, reference row) of each delta the report gives an interval for.
DELTAS = {"ptq_minus_origin": ("ptq", "origin"), "qat_minus_origin": ("qat_best", "origin"),
          "control_minus_origin": ("control_best", "origin"), "qat_minus_control": ("qat_best", "control_best")}


def evaluate_reported_rows(opt: argparse.Namespace, teacher: nn.Module, data: dict, report: dict,
                           save_dir: Path, device: torch.device, selection: Evaluator | None = None) -> None:
    """Every row again on the report split, as chosen on ``--task``, with paired bootstrap intervals
    of the deltas (``report['reported']``, ``report['intervals']``). A report on the ``--task`` split
    replays the ``selection`` evaluator's batches, decoded already."""
    split = report["reported_on"]
    reuse = selection is not None and split == opt.task
    evaluate = selection if reuse else make_evaluator(opt, data, teacher, split)
    rows, matches = {}, {}
    for key in ("origin", *_ROW_MODELS):
        if report.get(key) is None:
            continue
        model = teacher if key == "origin" else _ROW_MODELS[key](save_dir / "weights", device)
        result, matches[key] = evaluate.scored(model)
        rows[key] = {**metrics(result), **{k: report[key][k] for k in ("method", "epoch") if k in report[key]}}
    report["reported"] = {"split": split, "images": len(next(iter(matches.values()))[""]) if matches else 0, **rows}
    report["intervals"] = {name: {prefix + m: iv.to_dict() for prefix in matches[a]
                                  for m, iv in bootstrap.paired_delta(matches[a][prefix], matches[b][prefix]).items()}
                           for name, (a, b) in DELTAS.items() if a in matches and b in matches}
    report["bootstrap"] = bootstrap.method()


def _measured_layers(spec: str, quantized: nn.Module) -> list[int]:
    """``--layers`` of ``qat.py sensitive`` (default: every layer holding an INT8 convolution)."""
    quantizable = quantizable_layers(quantized)
    if not spec:
        return quantizable
    layers = parse_skip_layers(spec, len(quantized.model), flag="--layers")
    if float_layers := sorted(set(layers) - set(quantizable)):
        raise UserError(f"--layers {spec}: layer {', '.join(map(str, float_layers))} holds no INT8 convolution "
                        f"(these do: {','.join(map(str, quantizable))})")
    return layers


def run_sensitive(opt: argparse.Namespace) -> Path:
    """``qat.py sensitive``: per-layer sensitivity table, JSON and bar chart of a calibrated PTQ model."""
    check_flags(vars(opt))
    device = select_device(opt.device)
    data = load_data_config(opt.data)
    float_model = load_float_model(opt.weights, device, opt.unsafe_load)
    _check_classes(float_model, data, opt.weights)
    model = prepare(deepcopy(float_model))
    layers = _measured_layers(opt.layers, model)
    stride = max(int(float_model.stride.max()), 32)
    evaluate = make_evaluator(opt, data, float_model)
    save_dir = increment_path(Path(opt.project) / opt.name, opt.exist_ok)
    fp_map = score(metrics(evaluate(float_model)))
    loader = make_loader(data, "train", opt.imgsz, opt.batch_size, stride, opt.workers, shuffle=True, seed=opt.seed,
                         model=float_model, weights=opt.weights)
    calibrate_ptq(model, image_batches(loader, device, opt.calib_batches), opt.calib_method, opt.percentile,
                  evaluate if opt.calib_method == "auto" else None)
    ptq_map = score(metrics(evaluate(model)))
    rows = layer_sensitivity(float_model, model.quant_info.plan, amax_state(model), layers,
                             lambda m: score(metrics(evaluate(m))), ptq_map)
    for p in write_sensitivity(rows, fp_map, ptq_map, save_dir, score_name(float_model)):
        LOGGER.info(f"wrote {p}")
    return save_dir


def run_eval(opt: argparse.Namespace) -> EvalResult | Agreement:
    """``qat.py eval``: a saved PTQ/QAT checkpoint through the evaluator on ``--data``, and/or its
    label-free agreement with the FP32 ``--reference`` on ``--source`` (results in the run folder)."""
    check_flags(vars(opt))
    if not opt.weights:
        raise UserError("qat.py eval: pass --weights (a PTQ/QAT checkpoint)")
    if bool(opt.reference) != bool(opt.source):
        raise UserError("qat.py eval: --reference (the FP32 checkpoint) and --source (images or videos) go together")
    if not (opt.data or opt.source):
        raise UserError("qat.py eval: pass --data (mAP on its --task split) and/or --reference with --source "
                        "(agreement with the FP32 model)")
    device = select_device(opt.device)
    model, _ = load_quantized(opt.weights, device, opt.unsafe_load)
    stride = max(int(model.stride.max()), 32)
    evaluate = reference = None
    if opt.data:
        data = load_data_config(opt.data)
        _check_classes(model, data, opt.weights)
        evaluate = make_evaluator(opt, data, model)
    if opt.source:
        check_imgsz(opt.imgsz, stride)
        reference = load_float_model(opt.reference, device, opt.unsafe_load)
        if int(reference.nc) != int(model.nc):
            raise UserError(f"{opt.reference}: the reference has {reference.nc} classes but {opt.weights} has "
                            f"{model.nc}")
        check_reference_task(model_task(model), reference, opt.weights, opt.reference)
    save_dir = increment_path(Path(opt.project) / opt.name, opt.exist_ok)
    result = None
    if evaluate is not None:
        result = evaluate(model)
        (save_dir / "results.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        (save_dir / "results.md").write_text(result.markdown())
    if reference is not None:
        agreed = run_agreement(model, reference, opt.source, opt.imgsz, save_dir,
                               f"Agreement of {Path(opt.weights).name} with {Path(opt.reference).name}",
                               candidate_device=device, batch_size=opt.batch_size * 2, postprocess=opt.postprocess,
                               reference_conf=opt.reference_conf, conf_thres=opt.conf_thres, iou_thres=opt.iou_thres)
        return result or agreed
    return result
