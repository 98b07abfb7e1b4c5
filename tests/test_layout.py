"""The house rules of the layout (ARCHITECTURE.md): stage packages, thin root scripts, one-way imports."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOT_SCRIPTS = {p.stem for p in ROOT.glob("*.py")}
STAGES = ("data", "training", "evaluation", "quantization", "deployment")
# Stage -> stages it must never import: data flows data -> model -> postprocess -> metrics -> report,
# and quantization / deployment plug in after training and evaluation.
NEVER_IMPORTS = {
    "data": {"training", "evaluation", "quantization", "deployment"},
    "evaluation": {"training", "quantization", "deployment"},
    "training": {"quantization", "deployment"},
    "quantization": {"deployment"},
}
# Upstream module paths that user code and upstream checkpoints import: each must keep importing.
UPSTREAM_PATHS = {
    "utils.general": ["non_max_suppression", "scale_boxes", "xyxy2xywh", "xywh2xyxy", "increment_path", "LOGGER"],
    "utils.dataloaders": ["create_dataloader"],
    "utils.metrics": ["ap_per_class", "ConfusionMatrix"],
    "utils.loss_tal": ["ComputeLoss"],
    "utils.torch_utils": ["select_device", "de_parallel", "fuse_conv_and_bn"],
    "utils.tal.anchor_generator": ["make_anchors", "dist2bbox", "bbox2dist"],
    "models.experimental": ["attempt_load"],
    "models.yolo": ["DetectionModel", "Model", "DDetect", "DualDDetect"],
}


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module name a file imports, at any depth (function-local imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_library_code_never_imports_a_root_script():
    offenders = [f"{p.relative_to(ROOT)} imports {m}" for p in python_files("utils", "models", "tools")
                 for m in imported_modules(p) if m.split(".")[0] in ROOT_SCRIPTS]
    assert not offenders, "\n".join(offenders)


def test_stages_import_only_downstream_of_themselves():
    offenders = []
    for stage, forbidden in NEVER_IMPORTS.items():
        for p in python_files(f"utils/{stage}"):
            for m in imported_modules(p):
                parts = m.split(".")
                if parts[0] == "utils" and len(parts) > 1 and parts[1] in forbidden:
                    offenders.append(f"{p.relative_to(ROOT)} ({stage}) imports {m}")
    assert not offenders, "\n".join(offenders)


def test_every_stage_package_says_what_it_holds():
    for stage in STAGES:
        init = ROOT / "utils" / stage / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), f"{init}: needs a one-line docstring"


def test_root_scripts_only_parse_and_wire():
    """No classes, and no function longer than a parser: the logic lives where a test reaches it."""
    for script in sorted(ROOT.glob("*.py")):
        tree = ast.parse(script.read_text())
        assert not [n for n in tree.body if isinstance(n, ast.ClassDef)], f"{script.name} defines a class"
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith(("parse", "build_parser")):
                assert node.end_lineno - node.lineno < 15, f"{script.name}: {node.name}() holds logic"


@pytest.mark.parametrize("module", sorted(UPSTREAM_PATHS))
def test_upstream_module_paths_keep_working(module):
    mod = importlib.import_module(module)
    missing = [name for name in UPSTREAM_PATHS[module] if not hasattr(mod, name)]
    assert not missing, f"{module} lacks {missing}"
