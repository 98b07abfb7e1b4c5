"""The accuracy study of issue 13: six BCCD models, FP32 -> PTQ -> QAT (+ control) -> ONNX Runtime,
every delta with a 95% interval (GPU; the lead runs it on the device).

Each model is trained from scratch on BCCD (gelan-t, -s, -m, -c, -e, and yolov9-s with its auxiliary
branch, converted by tools/reparameterize.py into gelan-s form) and checked for convergence; then
``qat.py quantize --calib-method auto --control`` chooses on BCCD val and reports every row on BCCD
test with paired bootstrap intervals (with several --qat-lrs, once per learning rate, val choosing the
rate as it chooses the epoch); the chosen run's cost is split between INT8 weights and INT8
activations (bench/qat_cost_split.py); the QAT model is exported, run on ONNX Runtime, and scored
without labels against its FP32 model on the BCCD test images and on COCO128's 256 images.

    python bench/study_accuracy.py prepare --imgsz 320      # here, once: .data/ to carry to the device
    python bench/study_accuracy.py all --gpus 0,1 --per-gpu 3 --out $OUT     # device: stages A and B
    python bench/study_accuracy.py train ...                # stage A alone; quantize: stage B alone
    python bench/study_accuracy.py all --dry-run            # CPU: the whole path at 64 px, 1 epoch, few images

Stages run their models as child processes (`... job <stage> <model>`), the slowest first, spread
over the GPUs (--per-gpu at a time on each), each stage stopping its jobs at its time limit. The
FP32 weights of gelan-m/c/e (40-115 MB) cannot travel between device commands (at most 16 MiB a
file come back), so `all` runs both stages in one command; `train` copies back the weights that fit.

Records (bench/results/, or --results): fp32_val_map50_95_<model> (with the convergence check),
ptq_delta_map50_95_<model>, qat_delta_map50_95_<model>, qat_minus_control_map50_95_<model>,
ort_int8_minus_qat_map50_95_<model>, int8_agreement_map50_95_<model> (BCCD test) and
int8_agreement_coco128_map50_95_<model>, each with ci95_low / ci95_high and selected_on in extra.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.convergence import TOLERANCE, WINDOW, convergence, hold_epochs, val_history  # noqa: E402
from bench.record import this_command, write_record  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402

# Study name -> (config trained from scratch, config it is converted into before quantizing).
MODELS = {"gelan-t": ("gelan-t.yaml", None), "gelan-s": ("gelan-s.yaml", None), "gelan-m": ("gelan-m.yaml", None),
          "gelan-c": ("gelan-c.yaml", None), "gelan-e": ("gelan-e.yaml", None),
          "yolov9-s-converted": ("yolov9-s.yaml", "gelan-s.yaml")}
# Relative cost of a training step (GFLOPs and depth), to start the slowest first and balance the GPUs.
COST = {"gelan-e": 6.0, "gelan-c": 4.0, "gelan-m": 3.5, "yolov9-s-converted": 2.5, "gelan-s": 1.5, "gelan-t": 1.0}
DATASET = "BCCD"
BCCD_VOC = ROOT.parent / "shared" / "datasets" / "bccd" / "BCCD"
COCO128 = ROOT.parent / "shared" / "datasets" / "coco128" / "images"
RESULT_FILES = ("results.csv", "train_summary.json", "convergence.json", "report.md", "report.json",
                "agreement_bccd_test.json", "agreement_bccd_test.md", "agreement_coco128.json",
                "agreement_coco128.md", "ort.json", "cost_split.json", "cost_split.md")
# The records a model's jobs write (<name>_<model>.json), by stage. A stage packs only its own: the
# device's copy of the checkout also holds git's last study's records, which a stage run in its own
# command would otherwise send back as if it had written them.
RECORDS = {"train": ("fp32_val_map50_95",),
           "quantize": ("ptq_delta_map50_95", "qat_delta_map50_95", "qat_minus_control_map50_95",
                        "ort_int8_minus_qat_map50_95", "int8_agreement_map50_95", "int8_agreement_coco128_map50_95")}
QAT_EPOCHS = 15  # 195 steps on BCCD; with 3 the QAT models had not yet climbed back above their PTQ start on val
MAX_RETURNED_FILE = 15 * 2 ** 20  # the device gives back files of at most 16 MiB
COMMAND_VARIABLE = "STUDY_COMMAND"  # the study's command line, handed to its jobs for their records


# ----------------------------------------------------------------------------------------------
# Data: BCCD in YOLO form with real image copies (links do not travel), COCO128 shrunk
# ----------------------------------------------------------------------------------------------


def prepare(out: Path, imgsz: int, subset: dict[str, int] | None = None) -> Path:
    """BCCD converted into ``out/bccd`` (a yaml with a path relative to the project when it can be)
    and COCO128's images shrunk so that their long side is ``imgsz`` into ``out/coco128``.

    ``subset`` keeps the first N images of each split (the dry run). Returns the data yaml.
    """
    import cv2
    import yaml

    from tools import voc2yolo

    bccd = out / "bccd"
    voc2yolo.convert_voc(BCCD_VOC, bccd, splits=("train", "val", "test"), exist_ok=True)
    data = yaml.safe_load((bccd / "data.yaml").read_text())
    for split in ("train", "val", "test"):
        images = sorted((bccd / "images" / split).iterdir())
        for link in images:
            if link.is_symlink():
                target = link.resolve()
                link.unlink()
                shutil.copyfile(target, link)
        if subset:
            keep = images[:subset[split]]
            listing = bccd / f"{split}.txt"
            listing.write_text("".join(f"./images/{split}/{p.name}\n" for p in keep))
            data[split] = listing.name
    data["path"] = os.path.relpath(bccd.resolve(), ROOT) if bccd.resolve().is_relative_to(ROOT) else str(bccd)
    (bccd / "bccd.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    for folder in ("train2017", "val2017"):
        target = out / "coco128" / folder
        target.mkdir(parents=True, exist_ok=True)
        files = sorted((COCO128 / folder).glob("*.jpg"))[:subset["coco"] if subset else None]
        for f in files:
            image = cv2.imread(str(f))
            scale = imgsz / max(image.shape[:2])
            if scale < 1:
                image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                                   interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(target / f.name), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    print(f"prepared {bccd / 'bccd.yaml'} and {out / 'coco128'} (long side {imgsz})")
    return bccd / "bccd.yaml"


# ----------------------------------------------------------------------------------------------
# The plan every job reads
# ----------------------------------------------------------------------------------------------


@dataclass
class Plan:
    root: str  # study folder: <root>/<model>/{fp32,qat}/...
    data: str  # BCCD data yaml
    unlabelled: dict  # agreement set -> image folders
    results: str  # records folder
    imgsz: int = 320
    epochs: dict = field(default_factory=dict)  # model -> FP32 epochs
    close_mosaic: float = 0.3  # share of the epochs at the end without mosaic (ends before the check window)
    batch: int = 32
    qat_batch: int = 16
    qat_epochs: int = QAT_EPOCHS
    qat_lrs: list = field(default_factory=lambda: [1e-4])  # fine-tune learning rates tried; val chooses
    qat_iters: int = 200
    calib_batches: int = 16
    workers: int = 4
    threads: int = 4  # CPU threads per job (PyTorch on CPU, ONNX Runtime)
    device: str = "0"  # as each job sees it (one GPU each)
    window: float = WINDOW  # convergence: the share of the epochs at the end, trained at the final LR ...
    tolerance: float = TOLERANCE  # ... in which validation mAP50-95 may rise by less than this
    reference_conf: float = 0.25  # agreement: the FP32 detections that count as ground truth
    deadline: float = 0.0  # time.time() by which the running stage must be done
    fp32_dir: str = ""  # carried FP32 weights (<model>.pt), when stage B runs in a later command

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> "Plan":
        return cls(**json.loads(Path(path).read_text()))

    def run_dir(self, model: str) -> Path:
        return Path(self.root) / model


def fp32_weights(plan: Plan, model: str) -> Path:
    """The FP32 checkpoint stage B quantizes: carried in, or the converted / best weights of stage A."""
    carried = Path(plan.fp32_dir) / f"{model}.pt" if plan.fp32_dir else None
    if carried and carried.is_file():
        return carried
    weights = plan.run_dir(model) / "fp32" / "weights"
    path = weights / ("converted.pt" if MODELS[model][1] else "best.pt")
    if not path.is_file():
        raise UserError(f"{path}: no FP32 weights for {model}; run stage A (train) first in this command, "
                        f"or carry them and pass --fp32-dir")
    return path


# ----------------------------------------------------------------------------------------------
# Jobs: one child process per model and stage, on one GPU each
# ----------------------------------------------------------------------------------------------


def spread(models: list[str], gpus: list[str]) -> dict[str, list[str]]:
    """Models per GPU, slowest first, each to the GPU with the least work so far."""
    load, queues = {g: 0.0 for g in gpus}, {g: [] for g in gpus}
    for m in sorted(models, key=lambda m: -COST[m]):
        g = min(gpus, key=lambda g: load[g])
        load[g] += COST[m]
        queues[g].append(m)
    return queues


def run_jobs(stage: str, models: list[str], gpus: list[str], per_gpu: int, plan_file: Path, deadline: float,
             logs: Path) -> dict[str, str]:
    """Run ``job <stage> <model>`` for every model, at most ``per_gpu`` at a time on each GPU; jobs
    still running at ``deadline`` are stopped. Returns model -> how its job ended."""
    logs.mkdir(parents=True, exist_ok=True)
    queues, running, status = spread(models, gpus), {}, {}
    while any(queues.values()) or running:
        for gpu, queue in queues.items():
            while queue and sum(1 for _, g, _ in running.values() if g == gpu) < per_gpu:
                model = queue.pop(0)
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": "" if gpu == "cpu" else gpu, "PYTHONUNBUFFERED": "1",
                       COMMAND_VARIABLE: this_command()}
                log = open(logs / f"{stage}-{model}.log", "w")
                proc = subprocess.Popen([sys.executable, __file__, "job", stage, model, "--plan", str(plan_file)],
                                        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                running[model] = (proc, gpu, log)
                print(f"{stage}: {model} started on {'the CPU' if gpu == 'cpu' else 'GPU ' + gpu}")
        time.sleep(1.0)
        for model, (proc, gpu, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                status[model] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
                print(f"{stage}: {model} {status[model]}")
                del running[model]
        if time.time() > deadline and running:
            for model, (proc, _, log) in running.items():
                _stop(proc)
                log.close()
                status[model] = "stopped at the stage's time limit"
                print(f"{stage}: {model} {status[model]}")
            running.clear()
            for queue in queues.values():
                status.update({m: "not started before the time limit" for m in queue})
                queue.clear()
    return status


def _stop(proc: subprocess.Popen) -> None:
    """End a job and every process it started (its loader workers too)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


