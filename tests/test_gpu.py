"""The CUDA paths the CPU suite cannot reach; on a GPU machine run them with ``pytest -m gpu``.

A bf16 QAT step on CUDA tensors (our fake quantization: Model Optimizer's CUDA extension must never
be built), and QAT fine-tuning with DDP over NCCL. conftest skips them without a CUDA GPU; the DDP
case also needs two.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from copy import deepcopy

import pytest
import torch

from models.quantize import amax_state, calibrate, prepare, set_trainable
from tests.qat_helpers import check_torchrun_quantize, save_float_checkpoint, tiny_model
from utils.data.config import load_data_config, load_hyp
from utils.data.synthetic import make_shapes_dataset
from utils.paths import ROOT
from utils.quantization.distill import FeatureDistillation, supervised_layers
from utils.quantization.pipeline import make_loader
from utils.training.engine import make_precision, train_one_epoch
from utils.training.loss import build_loss
from utils.training.optim import build_optimizer

pytestmark = pytest.mark.gpu
IMGSZ = 64


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=8, n_val=4, imgsz=IMGSZ)


def test_bf16_qat_step_builds_no_extension_and_keeps_the_ranges(shapes):
    from modelopt.torch.quantization.extensions import get_cuda_ext

    device = torch.device("cuda:0")
    teacher = tiny_model().fuse().eval().to(device)
    student = prepare(deepcopy(teacher))
    calibrate(student, [torch.rand(2, 3, IMGSZ, IMGSZ, device=device)])
    set_trainable(student)
    ranges = amax_state(student)
    hyp = load_hyp(ROOT / "data/hyps/hyp.qat.yaml")
    loader = make_loader(load_data_config(shapes), "train", IMGSZ, 4, 32, 0, hyp=hyp, shuffle=True)
    distill = FeatureDistillation(student, teacher, supervised_layers(len(student.model), 1))
    stats = train_one_epoch(student, loader, build_loss(student, hyp), build_optimizer(student, "SGD", 0.01, 0.9, 5e-4),
                            device=device, precision=make_precision(device, "bf16"), max_iters=2,
                            extra_loss_fn=distill, progress=False)
    distill.remove()
    assert not hasattr(get_cuda_ext, "extension")  # Model Optimizer never loaded (or compiled) its kernels
    assert stats.iters == 2 and all(math.isfinite(v) for v in stats.loss)
    assert all(torch.equal(ranges[k], v) for k, v in amax_state(student).items())


def test_quantize_under_torchrun_over_nccl(shapes, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    check_torchrun_quantize(shapes, tmp_path, "0,1", IMGSZ)


@pytest.mark.parametrize("flags,graphed", [((), True), (("--no-cuda-graphs",), False)])
def test_quantize_replays_the_steps_from_cuda_graphs_by_default_and_warns_of_nothing(shapes, tmp_path, flags, graphed):
    """``qat.py quantize`` end to end on one GPU: without a flag the steps run from graphs (the log says
    so) and each epoch's short last batch is dropped (8 images in batches of 3: 6 trained), while
    ``--no-cuda-graphs`` runs every batch eagerly; neither autograd nor the graphs print a warning."""
    weights = save_float_checkpoint(tiny_model(), tmp_path / "fp.pt")
    cmd = [sys.executable, "qat.py", "quantize", "--weights", str(weights), "--data", str(shapes), "--imgsz",
           str(IMGSZ), "--batch-size", "3", "--device", "0", "--workers", "0", "--calib-batches", "2", "--epochs",
           "2", *flags, "--project", str(tmp_path / "runs"), "--name", "graphs"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert ("CUDA graphs recorded for batches of shape (3, 3, 64, 64)" in log) == graphed
    warnings = [line for line in log.splitlines() if "Warning" in line]
    assert not warnings, warnings
    report = json.loads((tmp_path / "runs" / "graphs" / "report.json").read_text())
    assert [(e["epoch"], e["train_images"]) for e in report["epochs"]] == [(1, 6 if graphed else 8),
                                                                          (2, 6 if graphed else 8)]


def test_train_with_cuda_graphs_replays_the_steps_and_warns_of_nothing(shapes, tmp_path):
    """``train.py --cuda-graphs`` end to end (BatchNorm, EMA, validation, the smaller last batch eager)."""
    cmd = [sys.executable, "train.py", "--cfg", str(ROOT / "tests" / "assets" / "gelan-tiny.yaml"), "--data",
           str(shapes), "--imgsz", str(IMGSZ), "--batch-size", "3", "--epochs", "2", "--device", "0", "--workers", "0",
           "--cuda-graphs", "--project", str(tmp_path / "runs"), "--name", "graphs"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "CUDA graphs recorded for batches of shape (3, 3, 64, 64)" in log
    warnings = [line for line in log.splitlines() if "Warning" in line]
    assert not warnings, warnings
    rows = (tmp_path / "runs" / "graphs" / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and (tmp_path / "runs" / "graphs" / "weights" / "best.pt").is_file()  # header + 2 epochs
    for name in ("last.pt", "best.pt"):  # finished files hold CPU tensors, as upstream's: they load anywhere
        ckpt = torch.load(tmp_path / "runs" / "graphs" / "weights" / name, weights_only=False)  # our own test file
        assert next(ckpt["model"].parameters()).device.type == "cpu" and ckpt["optimizer"] is None


def test_segmentation_demo_on_the_gpu_replays_qat_from_graphs(tmp_path):
    """``qat.py demo --task segment --device 0``: the shipped segmentation model through PTQ, QAT from
    graphs (each epoch's 18 images in batches of 4: 16 trained), export and the ONNX Runtime check."""
    cmd = [sys.executable, "qat.py", "demo", "--task", "segment", "--device", "0", "--images", "18", "--imgsz",
           str(IMGSZ), "--batch-size", "4", "--qat-epochs", "1", "--workers", "0", "--project", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "CUDA graphs recorded for batches of shape (4, 3, 64, 64)" in log
    summary = json.loads((tmp_path / "exp" / "demo.json").read_text())
    assert all("mask_map50_95" in row for row in summary["rows"].values())
    report = json.loads((tmp_path / "exp" / "qat" / "report.json").read_text())
    assert [(e["epoch"], e["train_images"]) for e in report["epochs"]] == [(1, 16)]
