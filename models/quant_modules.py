"""INT8 fake-quantized variants of the layers TensorRT should run in INT8, as real classes.

Every class here quantizes its *inputs* with an ``Int8Quantizer`` (NVIDIA Model Optimizer's
``TensorQuantizer`` computing with ``models.fake_quant``): activations per tensor, convolution
weights per output channel, symmetric (scale amax / 127, zero point 0), clamped to [-128, 127]
as TensorRT's Q/DQ layers clamp. The quantizers start out independent; which of
them must share one scale is decided from the model graph by ``models.quantize_rules`` and
applied by ``models.quantize``, which also owns calibration and checkpoints.

A quantized block is built from the float block it replaces (``from_float``): it adopts the
block's submodules and attributes unchanged, so state-dict keys stay upstream's, and adds its
quantizers under new names (``concat``, ``residual``, ``pool``, ``input_quantizer``...).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.abc
import importlib.machinery
import logging
import sys
import warnings
from typing import Callable, Iterator

import torch
import torch.nn as nn

# Third-party libraries for which Model Optimizer loads quantization plugins whenever they are installed
# (its ``import_plugin`` guards skip a missing one). We quantize none of their models; with transformers
# installed, hiding them took the import from 13.2 to 10.3 s on a 2-core CPU (bench/bench_import.py)
# and dropped modelopt's warning about transformers' version.
_PLUGIN_PACKAGES = frozenset({"accelerate", "apex", "diffusers", "fairscale", "liger_kernel", "megatron", "peft",
                              "torch_geometric", "transformer_engine", "transformers", "trl", "vllm"})
# ``modelopt.torch``'s __init__ imports every technique (distillation, NAS, pruning, sparsity, speculative
# decoding) and torch._dynamo; the quantization package imports what it needs itself.
_BARE_PACKAGES = frozenset({"modelopt.torch"})
# Names the quantization package imports at import time and we never call: its histogram calibrator's
# ``from scipy.stats import entropy`` (``RangeCalibrator`` searches ranges with ``models.range_search``),
# and scipy.stats is more than a second of every start on a 2-core CPU (BENCHMARKS.md). During the import
# such a module is a stand-in whose names import the real one on their first call; afterwards it is gone.
_DEFERRED_MODULES = {"scipy.stats": ("entropy",)}


class _BareLoader(importlib.abc.Loader):
    """Creates a package module (``__path__`` set from its spec) without running its __init__."""

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        pass


def _imported_on_call(module: str, name: str) -> Callable:
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    call.__name__ = call.__qualname__ = name
    return call


class _DeferredModuleLoader(importlib.abc.Loader):
    """A stand-in for a ``_DEFERRED_MODULES`` module: its listed names, each importing the real module
    when first called."""

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        for name in _DEFERRED_MODULES[module.__name__]:
            setattr(module, name, _imported_on_call(module.__name__, name))


def _drop_stand_ins() -> None:
    """Forget the stand-ins, so that a later ``import`` of their module loads the real one."""
    for name in _DEFERRED_MODULES:
        module = sys.modules.get(name)
        if module is not None and isinstance(module.__spec__.loader, _DeferredModuleLoader):
            del sys.modules[name]
            parent, _, child = name.rpartition(".")
            if getattr(sys.modules.get(parent), child, None) is module:
                delattr(sys.modules[parent], child)


class _LeanModelOptimizerFinder(importlib.abc.MetaPathFinder):
    """While on ``sys.meta_path``: the not-yet-imported ``_PLUGIN_PACKAGES`` look absent, the
    ``_BARE_PACKAGES`` load without their __init__ and the ``_DEFERRED_MODULES`` as stand-ins."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in _PLUGIN_PACKAGES:
            raise ModuleNotFoundError(f"hidden while Model Optimizer is imported: {fullname}", name=fullname)
        if fullname in _BARE_PACKAGES:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None:
                spec.loader = _BareLoader()
            return spec
        if fullname in _DEFERRED_MODULES:
            return importlib.machinery.ModuleSpec(fullname, _DeferredModuleLoader())
        return None