# ----------------------------------------------------------------------------------------------
# Stage A in a job: train, convert, check convergence
# ----------------------------------------------------------------------------------------------


class _OutOfTime(Exception):
    """Raised between epochs when the next epoch would not end before the stage's time limit."""


def job_train(plan: Plan, model: str) -> None:
    import train as train_cli
    from utils.training.trainer import train

    cfg, converted_cfg = MODELS[model]
    epochs = int(plan.epochs[model])
    run = plan.run_dir(model) / "fp32"
    argv = ["--cfg", cfg, "--data", plan.data, "--hyp", str(ROOT / "data/hyps/hyp.bccd.yaml"), "--optimizer", "AdamW",
            "--epochs", str(epochs), "--batch-size", str(plan.batch), "--imgsz", str(plan.imgsz),
            "--workers", str(plan.workers), "--cache", "ram", "--close-mosaic", str(round(plan.close_mosaic * epochs)),
            "--hold-lr", str(hold_epochs(epochs, plan.window)),
            "--patience", "0", "--device", plan.device, "--project", str(run.parent), "--name", run.name,
            "--exist-ok", "--seed", "0"]
    started, last = time.time(), [time.time()]

    def guard(epoch: int, _metrics: dict) -> None:
        seconds, last[0] = time.time() - last[0], time.time()
        if epoch + 1 < epochs and time.time() + 1.5 * seconds + 30 > plan.deadline:  # 30 s: convert and record
            raise _OutOfTime(epoch)

    stopped = None
    try:
        # best.pt and last.pt only when they change: a gelan-e checkpoint with its optimizer is ~0.9 GB
        train(train_cli.parse_args(argv), on_epoch_end=guard, save_every_epoch=False)
    except _OutOfTime as stop:
        stopped = f"stopped after epoch {stop.args[0] + 1} of {epochs} at the stage's time limit"
        print(stopped)
    best = run / "weights" / "best.pt"
    if converted_cfg:
        from tools import reparameterize

        reparameterize.main(["--weights", str(best), "--cfg", converted_cfg,
                             "--output", str(run / "weights" / "converted.pt")])
    history = val_history(run / "results.csv")
    check = {**convergence(history, plan.window, plan.tolerance), "stopped": stopped,
             "wall_seconds": time.time() - started}
    (run / "convergence.json").write_text(json.dumps({"map50_95_by_epoch": history, **check}, indent=2) + "\n")
    summary = json.loads((run / "train_summary.json").read_text()) if (run / "train_summary.json").exists() else {}
    best_epoch = summary.get("best_epoch", int(np.argmax(history)) + 1)  # 1-based, as train_summary.json
    _record(plan, f"fp32_val_map50_95_{model}", history[best_epoch - 1], "mAP50-95", model, f"{DATASET} val",
            {**check, "cfg": cfg, "converted_to": converted_cfg, "best_epoch": best_epoch, "epochs_planned": epochs,
             "imgsz": plan.imgsz, "batch": plan.batch, "selected_on": "val",
             "train_seconds": summary.get("train_seconds"), "run": str(run)})
    print(f"{model}: val mAP50-95 {history[best_epoch - 1]:.4f} at epoch {best_epoch}; "
          f"{'converged' if check['converged'] else 'NOT converged'} ({check})")


