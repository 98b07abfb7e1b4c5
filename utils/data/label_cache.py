"""Scan a dataset's image/label pairs once and keep the result in a ``.cache`` file.

Checking every image (a full decode) and every label file takes minutes on COCO, so the
outcome is stored next to the labels and reused while no file has changed. The cache is a
plain ``np.savez`` archive of arrays and strings, read with ``allow_pickle=False``: a cache file
from elsewhere can at worst be rejected, never execute code. Its key hashes the format
version, ``nc`` (it decides which rows are dropped) and each file's path, size and mtime, so
an edited label, a replaced image or a changed class count all trigger a fresh scan.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils.data import label_check as label_check

CACHE_VERSION = 2  # 2: polygons and each file's label kind
NUM_THREADS = min(8, max(1, (os.cpu_count() or 1)))
LOGGER = logging.getLogger("yolov9.data")


@dataclass
class LabelScan:
    """The usable images of a dataset with their checked labels, and the totals of the check."""
    im_files: list[str]
    labels: list[np.ndarray]
    shapes: np.ndarray  # (n, 2) width, height
    found: int = 0
    missing: int = 0
    empty: int = 0
    corrupt: int = 0
    repaired: int = 0
    dropped: int = 0
    messages: list[str] = field(default_factory=list)
    segments: list[list[np.ndarray]] = field(default_factory=list)  # per image: normalised polygons, or []
    kinds: list[str] = field(default_factory=list)  # per image: 'polygons', 'boxes' or '' (no rows)

    def files_of_kind(self, kind: str) -> list[str]:
        """Images whose label file was written as ``kind`` ('polygons' or 'boxes')."""
        return [f for f, k in zip(self.im_files, self.kinds) if k == kind]

    def summary(self) -> str:
        """The totals line printed after every scan or cache read."""
        polygons = len(self.files_of_kind("polygons"))
        kinds = f" ({polygons} of polygons, {len(self.files_of_kind('boxes'))} of boxes)" if polygons else ""
        return (f"{len(self.im_files)} images: {self.found} label files found{kinds}, {self.missing} missing, "
                f"{self.empty} empty, {self.corrupt} corrupt images dropped; "
                f"{self.repaired} label rows repaired, {self.dropped} dropped")


def cache_key(im_files: list[str], label_files: list[str], nc: int | None) -> str:
    """Hash of everything the scan result depends on."""
    h = hashlib.sha256(f"v{CACHE_VERSION} nc={nc}\n".encode())
    for f in (*im_files, *label_files):
        try:
            st = os.stat(f)
            h.update(f"{f} {st.st_size} {st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f} absent\n".encode())
    return h.hexdigest()


def scan_labels(im_files: list[str], label_files: list[str], nc: int | None, desc: str = "") -> LabelScan:
    """Check every pair in threads (PIL decoding releases the GIL) and collect the totals."""
    scan = LabelScan([], [], np.zeros((0, 2), np.int64))
    shapes = []
    with ThreadPoolExecutor(NUM_THREADS) as pool:
        results = pool.map(label_check.check_pair, im_files, label_files, [nc] * len(im_files))
        for check in tqdm(results, desc=f"{desc}Scanning", total=len(im_files), file=sys.stderr):
            if check.status == "corrupt":
                scan.corrupt += 1
            else:
                setattr(scan, check.status, getattr(scan, check.status) + 1)
                scan.im_files.append(check.im_file)
                scan.labels.append(check.labels)
                scan.segments.append(check.segments)
                scan.kinds.append(check.kind)
                shapes.append(check.shape)
            scan.repaired += check.repaired
            scan.dropped += check.dropped
            if check.message:
                scan.messages.append(check.message)
    scan.shapes = np.array(shapes, dtype=np.int64).reshape(-1, 2)
    return scan


def save_scan(path: Path, key: str, scan: LabelScan) -> bool:
    """Write the cache atomically; a read-only dataset folder only costs a rescan next time.

    A folder without write permission bits is left alone even when running as root, which
    could write anyway: such a folder was marked read-only on purpose (a shared dataset).
    """
    if not stat.S_IMODE(os.stat(path.parent).st_mode) & 0o222:
        LOGGER.info(f"{path.parent} is read-only; label cache not written")
        return False
    counts = np.array([len(lb) for lb in scan.labels], dtype=np.int64)
    rows = np.concatenate(scan.labels, 0) if scan.labels else np.zeros((0, 5), np.float32)
    polygons = [p for segments in scan.segments for p in segments]
    points = np.concatenate(polygons, 0) if polygons else np.zeros((0, 2), np.float32)
    polygon_counts = np.array([len(s) for s in scan.segments], dtype=np.int64)  # polygons per image
    point_counts = np.array([len(p) for p in polygons], dtype=np.int64)
    totals = np.array([scan.found, scan.missing, scan.empty, scan.corrupt, scan.repaired, scan.dropped])
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, version=np.array(CACHE_VERSION), key=np.array(key), im_files=np.array(scan.im_files, dtype=str),
                     rows=rows.astype(np.float32), counts=counts, shapes=scan.shapes, totals=totals,
                     messages=np.array(scan.messages, dtype=str), points=points.astype(np.float32),
                     polygon_counts=polygon_counts, point_counts=point_counts, kinds=np.array(scan.kinds, dtype=str))
        os.replace(tmp, path)
        return True
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        LOGGER.warning(f"{path}: label cache not written ({exc.strerror}); the next run will rescan")
        return False


def load_scan(path: Path, key: str) -> LabelScan | None:
    """The cached scan if the file is ours and current, else ``None``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION or str(z["key"]) != key:
                return None
            counts, rows = z["counts"], z["rows"]
            totals = [int(t) for t in z["totals"]]
            polygons = _split(z["points"], z["point_counts"])
            scan = LabelScan([str(f) for f in z["im_files"]], _split(rows, counts), z["shapes"], *totals,
                             messages=[str(m) for m in z["messages"]],
                             segments=[list(g) for g in _split_list(polygons, z["polygon_counts"])],
                             kinds=[str(k) for k in z["kinds"]])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        return None
    return scan


def _split(array: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Consecutive pieces of ``array`` with the given lengths."""
    return np.split(array, np.cumsum(counts)[:-1]) if len(counts) else []


def _split_list(items: list, counts: np.ndarray) -> list[list]:
    ends = np.cumsum(counts)
    return [items[end - n:end] for n, end in zip(counts, ends)]


def load_or_scan(cache_path: Path, im_files: list[str], label_files: list[str], nc: int | None,
                 prefix: str = "") -> tuple[LabelScan, bool]:
    """Reuse the cache when it is current, otherwise scan and save; print warnings and totals.

    Returns the scan and whether it came from the cache.
    """
    key = cache_key(im_files, label_files, nc)
    scan = load_scan(cache_path, key)
    reused = scan is not None
    if not reused:
        scan = scan_labels(im_files, label_files, nc, desc=prefix)
        save_scan(cache_path, key, scan)
    for message in scan.messages:
        LOGGER.warning(f"{prefix}WARNING {message}")
    source = "cache" if reused else "scan"
    print(f"{prefix}{cache_path.with_suffix('')} ({source}): {scan.summary()}", file=sys.stderr)
    return scan, reused
