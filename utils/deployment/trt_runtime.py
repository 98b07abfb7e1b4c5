"""TensorRT 10: build an engine from a (Q/DQ) ONNX and run it on torch CUDA tensors.

This is the only module that imports ``tensorrt``; everything else reaches TensorRT through
``build_engine`` and ``TrtRunner``. Written against the TensorRT 10 Python API (named I/O
tensors, ``set_tensor_address`` + ``execute_async_v3``; no bindings, no implicit batch).
"""
from __future__ import annotations

from pathlib import Path

import tensorrt as trt
import torch

from utils.deployment.signature import InputGeometry, Signature
from utils.errors import UserError

_LOGGER = trt.Logger(trt.Logger.WARNING)
trt.init_libnvinfer_plugins(_LOGGER, "")  # registers EfficientNMS_TRT for End2End graphs

_TORCH_DTYPES = {
    trt.DataType.FLOAT: torch.float32,
    trt.DataType.HALF: torch.float16,
    trt.DataType.BF16: torch.bfloat16,
    trt.DataType.INT8: torch.int8,
    trt.DataType.INT32: torch.int32,
    trt.DataType.INT64: torch.int64,
    trt.DataType.BOOL: torch.bool,
}


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, int8: bool = True, fp16: bool = True,
                 batch: tuple[int, int, int] = (1, 8, 32), imgsz: int | None = None,
                 timing_cache: str | Path | None = None, workspace_gib: float | None = None) -> Path:
    """Parse ``onnx_path``, build with INT8+FP16 allowed and a (min, opt, max) batch profile, save.

    INT8 here only *allows* INT8 kernels: in a Q/DQ graph the Q/DQ nodes decide what runs in
    INT8, so no calibrator is involved. A dynamic spatial size (rare) is pinned to ``imgsz``.
    The timing cache is read if present and written back, which makes rebuilds fast.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    builder = trt.Builder(_LOGGER)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, _LOGGER)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"{onnx_path}: TensorRT cannot parse this ONNX ({errors})")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shapes = [_profile_shape(tuple(tensor.shape), b, imgsz, tensor.name, onnx_path) for b in batch]
        profile.set_shape(tensor.name, *shapes)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(memoryview(serialized))
    if cache_path:
        cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return engine_path


def _profile_shape(shape: tuple[int, ...], batch: int, imgsz: int | None, name: str, source: Path) -> tuple[int, ...]:
    dims = list(shape)
    if dims[0] == -1:
        dims[0] = batch
    if any(d == -1 for d in dims[1:]):
        if imgsz is None:
            raise UserError(f"{source}: input {name} has a dynamic image size {shape}; pass --imgsz")
        dims = [dims[0]] + [imgsz if d == -1 else d for d in dims[1:]]
    return tuple(dims)


class TrtRunner:
    """A deserialized engine with one execution context; call it with a CUDA image batch.

    ``signature`` is the engine's I/O (checked to be a detector export; engines carry no ONNX
    metadata, so no class names), ``geometry`` its input size and batch range from profile 0.
    """

    def __init__(self, engine_path: str | Path, device: torch.device | str = "cuda:0"):
        path = Path(engine_path)
        if not path.is_file():
            raise UserError(f"{path}: TensorRT engine not found")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise UserError(f"{path}: a TensorRT engine runs on a CUDA device, not {self.device}")
        self.engine = trt.Runtime(_LOGGER).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"{path}: not an engine of this TensorRT version / GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: _TORCH_DTYPES[self.engine.get_tensor_dtype(n)] for n in names}
        shapes = {n: tuple(None if d == -1 else d for d in self.engine.get_tensor_shape(n)) for n in names}
        self.signature = Signature({n: shapes[n] for n in self.input_names},
                                   {n: shapes[n] for n in self.output_names}).check(path)
        self.geometry = self._geometry(self.input_names[0])

    def _geometry(self, name: str) -> InputGeometry:
        """Dynamic dimensions take their range from optimization profile 0; a size is fixed where min == max."""
        declared = tuple(self.engine.get_tensor_shape(name))
        low = high = declared
        if -1 in declared:
            low, _, high = (tuple(dims) for dims in self.engine.get_tensor_profile_shape(name, 0))
        hw = tuple(low[2:]) if tuple(low[2:]) == tuple(high[2:]) else None
        return InputGeometry(hw, low[0], high[0])

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs by name for ``images`` (B,3,H,W); ordered on the current torch stream."""
        name = self.input_names[0]
        images = images.to(self.device, self.dtypes[name]).contiguous()
        self.context.set_input_shape(name, tuple(images.shape))
        self.context.set_tensor_address(name, images.data_ptr())
        outputs = {}
        for out in self.output_names:
            shape = tuple(self.context.get_tensor_shape(out))
            outputs[out] = torch.empty(shape, dtype=self.dtypes[out], device=self.device)
            self.context.set_tensor_address(out, outputs[out].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return outputs
