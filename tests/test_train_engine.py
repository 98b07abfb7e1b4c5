"""The training step: optimizer groups, warm-up, EMA, and a tiny model overfitting real images."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from utils.loss_tal import build_loss
from utils.training.ema import ModelEMA
from utils.training.engine import train_one_epoch
from utils.training.optim import Warmup, build_optimizer, lr_lambda, param_groups

ASSETS = Path(__file__).parent / "assets"
CPU = torch.device("cpu")


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1, bias=True), nn.Linear(4, 2))


def test_param_groups_keep_norms_and_biases_out_of_weight_decay():
    net = small_net()
    groups = param_groups(net)
    ids = {k: {id(p) for p in v} for k, v in groups.items()}
    assert ids["decay"] == {id(net[0].weight), id(net[2].weight), id(net[3].weight)}
    assert ids["no_decay"] == {id(net[1].weight)}
    assert ids["bias"] == {id(net[0].bias), id(net[1].bias), id(net[2].bias), id(net[3].bias)}
    opt = build_optimizer(net, "SGD", lr=0.01, momentum=0.9, weight_decay=5e-4)
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"bias": 0.0, "decay": 5e-4, "no_decay": 0.0}


def test_lr_schedules_run_from_one_to_lrf():
    for cosine in (False, True):
        lf = lr_lambda(10, 0.01, cosine)
        assert lf(0) == pytest.approx(1.0) and lf(10) == pytest.approx(0.01)
        assert lf(3) > lf(6)


def test_lr_schedules_hold_the_final_lr_for_the_last_epochs():
    for cosine in (False, True):
        lf = lr_lambda(10, 0.01, cosine, hold=3)
        assert lf(0) == pytest.approx(1.0) and lf(5) > lf(6) > 0.01
        assert [lf(e) for e in (7, 8, 9, 10)] == pytest.approx([0.01] * 4)


def test_warmup_ramps_bias_down_others_up_and_accumulation_up():
    net = small_net()
    opt = build_optimizer(net, "SGD", lr=0.01, momentum=0.937)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    w = Warmup(iters=100, bias_lr=0.1, momentum_start=0.8, momentum=0.937, accumulate=4)
    assert w.apply(opt, 0, 1.0) == 1
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["bias"] == pytest.approx(0.1) and lrs["decay"] == 0.0
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.8)
    assert w.apply(opt, 100, 0.5) == 4
    assert all(g["lr"] == pytest.approx(0.005) for g in opt.param_groups)


def test_ema_ramps_its_decay_and_follows_the_model():
    net = small_net()
    ema = ModelEMA(net, decay=0.9999, tau=2000)
    assert ema.decay(1) < 0.001 and ema.decay(20000) > 0.999
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    before = ema.ema[0].weight.clone()
    ema.update(net)
    d = ema.decay(1)
    assert torch.allclose(ema.ema[0].weight, d * before + (1 - d) * net[0].weight)
    assert not any(p.requires_grad for p in ema.ema.parameters())


def test_ema_without_a_ramp_holds_its_decay_from_the_first_update():
    """A fine-tune's average (qat.py quantize --ema-decay) clings to the trained start at once."""
    net = small_net()
    start = net[0].weight.detach().clone()
    ema = ModelEMA(net, decay=0.9, tau=0)
    assert ema.decay(1) == ema.decay(1000) == 0.9
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.ema[0].weight, start + 0.1)


