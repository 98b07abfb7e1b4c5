"""Whole training runs on eight COCO128 images: files written, exact resume, weights transfer, CLI errors.

Two processes under torchrun, interrupted and resumed: tests/test_resume.py."""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.cli_helpers import run_script
from utils.checkpoint import load_checkpoint
from utils.errors import UserError
from utils.training.trainer import build_model, make_options, train

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "assets" / "gelan-tiny.yaml")


@pytest.fixture(scope="module")
def data_yaml(coco128_dir, tmp_path_factory) -> Path:
    """Eight COCO128 images as both train and val split."""
    folder = tmp_path_factory.mktemp("data")
    images = sorted((coco128_dir / "images" / "train2017").glob("*.jpg"))[:8]
    (folder / "eight.txt").write_text("".join(f"{p.resolve()}\n" for p in images))
    names = yaml.safe_load((coco128_dir / "coco128.yaml").read_text())["names"]
    path = folder / "data.yaml"
    path.write_text(yaml.safe_dump({"path": str(folder), "train": "eight.txt", "val": "eight.txt", "names": names}))
    return path


def run_kwargs(data_yaml: Path, project: Path, **extra) -> dict:
    return {**dict(cfg=TINY, data=str(data_yaml), epochs=2, batch_size=4, imgsz=64, device="cpu", workers=0,
                   project=str(project)), **extra}


