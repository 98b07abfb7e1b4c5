"""Models for tests whose every weight and BatchNorm statistic affects the output."""
import torch
import torch.nn as nn

from models.yolo import DetectionModel, Model


def trained_looking_model(cfg: str, nc: int = 3) -> DetectionModel:
    """Perturbed weights and BN running statistics moved away from 0 / 1; left in train mode."""
    torch.manual_seed(0)
    model = Model(cfg, nc=nc)  # a SegmentationModel for a segmentation config
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.train()
        model(torch.rand(2, 3, 64, 64))
    return model


def randomize_statistics(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine terms, so that a wrong fusion formula shows."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
