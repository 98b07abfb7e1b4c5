"""Deployment stage: ONNX export and graph tools, the Q/DQ lint, runtimes (ONNX Runtime, TensorRT) and their reports."""
