"""ONNX Runtime: run an exported (FP or Q/DQ INT8) ONNX with the same call as ``TrtRunner``.

ONNX Runtime executes QuantizeLinear/DequantizeLinear exactly as their definition says, so on
the CPU it checks a Q/DQ export numerically where TensorRT is not available.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from utils.errors import UserError

_TORCH_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}


def providers(device: torch.device | str = "cpu") -> list[str]:
    """CUDA when asked for and present, always with the CPU as fall-back."""
    wanted = ["CUDAExecutionProvider"] if torch.device(device).type == "cuda" else []
    return [p for p in wanted if p in ort.get_available_providers()] + ["CPUExecutionProvider"]


class OrtRunner:
    """An ``InferenceSession`` called with a torch image batch; returns outputs by name (torch, CPU)."""

    def __init__(self, onnx_path: str | Path, device: torch.device | str = "cpu", threads: int | None = None):
        path = Path(onnx_path)
        if not path.is_file():
            raise UserError(f"{path}: ONNX file not found")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers(device))
        except Exception as exc:  # ORT raises its own exception types for unknown ops / bad files
            if "EfficientNMS_TRT" in str(exc):
                raise UserError(f"{path}: ONNX Runtime cannot run the EfficientNMS_TRT plugin; use TensorRT or "
                                "export with --postprocess none") from exc
            raise UserError(f"{path}: ONNX Runtime cannot load this model ({exc})") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise UserError(f"{path}: expected one image input, found {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        self.input_dtype = _TORCH_DTYPES.get(inputs[0].type, torch.float32)
        batch = inputs[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) else None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = {self.input_name: images.detach().to("cpu", self.input_dtype).contiguous().numpy()}
        outs = self.session.run(self.output_names, feed)
        return {n: torch.from_numpy(np.ascontiguousarray(o)) for n, o in zip(self.output_names, outs)}
