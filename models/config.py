"""Model YAMLs: where the bundled ones live, finding one by name or path, and reading it. Free of
torch, so train.py can refuse a mistyped --cfg before torch loads (seconds on a small CPU)."""
from __future__ import annotations

from pathlib import Path

import yaml

from utils.errors import UserError, yaml_problem
from utils.paths import ROOT

CONFIG_DIR = ROOT / "models" / "detect"
SEGMENT_CONFIG_DIR = ROOT / "models" / "segment"


def resolve_config(cfg: str | Path) -> Path:
    """A YAML path as given, or a bundled config by name ('gelan-c', 'gelan-c-seg.yaml')."""
    path = Path(cfg)
    if path.is_file():
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    for folder in (CONFIG_DIR, SEGMENT_CONFIG_DIR):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{cfg}: model config not found (neither a file nor one of {CONFIG_DIR}, {SEGMENT_CONFIG_DIR})")


def load_config(path: Path) -> dict:
    """Read a model YAML; a file that is not one is a user error naming it."""
    try:
        with open(path, encoding="ascii", errors="ignore") as f:
            d = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    missing = [k for k in ("nc", "backbone", "head") if not isinstance(d, dict) or k not in d]
    if missing:
        raise UserError(f"{path}: not a model config (missing {', '.join(missing)})")
    return d
