"""Quantization pipeline: PTQ calibration, QAT fine-tuning with distillation, sensitivity, reports, checkpoints."""
