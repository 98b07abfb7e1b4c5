"""Write a converted dataset in YOLO layout without touching the source dataset.

Layout under the output folder (what ``utils.data.dataset`` and ``load_data_config`` expect):
``images/<split>/<file>`` symlinks to the original images (no copies), ``labels/<split>/<stem>.txt``
with one ``class x y w h`` row per box (normalised, 6 decimals), ``data.yaml`` with an
absolute ``path``, so the yaml works from any working directory, and the conversion report.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from utils.data.config import SPLITS
from utils.data.conversion_report import ConversionReport
from utils.errors import UserError

LOGGER = logging.getLogger("yolov9.data")
CLIP_TOLERANCE_PX = 0.01  # float noise from pixel <-> normalised round trips is not worth a warning


@dataclass
class LabeledImage:
    """One image of a converted dataset: its source file, its file name in the output, its boxes."""
    image: Path
    name: str
    rows: list[tuple] = field(default_factory=list)  # (class, x, y, w, h) or (class, x1, y1, x2, y2, ...)
    dropped: int = 0  # boxes of the source annotation left out
    clipped: int = 0  # boxes moved inside the image


def pixel_box_to_yolo(x1: float, y1: float, x2: float, y2: float, width: int, height: int):
    """Pixel corners -> normalised (x, y, w, h) clipped to the image, and whether clipping moved it.

    Returns ``(None, False)`` for a degenerate box (no width or height inside the image).
    """
    cx1, cx2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    cy1, cy2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if cx2 <= cx1 or cy2 <= cy1:
        return None, False
    moved = max(abs(cx1 - x1), abs(cx2 - x2), abs(cy1 - y1), abs(cy2 - y2)) > CLIP_TOLERANCE_PX
    xywh = ((cx1 + cx2) / 2 / width, (cy1 + cy2) / 2 / height, (cx2 - cx1) / width, (cy2 - cy1) / height)
    return xywh, moved


def prepare_out_dir(out: str | Path, sources: list[str | Path], splits: list[str], exist_ok: bool) -> Path:
    """Check that ``out`` is separate from every source and free (or replaceable); return it absolute."""
    out = Path(os.path.abspath(out))
    for src in sources:
        src = Path(src).resolve()
        real_out = out.resolve()
        if real_out == src or src in real_out.parents or real_out in src.parents:
            raise UserError(f"--out {out}: must be outside the source dataset {src} (and not contain it)")
    if out.exists() and any(out.iterdir()):
        if not exist_ok:
            raise UserError(f"--out {out}: folder is not empty; pass --exist-ok to replace its converted splits")
        for split in splits:  # only what a previous conversion wrote, never other files
            for sub in (out / "images" / split, out / "labels" / split):
                if sub.is_dir():
                    shutil.rmtree(sub)
            (out / "labels" / f"{split}.cache").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def link_image(src: str | Path, dst: Path) -> None:
    """Symlink ``dst`` to the absolute source image."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(os.path.abspath(src), dst)
    except OSError as exc:
        raise UserError(f"{dst}: cannot create a symlink to {src} ({exc.strerror})") from exc


def write_label_file(path: Path, rows: list[tuple]) -> None:
    """One ``class x y w h`` line per box (or ``class x1 y1 x2 y2 ...`` per polygon); an empty file marks an
    image with no objects."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{row[0]} " + " ".join(f"{v:.6f}" for v in row[1:]) + "\n" for row in rows))


def write_data_yaml(out: Path, names: list[str], splits: list[str], comment: str, extra: dict | None = None) -> Path:
    """``out/data.yaml`` naming the converted splits; ``extra`` keys (e.g. ``coco_ids``) follow ``names``."""
    data = {"path": str(out)}
    data.update({split: f"images/{split}" for split in splits})
    data["names"] = dict(enumerate(names))
    data.update(extra or {})
    file = out / "data.yaml"
    file.write_text(f"# {comment}\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return file


def write_converted(out: str | Path, sources: list[str | Path], splits: dict[str, list[LabeledImage]],
                    report: ConversionReport, comment: str, exist_ok: bool = False, extra: dict | None = None) -> Path:
    """Write every split, the data yaml and the report into ``out``; returns the data yaml.

    Called only once the whole source has been read and checked, so bad input stops a run
    before anything is written into ``out``.
    """
    # Every standard split is replaced, so a split the new conversion does not make cannot linger.
    out = prepare_out_dir(out, sources, list(dict.fromkeys([*SPLITS, *splits])), exist_ok)
    for split, items in splits.items():
        for item in items:
            link_image(item.image, out / "images" / split / item.name)
            write_label_file(out / "labels" / split / f"{Path(item.name).stem}.txt", item.rows)
        report.count_split(split, [[row[0] for row in item.rows] for item in items],
                           sum(item.dropped for item in items), sum(item.clipped for item in items))
    yaml_file = write_data_yaml(out, report.names, list(splits), comment, extra)
    report.write(out)
    return yaml_file