def csv_rows(run: Path) -> list[dict]:
    with open(run / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


class Interrupt(Exception):
    pass


def stop_after_first_epoch(epoch: int, metrics: dict) -> None:
    if epoch == 0:
        raise Interrupt


@pytest.fixture(scope="module")
def runs(data_yaml, tmp_path_factory) -> dict:
    """One uninterrupted 2-epoch run, and one interrupted after epoch 1 (state kept) then resumed by
    ``python train.py --resume`` in a process of its own, as a user resumes: nothing the interrupted
    run left in memory can help it (the torchrun test resumes in the launch's processes).

    Only the uninterrupted run caches its images in RAM, so equal results also show that the cache
    feeds the same pixels as reading the files. The interrupted run loads with two persistent
    workers, the others in the main process: augmentations must not depend on who draws them.
    """
    project = tmp_path_factory.mktemp("runs")
    full = train(**run_kwargs(data_yaml, project, name="full", cache="ram"))
    with pytest.raises(Interrupt):  # without plots, so the resume (which keeps the run's options) makes none
        train(on_epoch_end=stop_after_first_epoch, **run_kwargs(data_yaml, project, name="cut", workers=2, plots=False))
    cut = project / "cut"
    interrupted = {"ckpt": load_checkpoint(cut / "weights" / "last.pt"), "rows": csv_rows(cut)}
    snapshot = project / "cut_snapshot"
    shutil.copytree(cut, snapshot)
    resumed = subprocess.run([sys.executable, "train.py", "--resume", str(cut / "weights" / "last.pt"), "--device",
                              "cpu", "--workers", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return {"full": full, "cut": cut, "resumed": resumed, "interrupted": interrupted, "snapshot": snapshot}


def test_run_writes_results_and_safe_loading_checkpoints(runs):
    run = runs["full"]
    rows = csv_rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]  # numbered as the log numbers them
    assert all(float(rows[-1][k]) > 0 for k in ("train/box_loss", "train/cls_loss", "train/dfl_loss"))
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(run / "weights" / name)  # weights_only loader with the model allowlist
        assert ckpt["epoch"] == -1 and ckpt["optimizer"] is None  # finished: training state stripped
        assert next(ckpt["model"].parameters()).dtype == torch.float16
        assert ckpt["model"].names[0] == "person" and ckpt["model"].nc == 80
    assert (run / "hyp.yaml").is_file() and (run / "opt.yaml").is_file() and (run / "best_val.json").is_file()
    assert {p.name for p in run.glob("*.png")} == {"PR_curve.png", "confusion_matrix.png"}


def test_interrupted_run_kept_its_state(runs):
    ckpt, rows = runs["interrupted"]["ckpt"], runs["interrupted"]["rows"]
    assert ckpt["epoch"] == 0 and len(rows) == 1
    assert ckpt["optimizer"] is not None and ckpt["updates"] > 0
    assert next(ckpt["model"].parameters()).dtype == torch.float32  # exact weights for --resume
    assert ckpt["opt"]["epochs"] == 2


def test_resume_reaches_the_same_epochs_and_weights(runs):
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr[-2000:]
    full_rows, resumed_rows = csv_rows(runs["full"]), csv_rows(runs["cut"])
    assert [r["epoch"] for r in resumed_rows] == ["1", "2"]
    assert (runs["cut"] / "best_val.json").is_file() and not list(runs["cut"].glob("*.png"))  # plots=False kept
    assert resumed_rows == full_rows  # the same losses, metrics and learning rates, epoch by epoch
    a = load_checkpoint(runs["full"] / "weights" / "last.pt")["model"].state_dict()
    b = load_checkpoint(runs["cut"] / "weights" / "last.pt")["model"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finished_run_cannot_be_resumed(runs):
    with pytest.raises(UserError, match="nothing to resume"):
        train(resume=str(runs["full"] / "weights" / "last.pt"), device="cpu", workers=0)


def test_weights_transfer_matching_tensors(runs):
    src = runs["snapshot"] / "weights" / "last.pt"
    trained = load_checkpoint(src)["ema"].float().state_dict()  # --weights takes the EMA, as upstream
    same = build_model(make_options(weights=str(src)), nc=80, resume_ckpt=None).state_dict()
    assert all(torch.equal(same[k], trained[k]) for k in trained)
    fewer = build_model(make_options(weights=str(src)), nc=3, resume_ckpt=None)
    assert fewer.model[-1].nc == 3
    stem = "model.0.conv.weight"
    assert torch.equal(fewer.state_dict()[stem], trained[stem])


def test_checkpoints_only_where_needed_without_save_every_epoch(data_yaml, tmp_path):
    """With noval only the first epoch (best so far) and the last one write last.pt; the finished
    run's files are the same kind as a run that saves every epoch."""
    saved_epochs, run_dir = [], tmp_path / "sparse"

    def note_saved_epoch(_epoch, _metrics):
        saved_epochs.append(load_checkpoint(run_dir / "weights" / "last.pt")["epoch"])

    run = train(on_epoch_end=note_saved_epoch,
                **run_kwargs(data_yaml, tmp_path, name="sparse", epochs=3, noval=True, save_every_epoch=False))
    assert saved_epochs == [0, 0, 2]
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(run / "weights" / name)
        assert ckpt["epoch"] == -1 and ckpt["optimizer"] is None  # finished as usual
    # best.pt was a link to last.pt while the run went on; the finished run leaves two files
    assert (run / "weights" / "last.pt").stat().st_ino != (run / "weights" / "best.pt").stat().st_ino


def test_unknown_option_is_a_user_error():
    with pytest.raises(UserError, match="batchsize"):
        make_options(batchsize=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_device_0_without_gpu_is_one_line_exit_2(data_yaml, capsys, monkeypatch):
    code, err = run_script("train.py", ["--device", "0", "--cfg", TINY, "--data", str(data_yaml)], capsys, monkeypatch)
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("error: --device 0")



def test_finalizing_from_memory_writes_what_reading_the_file_back_writes(tmp_path):
    """The run finalizes last.pt and best.pt from what it kept of them; a file an earlier process
    wrote is read back. Both ways give the same checkpoint."""
    import argparse

    from tests.qat_helpers import tiny_model
    from utils.checkpoint import save_checkpoint
    from utils.training.ema import ModelEMA
    from utils.training.trainer import finalize_checkpoint, kept_for_finalizing, make_checkpoint

    model = tiny_model()
    ema = ModelEMA(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # the raw weights move off their average, so picking the wrong one shows
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpt = make_checkpoint(model, ema, optimizer, torch.amp.GradScaler("cpu", enabled=False), 3, 0.5, 2,
                           argparse.Namespace(epochs=4, cfg="x.yaml"))
    for name in ("disk.pt", "memory.pt"):
        save_checkpoint(ckpt, tmp_path / name)
    from_disk = finalize_checkpoint(tmp_path / "disk.pt")
    from_memory = finalize_checkpoint(tmp_path / "memory.pt", kept_for_finalizing(ckpt))
    a, b = (load_checkpoint(tmp_path / name) for name in ("disk.pt", "memory.pt"))
    for written, read in ((from_disk, a), (from_memory, b)):
        assert list(written) == list(read) and read["epoch"] == -1
        assert all(read[k] is None for k in ("optimizer", "ema", "updates", "scaler"))
    assert list(a) == list(b) and all(a[k] == b[k] for k in a if k not in ("model", "date"))
    sa, sb, average = a["model"].state_dict(), b["model"].state_dict(), ema.ema.state_dict()
    assert all(sa[k].dtype == torch.float16 or not sa[k].is_floating_point() for k in sa)
    assert all(torch.equal(sa[k], sb[k]) and torch.equal(sa[k], average[k].to(sa[k].dtype)) for k in sa)
