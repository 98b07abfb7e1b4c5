"""Convert COCO instances JSON files to YOLO labels, a data yaml and a conversion report.

    python tools/coco2yolo.py --annotations labels.json --images photos --out runs/data/mine --split 0.8 0.2 0
    python tools/coco2yolo.py --split train annotations/instances_train2017.json images/train2017 \\
                              --split val annotations/instances_val2017.json images/val2017 --out runs/data/coco

One JSON for the whole dataset (what labelling tools export) is split at random with ``--seed``
(``utils.data.split``); one JSON per split keeps its split. COCO category ids are sparse (1..90 with
gaps for COCO itself); YOLO class indices must be 0..nc-1, so categories are numbered in
ascending id order and the data yaml keeps the original ids as ``coco_ids`` (index -> id),
which the evaluator uses to write COCO-style predictions. Crowd annotations (``iscrowd: 1``)
mark regions of many objects, not one object, and are skipped, as upstream YOLO training does.
A ``file_name`` is looked up below the image folder by the rules of ``utils.data.source_images``;
images the JSON lists without annotations are kept as background images, images in the folder
that the JSON does not list are left out (the JSON defines the dataset), and every such case
is listed in ``conversion_report.md`` beside the output. Images are symlinked, never copied.

With ``--segments`` every annotation's ``segmentation`` becomes a YOLO polygon row instead of a box:
polygon lists as they are (an object in several parts is joined into one outline by zero-width
bridges, as one YOLO row must be), run-length encodings (compressed or not) decoded with
pycocotools and traced along their pixels' edges. An annotation without a usable segmentation is
dropped and reported, so no box row ends up among the polygons.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.data.config import SPLITS  # noqa: E402
from utils.data.conversion_report import REPORT_STEM, SHOWN_ON_CONSOLE, ConversionReport, Problem  # noqa: E402
from utils.data.source_images import ImageIndex, Matching, match_annotations, readable_images  # noqa: E402
from utils.data.split import DEFAULT_FRACTIONS, check_fractions, describe_split, seeded_split  # noqa: E402
from utils.data.polygons import clip_polygon, join_parts, mask_to_polygon  # noqa: E402
from utils.data.yolo_format import LabeledImage, pixel_box_to_yolo, write_converted  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402

NAMES_FROM = "COCO categories by ascending id"


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
                 exist_ok: bool = False, segments: bool = False) -> tuple[Path, ConversionReport]:
    """Convert ``{split: (instances_json, images_dir)}`` into ``out``; returns the data yaml and the report.
    ``segments``: polygon rows from the segmentations instead of box rows."""
    if not splits:
        raise UserError("no --split given")
    files = {split: Path(js) for split, (js, _) in splits.items()}
    cocos = {split: read_coco_json(f) for split, f in files.items()}
    coco_ids, names = category_table(cocos, files)
    indexes = {split: ImageIndex.scan(images) for split, (_, images) in splits.items()}
    source = ", ".join(f"{split}: {files[split].absolute()} with images {indexes[split].root}" for split in splits)
    report = ConversionReport(source, names, NAMES_FROM, split_from="one COCO file per split")
    converted = _convert_all({split: (files[split], cocos[split], indexes[split]) for split in splits}, coco_ids,
                             report, segments)
    comment = f"Converted from COCO JSON ({', '.join(str(f.resolve()) for f in files.values())}) by tools/coco2yolo.py"
    yaml_file = write_converted(out, [i.root for i in indexes.values()], converted, report, comment, exist_ok,
                                extra={"coco_ids": coco_ids})
    return yaml_file, report


def convert_coco_file(json_file: str | Path, images_dir: str | Path, out: str | Path,
                      fractions: Sequence[float] | None = None, seed: int = 0,
                      exist_ok: bool = False, segments: bool = False) -> tuple[Path, ConversionReport]:
    """Convert one JSON for the whole dataset, split at random by ``fractions`` (default ``DEFAULT_FRACTIONS``)."""
    fractions = check_fractions(fractions or DEFAULT_FRACTIONS)
    file = Path(json_file)
    coco = read_coco_json(file)
    coco_ids, names = category_table({"all": coco}, {"all": file})
    index = ImageIndex.scan(images_dir)
    report = ConversionReport(f"{file.absolute()} with images {index.root}", names, NAMES_FROM,
                              split_from=describe_split(fractions, seed))
    items = {item.name: item for item in _convert_all({"all": (file, coco, index)}, coco_ids, report, segments)["all"]}
    converted = {split: [items[name] for name in names_in_split]
                 for split, names_in_split in seeded_split(list(items), fractions, seed).items()}
    comment = f"Converted from COCO JSON {file.resolve()} by tools/coco2yolo.py"
    yaml_file = write_converted(out, [index.root], converted, report, comment, exist_ok, extra={"coco_ids": coco_ids})
    return yaml_file, report


def _convert_all(sources: dict[str, tuple[Path, dict, ImageIndex]], coco_ids: list[int],
                 report: ConversionReport, segments: bool = False) -> dict[str, list[LabeledImage]]:
    """``{key: (json file, its content, its image folder)}`` -> ``{key: converted images}``.

    Images in a folder that no JSON lists are left out (one JSON's folder may serve several).
    """
    matchings = {key: _match(file, coco, index, report) for key, (file, coco, index) in sources.items()}
    listed = {image for m in matchings.values() for image, _ in m.pairs}
    unlisted = sorted({image for m in matchings.values() for image in m.unannotated} - listed)
    report.left_out += [Problem(str(image), "no JSON's images table lists it") for image in unlisted]
    return {key: _convert_images(file, coco, index, matchings[key], coco_ids, report, segments)
            for key, (file, coco, index) in sources.items()}


def _match(json_file: Path, coco: dict, index: ImageIndex, report: ConversionReport) -> Matching:
    """The JSON's image records paired with files below ``index``; what does not pair goes into ``report``."""
    records = {}
    for image in coco["images"]:
        name = str(image.get("file_name") or "")
        if name in records:
            report.left_out.append(Problem(f"{json_file}: image id {image.get('id')}",
                                           f"file_name {name!r} is listed twice; the first entry kept"))
            continue
        records[name] = image
    matching = match_annotations(index, records, backgrounds=False)
    report.without_image += [f"{json_file}: {name}" for name in matching.orphans]
    report.left_out += [Problem(f"{json_file}: {name}", why) for name, why in matching.clashes]
    return matching


def _convert_images(json_file: Path, coco: dict, index: ImageIndex, matching: Matching, coco_ids: list[int],
                    report: ConversionReport, segments: bool = False) -> list[LabeledImage]:
    """The readable images of one JSON with their boxes (or polygons); everything else goes into ``report``."""
    sizes, unreadable = readable_images([p for p, _ in matching.pairs])
    report.unreadable_images += [Problem(str(p), why) for p, why in unreadable]

    known_ids = {image.get("id") for image in coco["images"]}
    items, size_of = {}, {}
    for path, image in matching.pairs:
        if path in sizes:
            items[image.get("id")] = LabeledImage(path, index.output_name(path))
            size_of[image.get("id")] = ((int(image["width"]), int(image["height"])) if image.get("width")
                                        and image.get("height") else sizes[path])
    class_of = {cid: k for k, cid in enumerate(coco_ids)}
    annotated = set()
    for ann in coco["annotations"]:
        image_id, where = ann.get("image_id"), f"{json_file}: annotation {ann.get('id')}"
        annotated.add(image_id)
        if image_id not in known_ids:
            report.without_image.append(f"{where}: image_id {image_id!r} is not in the images table")
        elif image_id in items and not ann.get("iscrowd", 0):
            add = _add_polygon if segments else _add_box
            add(ann, where, class_of, size_of[image_id], items[image_id], report)
    report.without_annotation += [str(item.image) for image_id, item in items.items() if image_id not in annotated]
    return sorted(items.values(), key=lambda item: item.name)


def _add_box(ann: dict, where: str, class_of: dict[int, int], size: tuple[int, int], item: LabeledImage,
             report: ConversionReport) -> None:
    cls, bbox = class_of.get(ann.get("category_id")), ann.get("bbox")
    if cls is None:
        report.box_notes.append(f"{where} ({item.image.name}): category_id {ann.get('category_id')!r} is not in "
                                "the categories table; dropped")
        item.dropped += 1
        return
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        report.box_notes.append(f"{where} ({item.image.name}): bbox {bbox!r} is not [x, y, w, h]; dropped")
        item.dropped += 1
        return
    x, y, w, h = bbox
    xywh, clipped = pixel_box_to_yolo(x, y, x + w, y + h, *size)
    if xywh is None:
        report.box_notes.append(f"{where} ({item.image.name}): degenerate box {bbox}; dropped")
        item.dropped += 1
        return
    if clipped:
        report.box_notes.append(f"{where} ({item.image.name}): box {bbox} reaches outside the image; clipped")
        item.clipped += 1
    item.rows.append((cls, *xywh))


def _segment_outline(segmentation, width: int, height: int) -> np.ndarray | None:
    """One (k, 2) pixel outline of a COCO segmentation (polygon list or RLE); None when it holds none."""
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list):
        parts = [np.asarray(part, dtype=np.float64).reshape(-1, 2) for part in segmentation
                 if isinstance(part, list) and len(part) >= 6 and len(part) % 2 == 0
                 and all(isinstance(v, (int, float)) for v in part)]
        return join_parts(parts) if parts else None
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        rle = segmentation
        if isinstance(rle["counts"], list):  # uncompressed RLE
            rle = coco_mask.frPyObjects(rle, *rle["size"])
        elif isinstance(rle["counts"], str):
            rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        mask = coco_mask.decode(rle)
        if mask.shape != (height, width):
            return None
        polygon, _ = mask_to_polygon(mask)
        return polygon
    return None


