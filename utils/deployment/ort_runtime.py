"""ONNX Runtime: run an exported (FP or Q/DQ INT8) ONNX with the same call as ``TrtRunner``.

ONNX Runtime executes QuantizeLinear/DequantizeLinear exactly as their definition says, so on
the CPU it checks a Q/DQ export numerically where TensorRT is not available.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from utils.deployment.signature import INPUT_NAME, onnx_signature
from utils.errors import UserError

_TORCH_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}
ORT_ERROR = 3  # ONNX Runtime's log severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Options for every session we open: errors-only logging, and as many threads as PyTorch uses
    (``torch.set_num_threads`` / OMP_NUM_THREADS) unless told. Left to itself ONNX Runtime sizes its
    pool by the cores, whatever PyTorch was given, and its idle threads spin on cores that other
    work needs (BENCHMARKS.md, "ONNX Runtime's threads"). Where nothing was set both take the
    physical cores, so a user's default does not change."""
    options = ort.SessionOptions()
    # ORT's graph optimizer logs, at WARNING, each Q/DQ scale it leaves unused after fusing
    # (about a hundred lines for the demo's model): nothing a user can act on. Errors still show.
    options.log_severity_level = ORT_ERROR
    options.intra_op_num_threads = threads or torch.get_num_threads()
    return options


def providers(device: torch.device | str = "cpu") -> list[str]:
    """CUDA when asked for and present, always with the CPU as fall-back."""
    wanted = ["CUDAExecutionProvider"] if torch.device(device).type == "cuda" else []
    return [p for p in wanted if p in ort.get_available_providers()] + ["CPUExecutionProvider"]


class OrtRunner:
    """An ``InferenceSession`` called with a torch image batch; returns outputs by name (torch, CPU).

    ``signature`` and ``geometry`` are what the file declares (checked to be a detector export
    before the session is made); a dynamic-batch file accepts any batch.
    """

    def __init__(self, onnx_path: str | Path, device: torch.device | str = "cpu", threads: int | None = None):
        path = Path(onnx_path)
        if not path.is_file():
            raise UserError(f"{path}: ONNX file not found")
        if path.suffix in (".pt", ".pth"):
            raise UserError(f"{path}: a PyTorch checkpoint, not an ONNX file; export it with export_qat.py first")
        self.signature = onnx_signature(path).check(path)
        self.geometry = self.signature.geometry
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads), providers=providers(device))
        except Exception as exc:  # ORT raises its own exception types for unknown ops / bad files
            if "EfficientNMS_TRT" in str(exc):
                raise UserError(f"{path}: ONNX Runtime cannot run the EfficientNMS_TRT plugin; use TensorRT or "
                                "export with --postprocess none") from exc
            # "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from <path> failed:Protobuf parsing failed."
            reason = re.sub(r"^\[ONNXRuntimeError\][\s:\d]*\w+\s*:\s*(Load model from .* failed:\s*)?", "", str(exc))
            raise UserError(f"{path}: ONNX Runtime cannot load this model ({reason.strip().rstrip('.')})") from exc
        self.input_name = INPUT_NAME
        self.input_dtype = _TORCH_DTYPES.get(self.session.get_inputs()[0].type, torch.float32)
        self.output_names = list(self.signature.outputs)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = {self.input_name: images.detach().to("cpu", self.input_dtype).contiguous().numpy()}
        outs = self.session.run(self.output_names, feed)
        return {n: torch.from_numpy(np.ascontiguousarray(o)) for n, o in zip(self.output_names, outs)}
