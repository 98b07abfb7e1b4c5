"""patch_yolov9.sh: what it copies is self-contained on top of upstream, and it never clobbers.

The copied scripts import upstream's own models/ and utils/ in the target checkout, so the
manifest must be closed under imports, must not name an upstream module, a copied file may use an
upstream module only where ours has upstream's interface (UPSTREAM_COMPATIBLE), and every name it
takes from one must exist there. Upstream facts come from two committed lists
(tests/data/upstream_modules.txt, tests/data/upstream_names.txt) read from the upstream commit
named in their headers, so these tests need no upstream checkout.
"""
from __future__ import annotations

import ast
import filecmp
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "patch_yolov9.sh"
DATA = Path(__file__).resolve().parent / "data"
# Imports that name neither the project nor an installable requirement: optional, or the stdlib.
# (triton comes with CUDA builds of torch; models/fused_ops.py runs without it)
OPTIONAL_PACKAGES = {"tensorrt", "pycuda", "cuda", "faster_coco_eval", "triton"}
# The upstream modules (and names, None = any name upstream defines) whose interface ours copies
# exactly, so a copied file may use upstream's version of them. Everything else at an upstream path
# (val.run, utils/dataloaders.py, utils/loss_tal.py, utils/metrics.py, models/experimental.py ...)
# behaves differently there, so copied files must import our non-colliding module instead.
UPSTREAM_COMPATIBLE: dict[str, set[str] | None] = {
    "models/common.py": None,  # the layer classes: upstream names, constructor arguments and attributes
    "models/yolo.py": {"BaseModel", "DetectionModel", "Model", "Detect", "DDetect", "DualDetect", "DualDDetect"},
    "utils/torch_utils.py": {"de_parallel", "select_device", "fuse_conv_and_bn", "initialize_weights"},
    "utils/tal/anchor_generator.py": {"make_anchors", "dist2bbox", "bbox2dist"},
}
# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"cv2": "opencv-python", "yaml": "PyYAML", "PIL": "Pillow", "modelopt": "nvidia-modelopt"}
# Distributions upstream's requirements.txt installs (its uncommented lines), so the hint need not name them.
UPSTREAM_REQUIREMENTS = {
    "gitpython", "ipython", "matplotlib", "numpy", "opencv-python", "pillow", "psutil", "pyyaml", "requests",
    "scipy", "thop", "torch", "torchvision", "tqdm", "tensorboard", "pandas", "seaborn", "albumentations",
    "pycocotools",
}


