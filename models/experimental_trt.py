"""Export wrappers: the raw prediction, and End2End graphs whose outputs are final detections.

Both End2End variants give the layout DeepStream and Triton users expect:
``num_dets`` int32 [B, 1], ``det_boxes`` [B, K, 4] (x1, y1, x2, y2 in input pixels),
``det_scores`` [B, K], ``det_classes`` int32 [B, K]; only the first ``num_dets`` rows of an image
are detections, the rest are zeros. A segmentation model adds ``det_masks`` [B, K, H/4, W/4]
(``MaskTail``): each detection's mask probability at the prototypes' resolution, zero outside
its box and on padding rows.

- ``NMSTail``: the head's boxes and scores go into TensorRT's ``EfficientNMS_TRT`` plugin
  (class-aware NMS; every class above the threshold is a candidate, like ``multi_label`` NMS).
  ONNX Runtime cannot run the plugin; in PyTorch the op computes a reference with the plugin's
  documented algorithm, so tests can compare it with ``utils.evaluation.postprocess``.
- ``TopKTail``: NMS-free: each anchor's best class, the K highest scores (ONNX ``TopK``),
  runnable anywhere, for one-to-one heads or users who want no plugin.

Masks need to know which anchor each detection came from, to take its mask coefficients. TopK
says so; ``EfficientNMS_TRT`` does not (its four outputs have no index). The plugins that add an
index output (``EfficientNMSX`` / ``YoloNMS_TRT``) are not among the plugins TensorRT ships
(TensorRT's plugin/README lists ``EfficientNMS_TRT``; NVIDIA/TensorRT#3859 proposed ``YoloNMS`` and
was not merged), so an engine would need a custom-built plugin library that stock TensorRT,
DeepStream, Triton and JetPack do not have. Here the anchor is found instead: without fused box
decoding the plugin returns each kept box's corners as it read them (``DecodeBoxes`` copies the
input box, ``WriteNMSResult`` writes it unclipped), so the nearest candidate box is the kept
detection's own anchor, at distance 0 up to the rounding of the centre-size to corner conversion.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from utils.data.dataset import model_task
from utils.boxes import xywh2xyxy
from utils.evaluation.postprocess import select_prediction

END2END_OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")
MASK_OUTPUT = "det_masks"
SEGMENT_END2END_OUTPUTS = (*END2END_OUTPUTS, MASK_OUTPUT)
# EfficientNMS sorts the candidates above the score threshold and runs NMS on the best 4096 only.
PLUGIN_CANDIDATES = 4096


class Prediction(nn.Module):
    """The model's main prediction (B, 4 + nc, anchors): xywh boxes in pixels, class scores.

    Dual-branch models return [auxiliary, main]; only the main one is exported, so the
    auxiliary branch is dead code that the exporter drops. A segmentation model (its head in
    export mode) gives upstream's pair instead: the prediction with its ``nm`` mask coefficients
    appended (B, 4 + nc + nm, anchors) and the prototypes (B, nm, H/4, W/4).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.masks = model_task(model) == "segment"

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        if not self.masks:
            return select_prediction(out)
        pred, extra = out  # export mode: prototypes; eval mode: (level maps, coefficients, prototypes)
        return pred, extra if isinstance(extra, torch.Tensor) else extra[-1]


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

    def select(self, pred: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The four outputs and each row's anchor (B, K), found by its box (see the module docstring)."""
        num, boxes, scores, classes = self(pred)
        return num, boxes, scores, classes, source_anchors(boxes, xywh2xyxy(pred[:, :4].transpose(1, 2)))


def source_anchors(kept: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, K) index of the candidate box (B, anchors, 4) nearest to each kept box (B, K, 4), in L1.

    Summed one coordinate at a time: each term is a (B, K, anchors) broadcast that TensorRT fuses
    into one kernel, where a (B, K, anchors, 4) difference would be materialised first.
    """
    distance = sum((kept[..., i:i + 1] - candidates[..., i].unsqueeze(1)).abs() for i in range(4))
    return distance.argmin(2)


class TopKTail(nn.Module):
    """Prediction -> the four End2End outputs without NMS: best class per anchor, then TopK.

    ``max_det`` must not exceed the number of anchors (the exporter clips it).
    """

    def __init__(self, max_det: int = 100, conf_thres: float = 0.25):
        super().__init__()
        self.max_det, self.conf_thres = max_det, conf_thres

    def forward(self, pred: torch.Tensor):
        return self.select(pred)[:4]

    def select(self, pred: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The four outputs and each row's anchor (B, K)."""
        best, cls = pred[:, 4:].max(1)  # (B, anchors)
        scores, idx = best.topk(self.max_det, dim=1)  # sorted; ties keep the lower anchor first
        boxes = pred[:, :4].transpose(1, 2).gather(1, idx.unsqueeze(-1).expand(-1, -1, 4))
        valid = scores > self.conf_thres
        boxes = xywh2xyxy(boxes) * valid.unsqueeze(-1)
        classes = cls.gather(1, idx) * valid
        return valid.sum(1, keepdim=True).int(), boxes, scores * valid, classes.int(), idx


class MaskTail(nn.Module):
    """A segmentation model's End2End tail: a detection tail (``NMSTail`` or ``TopKTail``) on the
    prediction's boxes and scores, plus ``det_masks`` assembled in plain ONNX ops.

    For each kept row: gather its anchor's ``nm`` coefficients, multiply them with the prototypes
    (MatMul), sigmoid, and zero everything outside its box (``crop_to_boxes``). Masks stay at the
    prototypes' resolution (1/4 of the input): 16x fewer values to write and copy out than at the
    input size (at 640 px and K = 100, 10 MB per image instead of 164 MB in float32), the
    resolution upstream's val.py scores masks at, and a consumer that wants input-size masks
    resizes the few it keeps (bilinear, then > 0.5, as upstream's ``process_mask`` does).
    """

    def __init__(self, tail: nn.Module, nm: int, input_hw: tuple[int, int]):
        super().__init__()
        self.tail, self.nm, self.input_hw = tail, nm, tuple(input_hw)
        self.max_det = tail.max_det

    def forward(self, pred: torch.Tensor, prototypes: torch.Tensor):
        detection, coefficients = pred[:, :-self.nm], pred[:, -self.nm:]
        num, boxes, scores, classes, anchors = self.tail.select(detection)
        valid = torch.arange(anchors.shape[1], device=anchors.device).unsqueeze(0) < num.long()
        masks = assemble_masks(coefficients, prototypes, anchors, boxes, self.input_hw)
        return num, boxes, scores, classes, masks * valid[..., None, None]


def assemble_masks(coefficients: torch.Tensor, prototypes: torch.Tensor, anchors: torch.Tensor,
                   boxes: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
    """(B, K, h, w) mask probabilities of the detections at ``anchors`` (B, K): their coefficients
    (B, nm, anchors) times the prototypes (B, nm, h, w), sigmoid, cropped to ``boxes`` (B, K, 4),
    x1 y1 x2 y2 in input pixels of an ``input_hw`` image."""
    b, nm, h, w = prototypes.shape
    picked = coefficients.transpose(1, 2).gather(1, anchors.unsqueeze(-1).expand(-1, -1, nm))  # (B, K, nm)
    masks = (picked @ prototypes.reshape(b, nm, h * w)).sigmoid().reshape(b, -1, h, w)
    scale = boxes.new_tensor([w / input_hw[1], h / input_hw[0]]).repeat(2)
    return crop_to_boxes(masks, boxes * scale)


def crop_to_boxes(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``masks`` (..., h, w) with every pixel outside its box (..., 4, in mask pixels) set to 0.

    Upstream's rule: pixel (row r, column c) is inside when x1 <= c < x2 and y1 <= r < y2.
    """
    h, w = masks.shape[-2:]
    cols = torch.arange(w, device=masks.device, dtype=boxes.dtype)
    rows = torch.arange(h, device=masks.device, dtype=boxes.dtype)
    x1, y1, x2, y2 = (boxes[..., i, None] for i in range(4))
    inside_x = (cols >= x1) & (cols < x2)  # (..., w)
    inside_y = (rows >= y1) & (rows < y2)  # (..., h)
    return masks * (inside_y.unsqueeze(-1) & inside_x.unsqueeze(-2))


class End2End(nn.Module):
    """A model followed by an End2End tail (``NMSTail``, ``TopKTail``, or a ``MaskTail`` for a
    segmentation model)."""

    def __init__(self, model: nn.Module, tail: nn.Module):
        super().__init__()
        self.prediction = Prediction(model)
        self.tail = tail

    def forward(self, images: torch.Tensor):
        pred = self.prediction(images)
        return self.tail(*pred) if isinstance(pred, tuple) else self.tail(pred)


def decode_end2end(num_dets: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
                   classes: torch.Tensor) -> list[torch.Tensor]:
    """Per image an (n, 6) tensor [x1, y1, x2, y2, conf, cls], the layout of ``utils.evaluation.postprocess``."""
    out = []
    for n, b, s, c in zip(num_dets.reshape(-1).tolist(), boxes, scores, classes):
        out.append(torch.cat((b[:n].float(), s[:n, None].float(), c[:n, None].float()), 1))
    return out


def decode_end2end_masks(num_dets: torch.Tensor, masks: torch.Tensor) -> list[torch.Tensor]:
    """Per image the (n, h, w) mask probabilities of its ``decode_end2end`` detections."""
    return [m[:n].float() for n, m in zip(num_dets.reshape(-1).tolist(), masks)]
