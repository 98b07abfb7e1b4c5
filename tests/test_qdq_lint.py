"""The Q/DQ lint on small hand-made graphs: a clean one passes, each defect kind is found."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.cli_helpers import run_script
from tests.export_helpers import hand_built_model
from utils.deployment.qdq_lint import CATEGORIES, SKIP_METADATA_KEY, counts, lint, to_json, to_markdown

C = 4  # channels of every feature map in these graphs


class Builder:
    """Grows a small NCHW graph node by node; every tensor gets a unique name."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def _name(self, stem):
        self.n += 1
        return f"{stem}{self.n}"

    def const(self, value, dtype=np.float32):
        name = self._name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type, inputs, n_out=1, **attrs):
        outs = [self._name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def qdq(self, x, scale):
        s, z = self.const(scale), self.const(0, np.int8)
        return self.op("DequantizeLinear", [self.op("QuantizeLinear", [x, s, z]), s, z])

    def pair(self, x, scale, zero=np.int8(0), axis=None):
        """A Q/DQ pair with any scale / zero point (None: no zero point) / axis, as a backend might write it."""
        s = self.const(scale)
        z = [] if zero is None else [self.const(zero, np.asarray(zero).dtype)]
        attrs = {} if axis is None else {"axis": axis}
        return self.op("DequantizeLinear", [self.op("QuantizeLinear", [x, s, *z], **attrs), s, *z], **attrs)

    def weight(self, c_out=C):
        return self.const(np.random.default_rng(1).normal(size=(c_out, C, 1, 1)))

    def conv(self, x, quant_weight=True):
        w = self.const(np.random.default_rng(0).normal(size=(C, C, 1, 1)))
        if quant_weight:
            s, z = self.const(np.full(C, 0.01)), self.const(np.zeros(C), np.int8)
            w = self.op("DequantizeLinear", [self.op("QuantizeLinear", [w, s, z], axis=0), s, z], axis=0)
        return self.op("Conv", [x, w])

    def silu(self, x):
        return self.op("Mul", [x, self.op("Sigmoid", [x])])

    def qconv_silu(self, x, scale=0.1):
        return self.silu(self.conv(self.qdq(x, scale)))

    def model(self, inp, out, metadata=None, value_info=(), out_shape=(1, None, 8, 8)):
        graph = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info(inp, TensorProto.FLOAT, [1, C, 8, 8])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], self.inits,
            value_info=list(value_info))
        m = hand_built_model(graph, 13)
        for k, v in (metadata or {}).items():
            m.metadata_props.add(key=k, value=v)
        onnx.checker.check_model(m)
        return m


