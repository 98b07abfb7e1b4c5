"""Segmentation QAT study in one command: train, PTQ, QAT, export and ONNX Runtime per model.

gelan-c-seg and the dual yolov9-c-dseg are trained from scratch on drawn shapes with exact masks,
then PTQ, QAT, a Q/DQ ONNX export and ONNX Runtime, the models spread over the GPUs, all at once.

Each model runs ``utils.demo.run_workflow`` (the pipeline ``qat.py demo`` runs) in its own process
on GPU i modulo the GPUs (on one GPU, one model per command with --models fits the time limit);
the dual model is reparameterized to its main branch (tools/reparameterize.py) between training
and quantization, as a deployment would. The parent draws the data once, waits, and writes per
model:

- ``seg_qat_delta_mask_map50_95_<model>``: QAT (best) - Origin (FP32) mask mAP50-95 on the test
  images, the best epoch chosen on val, with a 95% paired bootstrap interval (bar >= -0.003)
- ``seg_qat_delta_box_map50_95_<model>``: the same for boxes
- ``seg_ort_int8_minus_qat_mask_map50_95_<model>``: the exported INT8 model on ONNX Runtime - the
  QAT model in PyTorch, both on the same letterboxed input (bar >= -0.003)

The drawn set has train, val and test images of its own. The FP32 training anneals its LR over
the first 80% of the epochs and holds it for the last 20%, where validation mask mAP50-95 must be
flat (bench/convergence.py, the accuracy study's check): otherwise QAT's extra epochs would show up
as a gain. Each record says whether it was. Training stops at the end of the epoch that passes
``--train-minutes`` (its best.pt is kept, the record says so), and the parent stops whatever still
runs at ``--stop-minutes`` and packs what exists, so a slow model costs its own rows, not the logs.

    # GPU: 2 GPUs, one model each, < 10 min; one GPU: a command per model
    python bench/study_seg.py --out $OUT
    python bench/study_seg.py --out $OUT --models gelan-c-seg
    # CPU dry run at toy size (the same code path, records into a dry-run folder)
    python bench/study_seg.py --dry-run --out /tmp/seg_study --work /tmp/seg_study_work

Writes ``seg_study.tar.gz`` into ``--out``, one small file (the device returns at most 8): the
four records per model under ``records/`` (also written to bench/results unless --dry-run), and
each model's report.md/json, ONNX Runtime results, summary.json, train results.csv and the logs
(no weights).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.convergence import convergence, hold_epochs, val_history  # noqa: E402
from bench.record import RESULTS_DIR, machine_name, write_record  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402

MODELS = {"gelan-c-seg": ROOT / "models/segment/gelan-c-seg.yaml",
          "yolov9-c-dseg": ROOT / "models/segment/yolov9-c-dseg.yaml"}
DUAL = {"yolov9-c-dseg"}  # reparameterized to the main branch before quantization
# GPU sizes, from the 2026-11-30 runs on one H200 at 320 px, batch 32: an epoch of 2000 images
# took ~7 s of steps for gelan-c-seg and ~18 s for the dual model, plus validation; everything
# after training (PTQ, QAT, the control, export, ONNX Runtime on the CPU) ~4-5 min. 1200 images
# and 12 epochs fit the dual model's whole schedule into one 10-minute command after ~1 min of
# installing wheels.
GPU = {"imgsz": 320, "images": 1200, "epochs": 12, "qat_epochs": 2, "qat_iters": 150, "batch_size": 32,
       "workers": 8, "train_minutes": 4.0, "stop_minutes": 8.4}
DRY_RUN = {"imgsz": 64, "images": 16, "epochs": 1, "qat_epochs": 1, "qat_iters": 2, "batch_size": 8,
           "workers": 0, "train_minutes": 30.0, "stop_minutes": 60.0}
MASK_VAL_COLUMN = "metrics/mAP_0.5:0.95(M)"  # results.csv: validation mask mAP50-95 per epoch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the records and seg_study.tar.gz ($OUT)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "seg_study",
                   help="data, weights and run folders (kept out of --out: only the records and the tar go there)")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks the whole path in minutes")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    for key, value in GPU.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                       help=f"default {value} on GPU, {DRY_RUN[key]} with --dry-run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child process: run this model only
    p.add_argument("--device", default="", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    return p


def sizes(opt: argparse.Namespace) -> dict:
    defaults = DRY_RUN if opt.dry_run else GPU
    return {k: getattr(opt, k) if getattr(opt, k) is not None else v for k, v in defaults.items()}


def val_images(size: dict) -> int:
    """A tenth of the training images: enough instances for a stable mAP, few enough that ONNX
    Runtime on the CPU scores them in about a minute at 320 px."""
    return max(size["images"] // 10, 3)


def main(argv: list[str] | None = None) -> Path:
    opt = build_parser().parse_args(argv)
    if opt.one:
        return run_one(opt)
    models = opt.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise UserError(f"--models: unknown {unknown}; expected some of {list(MODELS)}")
    return run_study(opt, models)


def run_study(opt: argparse.Namespace, models: list[str]) -> Path:
    """Draw the data, run each model in its own process (GPU i mod the GPUs), then write the
    records and the tar."""
    import torch

    from utils.data.synthetic import make_shapes_dataset

    size = sizes(opt)
    work = opt.work
    work.mkdir(parents=True, exist_ok=True)
    opt.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = make_shapes_dataset(work / "data", n_train=size["images"], n_val=val_images(size),
                               n_test=val_images(size), imgsz=size["imgsz"], seed=opt.seed, masks=True)
    gpus = torch.cuda.device_count()
    if not opt.dry_run and not gpus:
        raise UserError("no CUDA GPU found; use --dry-run on a CPU")
    children = []
    for i, name in enumerate(models):
        args = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--out", str(opt.out), "--work",
                str(work), "--data",
                str(data), "--device", "cpu" if opt.dry_run else str(i % gpus), "--seed", str(opt.seed),
                *(["--dry-run"] if opt.dry_run else []),
                *[a for k, v in size.items() for a in (f"--{k.replace('_', '-')}", str(v))]]
        log = open(work / f"{name}.log", "w")
        children.append((name, subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
    failed = []
    for name, child, log in children:
        try:
            returncode = child.wait(timeout=max(start + size["stop_minutes"] * 60 - time.perf_counter(), 1))
        except subprocess.TimeoutExpired:
            child.kill()
            returncode = f"stopped at --stop-minutes {size['stop_minutes']}"
            child.wait()
        if returncode != 0:
            failed.append(f"{name} ({returncode})")
        log.close()
    summaries = {name: json.loads((work / name / "summary.json").read_text())
                 for name in models if (work / name / "summary.json").is_file()}
    records = write_records(summaries, opt, work / "records", size, time.perf_counter() - start)
    tar = pack(opt.out, work, models)
    for path in [*records, tar]:
        print(path)
    if failed:
        raise UserError(f"{', '.join(failed)} failed; see {tar} (the logs)")
    return opt.out


def run_one(opt: argparse.Namespace) -> Path:
    """One model's whole workflow in this process; writes work/<model>/summary.json."""
    import torch

    from utils.demo import RECIPES, quantize_and_check, run_workflow
    from utils.torch_utils import select_device

    size = sizes(opt)
    save_dir = opt.work / opt.one
    device = select_device(opt.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    demo_opt = argparse.Namespace(**size, device=opt.device, seed=opt.seed, exist_ok=True)
    deadline = time.perf_counter() + size["train_minutes"] * 60
    stopped = {}

    def stop_when_late(epoch: int, _metrics: dict) -> None:
        if time.perf_counter() > deadline and epoch + 1 < size["epochs"]:
            stopped["after_epoch"] = epoch + 1
            raise TrainingBudgetSpent

    def convert(weights: Path) -> Path:
        from tools.reparameterize import main as reparameterize

        return reparameterize(["--weights", str(weights), "--output", str(weights.with_name("converted.pt"))])

    convert_weights = convert if opt.one in DUAL else None
    # QAT - control: what quantizing costs; the held LR: the window the convergence check reads. Max
    # calibration and QAT at 1e-3: the recipe of this study's recorded runs (the demo's is now auto, 1e-4)
    recipe = dataclasses.replace(RECIPES["segment"], control=True, hold_lr=hold_epochs(size["epochs"]),
                                 calib_method="max", qat_lr=0.001)
    try:
        rows, written, seconds = run_workflow(MODELS[opt.one], opt.data, demo_opt, save_dir, device, convert_weights,
                                              stop_when_late, recipe=recipe)
    except TrainingBudgetSpent:  # quantize the best weights the shortened training saved
        rows, written, seconds = quantize_and_check(save_dir / "train" / "weights" / "best.pt", opt.data, demo_opt,
                                                    save_dir, device, convert_weights, recipe=recipe)
    history = val_history(save_dir / "train" / "results.csv", MASK_VAL_COLUMN)
    summary = {"model": opt.one, "reparameterized": opt.one in DUAL, "rows": rows, "seconds": seconds,
               "sizes": size, "training_stopped_after_epoch": stopped.get("after_epoch"),
               "convergence": {**convergence(history), "metric": "val mask mAP50-95", "by_epoch": history},
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "files": {k: str(v) for k, v in written.items()}}
    (save_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return save_dir


class TrainingBudgetSpent(Exception):
    """Raised after an epoch's checkpoint once --train-minutes have passed."""


def write_records(summaries: dict, opt: argparse.Namespace, folder: Path, size: dict, seconds: float) -> list[Path]:
    """The four records per model, into ``folder`` (and bench/results unless a dry run).

    The QAT deltas are the report's rows on the test split, its best epoch chosen on val, with the
    report's paired bootstrap intervals (boxes and masks each resampled by their own matches); ONNX
    Runtime - QAT compares one model in two runtimes on the val images, where nothing is chosen.
    """
    paths = []
    n_val = val_images(size)
    dataset = (f"drawn shapes with exact masks (utils/data/synthetic.py, seed {opt.seed}): {size['images']} train / "
               f"{n_val} val / {n_val} test images, {size['imgsz']} px")
    for name, s in summaries.items():
        report = json.loads(Path(s["files"]["qat_report"]).with_suffix(".json").read_text())
        qat_minus_origin, reported = report["intervals"]["qat_minus_origin"], report["reported"]
        rows = list(s["rows"].values())
        same_pt, same_ort = rows[3], rows[4]
        model = f"{name}{' (reparameterized to its main branch)' if s['reparameterized'] else ''}, from scratch"
        common = {"seconds": s["seconds"], "sizes": s["sizes"], "device": s["device"],
                  "training_stopped_after_epoch": s["training_stopped_after_epoch"],
                  "convergence": s["convergence"], "dry_run": opt.dry_run,
                  "study_seconds": round(seconds),
                  "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        on_test = {**common, "selected_on": report["selected_on"], "reported_on": reported["split"],
                   "images": reported["images"], "bootstrap": report["bootstrap"],
                   "fp32": reported["origin"], "qat_best": reported["qat_best"]}
        control = report["intervals"]["qat_minus_control"]
        values = {f"seg_qat_delta_mask_map50_95_{name}": (qat_minus_origin["mask_map50_95"], on_test),
                  f"seg_qat_delta_box_map50_95_{name}": (qat_minus_origin["map50_95"], on_test),
                  f"seg_qat_minus_control_mask_map50_95_{name}": (control["mask_map50_95"], on_test),
                  f"seg_ort_int8_minus_qat_mask_map50_95_{name}": (
                      {"value": same_ort["mask_map50_95"] - same_pt["mask_map50_95"]},
                      {**common, "split": "val", "images": n_val, "rows": s["rows"]})}
        for record, (figure, extra) in values.items():
            interval = {k: figure[k] for k in ("ci95_low", "ci95_high") if k in figure}
            for results_dir in [folder] + ([] if opt.dry_run else [RESULTS_DIR]):
                write_record(record, figure["value"], "mAP50-95", model, dataset, machine=machine_name(),
                             extra={**interval, **extra}, results_dir=results_dir)
            paths.append(folder / f"{record}.json")
    return paths


def pack(out: Path, work: Path, models: list[str]) -> Path:
    """Reports, evaluation results, summaries and logs (no weights, no images) in one small tar."""
    tar_path = out / "seg_study.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for pattern in ("records/*.json", "*.log", "*/summary.json", "*/qat/report.md", "*/qat/report.json",
                        "*/onnx_int8/results.*", "*/train/results.csv"):
            for f in sorted(work.glob(pattern)):
                tar.add(f, arcname=str(f.relative_to(work)))
    return tar_path


if __name__ == "__main__":
    run_cli(main)