# ----------------------------------------------------------------------------------------------
# Stage B in a job: auto calibration + QAT with control, export, ONNX Runtime, agreement
# ----------------------------------------------------------------------------------------------


def _ci(interval: dict) -> dict:
    return {"ci95_low": interval["ci95_low"], "ci95_high": interval["ci95_high"]}


def _record(plan: Plan, name: str, value: float, unit: str, model: str, dataset: str, extra: dict) -> Path:
    """A record named after the study command that ran the job (the job's own command line is internal)."""
    return write_record(name, value, unit, model, dataset, command=os.environ.get(COMMAND_VARIABLE), extra=extra,
                        results_dir=Path(plan.results))


def job_quantize(plan: Plan, model: str) -> None:
    """``qat.py quantize --control`` once per learning rate of the plan; the run whose best QAT model
    scores highest on val (where its epoch was chosen too) gives the records, its control having
    been fine-tuned at the same rate."""
    import qat
    from bench.qat_cost_split import main as cost_split
    from utils.quantization.report import score

    weights = fp32_weights(plan, model)
    runs = []
    for lr in plan.qat_lrs:
        run = qat.main(["quantize", "--weights", str(weights), "--data", plan.data, "--imgsz", str(plan.imgsz),
                        "--batch-size", str(plan.qat_batch), "--epochs", str(plan.qat_epochs), "--iters",
                        str(plan.qat_iters), "--lr", f"{lr:g}", "--calib-method", "auto", "--calib-batches",
                        str(plan.calib_batches), "--control", "--device", plan.device, "--workers", str(plan.workers),
                        "--project", str(plan.run_dir(model)), "--name", qat_run_name(plan, lr), "--exist-ok"])
        runs.append((lr, run, json.loads((run / "report.json").read_text())))
    lr, run, report = max(runs, key=lambda r: score(r[2]["qat_best"]))  # the first of equals
    candidates = [{"lr": x, "run": str(r), "val_qat_best_map50_95": rep["qat_best"]["map50_95"],
                   "val_qat_best_epoch": rep["qat_best"]["epoch"], "chosen": x == lr} for x, r, rep in runs]
    write_quantize_records(plan, model, report, run, {"lr": lr, "lr_candidates": candidates})
    cost_split(["--run", str(run), "--device", plan.device, "--workers", str(plan.workers)])  # weights or activations
    ort_and_agreement(plan, model, weights, run / "weights" / "qat_best.pt")


