"""Export wrappers: the raw prediction, and End2End graphs whose outputs are final detections.

Both End2End variants give the layout DeepStream and Triton users expect:
``num_dets`` int32 [B, 1], ``det_boxes`` [B, K, 4] (x1, y1, x2, y2 in input pixels),
``det_scores`` [B, K], ``det_classes`` int32 [B, K]; only the first ``num_dets`` rows of an image
are detections, the rest are zeros.

- ``NMSTail``: the head's boxes and scores go into TensorRT's ``EfficientNMS_TRT`` plugin
  (class-aware NMS; every class above the threshold is a candidate, like ``multi_label`` NMS).
  ONNX Runtime cannot run the plugin; in PyTorch the op computes a reference with the plugin's
  documented algorithm, so tests can compare it with ``utils.evaluation.postprocess``.
- ``TopKTail``: NMS-free: each anchor's best class, the K highest scores (ONNX ``TopK``),
  runnable anywhere, for one-to-one heads or users who want no plugin.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from utils.boxes import xywh2xyxy
from utils.evaluation.postprocess import select_prediction

END2END_OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")
# EfficientNMS sorts the candidates above the score threshold and runs NMS on the best 4096 only.
PLUGIN_CANDIDATES = 4096


class Prediction(nn.Module):
    """The model's main prediction (B, 4 + nc, anchors): xywh boxes in pixels, class scores.

    Dual-branch models return [auxiliary, main]; only the main one is exported, so the
    auxiliary branch is dead code that the exporter drops.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return select_prediction(self.model(images))


class EfficientNMS(torch.autograd.Function):
    """ONNX node ``TRT::EfficientNMS_TRT``; in PyTorch, a reference with the same semantics."""

    @staticmethod
    def forward(ctx, boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, score_threshold: float,
                max_output_boxes: int):
        return efficient_nms_reference(boxes, scores, iou_threshold, score_threshold, max_output_boxes)

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold: float, score_threshold: float, max_output_boxes: int):
        outputs = g.op("TRT::EfficientNMS_TRT", boxes, scores, outputs=4,
                       background_class_i=-1, box_coding_i=1,  # 1 = BoxCenterSize: the head's boxes are xywh
                       iou_threshold_f=iou_threshold, max_output_boxes_i=max_output_boxes, plugin_version_s="1",
                       score_activation_i=0, score_threshold_f=score_threshold)  # scores are already sigmoid
        # The plugin's output types, declared here: ONNX cannot infer a custom op's, and the exporter
        # warned about every output without them.
        batch = (boxes.type().varyingSizes() or [None])[0]
        shapes = ([batch, 1], [batch, max_output_boxes, 4], [batch, max_output_boxes], [batch, max_output_boxes])
        for value, shape, dtype in zip(outputs, shapes, (torch.int32, None, None, torch.int32)):
            value.setType(boxes.type().with_dtype(dtype or boxes.type().dtype()).with_sizes(shape))
        return outputs


def efficient_nms_reference(boxes_xywh: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                            score_threshold: float, max_output_boxes: int) -> tuple[torch.Tensor, ...]:
    """What ``EfficientNMS_TRT`` (box_coding=1, class-aware) returns for (B, N, 4) boxes, (B, N, C) scores."""
    b = boxes_xywh.shape[0]
    num = torch.zeros(b, 1, dtype=torch.int32, device=boxes_xywh.device)
    out_boxes = boxes_xywh.new_zeros(b, max_output_boxes, 4)
    out_scores = scores.new_zeros(b, max_output_boxes)
    out_classes = torch.zeros(b, max_output_boxes, dtype=torch.int32, device=boxes_xywh.device)
    for i in range(b):
        anchor, cls = (scores[i] > score_threshold).nonzero(as_tuple=True)
        conf = scores[i, anchor, cls]
        top = conf.argsort(descending=True, stable=True)[:PLUGIN_CANDIDATES]
        anchor, cls, conf = anchor[top], cls[top], conf[top]
        box = xywh2xyxy(boxes_xywh[i, anchor])
        kept = torchvision.ops.batched_nms(box, conf, cls, iou_threshold)[:max_output_boxes]
        n = kept.numel()
        num[i, 0] = n
        out_boxes[i, :n], out_scores[i, :n], out_classes[i, :n] = box[kept], conf[kept], cls[kept].int()
    return num, out_boxes, out_scores, out_classes


class NMSTail(nn.Module):
    """Prediction (B, 4 + nc, anchors) -> the four End2End outputs through ``EfficientNMS_TRT``."""

    def __init__(self, max_det: int = 100, iou_thres: float = 0.45, conf_thres: float = 0.25):
        super().__init__()
        self.max_det, self.iou_thres, self.conf_thres = max_det, iou_thres, conf_thres

    def forward(self, pred: torch.Tensor):
        pred = pred.transpose(1, 2)  # (B, anchors, 4 + nc)
        return EfficientNMS.apply(pred[..., :4], pred[..., 4:], self.iou_thres, self.conf_thres, self.max_det)


class TopKTail(nn.Module):
    """Prediction -> the four End2End outputs without NMS: best class per anchor, then TopK.

    ``max_det`` must not exceed the number of anchors (the exporter clips it).
    """

    def __init__(self, max_det: int = 100, conf_thres: float = 0.25):
        super().__init__()
        self.max_det, self.conf_thres = max_det, conf_thres

    def forward(self, pred: torch.Tensor):
        best, cls = pred[:, 4:].max(1)  # (B, anchors)
        scores, idx = best.topk(self.max_det, dim=1)  # sorted; ties keep the lower anchor first
        boxes = pred[:, :4].transpose(1, 2).gather(1, idx.unsqueeze(-1).expand(-1, -1, 4))
        valid = scores > self.conf_thres
        boxes = xywh2xyxy(boxes) * valid.unsqueeze(-1)
        classes = cls.gather(1, idx) * valid
        return valid.sum(1, keepdim=True).int(), boxes, scores * valid, classes.int()


class End2End(nn.Module):
    """A detection model followed by an End2End tail (``NMSTail`` or ``TopKTail``)."""

    def __init__(self, model: nn.Module, tail: nn.Module):
        super().__init__()
        self.prediction = Prediction(model)
        self.tail = tail

    def forward(self, images: torch.Tensor):
        return self.tail(self.prediction(images))


def decode_end2end(num_dets: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
                   classes: torch.Tensor) -> list[torch.Tensor]:
    """Per image an (n, 6) tensor [x1, y1, x2, y2, conf, cls], the layout of ``utils.evaluation.postprocess``."""
    out = []
    for n, b, s, c in zip(num_dets.reshape(-1).tolist(), boxes, scores, classes):
        out.append(torch.cat((b[:n].float(), s[:n, None].float(), c[:n, None].float()), 1))
    return out