def read_list(path: Path) -> list[str]:
    """Non-blank lines of a list file, with '#' comments removed (as patch_yolov9.sh reads them)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


MANIFEST = read_list(ROOT / "patch_manifest.txt")
# Project modules a copied file loads only on demand, and that stay behind on purpose: the demo
# trains with this repo's own trainer, so `qat.py demo` is offered only where utils/demo.py exists.
NOT_COPIED = {"utils/demo.py"}
UPSTREAM_MODULES = set(read_list(DATA / "upstream_modules.txt"))
UPSTREAM_NAMES = {
    module: set(names.split()) for module, names in (line.split(":", 1) for line in read_list(DATA / "upstream_names.txt"))
}


def module_paths(dotted: str) -> list[str]:
    """The two file paths a dotted module name can live at."""
    base = dotted.replace(".", "/")
    return [f"{base}.py", f"{base}/__init__.py"]


def is_module(dotted: str) -> str | None:
    """The path of a project or upstream module with this dotted name, else None."""
    for path in module_paths(dotted):
        if path in UPSTREAM_MODULES or (ROOT / path).is_file():
            return path
    return None


def project_roots() -> set[str]:
    """Top-level import names that mean 'this project or upstream', not an installed package."""
    ours = {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}
    upstream = {path.split("/")[0].removesuffix(".py") for path in UPSTREAM_MODULES}
    return ours | upstream


def imported_names(tree: ast.Module, package: str) -> tuple[dict[str, set[str]], set[str]]:
    """Project modules a file uses with the names it takes from each, and its third-party imports.

    `import m as a` and `from package import m as a` count every `a.name` in the file as a name taken from m.
    """
    roots = project_roots()
    uses: dict[str, set[str]] = {}
    third_party: set[str] = set()
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top not in roots:
                    third_party.add(top)
                    continue
                uses.setdefault(alias.name, set())
                aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                dotted = ".".join(base + ([node.module] if node.module else []))
            else:
                dotted = node.module
            if dotted.split(".")[0] not in roots:
                third_party.add(dotted.split(".")[0])
                continue
            for alias in node.names:
                submodule = f"{dotted}.{alias.name}"
                if is_module(submodule):
                    uses.setdefault(submodule, set())
                    aliases[alias.asname or alias.name] = submodule
                else:
                    uses.setdefault(dotted, set()).add(alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            dotted = ast.unparse(node.value)
            if dotted in aliases:
                uses[aliases[dotted]].add(node.attr)
    return uses, third_party - set(sys.stdlib_module_names) - {"__future__"}


def copied_python_files() -> list[str]:
    return [path for path in MANIFEST if path.endswith(".py")]


def analyse() -> tuple[list[str], set[str]]:
    """Every closure / name problem of the manifest, and the third-party packages it imports."""
    problems: list[str] = []
    packages: set[str] = set()
    for path in (p for p in MANIFEST if p.endswith(".sh")):
        for script in sorted(set(re.findall(r"[\w./-]+\.py\b", (ROOT / path).read_text()))):
            if script not in MANIFEST and script not in UPSTREAM_MODULES:
                problems.append(f"{path}: runs {script}, which patch_manifest.txt does not copy")
    for path in copied_python_files():
        package = ".".join(Path(path).parent.parts)
        uses, third_party = imported_names(ast.parse((ROOT / path).read_text(), path), package)
        packages |= third_party
        for dotted, names in sorted(uses.items()):
            target = is_module(dotted)
            if target is None:
                problems.append(f"{path}: imports {dotted}, which is neither ours nor upstream's")
            elif target in MANIFEST or target in NOT_COPIED:
                continue
            elif target not in UPSTREAM_MODULES:
                problems.append(f"{path}: imports {dotted} ({target}), which patch_manifest.txt does not copy")
            elif target not in UPSTREAM_COMPATIBLE:
                problems.append(f"{path}: imports {dotted}, which is upstream's own {target} in a patched checkout "
                                "and differs from ours; import our implementation from a module upstream lacks")
            else:
                names = {n for n in names if not n.startswith("__")}
                for name in sorted(names - UPSTREAM_NAMES[target]):
                    problems.append(f"{path}: uses {dotted}.{name}, which upstream's {target} does not define")
                allowed = UPSTREAM_COMPATIBLE[target]
                for name in sorted(names & UPSTREAM_NAMES[target] - (allowed if allowed is not None else names)):
                    problems.append(f"{path}: uses {dotted}.{name}, whose upstream version differs from ours")
    return problems, packages


def test_manifest_lists_existing_files_and_no_upstream_module():
    assert MANIFEST, "patch_manifest.txt is empty"
    assert len(MANIFEST) == len(set(MANIFEST)), "patch_manifest.txt lists a file twice"
    missing = [path for path in MANIFEST if not (ROOT / path).is_file()]
    assert not missing, f"patch_manifest.txt lists files the project lacks: {missing}"
    clobbered = sorted(set(MANIFEST) & UPSTREAM_MODULES)
    assert not clobbered, f"patch_manifest.txt would overwrite upstream modules: {clobbered}"


def test_manifest_is_closed_under_imports_against_upstream():
    problems, _ = analyse()
    assert not problems, "\n".join(problems)


def test_hint_names_every_package_upstream_lacks():
    _, packages = analyse()
    needed = {DISTRIBUTIONS.get(name, name).lower() for name in packages - OPTIONAL_PACKAGES}
    hinted = set(re.search(r"qat_packages=\(([^)]*)\)", SCRIPT.read_text()).group(1).lower().split())
    assert needed - UPSTREAM_REQUIREMENTS <= hinted, f"add to qat_packages: {sorted(needed - UPSTREAM_REQUIREMENTS - hinted)}"


def test_analysis_catches_a_name_upstream_lacks():
    source = ("from utils.metrics import ap_per_class, DetectionStats\nimport val\nval.evaluate()\n"
              "from models import yolo\nyolo.MODULES\nyolo.DetectionModel\n")
    uses, _ = imported_names(ast.parse(source), "")
    assert uses["utils.metrics"] - UPSTREAM_NAMES["utils/metrics.py"] == {"DetectionStats"}
    assert uses["val"] - UPSTREAM_NAMES["val.py"] == {"evaluate"}
    assert uses["models.yolo"] - UPSTREAM_NAMES["models/yolo.py"] == {"MODULES"}


# --- behaviour of the script on a fake upstream checkout ---------------------------------------


def run_patch(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    """The marker files that make a directory look like a WongKinYiu/yolov9 checkout."""
    root = tmp_path / "yolov9"
    (root / "models" / "detect").mkdir(parents=True)
    (root / "utils").mkdir()
    (root / "models" / "yolo.py").write_text("class DualDDetect:\n    pass\n")
    (root / "models" / "detect" / "yolov9-c.yaml").write_text("nc: 80\n")
    (root / "train_dual.py").write_text("")
    (root / "utils" / "metrics.py").write_text("def ap_per_class():\n    pass\n")
    return root


def test_dry_run_lists_every_file_and_writes_nothing(upstream):
    before = snapshot(upstream)
    result = run_patch(upstream, "--dry-run")
    assert result.returncode == 0, result.stderr
    for path in MANIFEST:
        assert f"would copy {path}" in result.stdout
    assert "nothing written" in result.stdout
    assert snapshot(upstream) == before


def test_copy_is_complete_and_leaves_upstream_files_alone(upstream):
    before = snapshot(upstream)
    result = run_patch(upstream)
    assert result.returncode == 0, result.stderr
    for path in MANIFEST:
        assert filecmp.cmp(ROOT / path, upstream / path, shallow=False), path
        assert os.access(upstream / path, os.X_OK) == os.access(ROOT / path, os.X_OK), path
    after = snapshot(upstream)
    assert {k: after[k] for k in before} == before
    assert set(after) == set(before) | set(MANIFEST), "copied something not in the manifest"
    assert f"{len(MANIFEST)} copied, 0 overwritten, 0 unchanged" in result.stdout
    assert re.search(r'^hint: .*pip install .*"nvidia-modelopt==[0-9.]+"', result.stdout, re.M)


def test_second_run_changes_nothing(upstream):
    assert run_patch(upstream).returncode == 0
    before = snapshot(upstream)
    result = run_patch(upstream)
    assert result.returncode == 0, result.stderr
    assert f"0 copied, 0 overwritten, {len(MANIFEST)} unchanged" in result.stdout
    assert snapshot(upstream) == before


def test_modified_file_refused_without_force_then_overwritten_with_it(upstream):
    edited = upstream / MANIFEST[0]
    edited.parent.mkdir(parents=True, exist_ok=True)
    edited.write_text("# a local edit\n")
    before = snapshot(upstream)

    refused = run_patch(upstream)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"error: {edited} exists and differs from the QAT layer's copy; rerun with --force to overwrite it"
    ]
    assert snapshot(upstream) == before, "a refused run must write nothing"

    dry = run_patch(upstream, "--force", "--dry-run")
    assert dry.returncode == 0 and f"would overwrite {MANIFEST[0]}" in dry.stdout
    assert snapshot(upstream) == before

    forced = run_patch(upstream, "--force")
    assert forced.returncode == 0, forced.stderr
    assert f"overwrite     {MANIFEST[0]}" in forced.stdout
    assert filecmp.cmp(ROOT / MANIFEST[0], edited, shallow=False)


@pytest.mark.parametrize(
    "make_target, message",
    [
        (lambda tmp: tmp / "absent", "no such directory"),
        (lambda tmp: tmp, "not an upstream WongKinYiu/yolov9 checkout (no models/yolo.py)"),
        (lambda tmp: ROOT, "this is the yolov9-qat project itself"),
    ],
    ids=["missing-dir", "empty-dir", "this-project"],
)
def test_bad_target_refused_with_one_line(tmp_path, make_target, message):
    target = make_target(tmp_path)
    before = snapshot(tmp_path)
    result = run_patch(target)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
    assert snapshot(tmp_path) == before


def test_checkout_without_dual_head_refused(upstream):
    (upstream / "models" / "yolo.py").write_text("class Detect:\n    pass\n")
    result = run_patch(upstream)
    assert result.returncode == 2
    assert "defines no DualDDetect" in result.stderr


@pytest.mark.parametrize("args", [[], ["--frobnicate"]], ids=["no-args", "unknown-option"])
def test_bad_arguments_exit_2(upstream, args):
    result = run_patch(*args, upstream) if args else run_patch()
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "usage: patch_yolov9.sh" in result.stderr


def test_script_is_bash_and_executable():
    assert os.access(SCRIPT, os.X_OK)
    assert shutil.which("bash")
    assert SCRIPT.read_text().startswith("#!/usr/bin/env bash\n")