def test_ema_follows_batchnorm_statistics_and_tensors_swapped_between_updates():
    """The tensor pairs are looked up once: later in-place updates, a layout change (new parameter
    data) and a replaced buffer must all still reach the average."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = ModelEMA(net, decay=0.5, tau=1e-9)  # decay 0.5 from the first update on
    ema.update(net)
    net.train()(torch.rand(2, 3, 8, 8))  # running statistics move in place
    net.to(memory_format=torch.channels_last)  # the conv weight gets new data
    net[1].running_var = torch.full((4,), 3.0)  # a new buffer tensor
    expected = {k: (v + net.state_dict()[k]) / 2 for k, v in ema.ema.state_dict().items() if v.dtype.is_floating_point}
    ema.update(net)
    for k, v in expected.items():
        assert torch.allclose(ema.ema.state_dict()[k], v), k


@pytest.fixture(scope="module")
def four_images(coco128_dir, tmp_path_factory) -> Path:
    """A list file of four COCO128 images (labels are found by the images/ -> labels/ rule)."""
    images = sorted((coco128_dir / "images" / "train2017").glob("*.jpg"))[:4]
    path = tmp_path_factory.mktemp("overfit") / "four.txt"
    path.write_text("".join(f"{p.resolve()}\n" for p in images))
    return path


@pytest.mark.parametrize("cfg, steps, ratio", [("gelan-tiny", 15, 0.65), ("yolov9-tiny", 8, 0.9)])
def test_tiny_model_overfits_a_few_images(four_images, cfg, steps, ratio):
    from models.yolo import DetectionModel
    from utils.dataloaders import create_dataloader

    torch.manual_seed(0)
    loader, _ = create_dataloader(str(four_images), 64, 4, 32, workers=0)
    model = DetectionModel(ASSETS / f"{cfg}.yaml", nc=80)
    loss_fn = build_loss(model)
    opt = build_optimizer(model, "Adam", lr=0.002, momentum=0.9, weight_decay=0.0)
    ema = ModelEMA(model)
    history = []
    for epoch in range(steps):
        stats = train_one_epoch(model, loader, loss_fn, opt, device=CPU, epoch=epoch, ema=ema, progress=False)
        assert stats.iters == 1 and stats.images == 4 and stats.optimizer_steps == 1
        history.append(sum(stats.loss))
    assert all(torch.isfinite(torch.tensor(history)))
    assert sum(history[-3:]) / 3 < ratio * history[0], history
    assert ema.updates == steps


def test_extra_loss_and_max_iters(four_images):
    """QAT's use: stop after max_iters batches and add a distillation-style term to the loss."""
    from models.yolo import DetectionModel
    from utils.dataloaders import create_dataloader

    torch.manual_seed(0)
    loader, _ = create_dataloader(str(four_images), 64, 1, 32, workers=0)
    model = DetectionModel(ASSETS / "gelan-tiny.yaml", nc=80)
    opt = build_optimizer(model, "SGD", lr=0.0)
    calls = []

    def extra(imgs, preds, targets):
        calls.append(imgs.shape[0])
        return torch.stack([p.float().pow(2).mean() for p in preds]).sum()

    stats = train_one_epoch(model, loader, build_loss(model), opt, device=CPU, max_iters=3, accumulate=2,
                            extra_loss_fn=extra, progress=False)
    assert stats.iters == 3 and calls == [1, 1, 1]
    assert stats.optimizer_steps == 2  # after batches 2 and 3 (the last one always steps)
    assert stats.extra > 0


def test_compile_falls_back_to_eager_on_cpu_and_layouts_follow_the_model(four_images, caplog):
    """--compile on a machine without CUDA trains eagerly, with the same result; images are fed in the
    layout the model's convolutions were given, and channels-last is a CUDA-only conversion."""
    from models.yolo import DetectionModel
    from utils.dataloaders import create_dataloader
    from utils.training.acceleration import channels_last, maybe_compile, memory_format

    caplog.set_level("INFO")
    loader, _ = create_dataloader(str(four_images), 64, 2, 32, workers=0)
    batch = next(iter(loader))
    weights = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = channels_last(DetectionModel(ASSETS / "gelan-tiny.yaml", nc=80), CPU)
        assert memory_format(model) == torch.contiguous_format
        forward = maybe_compile(model, CPU, compiled)
        assert forward is model
        train_one_epoch(model, [batch] * 2, build_loss(model), build_optimizer(model, "SGD", lr=0.01), device=CPU,
                        progress=False, forward=forward)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    assert "CUDA devices only" in caplog.text
    net = small_net().to(memory_format=torch.channels_last)
    assert memory_format(net) == torch.channels_last


def test_cpu_speedups_are_opt_in_and_train_in_bf16_where_the_cpu_computes_it(four_images, monkeypatch):
    """The demo's CPU knobs: channels-last only when asked, bf16 autocast only on a CPU with bf16
    arithmetic (elsewhere full precision), AdamW's foreach step; a step with all of them trains."""
    from models.yolo import DetectionModel
    from utils.dataloaders import create_dataloader
    from utils.training import acceleration
    from utils.training.acceleration import channels_last, cpu_bf16, memory_format, multi_tensor_step
    from utils.training.engine import make_precision

    assert make_precision(CPU, "bf16").dtype is None  # CPU training stays FP32 unless asked
    assert not cpu_bf16(CPU, False) and not cpu_bf16(torch.device("meta"), True)
    monkeypatch.setattr(acceleration, "cpu_computes_bf16", lambda: False)
    assert not cpu_bf16(CPU, True)  # emulated bf16 would be slower than FP32
    monkeypatch.setattr(acceleration, "cpu_computes_bf16", lambda: True)
    assert cpu_bf16(CPU, True)
    precision = make_precision(CPU, "bf16", cpu_bf16=True)
    assert precision.dtype == torch.bfloat16 and not precision.scaler.is_enabled()
    assert make_precision(CPU, "off", cpu_bf16=True).dtype is None

    torch.manual_seed(0)
    model = channels_last(DetectionModel(ASSETS / "gelan-tiny.yaml", nc=80), CPU, cpu=True)
    assert memory_format(model) == torch.channels_last
    optimizer = multi_tensor_step(build_optimizer(model, "AdamW", lr=0.001))
    assert all(g["foreach"] for g in optimizer.param_groups)
    loader, _ = create_dataloader(str(four_images), 64, 2, 32, workers=0)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_one_epoch(model, loader, build_loss(model), optimizer, device=CPU, precision=precision,
                            progress=False)
    assert stats.optimizer_steps == 2 and all(torch.isfinite(torch.tensor(stats.loss)))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast leaves the weights FP32
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
