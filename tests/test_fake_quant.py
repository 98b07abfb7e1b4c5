"""Our INT8 fake quantization against Model Optimizer's: same values, same gradients, same ONNX, no build."""
from __future__ import annotations

import io

import onnx
import onnx.numpy_helper
import pytest
import torch
import torch.nn as nn
from modelopt.torch.quantization import tensor_quant
from modelopt.torch.quantization.config import QuantizerAttributeConfig
from modelopt.torch.quantization.nn import TensorQuantizer
from modelopt.torch.quantization.nn.modules import tensor_quantizer

from models.fake_quant import DEAD_AMAX, fake_quant_int8
from models.quant_modules import Int8Quantizer, QuantConv2d, activation_quantizer, weight_quantizer


def _modelopt(x: torch.Tensor, amax: torch.Tensor, narrow_range: bool) -> torch.Tensor:
    """Model Optimizer's fake quantization as its TensorQuantizer calls it (signed INT8)."""
    return tensor_quant.fake_tensor_quant(x, amax, None, 8, False, narrow_range)


def _values_and_grads(fn, x: torch.Tensor, amax: torch.Tensor, narrow_range: bool, grad: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = fn(x, amax, narrow_range)
    y.backward(grad)
    return y.detach(), x.grad


CASES = {  # name -> (input shape, amax shape or None for per tensor)
    "per_tensor": ((4, 8, 6, 5), None),
    "per_channel": ((16, 8, 3, 3), (16, 1, 1, 1)),
    "one_channel": ((1, 8, 3, 3), (1, 1, 1, 1)),  # a one-class head's conv: per channel with a single scale
}


@pytest.mark.parametrize("narrow_range", (False, True))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_equal_model_optimizer(case, dtype, narrow_range):
    shape, amax_shape = CASES[case]
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        x = (torch.randn(shape, generator=g) * 10 ** (trial % 5 - 2)).to(dtype)
        top = x.float().abs().amax() if amax_shape is None else x.float().abs().amax(dim=(1, 2, 3), keepdim=True)
        amax = top * (0.3 + torch.rand(top.shape, generator=g))  # clipping and not clipping
        if amax_shape is not None and amax.numel() > 2:
            amax[0], amax[1] = 0.0, DEAD_AMAX / 4  # dead channels quantize to zero
        x.view(-1)[:3] = amax.max().to(dtype) * torch.tensor([1.0, -1.0, 0.5])  # values at the clip edge
        grad = torch.randn(shape, generator=g).to(dtype)
        ours, ours_grad = _values_and_grads(fake_quant_int8, x, amax, narrow_range, grad)
        theirs, theirs_grad = _values_and_grads(_modelopt, x, amax, narrow_range, grad)
        assert ours.dtype == theirs.dtype == dtype
        assert torch.equal(ours, theirs), (case, dtype, trial, int((ours != theirs).sum()))
        assert torch.equal(ours_grad, theirs_grad), (case, dtype, trial, int((ours_grad != theirs_grad).sum()))


def test_rounds_half_to_even_and_clamps_like_tensorrt():
    """Our quantizers' range is TensorRT's and ONNX's INT8: [-128, 127], the scale mapping amax to 127."""
    amax = torch.tensor(127.0)  # scale 1: inputs are their own quantized values
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, 200.0, -127.4, -127.5, -128.4, -300.0])
    assert fake_quant_int8(x, amax).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 126.0, 127.0, -127.0, -128.0, -128.0,
                                                 -128.0]
    assert fake_quant_int8(x, amax, narrow_range=True).min() == -127.0
    assert not activation_quantizer()._narrow_range and not weight_quantizer()._narrow_range


def test_amax_gets_no_gradient_and_channels_last_stays_channels_last():
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    amax = torch.tensor(1.0, requires_grad=True)
    y = fake_quant_int8(x, amax)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    assert amax.grad is None and x.grad is not None


def test_quantizers_never_use_model_optimizers_kernels(monkeypatch):
    """Calibration, fake quantization, its gradient and the ONNX export of our quantizers run without
    Model Optimizer's fake-quant function, whose CUDA path builds an extension on first use."""
    def refuse(*args, **kwargs):
        raise AssertionError("Model Optimizer's fake_tensor_quant was called")

    monkeypatch.setattr(tensor_quantizer, "fake_tensor_quant", refuse)
    monkeypatch.setattr(tensor_quant, "get_cuda_ext", refuse)
    conv = QuantConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1))
    conv.input_quantizer.disable_quant()
    conv.input_quantizer.enable_calib()
    conv(torch.rand(2, 3, 8, 8))
    conv.input_quantizer.disable_calib()
    conv.input_quantizer.enable_quant()
    conv.input_quantizer.amax = conv.input_quantizer._calibrator.compute_amax("max")
    conv.calibrate_weight()
    conv(torch.rand(2, 3, 8, 8)).sum().backward()
    torch.onnx.export(conv.eval(), torch.rand(1, 3, 8, 8), io.BytesIO(), dynamo=False, opset_version=17)


def _exported(quantizer_factory) -> onnx.ModelProto:
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1))
    conv.input_quantizer, conv.weight_quantizer = quantizer_factory()
    conv.input_quantizer.amax = torch.tensor(0.9)
    conv.calibrate_weight()
    buffer = io.BytesIO()
    torch.onnx.export(conv.eval(), torch.rand(1, 3, 8, 8), buffer, dynamo=False, opset_version=17,
                      do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def _canonical(model: onnx.ModelProto) -> list:
    """The graph with value names replaced by their order of appearance (the exporter numbers them freely)."""
    ids: dict[str, int] = {}

    def name(v: str) -> int:
        return ids.setdefault(v, len(ids))

    graph = model.graph
    inits = {i.name: onnx.numpy_helper.to_array(i).tolist() for i in graph.initializer}
    return [(n.op_type, [(name(v), inits.get(v)) for v in n.input], [name(v) for v in n.output],
             [onnx.helper.get_attribute_value(a) for a in n.attribute]) for n in graph.node]


def test_onnx_export_and_state_dict_are_model_optimizers():
    def theirs():
        return (TensorQuantizer(QuantizerAttributeConfig(num_bits=8, axis=None)),
                TensorQuantizer(QuantizerAttributeConfig(num_bits=8, axis=0)))

    ours_model, theirs_model = _exported(lambda: (activation_quantizer(), weight_quantizer())), _exported(theirs)
    assert _canonical(ours_model) == _canonical(theirs_model)
    assert [n.op_type for n in ours_model.graph.node].count("QuantizeLinear") == 2
    a, b = activation_quantizer(), TensorQuantizer(QuantizerAttributeConfig(num_bits=8, axis=None))
    a.amax = b.amax = torch.tensor(2.0)
    assert isinstance(a, TensorQuantizer) and isinstance(a, Int8Quantizer)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 5)
    assert torch.equal(a(x), fake_quant_int8(x, torch.tensor(2.0)))
