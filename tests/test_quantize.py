"""Quantizer insertion, TensorRT scale rules, calibration, skip-layers and checkpoints (models/quantize*)."""
from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from modelopt.torch.quantization.nn import TensorQuantizer

from models.common import DFL
from models.quant_modules import QuantConv2d, RangeCalibrator
from models.quantize import (
    amax_state,
    calibrate,
    collect_stats,
    float_conv_names,
    load_amax,
    parse_skip_layers,
    prepare,
    quantization_disabled,
    quantizers,
    set_quantization,
)
from models.yolo import DetectionModel, Model, SegmentationModel
from tests.qat_helpers import (
    BLOCK_CONFIGS,
    CONFIGS,
    one_thread,
    scale_violations,
    shrunk_config,
    slow_matrix_case,
    tiny_model,
)
from utils.checkpoint import save_checkpoint
from utils.errors import UserError
from utils.quantization.checkpoint import load_quantized, make_checkpoint

IMGSZ = 64
ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


_built: dict[str, tuple[DetectionModel, DetectionModel]] = {}


def float_and_quantized(cfg: str) -> tuple[DetectionModel, DetectionModel]:
    """(fused float model, the same prepared and calibrated on random images), built once per config."""
    if cfg not in _built:
        torch.manual_seed(0)
        fp = DetectionModel(shrunk_config(cfg)).fuse().eval()
        q = prepare(deepcopy(fp))
        calibrate(q, [torch.rand(2, 3, IMGSZ, IMGSZ)])
        _built[cfg] = fp, q
    return _built[cfg]


# Every block and head (BLOCK_CONFIGS), and the s configs the tests below build anyway; all ten configs
# at full width are quantized, exported and linted (a conv without Q/DQ or a scale that breaks a tie
# is a finding) by bench/bench_qdq_lint.py, and run here with YOLOV9_SLOW_TESTS=1.
MATRIX = [c if c in (*BLOCK_CONFIGS, "gelan-s", "yolov9-s") else
          pytest.param(c, marks=slow_matrix_case("bench/bench_qdq_lint.py")) for c in CONFIGS]


@pytest.mark.parametrize("cfg", MATRIX)
def test_every_conv_is_quantized(cfg):
    fp, q = float_and_quantized(cfg)
    fp_convs = {n for n, m in fp.named_modules() if isinstance(m, nn.Conv2d)}
    dfl_convs = {n for n, m in fp.named_modules() if isinstance(m, nn.Conv2d) and ".dfl" in n}
    q_convs = {n: m for n, m in q.named_modules() if isinstance(m, QuantConv2d)}
    assert set(q_convs) == fp_convs - dfl_convs
    assert set(float_conv_names(q)) == dfl_convs and dfl_convs  # DFL stays float on purpose, and says so
    for name, conv in q_convs.items():
        assert conv.input_quantizer.is_enabled, f"{name}: input quantizer off"
        assert conv.input_quantizer.amax is not None and conv.input_quantizer.amax.numel() == 1
        assert conv.weight_quantizer.amax.shape == (conv.out_channels, 1, 1, 1), f"{name}: not per channel"
    assert not any(isinstance(m, TensorQuantizer) for m in q.modules() if isinstance(m, DFL))


@pytest.mark.parametrize("cfg", MATRIX)
def test_one_scale_per_concat_pool_add_and_shared_tensor(cfg):
    _, q = float_and_quantized(cfg)
    assert scale_violations(q, torch.rand(1, 3, IMGSZ, IMGSZ)) == []


def test_checker_sees_a_broken_tie():
    """The rule check can fail: untie one concat input and give it another range."""
    _, q = float_and_quantized("gelan-s")
    q = deepcopy(q)
    cat = q.model[11].input_quantizers  # gelan-s layer 11: Concat of the upsampled P5 and P4
    cat[0] = deepcopy(cat[0])
    cat[0].amax = cat[0].amax * 2
    assert any("concat" in v for v in scale_violations(q, torch.rand(1, 3, IMGSZ, IMGSZ)))


def test_concat_groups_reach_across_layers():
    """gelan-s: layer 12's output feeds the upsample into concat 14 and concat 17 directly, so both
    concats (and both RepNCSPELAN4 inputs after them) must share one scale."""
    _, q = float_and_quantized("gelan-s")
    assert q.model[14].input_quantizers[0] is q.model[17].input_quantizers[1]
    assert q.model[13].input_quantizer is q.model[14].input_quantizers[0]
    assert q.model[15].cv1.conv.input_quantizer is q.model[14].input_quantizers[1]


