"""``python qat.py demo`` runs the whole pipeline and reports every step; here at a toy size. It starts
from the FP32 models the repo ships (models/demo/*.pt) unless ``--train`` trains one first."""
from __future__ import annotations

import json
import warnings

import onnx
import pytest
import torch

import qat
from models.quantize import CALIB_METHODS
from utils.errors import UserError

ROWS = ("Origin (FP32)", "PTQ (max)", "QAT (best)", "QAT in PyTorch, 64x64 input",
        "ONNX INT8 (onnxruntime), 64x64 input")


def test_demo_end_to_end_at_toy_size(tmp_path, capfd):
    """With --train: every row, every file, and nothing on the console a user did not cause: no Python
    warning and no ONNX Runtime log line (it goes to the file descriptor, hence capfd)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # what a user's `python qat.py demo` would print, once each
        save_dir = qat.main(["demo", "--train", "--project", str(tmp_path), "--name", "d", "--epochs", "1",
                             "--qat-epochs", "1", "--images", "8", "--imgsz", "64", "--batch-size", "8",
                             "--workers", "0"])
    out, err = capfd.readouterr()
    assert not [f"{w.category.__name__}: {w.message}" for w in caught]
    assert "onnxruntime" not in err
    assert save_dir == tmp_path / "d"
    summary = json.loads((save_dir / "demo.json").read_text())
    report = json.loads((save_dir / "qat" / "report.json").read_text())
    assert {t["method"] for t in report["calibration"]} == set(CALIB_METHODS)  # auto: each method evaluated
    rows = [row.replace("PTQ (max)", f"PTQ ({report['ptq']['method']})") for row in ROWS]
    assert list(summary["rows"]) == rows
    table = out[out.index("| Model | AP50-95 | AP50 | P | R |"):]
    for row in rows:
        cells = next(line for line in table.splitlines() if line.startswith(f"| {row} |")).split("|")[2:-1]
        assert len(cells) == 4 and all(0.0 <= float(c) <= 1.0 for c in cells), row
    # the QAT row may be the PTQ model itself (no epoch beat it on val), and then the table says so
    assert ("QAT (best) is the PTQ model itself" in out) == (report["qat_best"]["epoch"] == 0)

    files = summary["files"]
    for key in ("data", "train", "fp32_weights", "ptq_weights", "qat_weights", "qat_report", "onnx", "onnx_eval"):
        assert key in files and files[key] in out, key
    assert files["fp32_weights"] == str(save_dir / "train" / "weights" / "best.pt")
    graph = onnx.load(files["onnx"]).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 50  # really the INT8 Q/DQ export
    assert (save_dir / "data" / "images" / "train").is_dir() and len(list((save_dir / "data" / "images" /
                                                                           "train").iterdir())) == 8
    assert not list((save_dir / "train").glob("*.png"))  # the quick training draws no plots


def test_demo_recipes_per_task():
    """--epochs left out takes the task's recipe; detection trains quick (bf16 / channels-last on
    the CPU, one validation), segmentation as before; both calibrate with auto and fine-tune at qat.py's rate."""
    from utils.demo import QUICK_TRAINING, RECIPES
    from utils.training.trainer import DEFAULTS

    assert set(QUICK_TRAINING) <= set(DEFAULTS)  # each is a trainer option
    assert RECIPES["detect"].quick and not RECIPES["segment"].quick
    assert RECIPES["detect"].epochs < RECIPES["segment"].epochs
    assert {(r.calib_method, r.qat_lr) for r in RECIPES.values()} == {("auto", 0.0001)}
    # detection trains batch 32 at twice batch 16's rate; segmentation keeps batch 16 and its rate
    assert (RECIPES["detect"].batch_size, RECIPES["segment"].batch_size) == (32, 16)
    assert RECIPES["detect"].lr0 == pytest.approx(2 * RECIPES["segment"].lr0)
    opt = qat.parse_args(["demo"])
    assert opt.epochs is None and opt.batch_size is None and opt.task == "detect" and not opt.train


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_shipped_models_find_shapes_they_never_saw_at_every_demo_size(task, tmp_path):
    """The shipped FP32 model is the demo's config trained on images drawn from another seed; on the
    demo's own validation images (seed 0) it finds the shapes at both ends of the sizes it is offered for."""
    from models.config import load_config
    from models.loading import model_from_checkpoint
    from utils.checkpoint import load_checkpoint
    from utils.data.config import load_data_config
    from utils.data.synthetic import CLASS_NAMES, make_shapes_dataset
    from utils.demo import CFGS, SHIPPED_DATA_SEED, SHIPPED_SIZES, SHIPPED_WEIGHTS
    from utils.deployment.validate import evaluate_exported

    ckpt = load_checkpoint(SHIPPED_WEIGHTS[task])  # weights_only, the allowlist
    made_by = ckpt["made_by"]
    assert made_by["command"].startswith("python tools/make_demo_weights.py")
    # the demo's default seed draws other images; the one that would not is named (the demo warns of it)
    assert SHIPPED_DATA_SEED == made_by["data_seed"] != qat.parse_args(["demo"]).seed
    model = model_from_checkpoint(ckpt).eval()
    assert {**model.yaml, "ch": 3} == {**load_config(CFGS[task]), "ch": 3}  # Model() records the input channels
    assert list(model.names) == list(CLASS_NAMES)
    for imgsz in SHIPPED_SIZES:
        data = make_shapes_dataset(tmp_path / str(imgsz), n_train=0, n_val=24, imgsz=imgsz, seed=0,
                                   masks=task == "segment")
        scores, _ = evaluate_exported(model, load_data_config(data), imgsz, 8, "val", "nms", conf_thres=0.001,
                                      iou_thres=0.7, max_det=300, workers=0, device=torch.device("cpu"))
        assert scores.map50 > 0.8 and (task == "detect" or scores.mask["map50"] > 0.8), (imgsz, scores)