def qat_run_name(plan: Plan, lr: float) -> str:
    """The run folder of one learning rate: ``qat``, or ``qat-lr<lr>`` when the plan tries several."""
    return "qat" if len(plan.qat_lrs) == 1 else f"qat-lr{lr:g}"


def write_quantize_records(plan: Plan, model: str, report: dict, run: Path, recipe: dict) -> None:
    """PTQ - FP32, QAT - FP32 and QAT - control on the report split, with their intervals; ``recipe``
    (the learning rate val chose, and every one tried) goes into each record's extra."""
    reported, intervals = report["reported"], report["intervals"]
    common = {"selected_on": report["selected_on"], "reported_on": reported["split"], "images": reported["images"],
              "imgsz": plan.imgsz, "bootstrap": report["bootstrap"], "run": str(run), **recipe}
    fp32 = reported["origin"]["map50_95"]
    dataset = f"{DATASET} {reported['split']}"
    ptq = intervals["ptq_minus_origin"]["map50_95"]
    _record(plan, f"ptq_delta_map50_95_{model}", ptq["value"], "mAP50-95", model, dataset,
            {**_ci(ptq), **common, "fp32_map50_95": fp32, "ptq_map50_95": reported["ptq"]["map50_95"],
             "method": reported["ptq"]["method"], "calibration_trials": report["calibration"]})
    q = intervals["qat_minus_origin"]["map50_95"]
    _record(plan, f"qat_delta_map50_95_{model}", q["value"], "mAP50-95", model, dataset,
            {**_ci(q), **common, "fp32_map50_95": fp32, "qat_map50_95": reported["qat_best"]["map50_95"],
             "qat_map50": reported["qat_best"]["map50"], "best_epoch": reported["qat_best"]["epoch"],
             "epochs": plan.qat_epochs, "iters": plan.qat_iters, "calibration": reported["ptq"]["method"]})
    c = intervals["qat_minus_control"]["map50_95"]
    _record(plan, f"qat_minus_control_map50_95_{model}", c["value"], "mAP50-95", model, dataset,
            {**_ci(c), **common, "control_map50_95": reported["control_best"]["map50_95"],
             "control_best_epoch": reported["control_best"]["epoch"],
             "control_minus_fp32": intervals["control_minus_origin"]["map50_95"], "epochs": plan.qat_epochs})