def test_disabling_quantization_gives_the_float_model():
    """Compared on the raw head maps of both heads: this untrained model's decoded output came out
    bit for bit the same with and without quantization for 3 of 40 random inputs (the suite once
    drew one), its raw maps for none."""
    fp, q = float_and_quantized("yolov9-s")
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))

    def raw_maps(model):
        return [level for head in model(x)[1] for level in head]

    with torch.no_grad():
        ref = raw_maps(fp)
        with quantization_disabled(q):
            off = raw_maps(q)
        on = raw_maps(q)
    assert len(ref) == 6 and all(torch.equal(a, b) for a, b in zip(ref, off))
    assert not all(torch.equal(a, b) for a, b in zip(ref, on))
    assert all(qz.is_enabled for qz in quantizers(q))  # the context restored every quantizer


def test_disabling_only_the_activations_keeps_the_int8_weights():
    q = prepare(tiny_model().fuse().eval())  # features that keep a trained network's scale
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    calibrate(q, [x])
    with torch.no_grad():
        with quantization_disabled(q, activations_only=True):
            weights_only = q(x)[1]  # the raw head outputs
            on = [qz for qz in quantizers(q) if qz.is_enabled]
        with quantization_disabled(q):
            none = q(x)[1]
        both = q(x)[1]
    assert on and all(qz.axis == 0 for qz in on)  # the weights' per-channel quantizers, and only they
    assert len(on) < len(quantizers(q)) and all(qz.is_enabled for qz in quantizers(q))
    assert not any(torch.equal(a, b) for a, b in zip(weights_only, none))
    assert not any(torch.equal(a, b) for a, b in zip(weights_only, both))


def test_set_quantization_per_module():
    _, q = float_and_quantized("gelan-t")
    q = deepcopy(q)
    set_quantization(q.model[0], False)
    assert not q.model[0].conv.input_quantizer.is_enabled and q.model[1].conv.weight_quantizer.is_enabled
    set_quantization(q.model[0], True)
    assert q.model[0].conv.input_quantizer.is_enabled


def test_skip_layers_stay_float_and_are_recorded(tmp_path):
    fp, full = float_and_quantized("gelan-s")
    skip = [2, 15]
    q = prepare(deepcopy(fp), skip_layers=skip)
    # the fully quantized model's scale sharing (found on a copy here, on the model itself without skips)
    assert q.quant_info.plan == full.quant_info.plan and q.quant_info.skip_layers == skip
    for i, layer in enumerate(q.model):
        quantized = [m for m in layer.modules() if isinstance(m, TensorQuantizer)]
        float_convs = [n for n, m in layer.named_modules() if type(m) is nn.Conv2d and ".dfl" not in f".{n}"]
        assert (not quantized and float_convs) if i in skip else not float_convs, f"layer {i}"
    skipped_convs = {n for n in float_conv_names(q) if ".dfl" not in n}
    assert skipped_convs and {int(n.split(".")[1]) for n in skipped_convs} == set(skip)
    calibrate(q, [torch.rand(1, 3, IMGSZ, IMGSZ)])
    assert scale_violations(q, torch.rand(1, 3, IMGSZ, IMGSZ)) == []
    path = save_checkpoint(make_checkpoint(q), tmp_path / "ptq.pt")
    loaded, ckpt = load_quantized(path)
    assert ckpt["quant"]["skip_layers"] == skip and set(float_conv_names(loaded)) == set(float_conv_names(q))


def test_parse_skip_layers():
    assert parse_skip_layers("22, 3,-1", 23) == [3, 22]
    assert parse_skip_layers("", 23) == []
    for bad in ("23", "x"):
        with pytest.raises(UserError):
            parse_skip_layers(bad, 23)


def test_checkpoint_reloads_bit_for_bit(tmp_path):
    """Safe loading (plain torch.load with weights_only, no allowlist) rebuilds the same model."""
    fp, _ = float_and_quantized("yolov9-t")
    q = prepare(deepcopy(fp), skip_layers=[3])
    calibrate(q, [torch.rand(2, 3, IMGSZ, IMGSZ)], "percentile")
    path = save_checkpoint(make_checkpoint(q, epoch=3, opt={"weights": tmp_path / "fp.pt"}), tmp_path / "q.pt")
    torch.load(path, weights_only=True)  # plain data only: nothing to allow-list
    loaded, ckpt = load_quantized(path)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        a, b = q.eval()(x)[0], loaded(x)[0]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert len(quantizers(loaded)) == len(quantizers(q))
    assert loaded.quant_info.calibration["method"] == "percentile" and ckpt["epoch"] == 3
    assert loaded.model[5].cv1.conv.input_quantizer is not None


