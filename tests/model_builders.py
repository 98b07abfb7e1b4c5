"""Models for tests whose every weight and BatchNorm statistic affects the output."""
import torch

from models.yolo import DetectionModel


def trained_looking_model(cfg: str, nc: int = 3) -> DetectionModel:
    """Perturbed weights and BN running statistics moved away from 0 / 1; left in train mode."""
    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=nc)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.train()
        model(torch.rand(2, 3, 64, 64))
    return model
