"""The project's own source files, for the static checks that must find their subjects by scanning."""
from __future__ import annotations

import os
from pathlib import Path

# Folders that hold no project source: hidden ones (.git, .trt-stubs, virtual environments) and run outputs.
_SKIPPED = {"runs", "__pycache__"}


def project_files(root: Path, suffix: str) -> list[Path]:
    """Files under ``root`` ending in ``suffix``, sorted, outside hidden folders and run outputs."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in _SKIPPED]
        found += [Path(folder) / name for name in names if name.endswith(suffix)]
    return sorted(found)