def _add_polygon(ann: dict, where: str, class_of: dict[int, int], size: tuple[int, int], item: LabeledImage,
                 report: ConversionReport) -> None:
    cls, (width, height) = class_of.get(ann.get("category_id")), size
    if cls is None:
        report.box_notes.append(f"{where} ({item.image.name}): category_id {ann.get('category_id')!r} is not in "
                                "the categories table; dropped")
        item.dropped += 1
        return
    try:
        outline = _segment_outline(ann.get("segmentation"), width, height)
    except (ValueError, TypeError, KeyError) as exc:  # pycocotools on a malformed RLE
        report.box_notes.append(f"{where} ({item.image.name}): segmentation is not a readable RLE ({exc}); dropped")
        item.dropped += 1
        return
    inside = clip_polygon(outline, width, height) if outline is not None else np.zeros((0, 2))
    if len(inside) < 3:
        report.box_notes.append(f"{where} ({item.image.name}): no polygon or RLE with an area inside the image "
                                "in its segmentation; dropped")
        item.dropped += 1
        return
    if len(inside) != len(outline) or not np.allclose(inside, outline):
        report.box_notes.append(f"{where} ({item.image.name}): segmentation reaches outside the image; clipped")
        item.clipped += 1
    item.rows.append((cls, *(inside / (width, height)).ravel().tolist()))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Convert COCO instances JSON annotations to YOLO labels and a data yaml.")
    ap.add_argument("--annotations", help="one COCO instances JSON for the whole dataset, split at random; "
                                          "goes with --images")
    ap.add_argument("--images", help="folder of the images --annotations names (subfolders too)")
    ap.add_argument("--split", nargs=3, action="append", metavar=("TRAIN|NAME", "VAL|JSON", "TEST|IMAGES"),
                    help="with --annotations: fractions of the seeded random split, summing to 1 (0 = no such "
                         f"split; default {' '.join(map(str, DEFAULT_FRACTIONS))}); without: one split's name "
                         "(train, val or test), its instances JSON and its image folder, repeatable")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random split")
    ap.add_argument("--out", required=True, help="output folder; images are symlinked")
    ap.add_argument("--segments", action="store_true",
                    help="write each annotation's segmentation (polygons or RLE) as a polygon row, for instance "
                         "segmentation, instead of its box")
    ap.add_argument("--exist-ok", action="store_true", help="replace splits converted earlier into --out")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    if args.annotations or args.images:
        if not (args.annotations and args.images):
            raise UserError("--annotations (the JSON) and --images (its image folder) go together")
        yaml_file, report = convert_coco_file(args.annotations, args.images, args.out, _fractions(args.split),
                                              args.seed, args.exist_ok, args.segments)
    else:
        if not args.split:
            raise UserError("give --annotations JSON --images DIR (one file, split at random), "
                            "or --split NAME JSON IMAGES for each split")
        names = [name for name, _, _ in args.split]
        bad = [n for n in names if n not in SPLITS]
        if bad or len(set(names)) < len(names):
            raise UserError(f"--split {bad[0] if bad else names}: split names must be distinct and one of "
                            f"{', '.join(SPLITS)}")
        yaml_file, report = convert_coco({name: (js, images) for name, js, images in args.split}, args.out,
                                         args.exist_ok, args.segments)
    print(report.render(limit=SHOWN_ON_CONSOLE), end="")
    print(f"data yaml: {yaml_file}\nreport: {yaml_file.parent / REPORT_STEM}.md, .json")


def _fractions(split_args: list[list[str]] | None) -> list[float] | None:
    """``--split`` given with ``--annotations``: once, three numbers."""
    if not split_args:
        return None
    try:
        if len(split_args) == 1:
            return [float(v) for v in split_args[0]]
    except ValueError:
        pass
    raise UserError(f"--split {' '.join(split_args[-1])}: with --annotations, --split takes three fractions "
                    "TRAIN VAL TEST, once")


if __name__ == "__main__":
    run_cli(main)
