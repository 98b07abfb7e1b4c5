"""Convert Pascal VOC XML annotations to YOLO labels, a data yaml and a conversion report.

    python tools/voc2yolo.py --voc ../shared/datasets/bccd/BCCD --out runs/data/bccd
    python tools/voc2yolo.py --images photos --annotations labels --out runs/data/mine --split 0.8 0.2 0

``--voc`` reads a VOC devkit folder (``Annotations/``, ``JPEGImages/``) and its
``ImageSets/Main/<split>.txt`` lists; ``--images``/``--annotations`` read any two folders (or
one folder holding both), matched by file name (``utils.data.source_images``). Without split lists,
or with ``--split``, the images are split at random with ``--seed`` (``utils.data.split``). Class
indices follow ``--classes`` when given (a box of another class is then an error, as it is
almost always a typo), otherwise the alphabetical order of the class names in the XML files.
VOC corners are 1-based pixel indices; they are shifted to 0-based and the width is
``xmax - xmin``, the convention of common VOC converters, so a box with ``xmin == xmax`` is
degenerate and dropped. Images with no XML file are kept as background images. The source
folders are only read; images are symlinked into ``--out``, beside ``conversion_report.md``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.data.config import SPLITS  # noqa: E402
from utils.data.conversion_report import REPORT_STEM, SHOWN_ON_CONSOLE, ConversionReport, Problem  # noqa: E402
from utils.data.source_images import (  # noqa: E402
    ImageIndex,
    Matching,
    files_below,
    match_annotations,
    readable_images,
    relative_name,
)
from utils.data.split import DEFAULT_FRACTIONS, check_fractions, describe_split, seeded_split  # noqa: E402
from utils.data.yolo_format import LabeledImage, pixel_box_to_yolo, write_converted  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402


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


def read_split_lists(voc: Path, splits: tuple[str, ...]) -> dict[str, list[str]]:
    """Image ids of each split that has an ``ImageSets/Main/<split>.txt``; empty when none has."""
    found = {}
    for split in splits:
        f = voc / "ImageSets" / "Main" / f"{split}.txt"
        if f.is_file():
            found[split] = [line.split()[0] for line in f.read_text().splitlines() if line.strip()]
    return found


def convert_voc(voc_dir: str | Path, out: str | Path, names: list[str] | None = None,
                splits: tuple[str, ...] = SPLITS, exist_ok: bool = False, skip_difficult: bool = False,
                fractions: Sequence[float] | None = None, seed: int = 0) -> tuple[Path, ConversionReport]:
    """Convert a VOC devkit folder: its split lists when it has them and no ``fractions`` are given."""
    voc = Path(voc_dir)
    for sub in ("Annotations", "JPEGImages"):
        if not (voc / sub).is_dir():
            raise UserError(f"{voc}: no {sub}/ folder (expected a VOC dataset root)")
    lists = {} if fractions else read_split_lists(voc, splits)
    return convert_voc_folders(voc / "JPEGImages", voc / "Annotations", out, names, lists, exist_ok,
                               skip_difficult, fractions, seed, source_roots=[voc])


def convert_voc_folders(images_dir: str | Path, annotations_dir: str | Path, out: str | Path,
                        names: list[str] | None = None, split_lists: dict[str, list[str]] | None = None,
                        exist_ok: bool = False, skip_difficult: bool = False,
                        fractions: Sequence[float] | None = None, seed: int = 0,
                        source_roots: list[Path] | None = None) -> tuple[Path, ConversionReport]:
    """Convert a folder of images and a folder of XML files; returns the data yaml and the report.

    ``split_lists`` (``{split: [image name without extension]}``) decides the splits when given;
    otherwise a seeded split by ``fractions`` (default ``DEFAULT_FRACTIONS``). ``out`` must stay
    outside ``source_roots`` (default: the two folders).
    """
    if not split_lists:
        fractions = check_fractions(fractions or DEFAULT_FRACTIONS)
    index = ImageIndex.scan(images_dir)
    xml_root = Path(annotations_dir).absolute()
    xml_files = {relative_name(f, xml_root): f for f in files_below(xml_root, ("xml",), "XML files")}
    matching = match_annotations(index, xml_files)
    report = ConversionReport(source=f"images {index.root}, annotations {xml_root}")
    if split_lists:
        _keep_listed(matching, index, split_lists, report)
    report.without_image = [str(xml_files[n]) for n in matching.orphans]
    report.left_out += [Problem(str(xml_files.get(name, name)), why) for name, why in matching.clashes]

    parsed = {}  # image -> (its XML file, what the file says)
    for image, xml in matching.pairs:
        try:
            parsed[image] = (xml, parse_voc_xml(xml))
        except (OSError, ValueError) as exc:
            report.unreadable_annotations.append(Problem(str(xml), str(exc)))
    report.names, report.names_from = _class_names(names, [ann for _, ann in parsed.values()], index.root)
    if names:
        _refuse_unknown_classes(parsed.values(), names)

    sizes, unreadable = readable_images(sorted([*parsed, *matching.unannotated]))
    report.unreadable_images = [Problem(str(p), why) for p, why in unreadable]
    report.without_annotation = [str(p) for p in matching.unannotated if p in sizes]
    class_index = {name: i for i, name in enumerate(report.names)}
    items = {}  # relative name (what split lists hold) -> converted image
    for image, size in sizes.items():
        item = items[relative_name(image, index.root)] = LabeledImage(image, index.output_name(image))
        if image in parsed:
            _convert_objects(*parsed[image], size, class_index, skip_difficult, item, report)
    if split_lists:
        report.split_from = f"ImageSets/Main lists ({', '.join(split_lists)})"
        chosen = {split: [k for k in ids if k in items] for split, ids in split_lists.items()}
    else:
        report.split_from = describe_split(fractions, seed)
        chosen = seeded_split(list(items), fractions, seed)
    splits = {split: [items[k] for k in keys] for split, keys in chosen.items()}
    comment = f"Converted from Pascal VOC ({report.source}) by tools/voc2yolo.py"
    yaml_file = write_converted(out, source_roots or [index.root, xml_root], splits, report, comment, exist_ok)
    return yaml_file, report


def _keep_listed(matching: Matching, index: ImageIndex, split_lists: dict[str, list[str]],
                 report: ConversionReport) -> None:
    """Narrow ``matching`` to the images the split lists name; say which listed names exist nowhere."""
    listed = {i for ids in split_lists.values() for i in ids}
    matching.pairs = [(p, xml) for p, xml in matching.pairs if relative_name(p, index.root) in listed]
    matching.unannotated = [p for p in matching.unannotated if relative_name(p, index.root) in listed]
    matching.orphans = [n for n in matching.orphans if n in listed]
    known = {relative_name(p, index.root) for p, _ in matching.pairs} | set(matching.orphans)
    known |= {relative_name(p, index.root) for p in matching.unannotated}
    for split, ids in split_lists.items():
        report.left_out += [Problem(i, f"listed in ImageSets/Main/{split}.txt, but has neither image nor XML")
                            for i in ids if i not in known]


def _class_names(names: list[str] | None, annotations: list[VocImage], images_root: Path) -> tuple[list[str], str]:
    if names:
        if len(set(names)) < len(names):
            raise UserError(f"--classes {' '.join(names)}: a class is named twice")
        return list(names), "from --classes"
    found = sorted({o.name for a in annotations for o in a.objects})
    if not found:
        raise UserError(f"{images_root}: no objects in any annotation and no --classes given")
    return found, "found in the XML files, sorted"


def _refuse_unknown_classes(parsed: Iterable[tuple[Path, VocImage]], names: list[str]) -> None:
    unknown = [(xml, o.name) for xml, ann in parsed for o in ann.objects if o.name not in names]
    if unknown:
        xml, name = unknown[0]
        more = f" (and {len(unknown) - 1} more boxes)" if len(unknown) > 1 else ""
        raise UserError(f"{xml}: class {name!r} is not in --classes ({', '.join(names)}){more}")


def _convert_objects(xml: Path, ann: VocImage, image_size: tuple[int, int], class_index: dict[str, int],
                     skip_difficult: bool, item: LabeledImage, report: ConversionReport) -> None:
    width, height = ann.width, ann.height
    if width <= 0 or height <= 0:  # some tools leave <size> empty; the image itself knows
        width, height = image_size
    for obj in ann.objects:
        if obj.difficult and skip_difficult:
            continue
        xmin, ymin, xmax, ymax = obj.box
        xywh, clipped = pixel_box_to_yolo(xmin - 1, ymin - 1, xmax - 1, ymax - 1, width, height)
        if xywh is None:
            report.box_notes.append(f"{xml}: degenerate {obj.name} box {obj.box} (no width or height); dropped")
            item.dropped += 1
            continue
        if clipped:
            report.box_notes.append(f"{xml}: {obj.name} box {obj.box} reaches outside the {width}x{height} image; "
                                    "clipped")
            item.clipped += 1
        item.rows.append((class_index[obj.name], *xywh))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Convert Pascal VOC XML annotations to YOLO labels and a data yaml.")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--voc", help="VOC root holding Annotations/, JPEGImages/ and, optionally, ImageSets/Main/")
    source.add_argument("--images", help="folder of images (subfolders too), any name; goes with --annotations")
    ap.add_argument("--annotations", help="folder of VOC XML files, matched to --images by file name (may be the same)")
    ap.add_argument("--out", required=True, help="output folder (outside the source); images are symlinked")
    ap.add_argument("--classes", "--names", dest="classes", nargs="+",
                    help="class names in index order; a box of another class is an error (default: all, alphabetical)")
    ap.add_argument("--split", nargs=3, type=float, metavar=("TRAIN", "VAL", "TEST"),
                    help=f"fractions for a seeded random split, summing to 1 (0 = no such split); default "
                         f"{' '.join(map(str, DEFAULT_FRACTIONS))} when there are no ImageSets/Main lists, "
                         "which --split overrides")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random split")
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), help="with --voc: the ImageSets/Main lists to convert")
    ap.add_argument("--skip-difficult", action="store_true", help="leave out objects marked difficult")
    ap.add_argument("--exist-ok", action="store_true", help="replace splits converted earlier into --out")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    common = dict(exist_ok=args.exist_ok, skip_difficult=args.skip_difficult, fractions=args.split, seed=args.seed)
    if args.voc:
        if args.annotations:
            raise UserError("--annotations goes with --images, not with --voc")
        yaml_file, report = convert_voc(args.voc, args.out, args.classes, tuple(args.splits), **common)
    else:
        if not args.annotations:
            raise UserError("--images needs --annotations (the folder of XML files; it may be the same folder)")
        yaml_file, report = convert_voc_folders(args.images, args.annotations, args.out, args.classes, **common)
    print(report.render(limit=SHOWN_ON_CONSOLE), end="")
    print(f"data yaml: {yaml_file}\nreport: {yaml_file.parent / REPORT_STEM}.md, .json")


if __name__ == "__main__":
    run_cli(main)
