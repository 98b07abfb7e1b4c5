"""Read data and hyperparameter yaml files into checked, absolute settings.

Data yamls follow upstream YOLOv9's convention so existing files keep working: a relative
``path`` is resolved from the project root (not from the yaml's folder), and ``train`` /
``val`` / ``test`` are folders of images, ``.txt`` lists of image paths, or lists of either.
Everything is checked here, once, so a typo in a yaml becomes one line naming the file
instead of a traceback deep inside a dataloader worker.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from utils.errors import UserError, yaml_problem
from utils.paths import ROOT

SPLITS = ("train", "val", "test")

# The augmentation keys the training dataset reads; a hyp file without them would fail
# only when the first augmented batch is drawn, possibly minutes into a run.
AUGMENT_KEYS = ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective",
                "flipud", "fliplr", "mosaic", "mixup")


def read_yaml(path: str | Path, what: str) -> dict:
    """Parse a yaml file that must hold a mapping; ``UserError`` naming the file otherwise."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{file}: {what} not found")
    try:
        content = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: {what} is not valid YAML ({yaml_problem(exc)})") from None
    if not isinstance(content, dict):
        raise UserError(f"{file}: {what} must be a mapping of keys to values")
    return content


def load_data_config(path: str | Path) -> dict:
    """Return the data yaml with absolute ``path``, ``train``/``val``/``test``, ``names`` (list) and ``nc``.

    Keys this function does not know (``download``, ``coco_ids``...) are passed through unchanged.
    A split that is absent is ``None``; a split that is named but does not exist is an error.
    """
    file = Path(path)
    data = read_yaml(file, "data yaml")
    names = _class_names(data, file)

    root = Path(str(data.get("path") or ""))
    if not root.is_absolute():
        root = (ROOT / root).resolve()
    if not root.is_dir():
        raise UserError(f"{file}: path {data.get('path')!r} resolves to {root}, which is not a folder")

    config = dict(data)
    config["path"] = str(root)
    for split in SPLITS:
        config[split] = _resolve_split(data.get(split), root, file, split)
    if config["train"] is None and config["val"] is None:
        raise UserError(f"{file}: names neither a 'train' nor a 'val' split")
    config["names"] = names
    config["nc"] = len(names)
    return config


def require_split(config: dict, split: str) -> str | list[str]:
    """The image source of ``split``; ``UserError`` when the data yaml does not define it."""
    source = config.get(split)
    if not source:
        raise UserError(f"data yaml with path {config.get('path')}: has no '{split}' split")
    return source


def load_hyp(path: str | Path) -> dict:
    """Read a hyperparameter yaml and check that every augmentation key is present."""
    hyp = read_yaml(path, "hyp yaml")
    missing = [k for k in AUGMENT_KEYS if k not in hyp]
    if missing:
        raise UserError(f"{path}: hyp yaml lacks {', '.join(missing)}")
    return hyp


def _class_names(data: dict, file: Path) -> list[str]:
    names = data.get("names")
    if names is None:
        raise UserError(f"{file}: no 'names' (class names as a list or a dict of index: name)")
    if isinstance(names, dict):
        if set(names) != set(range(len(names))):
            raise UserError(f"{file}: 'names' keys must be the class indices 0..{len(names) - 1}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise UserError(f"{file}: 'names' must be a non-empty list or dict of class names")
    if "nc" in data and data["nc"] != len(names):
        raise UserError(f"{file}: nc is {data['nc']} but 'names' lists {len(names)} classes")
    return [str(n) for n in names]


def _resolve_split(value, root: Path, file: Path, split: str) -> str | list[str] | None:
    if value in (None, "", []):
        return None
    items = value if isinstance(value, list) else [value]
    resolved = []
    for item in items:
        if not isinstance(item, str):
            raise UserError(f"{file}: {split} entry {item!r} must be a path")
        p = (root / item).resolve()
        if not p.exists():
            raise UserError(f"{file}: {split} {item!r} resolves to {p}, which does not exist")
        resolved.append(str(p))
    return resolved if isinstance(value, list) else resolved[0]
