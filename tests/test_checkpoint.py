"""Checkpoints: upstream's dict format loads safely; bad files fail with one line naming them."""
from __future__ import annotations

import argparse
import io
import os
import zipfile
from copy import deepcopy
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from models.common import Conv
from models.experimental import attempt_load
from models.yolo import DetectionModel, SegmentationModel
from tests.model_builders import trained_looking_model
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import UserError

ASSETS = Path(__file__).parent / "assets"


def _perturbed(cfg: str, nc: int = 3) -> DetectionModel:
    model = trained_looking_model(cfg, nc)
    model.names = ["a", "b", "c"][:nc]
    return model


def upstream_style_checkpoint(model: DetectionModel) -> dict:
    """What upstream's train.py saves each epoch: fp16 model + EMA, optimizer state, numpy fitness."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.937, nesterov=True)
    return {
        "epoch": 3,
        "best_fitness": np.array([0.25]),  # upstream's fitness() returns an ndarray
        "model": deepcopy(model).half(),
        "ema": deepcopy(model).eval().half(),
        "updates": 7,
        "optimizer": optimizer.state_dict(),
        "opt": vars(argparse.Namespace(weights="", imgsz=640, hyp={"lr0": 0.01}, freeze=[0], evolve=None)),
        "git": None,
        "date": datetime.now().isoformat(),
    }


@pytest.fixture(scope="module")
def gelan_t():
    return _perturbed("gelan-t")


@pytest.fixture()
def ckpt_file(tmp_path, gelan_t):
    path = tmp_path / "last.pt"
    torch.save(upstream_style_checkpoint(gelan_t), path)  # plain torch.save, as upstream does
    return path


def test_upstream_format_round_trip(ckpt_file, gelan_t):
    ckpt = load_checkpoint(ckpt_file)
    assert isinstance(ckpt["best_fitness"], np.ndarray) and ckpt["epoch"] == 3 and ckpt["updates"] == 7
    assert ckpt["model"].yaml_file == "gelan-t.yaml" and ckpt["model"].names == ["a", "b", "c"]
    assert next(ckpt["ema"].parameters()).dtype == torch.float16

    x = torch.rand(1, 3, 96, 64)
    expected = deepcopy(gelan_t).half().float().eval()(x)[0]
    model = attempt_load(ckpt_file, fuse=False)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert model.names == {0: "a", 1: "b", 2: "c"}
    assert torch.equal(model(x)[0], expected)
    fused = attempt_load(ckpt_file)
    assert (fused(x)[0] - expected).abs().max() < 1e-3


def test_numpy_1x_names_in_released_checkpoints(tmp_path):
    # Released upstream weights were pickled under numpy 1.x, which names 'numpy.core.multiarray';
    # numpy 2 writes 'numpy._core.multiarray'. Rewrite the names to get a numpy-1.x style file.
    buf = io.BytesIO()
    torch.save({"best_fitness": np.array([0.5]), "scalar": np.float64(0.25)}, buf)
    path = tmp_path / "np1.pt"
    renamed = 0
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(path, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                renamed = data.count(b"numpy._core.multiarray")
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(item, data)
    assert renamed == 2
    ckpt = load_checkpoint(path)
    assert ckpt["best_fitness"].tolist() == [0.5] and ckpt["scalar"] == 0.25


def test_plain_state_dict_needs_cfg(tmp_path, gelan_t):
    path = tmp_path / "sd.pt"
    torch.save(gelan_t.state_dict(), path)
    with pytest.raises(UserError, match=r"sd\.pt: holds only a state dict; pass the model YAML"):
        attempt_load(path)
    model = attempt_load(path, cfg="gelan-t", fuse=False)  # nc=3 read from the head
    x = torch.rand(1, 3, 64, 64)
    assert model.nc == 3 and torch.equal(model(x)[0], deepcopy(gelan_t).eval()(x)[0])
    with pytest.raises(UserError, match=r"sd\.pt: does not fit gelan-s"):
        attempt_load(path, cfg="gelan-s")


def test_bare_pickled_model_and_our_atomic_save(tmp_path, gelan_t):
    path = save_checkpoint({"model": deepcopy(gelan_t).half(), "ema": None, "epoch": -1}, tmp_path / "w" / "c.pt")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temp file left
    assert attempt_load(path).nc == 3
    torch.save(deepcopy(gelan_t), tmp_path / "bare.pt")
    assert isinstance(load_checkpoint(tmp_path / "bare.pt")["model"], DetectionModel)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: not a") and "\n" not in msg


def test_truncated_checkpoint(tmp_path, ckpt_file):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ckpt_file.read_bytes()[: os.path.getsize(ckpt_file) // 2])
    with pytest.raises(UserError) as err:
        attempt_load(cut)
    msg = str(err.value)
    assert msg.startswith(f"{cut}: not a readable PyTorch checkpoint, truncated") and "\n" not in msg


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_outside_allowlist_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": _RunsCode()}, path)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: refuses to unpickle") and "system" in msg and "--unsafe-load" in msg
    assert "\n" not in msg

    harmless = tmp_path / "fraction.pt"
    from fractions import Fraction

    torch.save({"model": None, "note": Fraction(1, 3)}, harmless)
    with pytest.raises(UserError, match="refuses to unpickle fractions.Fraction"):
        load_checkpoint(harmless)
    assert load_checkpoint(harmless, unsafe=True)["note"] == Fraction(1, 3)
    assert "warning" in capsys.readouterr().err


def test_a_class_another_library_allowed_is_still_refused_and_stays_allowed_there(tmp_path):
    """torch's allowlist is one per process and libraries add to it (Model Optimizer does on import):
    a checkpoint is read with ours alone, and the process's own is left as it was."""
    from fractions import Fraction

    path = tmp_path / "fraction.pt"
    torch.save({"model": None, "note": Fraction(1, 3)}, path)
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([Fraction])
    try:
        assert torch.load(path, weights_only=True)["note"] == Fraction(1, 3)  # the process allows it
        with pytest.raises(UserError, match="refuses to unpickle fractions.Fraction"):
            load_checkpoint(path)
        assert Fraction in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_missing_file_and_wrong_content(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="holds a list"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({"epoch": 1}, tmp_path / "empty.pt")
    with pytest.raises(UserError, match="no model in this checkpoint"):
        attempt_load(tmp_path / "empty.pt")


def _flat(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for o in out for t in _flat(o)]


@pytest.mark.parametrize("cfg", ["gelan-tiny-seg", "yolov9-tiny-dseg"])
def test_upstream_format_segmentation_round_trip(tmp_path, cfg):
    # Upstream's seg heads keep ``detect = <Detect class>.forward``, which pickle writes as
    # getattr(<class>, 'forward'): the allowlist must answer that lookup, and only that one.
    model = trained_looking_model(str(ASSETS / f"{cfg}.yaml"), nc=2)
    path = tmp_path / "last.pt"
    torch.save(upstream_style_checkpoint(model), path)
    assert "builtins.getattr" in torch.serialization.get_unsafe_globals_in_checkpoint(path)

    x = torch.rand(1, 3, 64, 96)
    reference = deepcopy(model).half().float().eval()
    with torch.no_grad():
        expected = _flat(reference(x))
        loaded = attempt_load(path, fuse=False)
        got = _flat(loaded(x))
        fused = _flat(attempt_load(path)(x))
    assert type(loaded) is SegmentationModel and type(loaded.model[-1]) is type(model.model[-1])
    assert len(got) == len(expected) == 6 and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert max(float((a - b).abs().max()) for a, b in zip(fused, expected)) < 1e-3


class _GetattrOf:
    def __init__(self, obj, name):
        self.args = obj, name

    def __reduce__(self):
        return (getattr, self.args)


@pytest.mark.parametrize("obj, name", [(Conv, "__init__"), (Conv, "fuse"), (torch.nn.Conv2d, "forward")])
def test_checkpoint_getattr_is_limited_to_head_forwards(tmp_path, obj, name):
    path = tmp_path / "reach.pt"
    torch.save({"model": None, "x": _GetattrOf(obj, name)}, path)
    with pytest.raises(UserError, match=r"reach\.pt: refuses to unpickle builtins\.getattr"):
        load_checkpoint(path)


def test_segmentation_state_dict_with_cfg(tmp_path):
    model = trained_looking_model(str(ASSETS / "gelan-tiny-dseg.yaml"), nc=2).eval()
    path = tmp_path / "sd.pt"
    torch.save({"model": model.state_dict()}, path)
    loaded = attempt_load(path, cfg=ASSETS / "gelan-tiny-dseg.yaml", fuse=False)
    x = torch.rand(1, 3, 64, 64)
    assert type(loaded) is SegmentationModel and loaded.nc == 2
    assert all(torch.equal(a, b) for a, b in zip(_flat(loaded(x)), _flat(model(x))))
@pytest.mark.parametrize("yaml_names", [None, ["cell"]])
def test_model_pickled_without_nc_and_names_takes_them_from_head_and_yaml(tmp_path, yaml_names):
    """A model saved by hand from ``Model(cfg)`` by code that never set ``nc`` / ``names`` (training does)."""
    model = DetectionModel("gelan-t.yaml", nc=1)
    del model.nc, model.names
    if yaml_names:
        model.yaml["names"] = yaml_names
    path = tmp_path / "hand.pt"
    torch.save({"model": model}, path)
    loaded = attempt_load(path)
    assert loaded.nc == 1 and loaded.names == {0: yaml_names[0] if yaml_names else "0"}


def test_background_writer_writes_in_order_and_reports_failures(tmp_path):
    from utils.checkpoint import CheckpointWriter, load_checkpoint

    writer = CheckpointWriter()
    for epoch in range(3):
        writer.submit({"epoch": epoch, "model": None}, [tmp_path / "last.pt", tmp_path / f"e{epoch}.pt"])
    writer.wait()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    # the second name was a link to the epoch's file: replacing last.pt later left it as it was
    assert [load_checkpoint(tmp_path / f"e{epoch}.pt")["epoch"] for epoch in range(3)] == [0, 1, 2]
    assert (tmp_path / "e2.pt").stat().st_ino == (tmp_path / "last.pt").stat().st_ino
    assert not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "blocked").write_text("a file where a folder should be")
    writer.submit({"epoch": 3}, [tmp_path / "blocked" / "last.pt"])
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()  # the failure is reported once