def ort_and_agreement(plan: Plan, model: str, fp32: Path, qat_best: Path) -> None:
    """ONNX Runtime INT8 - PyTorch QAT on BCCD test (paired), then the exported model's agreement
    with the FP32 model on the BCCD test images (labels unused) and on COCO128."""
    import torch

    from utils.data.config import load_data_config
    from utils.deployment.backends import DetectionBackend
    from utils.deployment.export import export_checkpoint
    from utils.deployment.ort_runtime import OrtRunner
    from utils.deployment.validate import evaluate_exported
    from utils.evaluation.agreement import run_agreement
    from utils.evaluation.bootstrap import paired_delta
    from utils.quantization.checkpoint import load_quantized
    from utils.quantization.pipeline import load_float_model
    from utils.torch_utils import select_device

    device, cpu = select_device(plan.device), torch.device("cpu")
    data = load_data_config(plan.data)
    exported = export_checkpoint(qat_best, ("onnx",), plan.imgsz, dynamic=True, device=plan.device)[0]
    backend = DetectionBackend(OrtRunner(exported.path, threads=plan.threads), data["nc"])
    settings = dict(conf_thres=0.001, iou_thres=0.7, max_det=300, workers=plan.workers)
    ort, ort_art = evaluate_exported(backend, data, plan.imgsz, plan.qat_batch, "test", "nms", device=cpu, **settings)
    pytorch, pt_art = evaluate_exported(load_quantized(qat_best, device)[0], data, plan.imgsz, plan.qat_batch, "test",
                                        "nms", device=device, **settings)
    delta = paired_delta(ort_art.per_image, pt_art.per_image)["map50_95"]
    out = qat_best.parent.parent
    (out / "ort.json").write_text(json.dumps({"onnx": str(exported.path), "ort": ort.to_dict(),
                                              "pytorch": pytorch.to_dict(), "delta": delta.to_dict()}, indent=2))
    _record(plan, f"ort_int8_minus_qat_map50_95_{model}", delta.value, "mAP50-95 (ORT INT8 - PyTorch QAT)", model,
            f"{DATASET} test", {**_ci(delta.to_dict()), "selected_on": "val", "ort_map50_95": ort.map50_95,
                                "pytorch_map50_95": pytorch.map50_95, "images": ort.images, "imgsz": plan.imgsz,
                                "letterbox": "square (the exported input size)",
                                "qdq_lint_findings": len(exported.findings)})
    reference = load_float_model(fp32, device)
    for name, title in (("bccd_test", "BCCD test images, labels unused"), ("coco128", "COCO128, out of domain")):
        save = out / f"agreement_{name}"
        save.mkdir(exist_ok=True)
        try:
            agreed = run_agreement(backend, reference, plan.unlabelled[name], plan.imgsz, save,
                                   f"{model}: ONNX Runtime INT8 vs FP32 on {title}", candidate_device=cpu,
                                   batch_size=plan.qat_batch, reference_conf=plan.reference_conf)
        except UserError as exc:  # e.g. the FP32 model finds nothing out of domain
            print(f"{model} agreement on {name}: {exc}")
            continue
        for suffix in ("json", "md"):
            shutil.copyfile(save / f"agreement.{suffix}", out / f"agreement_{name}.{suffix}")
        record = "int8_agreement_map50_95" if name == "bccd_test" else "int8_agreement_coco128_map50_95"
        _record(plan, f"{record}_{model}", agreed.map50_95, "agreement mAP50-95 (INT8 vs FP32 detections)", model,
                title, {**_ci(agreed.intervals["map50_95"]), "selected_on": "val", "map50": agreed.map50,
                        "matched": agreed.matched, "matched_iou": agreed.matched_iou, "score_error": agreed.score_error,
                        "images": agreed.images, "reference_boxes": agreed.reference_boxes,
                        "reference_conf": agreed.reference_conf, "runtime": "onnxruntime (CPU)",
                        "imgsz": plan.imgsz})