def deferred_compile(compile_now: Callable) -> Callable:
    """``torch.compile`` that compiles a function on its first call, not where it is decorated:
    modelopt decorates functions we never call (an LLM log-softmax of its auto-quantize search, FP8
    GEMMs), and deciding the backend at decoration imports TorchInductor, seconds of every start on a
    small CPU."""
    def deferred(model: Callable | None = None, **options):
        if model is None:  # used as @torch.compile(**options)
            return lambda fn: deferred(fn, **options)
        compiled = None

        @functools.wraps(model)
        def first_call_compiles(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_now(model, **options)
            return compiled(*args, **kwargs)
        return first_call_compiles
    return deferred


@contextlib.contextmanager
def _lean_modelopt_import() -> Iterator[None]:
    """Import Model Optimizer's quantization package (and what it imports) without the rest of
    ``modelopt.torch``'s __init__ (``_BARE_PACKAGES``), without its third-party plugins, with
    ``torch.compile`` and scipy.stats deferred (``deferred_compile``, ``_DEFERRED_MODULES``), and
    without the notices it prints that the user neither caused nor can act on: torch's "No CUDA
    runtime is found" on a machine without CUDA (modelopt imports torch.utils.cpp_extension for its
    kernels), the torch.jit.script deprecation (a decorator inside modelopt) and its warning about an
    untested transformers version. Only during this import; a package the process imported before
    stays as it was, and modelopt's other techniques still import when asked for by name."""
    def keep(record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()

    logger = logging.getLogger("torch.utils.cpp_extension")
    logger.addFilter(keep)
    finder = _LeanModelOptimizerFinder()
    sys.meta_path.insert(0, finder)
    compile_now = torch.compile
    torch.compile = deferred_compile(compile_now)
    try:
        with warnings.catch_warnings():
            # a FutureWarning in torch 2.14, a DeprecationWarning in 2.11: the message, whatever the class
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
            yield
    finally:
        torch.compile = compile_now
        sys.meta_path.remove(finder)
        _drop_stand_ins()
        logger.removeFilter(keep)


with _lean_modelopt_import():  # models.quantize and models.quantize_rules take TensorQuantizer from here
    from modelopt.torch.quantization.calib import HistogramCalibrator
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

from models.common import DFL, ELAN1, SPPELAN, ADown, Concat, RepNBottleneck, RepNCSP, RepNCSPELAN4
from models.fake_quant import exported_fake_quant_int8, fake_quant_int8
from models.fused_ops import average_blur
from models.range_search import entropy_amax, mse_amax, percentile_amax

CALIB_METHODS = ("max", "percentile", "mse", "entropy")
MAX_SEARCH_STEPS = 128  # amax candidates tried by mse / entropy (modelopt tries every bin: seconds per tensor)


class RangeCalibrator(HistogramCalibrator):
    """Exact running max plus a histogram of |x|, so one pass over the calibration images serves
    every method: ``max`` reads the max, the others search the histogram (``models.range_search``).

    Model Optimizer's own collection adds bins whenever a batch exceeds the range seen so far; a
    near-zero first batch then grows millions of bins. Here the bin count is fixed and the range
    (the first nonzero max) doubles as often as a later max needs, old bins merging exactly.
    Everything stays on the activations' device and no value is read back to the host, so
    collecting never stalls the GPU. Counts are kept in float64.
    """

    NUM_BINS = 2048
    MAX_DOUBLINGS = 11  # log2(NUM_BINS)

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False):
        super().__init__(num_bits, axis, unsigned, num_bins=self.NUM_BINS)
        self._max: torch.Tensor | None = None
        self._range: torch.Tensor | None = None  # 0 until a batch is not all zeros
        self._counts: torch.Tensor | None = None

    def collect(self, x: torch.Tensor) -> None:
        x = x.detach().abs().float()
        top = x.max()
        if self._max is None:
            self._max, self._range = top, torch.zeros_like(top)
            self._counts = torch.zeros(self.NUM_BINS, dtype=torch.float64, device=x.device)
        else:
            self._max = torch.maximum(self._max, top)
        started = self._range > 0
        ratio = torch.where(started, self._max.double() / self._range.double(), 1.0)
        doublings = ratio.log2().ceil().clamp(0, self.MAX_DOUBLINGS).long()
        grown = self._range * torch.pow(2, doublings).float()  # float32 times a power of two: exact
        short = grown < self._max  # the log2 of a rounded ratio fell short: one more doubling covers it
        grown, doublings = torch.where(short, grown * 2, grown), doublings + short.long()
        # a range that more than 2**11-folds merges every old count into bin 0, whatever its new width
        grown = torch.where(started & (doublings <= self.MAX_DOUBLINGS), grown, self._max)
        bins = torch.arange(self.NUM_BINS, device=x.device)
        merged = torch.zeros_like(self._counts).index_add_(0, torch.bitwise_right_shift(bins, doublings), self._counts)
        has_range = grown > 0
        hist = torch.histc(x / torch.where(has_range, grown, 1.0), bins=self.NUM_BINS, min=0, max=1)
        self._counts = merged + hist.double() * has_range
        self._range = grown

    def reset(self) -> None:
        super().reset()
        self._max, self._range, self._counts = None, None, None

    def compute_amax(self, method: str, percentile: float = 99.999) -> torch.Tensor | None:
        return self.compute_amaxes([self], method, percentile)[0]

    @classmethod
    def compute_amaxes(cls, calibrators: list["RangeCalibrator"], method: str,
                       percentile: float = 99.999) -> list[torch.Tensor | None]:
        """Each calibrator's range by ``method``, all histograms searched at once (None: saw no data)."""
        if method not in CALIB_METHODS:
            raise ValueError(f"unknown calibration method {method!r}")
        out: list[torch.Tensor | None] = [None if c._max is None else c._max.clone() for c in calibrators]
        seen = [i for i, c in enumerate(calibrators) if c._max is not None]
        if method == "max" or not seen:
            return out
        counts = torch.stack([calibrators[i]._counts for i in seen])
        ranges = torch.stack([calibrators[i]._range for i in seen])
        maxes = torch.stack([calibrators[i]._max for i in seen])
        width, stride = ranges.double() / cls.NUM_BINS, max(1, cls.NUM_BINS // MAX_SEARCH_STEPS)
        if method == "percentile":
            searched = percentile_amax(counts, width, percentile)
        elif method == "mse":
            searched = mse_amax(counts, width, stride)
        else:
            searched = entropy_amax(counts, width, stride)
        # the histogram may reach twice the max; a range beyond the max only coarsens the steps
        amax = torch.where(ranges > 0, torch.minimum(searched.float(), maxes), maxes)
        for k, i in enumerate(seen):
            out[i] = amax[k]
        return out


class Int8Quantizer(TensorQuantizer):
    """Model Optimizer's quantizer (state, calibration, ONNX export) with our fake quantization.

    Its fake quantization is ``models.fake_quant.fake_quant_int8``: the same values and gradients as
    Model Optimizer's CUDA extension, which is never built. A calibrated, enabled quantizer takes a
    short path of a few attribute reads, which costs little per call in eager mode and lets
    ``torch.compile`` trace it without graph breaks; anything else (calibrating, disabled
    quantization, no range yet) and the ONNX export go through Model Optimizer's ``forward``.
    """

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # ``inputs``: the name exported graphs show
        if self._disabled:
            return inputs
        if self._if_quant and not self._if_calib and hasattr(self, "_amax") and not torch.onnx.is_in_onnx_export():
            return fake_quant_int8(inputs, self._amax, self._narrow_range)
        return super().forward(inputs)  # its export path reads the range as a constant, as Q/DQ needs

    def _fake_quantize(self, inputs: torch.Tensor) -> torch.Tensor:
        quantize = exported_fake_quant_int8 if torch.onnx.is_in_onnx_export() else fake_quant_int8
        return quantize(inputs, self._get_amax(inputs), self._narrow_range)


@functools.cache
def _prototype(kind: str) -> Int8Quantizer:
    if kind == "activation":
        return Int8Quantizer(QuantizerAttributeConfig(num_bits=8, axis=None, calibrator=RangeCalibrator))
    return Int8Quantizer(QuantizerAttributeConfig(num_bits=8, axis=0))


_MODULE_REGISTRIES = frozenset(vars(nn.Module()))


def _copy_of_prototype(kind: str) -> Int8Quantizer:
    """A new quantizer set up as Model Optimizer's constructor sets up ``_prototype(kind)``.

    The constructor validates its config and sets some thirty attributes through two ``__setattr__``
    layers: 0.4 ms a quantizer, 60% of preparing a model (a tiny one holds 350 quantizers). A copy
    takes the prototype's settings (deep-copied: its calibrator holds per-quantizer statistics) and
    fresh module registries; the prototype has no parameters, buffers or children to share.
    """
    prototype = _prototype(kind)
    quantizer = Int8Quantizer.__new__(Int8Quantizer)
    nn.Module.__init__(quantizer)
    for name, value in vars(prototype).items():
        if name not in _MODULE_REGISTRIES:
            quantizer.__dict__[name] = copy.deepcopy(value)
    return quantizer


def activation_quantizer() -> Int8Quantizer:
    """Per-tensor signed INT8 quantizer for an activation, calibrated by ``RangeCalibrator``."""
    return _copy_of_prototype("activation")


def weight_quantizer() -> Int8Quantizer:
    """Per-output-channel (axis 0) signed INT8 quantizer for a convolution weight."""
    return _copy_of_prototype("weight")


class _FromFloat:
    """``from_float`` for quantized subclasses: adopt a float module's state, then add quantizers."""

    @classmethod
    def from_float(cls, module: nn.Module) -> nn.Module:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        # hooks and registries of the fresh module stay fresh; an instance-level ``forward`` (upstream's
        # fuse sets one on some layers) is bound to the old object and must not be carried over
        skip = set(vars(nn.Module())) | {"forward"}
        for k, v in vars(module).items():
            if k not in skip:
                setattr(new, k, v)
        new.training = module.training
        for k, v in module._parameters.items():
            new.register_parameter(k, v)
        for k, v in module._buffers.items():
            new.register_buffer(k, v, persistent=k not in module._non_persistent_buffers_set)
        for k, v in module._modules.items():
            new.add_module(k, v)
        new.add_quantizers()
        return new

    def add_quantizers(self) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# Leaf layers
# ----------------------------------------------------------------------------------------------


class QuantConv2d(_FromFloat, nn.Conv2d):
    """Conv2d reading an INT8 input (per tensor) with INT8 weights (per output channel)."""

    def add_quantizers(self) -> None:
        self.input_quantizer = activation_quantizer()
        self.weight_quantizer = weight_quantizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_forward(x, self.bias)

    def conv_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The convolution of the quantized input and weights plus ``bias`` (None: the caller adds the
        bias, as ``models.common.conv_then_act`` does in one kernel with the activation)."""
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), bias)

    @torch.no_grad()
    def calibrate_weight(self) -> None:
        """Weights are known in advance: their per-channel range is their absolute maximum."""
        self.weight_quantizer.amax = self.weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True).float()


class _QuantInput(_FromFloat):
    """A one-input float layer whose input is quantized first; the layer itself stays as it was."""

    def add_quantizers(self) -> None:
        self.input_quantizer = activation_quantizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_quantizer(x))


class QuantMaxPool2d(_QuantInput, nn.MaxPool2d):
    """Max-pool on an INT8 input; max commutes with the scale, so TensorRT pools in INT8."""


class QuantUpsample(_QuantInput, nn.Upsample):
    """Nearest up-sampling of an INT8 input (a copy of values, so the scale passes through)."""


class QuantConcat(_FromFloat, Concat):
    """Concat of INT8 inputs; TensorRT needs one scale on all of them (tied by the rules).

    ``from_float`` is for a model-level Concat layer, whose input count is its ``f`` list;
    blocks build theirs with ``QuantConcat.with_inputs``.
    """

    def add_quantizers(self) -> None:
        self.input_quantizers = nn.ModuleList(activation_quantizer() for _ in self.f)

    @classmethod
    def with_inputs(cls, n: int, dimension: int = 1) -> "QuantConcat":
        cat = cls.__new__(cls)
        Concat.__init__(cat, dimension)
        cat.input_quantizers = nn.ModuleList(activation_quantizer() for _ in range(n))
        return cat

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        if len(x) != len(self.input_quantizers):
            raise ValueError(f"QuantConcat built for {len(self.input_quantizers)} inputs got {len(x)}")
        return torch.cat([q(t) for q, t in zip(self.input_quantizers, x)], self.d)


class QuantAdd(nn.Module):
    """Residual addition of two INT8 inputs, so TensorRT can fuse it into the preceding conv."""

    def __init__(self):
        super().__init__()
        self.input_quantizers = nn.ModuleList((activation_quantizer(), activation_quantizer()))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.input_quantizers[0](a) + self.input_quantizers[1](b)


# ----------------------------------------------------------------------------------------------
# Blocks whose forward joins tensors inline: the same dataflow, with the joins quantized
# ----------------------------------------------------------------------------------------------


class QuantRepNBottleneck(_FromFloat, RepNBottleneck):
    """RepNBottleneck whose residual add reads INT8 inputs."""

    def add_quantizers(self) -> None:
        if self.add:
            self.residual = QuantAdd()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return self.residual(x, y) if self.add else y


class QuantRepNCSP(_FromFloat, RepNCSP):
    """RepNCSP whose concat reads INT8 inputs."""

    def add_quantizers(self) -> None:
        self.concat = QuantConcat.with_inputs(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(self.concat([self.m(self.cv1(x)), self.cv2(x)]))


class _QuantELANForward:
    """ELAN1 and RepNCSPELAN4 share one dataflow: chunk, two chained stages, concat of all four."""

    def add_quantizers(self) -> None:
        self.concat = QuantConcat.with_inputs(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.append(self.cv2(y[-1]))
        y.append(self.cv3(y[-1]))
        return self.cv4(self.concat(y))


class QuantELAN1(_QuantELANForward, _FromFloat, ELAN1):
    """ELAN1 whose concat reads INT8 inputs."""


class QuantRepNCSPELAN4(_QuantELANForward, _FromFloat, RepNCSPELAN4):
    """RepNCSPELAN4 whose concat reads INT8 inputs."""


class QuantSPPELAN(_FromFloat, SPPELAN):
    """SPPELAN whose concat reads INT8 inputs (its SP max-pools are quantized as leaf layers)."""

    def add_quantizers(self) -> None:
        self.concat = QuantConcat.with_inputs(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for pool in (self.cv2, self.cv3, self.cv4):
            y.append(pool(y[-1]))
        return self.cv5(self.concat(y))


class QuantADown(_FromFloat, ADown):
    """ADown whose max-pool branch and concat read INT8 inputs (the average blur stays float)."""

    def add_quantizers(self) -> None:
        self.pool = QuantMaxPool2d.from_float(nn.MaxPool2d(3, 2, 1))
        self.concat = QuantConcat.with_inputs(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = average_blur(x).chunk(2, 1)
        return self.concat([self.cv1(x1), self.cv2(self.pool(x2))])


def _upsample_from_float(m: nn.Upsample) -> nn.Module:
    # only nearest up-sampling copies values; any interpolating mode creates new ones and stays float
    return QuantUpsample.from_float(m) if m.mode == "nearest" else m


# Float class -> builder of its quantized replacement. Exact types only: a subclass may change the dataflow.
QUANTIZED = {
    nn.Conv2d: QuantConv2d.from_float,
    nn.MaxPool2d: QuantMaxPool2d.from_float,
    nn.Upsample: _upsample_from_float,
    Concat: QuantConcat.from_float,
    RepNBottleneck: QuantRepNBottleneck.from_float,
    RepNCSP: QuantRepNCSP.from_float,
    ELAN1: QuantELAN1.from_float,
    RepNCSPELAN4: QuantRepNCSPELAN4.from_float,
    SPPELAN: QuantSPPELAN.from_float,
    ADown: QuantADown.from_float,
}

# Layers kept in floating point on purpose: DFL's conv is a fixed expectation over 16 softmax bins
# (box decoding, not a feature), and INT8 there would only blur box edges.
FLOAT_ONLY = (DFL,)


def quantize_modules(module: nn.Module) -> nn.Module:
    """Replace, bottom-up, every layer of ``module`` that has a quantized variant; return the new root."""
    if isinstance(module, FLOAT_ONLY):
        return module
    for name, child in list(module.named_children()):
        new = quantize_modules(child)
        if new is not child:
            setattr(module, name, new)
    build = QUANTIZED.get(type(module))
    return build(module) if build else module


def is_weight_quantizer(name: str) -> bool:
    return name.endswith("weight_quantizer")