def test_calibration_methods_give_different_finite_ranges():
    torch.manual_seed(0)
    cal = RangeCalibrator()
    for _ in range(3):
        x = torch.randn(20000)
        x[:3] *= 30  # a few outliers: the methods disagree about clipping them
        cal.collect(x)
    amax = {m: float(cal.compute_amax(m, percentile=99.9)) for m in ("max", "percentile", "mse", "entropy")}
    assert all(0 < v < float("inf") for v in amax.values()), amax
    assert len({round(v, 5) for v in amax.values()}) == 4, amax
    assert amax["max"] == pytest.approx(float(cal._max)) and amax["percentile"] < amax["max"]


ACTIVATIONS = {  # |x| shapes a calibrator meets: images, SiLU outputs, heavy tails, bf16's coarse values
    "image": lambda n: (torch.rand(n) * 255).round() / 255,
    "silu": lambda n: nn.functional.silu(torch.randn(n) * 3),
    "relu": lambda n: torch.relu(torch.randn(n)),
    "student_t": lambda n: torch.distributions.StudentT(3.0).sample((n,)),
    "silu_bf16": lambda n: nn.functional.silu(torch.randn(n) * 3).bfloat16(),
}


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_every_method_gives_a_sane_range(kind):
    """Each method's range is finite, at most the exact max, and not a small fraction of it:
    a range far below the bulk of the data clips nearly everything (broken PTQ)."""
    torch.manual_seed(0)
    cal = RangeCalibrator()
    for scale in (0.5, 1.0, 2.0):  # growing batches: the histogram range grows past the max
        cal.collect(ACTIVATIONS[kind](50000) * scale)
    top = float(cal._max)
    floor = 0.1 if kind == "student_t" else 0.5  # a heavy tail may rightly be clipped hard
    amax = {m: float(cal.compute_amax(m, percentile=99.99)) for m in ("max", "percentile", "mse", "entropy")}
    bad = {m: a for m, a in amax.items() if not floor * top <= a <= top * (1 + 1e-6)}
    assert not bad, (bad, top)


def test_entropy_calibrated_model_stays_close_to_float():
    """A toy conv net on images: quantized with each method, its output stays near the float one,
    entropy as close as percentile."""
    torch.manual_seed(0)
    fp = DetectionModel(shrunk_config("gelan-t")).fuse().eval()
    q = prepare(deepcopy(fp))
    collect_stats(q, [torch.rand(2, 3, IMGSZ, IMGSZ) for _ in range(2)])
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        ref = fp(x)[0]
        err = {}
        for method in ("max", "percentile", "mse", "entropy"):
            load_amax(q, method)
            amax = [float(v) for v in amax_state(q).values() if v.numel() == 1]
            assert all(0 < a < float("inf") for a in amax), method
            err[method] = float((q(x)[0] - ref).norm() / ref.norm())
    assert err["entropy"] <= 3 * err["percentile"] + 1e-3, err
    assert max(err.values()) < 0.2, err


def test_calibrator_range_grows_by_merging_bins():
    cal = RangeCalibrator()
    small, large = torch.rand(1000) * 1e-3, torch.rand(1000) * 5.0
    cal.collect(small)
    cal.collect(large)
    assert len(cal._counts) == RangeCalibrator.NUM_BINS and float(cal._counts.sum()) == 2000
    assert float(cal.compute_amax("max")) == pytest.approx(float(large.abs().max()))
    assert cal._range >= float(large.max())
    assert 0 < float(cal.compute_amax("mse")) <= cal._range


def test_model_calibration_methods_differ():
    fp, _ = float_and_quantized("gelan-t")
    q = prepare(deepcopy(fp))
    collect_stats(q, [torch.rand(2, 3, IMGSZ, IMGSZ) for _ in range(2)])
    ranges = {}
    for method in ("max", "percentile"):
        load_amax(q, method, percentile=99.0)
        ranges[method] = {k: float(v) for k, v in amax_state(q).items() if v.numel() == 1}
    assert all(v == v and v > 0 for v in ranges["percentile"].values())
    smaller = sum(ranges["percentile"][k] < ranges["max"][k] for k in ranges["max"])
    assert smaller > len(ranges["max"]) // 2
    with pytest.raises(UserError):
        load_amax(q, "median")