def clean_model():
    """Conv+SiLU chains, a MaxPool branch, a one-scale Concat, a both-sides-INT8 residual Add."""
    b = Builder()
    y = b.qconv_silu("x")
    shared = b.qdq(y, 0.05)  # one Q/DQ for both readers of y
    pooled = b.op("MaxPool", [y], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    z = b.silu(b.conv(shared))
    cat = b.op("Concat", [y, pooled, z], axis=1)
    c2 = b.silu(b.conv(b.qdq(cat, 0.05)))  # consumer scale equals every Concat input's scale
    c3 = b.silu(b.conv(b.qdq(c2, 0.2)))
    res = b.op("Add", [b.qdq(c3, 0.3), b.qdq(c2, 0.2)])
    return b.model("x", b.op("Conv", [b.qdq(res, 0.3), b.const(np.ones((C, C, 1, 1)))]))


def test_clean_graph_has_no_findings_except_the_unquantized_tail():
    found = lint(clean_model())
    assert [f.category for f in found] == ["conv_without_qdq"], found  # the last Conv's weight is float


def test_skip_metadata_silences_a_conv_kept_in_float_on_purpose():
    model = clean_model()
    last_conv = [n for n in model.graph.node if n.op_type == "Conv"][-1].name
    model.metadata_props.add(key=SKIP_METADATA_KEY, value=json.dumps([last_conv]))
    assert lint(model) == []
    assert lint(clean_model(), skip_convs={last_conv}) == []


def test_fp_graph_without_qdq_is_not_linted():
    b = Builder()
    assert lint(b.model("x", b.silu(b.conv("x", quant_weight=False)))) == []


def test_conv_without_dq_on_input_and_weight():
    b = Builder()
    y = b.qconv_silu("x")
    out = b.silu(b.conv(y))  # input not quantized
    out = b.silu(b.conv(b.qdq(out, 0.1), quant_weight=False))
    found = lint(b.model("x", out))
    assert counts(found)["conv_without_qdq"] == 2
    assert {"input not dequantized", "weight not dequantized"} <= {f.message.split(":")[0] for f in found}


def test_concat_inputs_with_different_scales():
    b = Builder()
    y1, y2 = b.qconv_silu("x"), b.qconv_silu("x")
    cat = b.op("Concat", [b.qdq(y1, 0.1), b.qdq(y2, 0.2)], axis=1)
    found = lint(b.model("x", b.silu(b.conv(b.qdq(cat, 0.1)))))
    assert [f.category for f in found] == ["concat_scale_mismatch"]
    assert found[0].op_type == "Concat"


def test_concat_output_scale_differs_from_an_input_reader():
    """The anchor's ELAN defect: a Concat input also feeds a Conv quantized with another scale."""
    b = Builder()
    y1 = b.qconv_silu("x")
    y2 = b.silu(b.conv(b.qdq(y1, 0.3)))
    cat = b.op("Concat", [y1, y2], axis=1)
    found = lint(b.model("x", b.silu(b.conv(b.qdq(cat, 0.1)))))
    cats = counts(found)
    assert cats["concat_scale_mismatch"] == 1 and cats["multi_scale_tensor"] == 1


def test_tensor_quantized_with_two_scales():
    b = Builder()
    y = b.qconv_silu("x")
    a = b.silu(b.conv(b.qdq(y, 0.1)))
    c = b.silu(b.conv(b.qdq(y, 0.2)))
    found = lint(b.model("x", b.op("Add", [b.qdq(a, 0.5), b.qdq(c, 0.5)])))
    assert [f.category for f in found] == ["multi_scale_tensor"]
    assert found[0].op_type == "Mul"  # reported at the SiLU that produces y


def test_two_scales_through_a_maxpool_are_reported_once_at_the_source():
    b = Builder()
    y = b.qconv_silu("x")
    pooled = b.op("MaxPool", [y], kernel_shape=[1, 1])
    a = b.silu(b.conv(b.qdq(pooled, 0.1)))
    c = b.silu(b.conv(b.qdq(y, 0.2)))
    found = lint(b.model("x", b.op("Add", [b.qdq(a, 0.5), b.qdq(c, 0.5)])))
    assert [(f.category, f.op_type) for f in found] == [("multi_scale_tensor", "Mul")]


def test_qdq_between_conv_and_its_activation():
    b = Builder()
    pre = b.conv(b.qdq("x", 0.1))
    out = b.silu(b.qdq(pre, 0.1))
    found = lint(b.model("x", b.silu(b.conv(b.qdq(out, 0.1)))))
    assert [f.category for f in found] == ["qdq_splits_conv_activation"]
    assert found[0].op_type == "QuantizeLinear"


def test_residual_add_with_one_float_input():
    b = Builder()
    y = b.qconv_silu("x")
    z = b.silu(b.conv(b.qdq(y, 0.1)))
    res = b.op("Add", [z, b.qdq(y, 0.1)])
    found = lint(b.model("x", b.silu(b.conv(b.qdq(res, 0.1)))))
    assert [f.category for f in found] == ["unfused_residual_add"]


def test_head_arithmetic_add_is_not_a_residual():
    b = Builder()
    y = b.qconv_silu("x")
    lt, rb = b.op("Split", [y], n_out=2, axis=1)
    out = b.op("Add", [b.op("Sub", [b.const(1.0), lt]), b.op("Add", [b.const(1.0), rb])])
    assert lint(b.model("x", out)) == []


def test_dq_into_an_op_tensorrt_runs_in_float():
    b = Builder()
    y = b.qconv_silu("x")
    out = b.op("Softmax", [b.qdq(y, 0.1)], axis=1)
    found = lint(b.model("x", out))
    assert [f.category for f in found] == ["qdq_on_non_int8_op"]
    assert "Softmax" in found[0].message


def test_reports_and_cli(tmp_path, capsys, monkeypatch):
    b = Builder()
    y1, y2 = b.qconv_silu("x"), b.qconv_silu("x")
    cat = b.op("Concat", [b.qdq(y1, 0.1), b.qdq(y2, 0.2)], axis=1)
    model = b.model("x", b.op("Softmax", [b.qdq(cat, 0.1)], axis=1))
    found = lint(model)
    md, js = to_markdown(found, "m.onnx"), to_json(found, "m.onnx")
    assert js["total"] == len(found) == 2 and set(js["counts"]) == set(CATEGORIES)
    assert "## concat_scale_mismatch" in md and "## qdq_on_non_int8_op" in md
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    # the command line in this process (tests/cli_helpers.py): exit 1 on findings, 0 on none, 2 on bad input
    reports = ["--json", str(tmp_path / "f.json"), "--markdown", str(tmp_path / "f.md")]  # the markdown is what it prints
    code, _ = run_script("tools/qdq_lint.py", [str(path), *reports], capsys, monkeypatch)
    assert code == 1 and "concat_scale_mismatch" in (tmp_path / "f.md").read_text()
    assert json.loads((tmp_path / "f.json").read_text())["total"] == 2
    onnx.save(clean_model(), path)
    last_conv = [n for n in clean_model().graph.node if n.op_type == "Conv"][-1].name
    assert run_script("tools/qdq_lint.py", [str(path), "--skip", last_conv], capsys, monkeypatch)[0] == 0
    code, err = run_script("tools/qdq_lint.py", [str(tmp_path / "nope.onnx")], capsys, monkeypatch)
    assert code == 2 and "nope.onnx" in err


def test_dq_of_a_conv_output_into_softmax_is_still_reported():
    b = Builder()
    out = b.op("Softmax", [b.qdq(b.conv(b.qdq("x", 0.1)), 0.1)], axis=1)
    assert [f.category for f in lint(b.model("x", out))] == ["qdq_on_non_int8_op"]


# --- qdq_spec: what ONNX Runtime and TensorRT check before running a graph ---------------------


def spec_messages(model):
    return [f.message for f in lint(model) if f.category == "qdq_spec"]


def one_class_conv(weight_scale_shape=(1, 1, 1, 1), zero=np.int8(0), axis=None):
    """A quantized 1x1 conv with ONE output channel; by default its weight pair as Model Optimizer
    0.47 exports it for a one-class head: (1, 1, 1, 1) scale, scalar zero point, no axis."""
    b = Builder()
    w = b.pair(b.weight(c_out=1), np.full(weight_scale_shape, 0.02), zero, axis)
    return b.model("x", b.op("Conv", [b.qdq("x", 0.1), w]))


def broken(make_weight=None, make_act=None):
    """The clean conv chain with one weight pair or one activation pair built by the caller."""
    b = Builder()
    x = make_act(b, "x") if make_act else b.qdq("x", 0.1)
    w = make_weight(b) if make_weight else b.pair(b.weight(), np.full(C, 0.02), np.zeros(C, np.int8), axis=0)
    return b.model("x", b.silu(b.op("Conv", [x, w])))


def test_the_clean_graph_and_a_canonical_one_class_conv_meet_the_spec():
    assert spec_messages(clean_model()) == []
    assert spec_messages(broken()) == []
    assert lint(one_class_conv((1,), np.zeros(1, np.int8), axis=0)) == []


def test_one_class_weight_as_model_optimizer_exports_it_is_reported_on_q_and_dq():
    found = [f for f in lint(one_class_conv()) if f.category == "qdq_spec"]
    assert [f.op_type for f in found] == ["QuantizeLinear", "DequantizeLinear"]
    assert "scale has shape (1, 1, 1, 1)" in found[0].message
    assert "zero point shape () differs" in found[0].message


SPEC_RULES = {  # rule -> (graph breaking only that rule, what the finding says)
    "scale rank": (lambda: broken(make_act=lambda b, x: b.pair(x, np.full((1, 1, 1, 1), 0.1), np.zeros((1, 1, 1, 1), np.int8))),
                   "scale has shape (1, 1, 1, 1)"),
    "scale length": (lambda: broken(lambda b: b.pair(b.weight(), np.full(C - 1, 0.02), np.zeros(C - 1, np.int8), 0)),
                     f"scale has {C - 1} value(s) for axis 0 of size {C}"),
    "axis range": (lambda: broken(lambda b: b.pair(b.weight(), np.full(C, 0.02), np.zeros(C, np.int8), 4)),
                   "axis 4 is outside"),
    "scale value": (lambda: broken(lambda b: b.pair(b.weight(), np.array([0.02, 0, 0.02, 0.02]), np.zeros(C, np.int8), 0)),
                    "scale has zero, negative or non-finite values"),
    "zero point missing": (lambda: broken(make_act=lambda b, x: b.pair(x, 0.1, zero=None)), "no zero point"),
    "zero point shape": (lambda: broken(lambda b: b.pair(b.weight(), np.full(C, 0.02), np.int8(0), 0)),
                         "zero point shape () differs from scale shape (4,)"),
    "zero point type": (lambda: broken(make_act=lambda b, x: b.pair(x, 0.1, zero=np.uint8(0))),
                        "zero point is uint8, not int8"),
    "zero point value": (lambda: broken(make_act=lambda b, x: b.pair(x, 0.1, zero=np.int8(3))),
                         "zero point is not 0"),
    "weight per tensor": (lambda: broken(lambda b: b.pair(b.weight(), 0.02)),
                          "weight is not quantized per channel on axis 0"),
    "weight on axis 1": (lambda: broken(lambda b: b.pair(b.weight(), np.full(C, 0.02), np.zeros(C, np.int8), 1)),
                         "weight is not quantized per channel on axis 0"),
    "activation per channel": (lambda: broken(make_act=lambda b, x: b.pair(x, np.full(C, 0.1), np.zeros(C, np.int8), 1)),
                               "activation is not quantized per tensor"),
}


@pytest.mark.parametrize("rule", SPEC_RULES)
def test_each_spec_rule_is_reported(rule):
    make, expected = SPEC_RULES[rule]
    messages = spec_messages(make())
    assert len(messages) == 2, messages  # the Q and the DQ of the broken pair
    assert all(expected in m for m in messages), messages
    others = [m for m in messages[0].split("; ") if expected not in m]
    assert others == [], f"{rule} also tripped: {others}"


def test_a_computed_scale_is_reported_and_stops_the_placement_checks():
    b = Builder()
    s = b.op("Abs", [b.const(0.1)])
    z = b.const(0, np.int8)
    x = b.op("DequantizeLinear", [b.op("QuantizeLinear", ["x", s, z]), s, z])
    found = lint(b.model("x", b.silu(b.conv(x))))
    assert {f.category for f in found} == {"qdq_spec"}
    assert all("scale is not a constant" in f.message for f in found) and len(found) == 2


def test_initializer_and_constant_shapes_must_agree_with_their_declarations():
    b = Builder()
    w = b.weight()
    model = b.model("x", b.op("Conv", [b.qdq("x", 0.1), w]),
                    value_info=[helper.make_tensor_value_info(w, TensorProto.FLOAT, [C, C, 3, 3])])
    assert [(f.node, f.op_type) for f in lint(model) if f.category == "qdq_spec"] == [(w, "initializer")]
    b = Builder()
    const = b.op("Constant", [], value=numpy_helper.from_array(np.ones((1, C, 1, 1), np.float32)))
    model = b.model("x", b.op("Add", ["x", const]),
                    value_info=[helper.make_tensor_value_info(const, TensorProto.FLOAT, [1, 2, 1, 1])])
    found = [f for f in lint(model) if f.category == "qdq_spec"]
    assert [f.op_type for f in found] == ["Constant"] and "declared shape (1, 2, 1, 1)" in found[0].message


def test_a_declared_shape_that_shape_inference_contradicts_is_reported():
    b = Builder()
    out = b.silu(b.conv(b.qdq("x", 0.1)))
    found = lint(b.model("x", out, out_shape=(1, C, 9, 9)))
    assert [f.category for f in found] == ["qdq_spec"] and "strict shape inference fails" in found[0].message