# ----------------------------------------------------------------------------------------------
# Stages, packing, command line
# ----------------------------------------------------------------------------------------------


def run_stage(stage: str, plan: Plan, models: list[str], gpus: list[str], per_gpu: int, minutes: float) -> dict:
    root = Path(plan.root)
    plan.deadline = time.time() + 60 * minutes
    plan_file = plan.save(root / f"plan-{stage}.json")
    t = time.time()
    status = run_jobs(stage, models, gpus, per_gpu, plan_file, plan.deadline, root / "logs")
    result = {"stage": stage, "seconds": time.time() - t, "jobs": status}
    (root / f"status-{stage}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def pack(plan: Plan, models: list[str], stage: str, out: Path, with_weights: bool) -> list[Path]:
    """One tar of the records and run reports (no weights) under ``out``; with ``with_weights`` also
    each FP32 checkpoint small enough to come back from the device (<model>.pt)."""
    out.mkdir(parents=True, exist_ok=True)
    root, results = Path(plan.root), Path(plan.results)
    tar_path = out / f"study-{stage}.tar.gz"
    names = [n for st in (RECORDS if stage == "all" else (stage,)) for n in RECORDS[st]]
    with tarfile.open(tar_path, "w:gz") as tar:
        for model in models:
            for rec in (results / f"{name}_{model}.json" for name in names):
                if rec.is_file():
                    tar.add(rec, arcname=str(rec.relative_to(ROOT) if rec.is_relative_to(ROOT) else rec.name))
            for f in sorted(plan.run_dir(model).rglob("*")):
                if f.name in RESULT_FILES:
                    tar.add(f, arcname=f"bench/results/accuracy-study/{model}/{f.parent.name}/{f.name}")
        for f in sorted(root.glob("*.json")) + sorted((root / "logs").glob("*.log")):
            tar.add(f, arcname=f"bench/results/accuracy-study/{f.relative_to(root)}")
    written = [tar_path]
    if with_weights:
        from utils.checkpoint import load_checkpoint, save_checkpoint

        for model in models:
            try:
                source = fp32_weights(plan, model)
            except UserError:
                continue
            ckpt = load_checkpoint(source)
            slim = {"model": (ckpt["model"] if ckpt.get("ema") is None else ckpt["ema"]).half(), "ema": None,
                    "optimizer": None,
                    "epoch": ckpt.get("epoch", -1), "best_fitness": ckpt.get("best_fitness", 0.0)}
            target = out / f"{model}.pt"
            save_checkpoint(slim, target)
            if target.stat().st_size > MAX_RETURNED_FILE or len(written) >= 8:
                print(f"{model}: FP32 weights {target.stat().st_size / 2 ** 20:.1f} MiB do not fit the way back")
                target.unlink()
                continue
            written.append(target)
    for f in written:
        print(f"packed {f} ({f.stat().st_size / 2 ** 20:.2f} MiB)")
    return written


def build_plan(args: argparse.Namespace) -> tuple[Plan, list[str], list[str]]:
    """The plan from the flags; ``--dry-run`` shrinks everything to a few CPU minutes."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise UserError(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.dry_run:
        root = Path(args.root or ROOT / "runs/study-dry")
        data_dir = root / "data"
        data = prepare(data_dir, 64, subset={"train": 8, "val": 4, "test": 4, "coco": 4})
        plan = Plan(str(root), str(data), _unlabelled(data_dir), str(args.results or root / "results"), imgsz=64,
                    epochs={m: 1 for m in models}, batch=4, qat_batch=4, qat_epochs=1, qat_iters=1, calib_batches=1,
                    qat_lrs=_learning_rates(args.qat_lrs),
                    workers=0, threads=1, device="cpu", reference_conf=0.0)  # 1-epoch models score ~0
        return plan, models, ["cpu"]
    data_dir = Path(args.data_dir)
    data = data_dir / "bccd" / "bccd.yaml"
    if not data.is_file():
        raise UserError(f"{data}: not prepared; run `python bench/study_accuracy.py prepare` here and carry .data")
    epochs = {m: args.epochs for m in models}
    for item in filter(None, args.epochs_for.split(",")):
        name, n = item.split(":")
        epochs[name] = int(n)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    jobs_at_once = len(gpus) * args.per_gpu
    cores = os.cpu_count() or 8
    plan = Plan(str(args.root or ROOT / "runs/study"), str(data), _unlabelled(data_dir),
                str(args.results or ROOT / "bench/results"), imgsz=args.imgsz, epochs=epochs,
                qat_epochs=args.qat_epochs, qat_lrs=_learning_rates(args.qat_lrs),
                workers=max(1, cores // jobs_at_once - 1),
                threads=max(1, cores // jobs_at_once), fp32_dir=args.fp32_dir or "")
    return plan, models, gpus


def _learning_rates(text: str) -> list[float]:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        lrs = []
    if not lrs or any(not lr > 0 for lr in lrs):
        raise UserError(f"--qat-lrs {text!r}: give positive learning rates separated by commas, e.g. 1e-4,1e-5")
    return lrs


def _unlabelled(data_dir: Path) -> dict:
    bccd_test = data_dir / "bccd" / "images" / "test"
    listing = data_dir / "bccd" / "test.txt"  # the dry run's subset
    sources = [str(data_dir / "bccd" / p.strip()) for p in listing.read_text().split()] if listing.exists() \
        else [str(bccd_test)]
    return {"bccd_test": sources,
            "coco128": [str(data_dir / "coco128" / "train2017"), str(data_dir / "coco128" / "val2017")]}


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="BCCD in YOLO form and COCO128 shrunk, into --data-dir (here, once)")
    prep.add_argument("--imgsz", type=int, default=320)
    prep.add_argument("--data-dir", default=str(ROOT / ".data"))
    job = sub.add_parser("job", help="(internal) one model's stage, in a child process")
    job.add_argument("stage", choices=("train", "quantize"))
    job.add_argument("model", choices=tuple(MODELS))
    job.add_argument("--plan", required=True)
    for name, help_text in (("train", "stage A: train every model and check convergence"),
                            ("quantize", "stage B: auto calibration, QAT with --control, ONNX Runtime, agreement"),
                            ("all", "stage A then stage B in one command")):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--models", default=",".join(MODELS))
        s.add_argument("--gpus", default="0,1")
        s.add_argument("--per-gpu", type=int, default=3, help="jobs at once on each GPU")
        s.add_argument("--imgsz", type=int, default=320)
        s.add_argument("--epochs", type=int, default=100, help="FP32 epochs (stage A)")
        s.add_argument("--epochs-for", default="", help="per-model epochs, e.g. gelan-e:80,gelan-t:120")
        s.add_argument("--qat-epochs", type=int, default=QAT_EPOCHS)
        s.add_argument("--qat-lrs", default="1e-4", help="fine-tune learning rates to try, e.g. 1e-4,1e-5: val "
                       "chooses among them (each run's best epoch chosen on val too)")
        s.add_argument("--train-minutes", type=float, default=5.5, help="stage A's time limit")
        s.add_argument("--quantize-minutes", type=float, default=3.5, help="stage B's time limit")
        s.add_argument("--data-dir", default=str(ROOT / ".data"), help="what `prepare` wrote")
        s.add_argument("--fp32-dir", default="", help="stage B: carried FP32 weights <model>.pt")
        s.add_argument("--root", default="", help="study folder (default runs/study)")
        s.add_argument("--results", default="", help="records folder (default bench/results)")
        s.add_argument("--out", default="", help="where to pack the outputs ($OUT on the device)")
        s.add_argument("--dry-run", action="store_true", help="CPU, 64 px, 1 epoch, a few images: the whole path")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    opt = parse_opt(argv)
    if opt.cmd == "prepare":
        return {"data": str(prepare(Path(opt.data_dir), opt.imgsz))}
    if opt.cmd == "job":
        import logging

        import torch

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        plan = Plan.load(Path(opt.plan))
        torch.set_num_threads(plan.threads)
        (job_train if opt.stage == "train" else job_quantize)(plan, opt.model)
        return {}
    t = time.time()
    plan, models, gpus = build_plan(opt)
    per_gpu = 1 if opt.dry_run else opt.per_gpu
    stages = ("train", "quantize") if opt.cmd == "all" else (opt.cmd,)
    minutes = {"train": opt.train_minutes, "quantize": opt.quantize_minutes}
    result = {stage: run_stage(stage, plan, models, gpus, per_gpu, 10_000 if opt.dry_run else minutes[stage])
              for stage in stages}
    out = Path(opt.out or Path(plan.root) / "out")
    pack(plan, models, opt.cmd, out, with_weights=opt.cmd == "train")
    result["wall_seconds"] = time.time() - t
    print(f"study {opt.cmd}: {result['wall_seconds']:.1f} s wall")
    return result


if __name__ == "__main__":
    run_cli(main)
