"""Q/DQ parameter normalisation: what a fake-quant backend writes becomes the form ONNX Runtime and
TensorRT accept, without changing a value; a graph already in that form is left untouched."""
from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from models.quant_modules import QuantConv2d
from tests.export_helpers import cpu_session
from tests.test_qdq_lint import C, Builder
from utils.deployment.qdq_lint import lint
from utils.deployment.qdq_normalize import canonical_layout, normalize_qdq


def export(module: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(module.eval(), x, buffer, opset_version=17, dynamo=False, input_names=["x"],
                      output_names=["y"])
    return onnx.load_from_string(buffer.getvalue())


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = cpu_session(model.SerializeToString())
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def model_optimizer_conv(c_out: int) -> QuantConv2d:
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(4, c_out, 1))
    conv.calibrate_weight()
    conv.input_quantizer.amax = torch.tensor(1.0)
    return conv


class TorchFakeQuantConv(nn.Module):
    """The same quantized conv with PyTorch's fused fake-quant ops instead of Model Optimizer's."""

    def __init__(self, c_out: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, c_out, 1)
        self.weight_scale = (self.conv.weight.detach().abs().amax((1, 2, 3)) / 127).clone()
        self.input_scale = torch.tensor([1 / 127])  # PyTorch keeps a per-tensor scale as a (1,) tensor

    def forward(self, x):
        zeros = torch.zeros(self.weight_scale.shape, dtype=torch.int32)
        w = torch.fake_quantize_per_channel_affine(self.conv.weight, self.weight_scale, zeros, 0, -128, 127)
        x = torch.fake_quantize_per_tensor_affine(x, self.input_scale, torch.zeros(1, dtype=torch.int32), -128, 127)
        return nn.functional.conv2d(x, w, self.conv.bias)


@pytest.mark.parametrize("backend", [model_optimizer_conv, TorchFakeQuantConv])
def test_one_output_channel_exports_runnable_and_equal_whatever_the_fake_quant_backend(backend):
    module = backend(1)
    x = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    model = export(module, x)
    assert [f for f in lint(model) if f.category == "qdq_spec"]  # the backend's own form breaks the spec
    assert normalize_qdq(model) >= 2
    assert lint(model) == []
    onnx.checker.check_model(model, full_check=True)
    with torch.no_grad():
        np.testing.assert_allclose(run(model, x.numpy()), module(x).numpy(), atol=1e-5)
    weight_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and "weight" in n.input[0])
    assert [(a.name, a.i) for a in weight_q.attribute] == [("axis", 0)]
    assert normalize_qdq(model) == 0  # idempotent


def test_model_optimizer_one_class_export_is_refused_by_onnx_runtime_before_normalisation():
    """The defect itself (issue 11), so this test fails loudly if a future backend stops needing the pass."""
    module = model_optimizer_conv(1)
    model = export(module, torch.rand(1, 4, 8, 8))
    with pytest.raises(Exception, match="scale must be 1D tensor with size 4"):
        run(model, np.random.rand(1, 4, 8, 8).astype(np.float32))


def test_a_canonical_graph_is_left_byte_for_byte():
    model = export(model_optimizer_conv(3), torch.rand(1, 4, 8, 8))
    before = model.SerializeToString()
    assert normalize_qdq(model) == 0 and model.SerializeToString() == before
    assert lint(model) == []


def test_hand_written_forms_of_the_same_quantization():
    b = Builder()
    w = b.pair(b.weight(), np.full((C, 1, 1, 1), 0.02), np.zeros((C, 1, 1, 1), np.int8), axis=0)  # keepdim amax
    x = b.pair("x", np.full((1, 1, 1, 1), 0.1), np.zeros((1, 1, 1, 1), np.int8))
    model = b.model("x", b.op("Conv", [x, w]))
    reference = Builder()
    expected = reference.model("x", reference.op("Conv", [reference.qdq("x", 0.1), reference.pair(
        reference.weight(), np.full(C, 0.02), np.zeros(C, np.int8), axis=0)]))
    assert normalize_qdq(model) == 4
    assert lint(model) == []
    inp = np.random.default_rng(2).random((1, C, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(run(model, inp), run(expected, inp))
    assert len(model.graph.initializer) == len(expected.graph.initializer)  # the replaced originals are gone


def test_forms_that_would_change_values_are_left_for_the_lint():
    b = Builder()
    w = b.pair(b.weight(), np.full(C, 0.02), np.zeros(C, np.int8))  # 1-D, no axis: axis 1 by the spec
    model = b.model("x", b.op("Conv", [b.pair("x", 0.1, zero=None), w]))  # no zero point: uint8
    before = model.SerializeToString()
    assert normalize_qdq(model) == 0 and model.SerializeToString() == before
    messages = " ".join(f.message for f in lint(model))
    assert "no zero point" in messages and "weight is not quantized per channel on axis 0" in messages


@pytest.mark.parametrize("scale, axis, source, expected", [
    ((1, 1, 1, 1), None, (1, 64, 1, 1), ((1,), 0)),  # one output channel: per channel on axis 0
    ((1, 1, 1, 1), None, None, ((), None)),  # an activation's one-element range: per tensor
    ((1,), None, (8, 64, 3, 3), ((), None)),  # one range for a whole weight: per tensor, as written
    ((), None, (1, 64, 1, 1), ((1,), 0)),
    ((8, 1, 1, 1), 0, (8, 64, 3, 3), ((8,), 0)),
    ((8, 1, 1, 1), None, (8, 64, 3, 3), ((8,), 0)),
    ((8,), 0, (8, 64, 3, 3), ((8,), 0)),
    ((8, 1, 1, 1), 1, (8, 64, 3, 3), None),  # contradicts its axis
    ((8, 1), None, (8, 64, 3, 3), None),  # rank differs from the tensor's: alignment unknown
    ((8, 64, 1, 1), 0, (8, 64, 3, 3), None),  # two varying dims
])
def test_canonical_layout(scale, axis, source, expected):
    assert canonical_layout(scale, axis, source) == expected
