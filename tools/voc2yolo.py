"""Convert a Pascal VOC dataset (XML boxes, ImageSets splits) to YOLO labels and a data yaml.

    python tools/voc2yolo.py --voc ../shared/datasets/bccd/BCCD --out runs/data/bccd

Splits come from ``ImageSets/Main/<split>.txt``. Class indices follow ``--names`` when given,
otherwise the alphabetical order of the class names found in the XML files (stable whatever
the file order). VOC corners are 1-based pixel indices; they are shifted to 0-based and the
width is ``xmax - xmin``, the convention of common VOC converters, so a box with
``xmin == xmax`` is degenerate: it is dropped with a warning naming its XML file. The source
folder is only read; images are symlinked into ``--out``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from utils.data.label_check import IMG_FORMATS  # noqa: E402
from utils.data.yolo_format import (  # noqa: E402
    SplitStats,
    link_image,
    pixel_box_to_yolo,
    prepare_out_dir,
    write_data_yaml,
    write_label_file,
)
from utils.errors import UserError, run_cli  # noqa: E402

LOGGER = logging.getLogger("yolov9.data")
SPLITS = ("train", "val", "test")


@dataclass
class VocObject:
    name: str
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax as written in the XML
    difficult: bool = False


@dataclass
class VocImage:
    filename: str
    width: int
    height: int
    objects: list[VocObject] = field(default_factory=list)


def parse_voc_xml(path: str | Path) -> VocImage:
    """Read one annotation file; ``ValueError`` saying what is wrong with a malformed one."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"not valid XML ({exc})") from exc
    filename = (root.findtext("filename") or "").strip()
    width = int(float(root.findtext("size/width") or 0))
    height = int(float(root.findtext("size/height") or 0))
    objects = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bnd = obj.find("bndbox")
        if not name or bnd is None:
            raise ValueError("an <object> without <name> or <bndbox>")
        try:
            box = tuple(float(bnd.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"object {name}: bndbox corners are not all numbers") from exc
        objects.append(VocObject(name, box, (obj.findtext("difficult") or "0").strip() == "1"))
    return VocImage(filename, width, height, objects)


def read_splits(voc: Path, splits: tuple[str, ...]) -> dict[str, list[str]]:
    """Image ids of each split that has an ``ImageSets/Main/<split>.txt``."""
    found = {}
    for split in splits:
        f = voc / "ImageSets" / "Main" / f"{split}.txt"
        if f.is_file():
            found[split] = [line.split()[0] for line in f.read_text().splitlines() if line.strip()]
    if not found:
        raise UserError(f"{voc}: none of ImageSets/Main/{{{','.join(splits)}}}.txt exists")
    return found


def convert_voc(voc_dir: str | Path, out: str | Path, names: list[str] | None = None,
                splits: tuple[str, ...] = SPLITS, exist_ok: bool = False,
                skip_difficult: bool = False) -> tuple[Path, dict[str, SplitStats]]:
    """Convert ``voc_dir`` into ``out``; returns the data yaml and per-split statistics."""
    voc = Path(voc_dir)
    for sub in ("Annotations", "JPEGImages"):
        if not (voc / sub).is_dir():
            raise UserError(f"{voc}: no {sub}/ folder (expected a VOC dataset root)")
    ids = read_splits(voc, splits)
    annotations: dict[str, VocImage | None] = {}
    for image_id in dict.fromkeys(i for split_ids in ids.values() for i in split_ids):
        xml = voc / "Annotations" / f"{image_id}.xml"
        try:
            annotations[image_id] = parse_voc_xml(xml)
        except (OSError, ValueError) as exc:
            LOGGER.warning(f"WARNING {xml}: {exc}; image skipped")
            annotations[image_id] = None
    classes = list(names) if names else sorted({o.name for a in annotations.values() if a for o in a.objects})
    if not classes:
        raise UserError(f"{voc}: no objects in any annotation and no --names given")
    index = {name: i for i, name in enumerate(classes)}

    out = prepare_out_dir(out, [voc], list(ids), exist_ok)
    stats = {}
    for split, split_ids in ids.items():
        stats[split] = st = SplitStats()
        for image_id in split_ids:
            ann = annotations[image_id]
            image = _find_image(voc, image_id, ann)
            if ann is None or image is None:
                if ann is not None:
                    LOGGER.warning(f"WARNING {voc / 'JPEGImages'}: no image for {image_id}; skipped")
                st.skipped += 1
                continue
            rows = _convert_objects(voc / "Annotations" / f"{image_id}.xml", ann, image, index, skip_difficult, st)
            link_image(image, out / "images" / split / image.name)
            write_label_file(out / "labels" / split / f"{image.stem}.txt", rows)
            st.images += 1
            st.boxes += len(rows)
    yaml_file = write_data_yaml(out, classes, list(ids), f"Converted from Pascal VOC {voc.resolve()} by tools/voc2yolo.py")
    return yaml_file, stats


def _find_image(voc: Path, image_id: str, ann: VocImage | None) -> Path | None:
    folder = voc / "JPEGImages"
    if ann is not None and ann.filename and (folder / ann.filename).is_file():
        return folder / ann.filename
    return next((folder / f"{image_id}.{ext}" for ext in IMG_FORMATS if (folder / f"{image_id}.{ext}").is_file()), None)


def _convert_objects(xml: Path, ann: VocImage, image: Path, index: dict[str, int], skip_difficult: bool,
                     st: SplitStats) -> list[tuple]:
    width, height = ann.width, ann.height
    if width <= 0 or height <= 0:  # some tools leave <size> empty; the image itself knows
        with Image.open(image) as im:
            width, height = im.size
    rows = []
    for obj in ann.objects:
        if obj.difficult and skip_difficult:
            continue
        if obj.name not in index:
            LOGGER.warning(f"WARNING {xml}: class {obj.name!r} is not in --names; box dropped")
            st.dropped += 1
            continue
        xmin, ymin, xmax, ymax = obj.box
        xywh, clipped = pixel_box_to_yolo(xmin - 1, ymin - 1, xmax - 1, ymax - 1, width, height)
        if xywh is None:
            LOGGER.warning(f"WARNING {xml}: degenerate {obj.name} box {obj.box} (no width or height); dropped")
            st.dropped += 1
            continue
        if clipped:
            LOGGER.warning(f"WARNING {xml}: {obj.name} box {obj.box} reaches outside the {width}x{height} image; clipped")
            st.repaired += 1
        rows.append((index[obj.name], *xywh))
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Convert Pascal VOC XML annotations to YOLO labels and a data yaml.")
    ap.add_argument("--voc", required=True, help="VOC root holding Annotations/, JPEGImages/, ImageSets/Main/")
    ap.add_argument("--out", required=True, help="output folder (outside the VOC root); images are symlinked")
    ap.add_argument("--names", nargs="+", help="class names in index order (default: alphabetical from the XML)")
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), help="ImageSets/Main split files to convert")
    ap.add_argument("--skip-difficult", action="store_true", help="leave out objects marked difficult")
    ap.add_argument("--exist-ok", action="store_true", help="replace splits converted earlier into --out")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    yaml_file, stats = convert_voc(args.voc, args.out, args.names, tuple(args.splits), args.exist_ok,
                                   args.skip_difficult)
    for split, st in stats.items():
        print(st.line(split))
    print(f"data yaml: {yaml_file}")


if __name__ == "__main__":
    run_cli(main)
