"""What a dataset conversion did, said once on the console and kept beside the converted data.

A converter that silently skips files turns a labelling mistake into a weaker model weeks
later. Every image and annotation ends up in exactly one place here: converted (counted per
split and class), kept as a background image, or left out with the reason. The console gets
the first few of each list; ``conversion_report.md`` and ``conversion_report.json`` in the
output folder get all of them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

REPORT_STEM = "conversion_report"
SHOWN_ON_CONSOLE = 5
MAX_CLASS_ROWS_ON_CONSOLE = 20


@dataclass
class Problem:
    """A file left out of the conversion, and why."""
    file: str
    reason: str


@dataclass
class SplitStats:
    """One converted split; ``dropped`` and ``clipped`` count boxes, ``backgrounds`` images with no box."""
    images: int = 0
    backgrounds: int = 0
    boxes: int = 0
    dropped: int = 0
    clipped: int = 0
    classes: dict[str, int] = field(default_factory=dict)


@dataclass
class ConversionReport:
    source: str
    names: list[str] = field(default_factory=list)
    names_from: str = ""
    split_from: str = ""
    splits: dict[str, SplitStats] = field(default_factory=dict)
    without_annotation: list[str] = field(default_factory=list)  # kept, as background images
    without_image: list[str] = field(default_factory=list)  # annotations skipped
    unreadable_images: list[Problem] = field(default_factory=list)
    unreadable_annotations: list[Problem] = field(default_factory=list)
    left_out: list[Problem] = field(default_factory=list)  # anything else not converted
    box_notes: list[str] = field(default_factory=list)  # boxes dropped or clipped

    def count_split(self, split: str, boxes_per_image: Iterable[list[int]], dropped: int, clipped: int) -> None:
        """Record a written split from the class ids of each of its images."""
        stats = SplitStats(dropped=dropped, clipped=clipped, classes={name: 0 for name in self.names})
        for class_ids in boxes_per_image:
            stats.images += 1
            stats.backgrounds += not class_ids
            stats.boxes += len(class_ids)
            for c in class_ids:
                stats.classes[self.names[c]] += 1
        self.splits[split] = stats

    def render(self, limit: int | None = None) -> str:
        """Markdown; ``limit`` shortens each list (and a long class table) for the console."""
        lines = [f"Converted {self.source}", "", f"classes ({self.names_from}): {', '.join(self.names)}",
                 f"splits: {self.split_from}", "",
                 "| split | images | background images | boxes | boxes dropped | boxes clipped |",
                 "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {s} | {st.images} | {st.backgrounds} | {st.boxes} | {st.dropped} | {st.clipped} |"
                  for s, st in self.splits.items()]
        lines += [""] + self._class_table(limit)
        sections = [
            ("images with no annotation, kept as background images (empty label files)", self.without_annotation),
            ("annotations with no image, skipped", self.without_image),
            ("images that could not be read, skipped", self.unreadable_images),
            ("annotation files that could not be read, their images skipped", self.unreadable_annotations),
            ("other files left out", self.left_out),
            ("boxes dropped or clipped", self.box_notes),
        ]
        for title, items in sections:
            lines.append(f"{title}: {len(items)}")
            shown = items if limit is None else items[:limit]
            lines += [f"- {i.file}: {i.reason}" if isinstance(i, Problem) else f"- {i}" for i in shown]
            if len(shown) < len(items):
                lines.append(f"- ... and {len(items) - len(shown)} more (see {REPORT_STEM}.md)")
        return "\n".join(lines) + "\n"

    def _class_table(self, limit: int | None) -> list[str]:
        if limit is not None and len(self.names) > MAX_CLASS_ROWS_ON_CONSOLE:
            return [f"boxes per class: {len(self.names)} classes, see {REPORT_STEM}.md", ""]
        rows = ["| class | " + " | ".join(self.splits) + " |", "| --- |" + " ---: |" * len(self.splits)]
        rows += [f"| {name} | " + " | ".join(str(st.classes[name]) for st in self.splits.values()) + " |"
                 for name in self.names]
        return rows + [""]

    def write(self, out: Path) -> tuple[Path, Path]:
        """``conversion_report.md`` and ``.json`` in ``out``."""
        md, js = out / f"{REPORT_STEM}.md", out / f"{REPORT_STEM}.json"
        md.write_text(self.render())
        js.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return md, js
