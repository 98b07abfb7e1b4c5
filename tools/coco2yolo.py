"""Convert COCO instances JSON files to YOLO labels and a data yaml.

    python tools/coco2yolo.py --split train annotations/instances_train2017.json images/train2017 \\
                              --split val annotations/instances_val2017.json images/val2017 --out runs/data/coco

COCO category ids are sparse (1..90 with gaps for COCO itself); YOLO class indices must be
0..nc-1, so categories are numbered in ascending id order and the data yaml keeps the
original ids as ``coco_ids`` (index -> id), which the evaluator uses to write COCO-style
predictions. Crowd annotations (``iscrowd: 1``) mark regions of many objects, not one
object, and are skipped, as upstream YOLO training does. Images are symlinked, never copied.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

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


def read_coco_json(path: str | Path) -> dict:
    """Load an instances JSON and check it has the three tables a detection dataset needs."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{file}: COCO annotation file not found")
    try:
        coco = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: not valid JSON ({exc})") from exc
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(coco.get(k), list)]
    if missing:
        raise UserError(f"{file}: not a COCO instances file (no {', '.join(missing)} list)")
    return coco


def category_table(cocos: dict[str, dict], files: dict[str, Path]) -> tuple[list[int], list[str]]:
    """Sorted category ids and their names; every split must declare the same categories."""
    tables = {split: sorted((int(c["id"]), str(c["name"])) for c in coco["categories"]) for split, coco in cocos.items()}
    first_split, first = next(iter(tables.items()))
    if not first:
        raise UserError(f"{files[first_split]}: no categories")
    for split, table in tables.items():
        if table != first:
            raise UserError(f"{files[split]}: categories differ from those of {files[first_split]}")
    return [i for i, _ in first], [n for _, n in first]


def convert_coco(splits: dict[str, tuple[str | Path, str | Path]], out: str | Path,
                 exist_ok: bool = False) -> tuple[Path, dict[str, SplitStats]]:
    """Convert ``{split: (instances_json, images_dir)}`` into ``out``; returns the data yaml and statistics."""
    if not splits:
        raise UserError("no --split given")
    files = {split: Path(js) for split, (js, _) in splits.items()}
    cocos = {split: read_coco_json(f) for split, f in files.items()}
    coco_ids, names = category_table(cocos, files)
    class_of = {cid: k for k, cid in enumerate(coco_ids)}
    for split, (_, images_dir) in splits.items():
        if not Path(images_dir).is_dir():
            raise UserError(f"{images_dir}: image folder of split {split} not found")

    out = prepare_out_dir(out, [d for _, d in splits.values()], list(splits), exist_ok)
    stats = {split: _convert_split(files[split], cocos[split], Path(splits[split][1]), class_of, out, split)
             for split in splits}
    comment = f"Converted from COCO JSON ({', '.join(str(f.resolve()) for f in files.values())}) by tools/coco2yolo.py"
    yaml_file = write_data_yaml(out, names, list(splits), comment, extra={"coco_ids": coco_ids})
    return yaml_file, stats


def _convert_split(json_file: Path, coco: dict, images_dir: Path, class_of: dict[int, int], out: Path,
                   split: str) -> SplitStats:
    st = SplitStats()
    images = {img["id"]: img for img in coco["images"]}
    rows: dict[object, list[tuple]] = {image_id: [] for image_id in images}
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        where = f"{json_file}: annotation {ann.get('id')}"
        image = images.get(ann.get("image_id"))
        cls = class_of.get(ann.get("category_id"))
        bbox = ann.get("bbox")
        if image is None or cls is None:
            LOGGER.warning(f"WARNING {where}: unknown image_id or category_id; dropped")
            st.dropped += 1
            continue
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            LOGGER.warning(f"WARNING {where}: bbox {bbox!r} is not [x, y, w, h]; dropped")
            st.dropped += 1
            continue
        size = _image_size(image, images_dir)
        if size is None:
            continue  # the image itself is missing; reported once below
        x, y, w, h = bbox
        width, height = size
        xywh, clipped = pixel_box_to_yolo(x, y, x + w, y + h, width, height)
        if xywh is None:
            LOGGER.warning(f"WARNING {where} ({image['file_name']}): degenerate box {bbox}; dropped")
            st.dropped += 1
            continue
        if clipped:
            LOGGER.warning(f"WARNING {where} ({image['file_name']}): box {bbox} reaches outside the image; clipped")
            st.repaired += 1
        rows[image["id"]].append((cls, *xywh))

    for image_id, image in images.items():
        src = images_dir / image["file_name"]
        if not src.is_file():
            LOGGER.warning(f"WARNING {json_file}: image {src} not found; skipped")
            st.skipped += 1
            continue
        rel = Path(image["file_name"])
        if rel.is_absolute() or ".." in rel.parts:  # keep every link inside --out
            rel = Path(rel.name)
        link_image(src, out / "images" / split / rel)
        write_label_file(out / "labels" / split / rel.with_suffix(".txt"), rows[image_id])
        st.images += 1
        st.boxes += len(rows[image_id])
    return st


def _image_size(image: dict, images_dir: Path) -> tuple[int, int] | None:
    """(width, height) from the JSON, or from the file where the JSON leaves them out."""
    if image.get("width") and image.get("height"):
        return int(image["width"]), int(image["height"])
    try:
        with Image.open(images_dir / image["file_name"]) as im:
            image["width"], image["height"] = im.size
    except OSError:
        return None
    return image["width"], image["height"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Convert COCO instances JSON annotations to YOLO labels and a data yaml.")
    ap.add_argument("--split", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGES"), required=True,
                    help="a split: its name (train, val or test), its instances JSON and its image folder; repeatable")
    ap.add_argument("--out", required=True, help="output folder; images are symlinked")
    ap.add_argument("--exist-ok", action="store_true", help="replace splits converted earlier into --out")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    names = [name for name, _, _ in args.split]
    bad = [n for n in names if n not in ("train", "val", "test")]
    if bad or len(set(names)) < len(names):
        raise UserError(f"--split {bad[0] if bad else names}: split names must be distinct and one of train, val, test")
    yaml_file, stats = convert_coco({name: (js, images) for name, js, images in args.split}, args.out, args.exist_ok)
    for split, st in stats.items():
        print(st.line(split))
    print(f"data yaml: {yaml_file}")


if __name__ == "__main__":
    run_cli(main)
