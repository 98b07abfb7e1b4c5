"""Find a dataset folder's images, match each annotation to its image by name, check they decode.

Datasets people label or download are seldom in a devkit layout: a folder of images and a
folder of annotations (or both in one folder), any names, sometimes nested. The rules:

- an image is any file below the folder (links followed) whose extension, in any letter case,
  is one upstream reads (``IMG_FORMATS``);
- an annotation named ``sub/a`` (``xml/sub/a.xml``, or ``sub/a.jpg`` in a COCO file) matches the
  image at that relative path; failing that, the one image anywhere below whose stem is ``a``,
  so the two folders may be nested differently;
- nothing is guessed: when several images fit, when an image is claimed twice, or when two
  images would share a label file, those images and annotations are left out and said why.

Converted images keep their file name; an image in a subfolder gets the folder in its name
(``sub__a.jpg``) so that the output is flat and a folder named ``images`` inside the source
cannot break upstream's images -> labels path rule.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Generic, TypeVar

from utils.data.label_check import IMG_FORMATS, image_size
from utils.errors import UserError

T = TypeVar("T")
SUBFOLDER_SEPARATOR = "__"


def files_below(folder: str | Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    """Sorted files below ``folder`` whose lower-case extension is in ``suffixes`` (without dots)."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{root}: folder of {what} not found")
    found = sorted(Path(d) / f for d, _, names in os.walk(root, followlinks=True) for f in names
                   if Path(f).suffix[1:].lower() in suffixes)
    if not found:
        raise UserError(f"{root}: no {what} found (extensions: {', '.join(suffixes)})")
    return found


def relative_name(path: Path, root: Path) -> str:
    """``path`` below ``root`` as a slash-separated name without extension: the key annotations match on."""
    return path.relative_to(root).with_suffix("").as_posix()


@dataclass
class ImageIndex:
    """The images below one folder, looked up by relative name or by stem."""
    root: Path
    images: list[Path]
    _by_name: dict[str, list[Path]] = field(init=False, repr=False)
    _by_stem: dict[str, list[Path]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name, self._by_stem = defaultdict(list), defaultdict(list)
        for image in self.images:
            self._by_name[relative_name(image, self.root)].append(image)
            self._by_stem[image.stem].append(image)

    @classmethod
    def scan(cls, folder: str | Path) -> ImageIndex:
        root = Path(folder).absolute()  # reports name files that stay findable from any working directory
        return cls(root, files_below(root, IMG_FORMATS, "images"))

    def candidates(self, name: str) -> list[Path]:
        """Images an annotation called ``name`` may describe; a name with an image extension must keep it."""
        stem_path, suffix = _without_image_suffix(name)
        found = self._by_name.get(stem_path.as_posix()) or self._by_stem.get(stem_path.name, [])
        return [p for p in found if not suffix or p.suffix.lower() == suffix]

    def output_name(self, image: Path) -> str:
        """File name of ``image`` in the converted, flat image folder."""
        return SUBFOLDER_SEPARATOR.join(image.relative_to(self.root).parts)


@dataclass
class Matching(Generic[T]):
    """Images paired with annotations; the rest sorted by what went wrong."""
    pairs: list[tuple[Path, T]] = field(default_factory=list)
    unannotated: list[Path] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # annotation names with no image
    clashes: list[tuple[str, str]] = field(default_factory=list)  # (image or annotation name, why left out)


def match_annotations(index: ImageIndex, annotations: dict[str, T], backgrounds: bool = True) -> Matching[T]:
    """Pair ``{annotation name: annotation}`` with the images of ``index`` (module docstring: the rules).

    ``backgrounds`` says whether the caller converts unannotated images too, which matters for the
    label files they could share with annotated ones.
    """
    result: Matching[T] = Matching()
    claimed: dict[Path, str] = {}
    left_out: set[Path] = set()  # images an ambiguous annotation may describe: neither paired nor background
    # Exact relative-path matches go first, so a stem-only match never takes an image from one.
    for name in sorted(annotations, key=lambda n: (not _matches_exactly(index, n), n)):
        found = index.candidates(name)
        if not found:
            result.orphans.append(name)
        elif len(found) > 1:
            listed = ", ".join(str(p.relative_to(index.root)) for p in found)
            result.clashes.append((name, f"several images fit ({listed}); the annotation and its unmatched "
                                         "candidates left out"))
            left_out.update(p for p in found if p not in claimed)
        elif found[0] in claimed or found[0] in left_out:
            other = claimed.get(found[0], "an annotation that several images fit")
            result.clashes.append((name, f"{found[0]} is already matched by {other}; annotation left out"))
        else:
            claimed[found[0]] = name
            result.pairs.append((found[0], annotations[name]))
    result.unannotated = [p for p in index.images if p not in claimed and p not in left_out]
    _leave_out_shared_label_files(index, result, backgrounds)
    return result


def _matches_exactly(index: ImageIndex, name: str) -> bool:
    found = index.candidates(name)
    return len(found) == 1 and relative_name(found[0], index.root) == _without_image_suffix(name)[0].as_posix()


def _without_image_suffix(name: str) -> tuple[PurePosixPath, str]:
    """(``name`` as a path without its image extension, that extension in lower case or '')."""
    path = PurePosixPath(name.replace("\\", "/"))  # names written on Windows
    suffix = path.suffix.lower()
    return (path.with_suffix(""), suffix) if suffix[1:] in IMG_FORMATS else (path, "")


def _leave_out_shared_label_files(index: ImageIndex, result: Matching, backgrounds: bool) -> None:
    """Drop images whose label files would be one file (``a.jpg`` and ``a.png`` side by side)."""
    by_label = defaultdict(list)
    for image in [p for p, _ in result.pairs] + (result.unannotated if backgrounds else []):
        by_label[Path(index.output_name(image)).stem].append(image)
    shared = {p for group in by_label.values() if len(group) > 1 for p in group}
    if not shared:
        return
    result.pairs = [(p, a) for p, a in result.pairs if p not in shared]
    result.unannotated = [p for p in result.unannotated if p not in shared]
    for image in sorted(shared):
        others = ", ".join(p.name for p in by_label[Path(index.output_name(image)).stem] if p != image)
        result.clashes.append((str(image), f"would share its label file with {others}; left out"))


def readable_images(images: list[Path]) -> tuple[dict[Path, tuple[int, int]], list[tuple[Path, str]]]:
    """(width, height) of each image that decodes completely, and (image, why not) for the others.

    Checked at conversion time so that a broken file is named once, with its source path, rather
    than dropped later by every training run's label scan.
    """
    sizes, unreadable = {}, []
    for image in images:
        try:
            sizes[image] = image_size(image)
        except ValueError as exc:
            unreadable.append((image, str(exc)))
    return sizes, unreadable
