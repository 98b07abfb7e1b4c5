"""What an exported detector declares: its image input, its outputs, its metadata.

Every tool that runs an exported file (val_trt.py, detect.py) reads the input size, the batch
range, the class count and the class names from here, and a file that is not a detector export
(another network, a truncated graph) stops here with one line saying what was expected, before
anything runs it or any run folder is made. A segmentation export is a detector export with
masks: raw, a second output of prototypes (B, nm, h, w) after the prediction (whose last ``nm``
channels are mask coefficients); End2End, a fifth output ``det_masks``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from models.experimental_trt import END2END_OUTPUTS as END2END_KEYS
from models.experimental_trt import MASK_OUTPUT
from utils.errors import UserError

INPUT_NAME = "images"
DEFAULT_IMGSZ = 640  # the square input fed to a model whose image size is dynamic, unless --imgsz says

Shape = tuple  # of int, or None for a dynamic dimension


@dataclass(frozen=True)
class InputGeometry:
    """The image batches a model accepts: a fixed (h, w) (None: dynamic) and a batch range."""

    hw: tuple[int, int] | None
    min_batch: int = 1
    max_batch: int | None = None  # None: no upper bound (a dynamic-batch ONNX)

    @classmethod
    def of_shape(cls, shape: Shape) -> InputGeometry:
        """From a declared (batch, 3, h, w) input shape; a dynamic batch is unbounded."""
        batch, _, h, w = shape
        return cls((h, w) if h and w else None, batch or 1, batch)

    @property
    def fixed_batch(self) -> int | None:
        return self.min_batch if self.min_batch == self.max_batch else None

    def accepts(self, batch: int) -> bool:
        return batch >= self.min_batch and (self.max_batch is None or batch <= self.max_batch)

    def input_hw(self, imgsz: int | None, source: str | Path) -> tuple[int, int]:
        """The (h, w) to feed: the model's own size; a square ``imgsz`` only where that size is dynamic.

        Feeding a fixed-size model anything else fails inside the runtime, so a different
        ``imgsz`` is ignored with a note rather than passed on.
        """
        if self.hw is None:
            size = imgsz or DEFAULT_IMGSZ
            return size, size
        if imgsz is not None and (imgsz, imgsz) != self.hw:
            print(f"{source}: the model takes {self.hw[0]}x{self.hw[1]} (height x width) images; --imgsz {imgsz} "
                  "ignored")
        return self.hw


@dataclass(frozen=True)
class Signature:
    """Input and output shapes by name (None for a dynamic dimension) and the metadata of one model."""

    inputs: dict[str, Shape]
    outputs: dict[str, Shape]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def end2end(self) -> bool:
        """Outputs are detections already (EfficientNMS or TopK tail)."""
        return all(k in self.outputs for k in END2END_KEYS)

    @property
    def segment(self) -> bool:
        """A segmentation export: End2End with ``det_masks``, or raw with a prototype output."""
        if self.end2end:
            return MASK_OUTPUT in self.outputs
        shapes = list(self.outputs.values())
        return len(shapes) == 2 and len(shapes[0]) == 3 and len(shapes[1]) == 4

    @property
    def nm(self) -> int | None:
        """Mask coefficients per detection (the prototypes' channels); None for a detector or where unknown."""
        if not self.segment:
            return None
        if self.metadata.get("nm", "").isdigit():
            return int(self.metadata["nm"])
        return None if self.end2end else list(self.outputs.values())[1][1]

    @property
    def geometry(self) -> InputGeometry:
        return InputGeometry.of_shape(self.inputs[INPUT_NAME])

    @property
    def names(self) -> list[str] | None:
        """Class names written by our exporter; None where the file carries none (or in another format)."""
        try:
            names = json.loads(self.metadata.get("names", "null"))
        except json.JSONDecodeError:
            return None
        return [str(n) for n in names] if isinstance(names, list) and names else None

    @property
    def nc(self) -> int | None:
        """Class count: the export's metadata, else a raw output's channels - 4, else the names."""
        if self.metadata.get("nc", "").isdigit():
            return int(self.metadata["nc"])
        if not self.end2end:
            channels = next(iter(self.outputs.values()))[1]
            masks = self.nm if self.segment else 0
            if channels and masks is not None:
                return channels - 4 - masks
        return len(self.names) if self.names else None

    def check(self, source: str | Path) -> Signature:
        """Itself, when it is an image -> detections export; else one line saying what was expected."""
        image_input = list(self.inputs) == [INPUT_NAME] and len(self.inputs[INPUT_NAME]) == 4 \
            and self.inputs[INPUT_NAME][1] in (3, None)
        shapes = list(self.outputs.values())
        prediction = len(shapes) in (1, 2) and len(shapes[0]) == 3 and (shapes[0][1] is None or shapes[0][1] > 4)
        raw = prediction and (len(shapes) == 1 or self.segment)
        if image_input and (raw or self.end2end):
            return self
        found = "; ".join(f"{kind} {', '.join(f'{n}{_dims(s)}' for n, s in io.items()) or 'none'}"
                          for kind, io in (("inputs", self.inputs), ("outputs", self.outputs)))
        raise UserError(f"{source}: not a detector export: expected one input '{INPUT_NAME}' (batch, 3, height, "
                        "width) and either one output (batch, 4 + classes, anchors), two for segmentation (batch, "
                        "4 + classes + masks, anchors) and (batch, masks, height/4, width/4), or the End2End "
                        f"outputs {', '.join(END2END_KEYS)} (and {MASK_OUTPUT}); found {found}")


def _dims(shape: Shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def onnx_signature(path: str | Path) -> Signature:
    """The signature an ONNX file declares, read from its graph without loading external weights."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own decode errors for files that are not ONNX
        raise UserError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from exc
    graph = model.graph
    weights = {t.name for t in graph.initializer}  # old exporters list initializers among the inputs

    def shapes(values) -> dict[str, Shape]:
        return {v.name: tuple(d.dim_value if d.HasField("dim_value") else None
                              for d in v.type.tensor_type.shape.dim) for v in values if v.name not in weights}

    return Signature(shapes(graph.input), shapes(graph.output), {p.key: p.value for p in model.metadata_props})
