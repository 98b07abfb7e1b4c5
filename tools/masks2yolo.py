"""Convert instance-id mask PNGs to YOLO polygon labels, a data yaml and a conversion report.

    python tools/masks2yolo.py --images photos --masks masks --out runs/data/mine --classes cell
    python tools/masks2yolo.py --images photos --masks masks --out runs/data/mine --classes cat dog \\
                               --class-map classes.json --split 0.8 0.2 0

One single-channel PNG per image (8 or 16 bit), matched to its image by file name
(``utils.data.source_images``): 0 is background, every other value k one instance. Each instance's
pixels are traced along their edges into one polygon (parts of an instance joined by zero-width
bridges, holes filled: a YOLO row holds one outline), which COCO's rasteriser turns back into the
same pixels. With one name in ``--classes`` every instance is of that class; with several,
``--class-map`` is a JSON object ``{"<mask name without extension>": {"<k>": "<class name>"}}``,
and an instance it does not name is dropped and reported. Images without a mask are kept as
background images; the images are split at random with ``--seed`` (``utils.data.split``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.data.conversion_report import REPORT_STEM, SHOWN_ON_CONSOLE, ConversionReport, Problem  # noqa: E402
from utils.data.polygons import mask_to_polygon  # noqa: E402
from utils.data.source_images import (  # noqa: E402
    ImageIndex,
    files_below,
    match_annotations,
    readable_images,
    relative_name,
)
from utils.data.split import DEFAULT_FRACTIONS, check_fractions, describe_split, seeded_split  # noqa: E402
from utils.data.yolo_format import LabeledImage, write_converted  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402

MASK_SUFFIXES = ("png",)


def read_class_map(path: str | Path | None, names: list[str]) -> dict[str, dict[int, int]] | None:
    """``{mask name: {instance id: class index}}`` from the JSON file; None without one (a single class)."""
    if path is None:
        if len(names) > 1:
            raise UserError(f"--classes names {len(names)} classes: give --class-map (which instance is which class)")
        return None
    file = Path(path)
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{file}: cannot read the class map ({exc.strerror})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise UserError(f'{file}: expected {{"<mask name>": {{"<instance id>": "<class name>"}}}}')
    index = {name: i for i, name in enumerate(names)}
    table = {}
    for mask_name, instances in raw.items():
        for k, cls in instances.items():
            if cls not in index or not str(k).isdigit():
                raise UserError(f"{file}: {mask_name!r} instance {k!r} -> {cls!r}: instance ids are numbers and "
                                f"classes one of --classes ({', '.join(names)})")
        table[mask_name] = {int(k): index[cls] for k, cls in instances.items()}
    return table


def read_instance_mask(path: Path) -> np.ndarray:
    """The (h, w) integer id image; ValueError saying why when the file is not one."""
    ids = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if ids is None:
        raise ValueError("not a readable PNG")
    if ids.ndim != 2:
        raise ValueError(f"{ids.shape[2]} channels: an instance-id mask has one (0 background, k instance k)")
    return ids


def convert_masks(images_dir: str | Path, masks_dir: str | Path, out: str | Path, names: Sequence[str],
                  class_map: str | Path | None = None, fractions: Sequence[float] | None = None, seed: int = 0,
                  exist_ok: bool = False) -> tuple[Path, ConversionReport]:
    """Convert a folder of images and one of instance-id PNGs; returns the data yaml and the report."""
    names = list(names)
    fractions = check_fractions(fractions or DEFAULT_FRACTIONS)
    classes = read_class_map(class_map, names)
    index = ImageIndex.scan(images_dir)
    mask_root = Path(masks_dir).absolute()
    mask_files = {relative_name(f, mask_root): f for f in files_below(mask_root, MASK_SUFFIXES, "mask PNGs")}
    matching = match_annotations(index, mask_files)
    how = "one class" if classes is None else f"--class-map {class_map}"
    report = ConversionReport(f"images {index.root}, instance masks {mask_root}", names, f"--classes ({how})",
                              split_from=describe_split(fractions, seed))
    report.without_image = [str(mask_files[n]) for n in matching.orphans]
    report.left_out += [Problem(str(mask_files.get(name, name)), why) for name, why in matching.clashes]
    sizes, unreadable = readable_images(sorted([*(image for image, _ in matching.pairs), *matching.unannotated]))
    report.unreadable_images = [Problem(str(p), why) for p, why in unreadable]
    report.without_annotation = [str(p) for p in matching.unannotated if p in sizes]
    items = {}
    for image, size in sizes.items():
        items[relative_name(image, index.root)] = LabeledImage(image, index.output_name(image))
    for image, mask_file in matching.pairs:
        if image in sizes:
            _convert_mask(mask_file, relative_name(mask_file, mask_root), sizes[image], classes,
                          items[relative_name(image, index.root)], report)
    chosen = seeded_split(list(items), fractions, seed)
    splits = {split: [items[k] for k in keys] for split, keys in chosen.items()}
    comment = f"Converted from instance-id masks ({report.source}) by tools/masks2yolo.py"
    yaml_file = write_converted(out, [index.root, mask_root], splits, report, comment, exist_ok)
    return yaml_file, report


def _convert_mask(mask_file: Path, mask_name: str, size: tuple[int, int], classes: dict[str, dict[int, int]] | None,
                  item: LabeledImage, report: ConversionReport) -> None:
    """One polygon row per instance of ``mask_file`` into ``item``; problems into ``report``."""
    try:
        ids = read_instance_mask(mask_file)
    except ValueError as exc:
        report.unreadable_annotations.append(Problem(str(mask_file), str(exc)))
        return
    width, height = size
    if ids.shape != (height, width):
        report.unreadable_annotations.append(Problem(str(mask_file), f"{ids.shape[1]}x{ids.shape[0]} pixels, its "
                                                                     f"image {width}x{height}"))
        return
    for k in np.unique(ids[ids > 0]).tolist():
        cls = 0 if classes is None else classes.get(mask_name, {}).get(int(k))
        if cls is None:
            report.box_notes.append(f"{mask_file}: instance {k} has no class in the class map; dropped")
            item.dropped += 1
            continue
        polygon, _ = mask_to_polygon(ids == k)
        item.rows.append((cls, *(polygon / (width, height)).ravel().tolist()))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Convert instance-id mask PNGs (0 background, k instance k) to YOLO "
                                             "polygon labels and a data yaml.")
    ap.add_argument("--images", required=True, help="folder of images (subfolders too)")
    ap.add_argument("--masks", required=True, help="folder of single-channel PNGs, one per image, same file names")
    ap.add_argument("--out", required=True, help="output folder (outside the sources); images are symlinked")
    ap.add_argument("--classes", "--names", dest="classes", nargs="+", default=["object"],
                    help="class names in index order (default: one class, 'object')")
    ap.add_argument("--class-map", help='JSON {"<mask name>": {"<instance id>": "<class name>"}}; needed with '
                                        "more than one class")
    ap.add_argument("--split", nargs=3, type=float, metavar=("TRAIN", "VAL", "TEST"),
                    help=f"fractions of a seeded random split, summing to 1 (default "
                         f"{' '.join(map(str, DEFAULT_FRACTIONS))})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random split")
    ap.add_argument("--exist-ok", action="store_true", help="replace splits converted earlier into --out")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    yaml_file, report = convert_masks(args.images, args.masks, args.out, args.classes, args.class_map, args.split,
                                      args.seed, args.exist_ok)
    print(report.render(limit=SHOWN_ON_CONSOLE), end="")
    print(f"data yaml: {yaml_file}\nreport: {yaml_file.parent / REPORT_STEM}.md, .json")


if __name__ == "__main__":
    run_cli(main)