@pytest.mark.parametrize("cfg", ["gelan-tiny-seg", "yolov9-tiny-dseg"])
def test_segmentation_models_quantize_and_reload(tmp_path, cfg):
    # Not segmentation QAT yet: module swapping, the scale rules and the checkpoint already hold for
    # the mask towers and prototype layers (Proto's upsampling shares its input's scale).
    torch.manual_seed(0)
    fp = Model(ASSETS / f"{cfg}.yaml", nc=2).fuse().eval()
    q = prepare(deepcopy(fp))
    calibrate(q, [torch.rand(2, 3, IMGSZ, IMGSZ)])
    convs = {n for n, m in fp.named_modules() if isinstance(m, nn.Conv2d) and ".dfl" not in n}
    assert {n for n, m in q.named_modules() if isinstance(m, QuantConv2d)} == convs
    assert any(".proto." in n for n in convs) and any(".cv4." in n or ".cv7." in n for n in convs)
    assert scale_violations(q, torch.rand(1, 3, IMGSZ, IMGSZ)) == []
    path = save_checkpoint(make_checkpoint(q, epoch=1, opt={}), tmp_path / "q.pt")
    loaded, _ = load_quantized(path)
    x = torch.rand(1, 3, IMGSZ, 96)
    with torch.no_grad():
        (a, (_, _, pa)), (b, (_, _, pb)) = q.eval()(x), loaded(x)
    assert type(loaded) is SegmentationModel and torch.equal(a, b) and torch.equal(pa, pb)


def test_deferred_compile_compiles_on_the_first_call_only():
    """What Model Optimizer's import gets for ``torch.compile``: both decorator forms, the function's
    name kept, one compilation, and only when the function is first called."""
    from models.quant_modules import deferred_compile

    compiled = []

    def compile_now(fn, **options):
        compiled.append((fn.__name__, options))
        return lambda *args: ("compiled", fn(*args))

    torch_compile = deferred_compile(compile_now)

    @torch_compile(dynamic=True)
    def double(x):
        return 2 * x

    def square(x):
        return x * x

    squared = torch_compile(square)
    assert compiled == [] and double.__name__ == "double"
    assert double(3) == ("compiled", 6) and double(4) == ("compiled", 8)
    assert squared(3) == ("compiled", 9)
    assert compiled == [("double", {"dynamic": True}), ("square", {})]


@pytest.mark.parametrize("kind", ["activation", "weight"])
def test_a_copied_quantizer_is_the_one_model_optimizer_builds(kind):
    """Quantizers are copies of a prototype (Model Optimizer's constructor costs 0.4 ms each): every
    attribute equals a freshly constructed one's, and nothing mutable is shared between copies."""
    from copy import deepcopy

    from modelopt.torch.quantization.config import QuantizerAttributeConfig

    from models.quant_modules import Int8Quantizer, RangeCalibrator, activation_quantizer, weight_quantizer

    settings = dict(num_bits=8, axis=None, calibrator=RangeCalibrator) if kind == "activation" else \
        dict(num_bits=8, axis=0)
    built = Int8Quantizer(QuantizerAttributeConfig(**settings))
    make = activation_quantizer if kind == "activation" else weight_quantizer
    copied, other = make(), make()
    assert list(vars(copied)) == list(vars(built))
    for name, value in vars(built).items():
        mine = vars(copied)[name]
        if hasattr(value, "__dict__") and not isinstance(value, type):  # the calibrator: same settings, its own
            assert type(mine) is type(value) and vars(mine).keys() == vars(value).keys()
            assert mine is not vars(other)[name]
            assert all(str(vars(mine)[k]) == str(vars(value)[k]) for k in vars(value))
        else:
            assert type(mine) is type(value) and str(mine) == str(value), name
            if isinstance(value, (dict, list, set)):
                assert mine is not vars(other)[name]
    x = torch.randn(2, 4, 5, 5)
    for q in (built, copied):
        q.disable_quant(), q.enable_calib()
        q(x)
        q.load_calib_amax() if kind == "weight" else q.load_calib_amax("max")
        q.enable_quant(), q.disable_calib()
    assert torch.equal(built(x), copied(x)) and torch.equal(built.amax, copied.amax)
    assert not hasattr(other, "_amax")  # the other copy saw nothing
    assert deepcopy(copied).amax is not None