def test_demo_refuses_fp32_epochs_without_train_and_a_missing_model(tmp_path, monkeypatch):
    """--epochs only means something with --train; a missing shipped model names the file and the way out.
    Both stop before anything is written."""
    import utils.demo

    with pytest.raises(UserError, match="--epochs 3: .*--train"):
        qat.main(["demo", "--project", str(tmp_path), "--epochs", "3"])
    missing = tmp_path / "gone.pt"
    monkeypatch.setitem(utils.demo.SHIPPED_WEIGHTS, "detect", missing)
    with pytest.raises(UserError, match=f"{missing}: .*--train"):
        qat.main(["demo", "--project", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_demo_rejects_a_bad_size_before_writing(tmp_path):
    with pytest.raises(UserError, match="--imgsz 50"):
        qat.main(["demo", "--project", str(tmp_path), "--imgsz", "50"])
    assert not any(tmp_path.iterdir())


def test_segmentation_demo_end_to_end_at_toy_size(tmp_path, capsys):
    """The default path: the shipped segmentation model, quantized, exported and checked; nothing trained."""
    from utils.demo import SHIPPED_WEIGHTS

    save_dir = qat.main(["demo", "--task", "segment", "--project", str(tmp_path), "--name", "s",
                         "--qat-epochs", "1", "--qat-iters", "2", "--images", "8", "--imgsz", "64",
                         "--batch-size", "8", "--workers", "0"])
    out = capsys.readouterr().out
    table = out[out.index("| Model | AP50-95 | AP50 | P | R |"):]
    method = json.loads((save_dir / "qat" / "report.json").read_text())["ptq"]["method"]  # auto's choice
    for row in ROWS:
        for part in ("boxes", "masks"):
            label = row.replace("PTQ (max)", f"PTQ ({method})")
            line = next(line for line in table.splitlines() if line.startswith(f"| {label}, {part} |"))
            cells = line.split("|")[2:-1]
            assert len(cells) == 4 and all(0.0 <= float(c) <= 1.0 for c in cells), (label, part)
    summary = json.loads((save_dir / "demo.json").read_text())
    assert summary["task"] == "segment" and all("mask_map50_95" in m for m in summary["rows"].values())
    outputs = [o.name for o in onnx.load(summary["files"]["onnx"]).graph.output]
    assert outputs == ["output0", "output1"]  # prediction with mask coefficients, prototypes
    assert any((save_dir / "data" / "masks" / "train").iterdir())  # the shapes' exact masks were drawn
    assert summary["files"]["fp32_weights"] == str(SHIPPED_WEIGHTS["segment"]) and not (save_dir / "train").exists()


def test_make_demo_weights_writes_a_loadable_model_that_says_how_it_was_made(tmp_path):
    """tools/make_demo_weights.py at a toy size: the shipped file's format, made_by included."""
    from models.loading import model_from_checkpoint
    from tools.make_demo_weights import main as make_demo_weights
    from utils.checkpoint import load_checkpoint

    argv = ["--images", "4", "--epochs", "1", "--imgsz", "64", "--batch-size", "4", "--workers", "0",
            "--device", "cpu", "--seed", "7", "--project", str(tmp_path / "runs"), "--output", str(tmp_path / "m.pt")]
    ckpt = load_checkpoint(make_demo_weights(argv))
    made_by = ckpt["made_by"]
    assert made_by["command"] == "python tools/make_demo_weights.py " + " ".join(argv)
    assert (made_by["data_seed"], made_by["images"], made_by["last_epoch_results"]["epoch"]) == (7, 4, 1)
    assert ckpt["optimizer"] is None and ckpt["ema"] is None  # a finished run's file, as shipped
    assert model_from_checkpoint(ckpt).yaml["nc"] == 3


def test_demo_warns_when_the_shipped_model_meets_other_sizes_or_its_own_images(tmp_path, monkeypatch, caplog):
    """Outside the checked sizes, and with the seed that drew its training images, the demo says so
    before it quantizes (stopped there: the rest is the toy-size runs above)."""
    import utils.demo

    class Quantizing(Exception):
        pass

    def stop(*_args, **_kwargs):
        raise Quantizing

    monkeypatch.setattr(utils.demo, "quantize_and_check", stop)
    seed = utils.demo.SHIPPED_DATA_SEED
    for flags, expected in ((["--imgsz", "64"], "checked at 96-256 px; at --imgsz 64"),
                            (["--seed", str(seed)], f"--seed {seed} draws the images the shipped model was trained on"),
                            ([], None)):
        caplog.clear()
        with caplog.at_level("INFO", logger="yolov9"), pytest.raises(Quantizing):
            qat.main(["demo", "--project", str(tmp_path), "--images", "4", *flags])
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warnings == ([] if expected is None else [next(w for w in warnings if expected in w)]), warnings
