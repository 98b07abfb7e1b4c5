"""Data yaml loading: upstream's path convention, split forms, names, and one-line errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from utils.data.config import load_data_config, load_hyp, require_split
from utils.errors import UserError
from utils.paths import ROOT


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_shipped_coco128_yaml_resolves_relative_path_from_project_root(coco128_dir):
    data = load_data_config(ROOT / "data" / "coco128.yaml")
    assert Path(data["path"]) == coco128_dir.resolve()
    assert data["train"] == str(coco128_dir.resolve() / "images" / "train2017")
    assert data["test"] is None
    assert data["nc"] == 80 and len(data["names"]) == 80
    assert data["names"][0] == "person" and data["names"][79] == "toothbrush"


def test_relative_path_is_from_project_root_not_yaml_folder(tmp_path, coco128_dir):
    # The yaml sits in tmp_path, but '../shared/...' must still be read from the project root.
    f = write(tmp_path / "d.yaml", "path: ../shared/datasets/coco128\ntrain: images/train2017\n"
                                   "val: images/val2017\nnames: [a, b]\n")
    assert load_data_config(f)["path"] == str(coco128_dir.resolve())


def test_list_files_lists_of_sources_and_names_dict(tmp_path, coco128_dir):
    (tmp_path / "train.txt").write_text("images/a.jpg\n")
    (tmp_path / "extra.txt").write_text("images/b.jpg\n")
    f = write(tmp_path / "d.yaml", f"path: {tmp_path}\ntrain: [train.txt, extra.txt]\nval: train.txt\n"
                                   "names: {0: cat, 1: dog}\nnc: 2\ncoco_ids: [17, 18]\n")
    data = load_data_config(f)
    assert data["train"] == [str(tmp_path / "train.txt"), str(tmp_path / "extra.txt")]
    assert data["val"] == str(tmp_path / "train.txt")
    assert data["names"] == ["cat", "dog"] and data["nc"] == 2
    assert data["coco_ids"] == [17, 18]  # unknown keys pass through
    assert require_split(data, "val") == data["val"]
    with pytest.raises(UserError, match="no 'test' split"):
        require_split(data, "test")


@pytest.mark.parametrize("text, message", [
    (None, "data yaml not found"),
    ("path: [unclosed\n", "not valid YAML"),
    ("- just\n- a list\n", "must be a mapping"),
    ("path: {tmp}\ntrain: .\nval: .\n", "no 'names'"),
    ("path: {tmp}\ntrain: .\nval: .\nnames: []\n", "non-empty"),
    ("path: {tmp}\ntrain: .\nval: .\nnames: {{0: a, 2: b}}\n", "class indices 0..1"),
    ("path: {tmp}\ntrain: .\nval: .\nnames: [a]\nnc: 3\n", "nc is 3"),
    ("path: {tmp}/nowhere\ntrain: .\nval: .\nnames: [a]\n", "not a folder"),
    ("path: {tmp}\ntrain: images/missing\nval: .\nnames: [a]\n", "train 'images/missing' resolves to"),
    ("path: {tmp}\ntrain: .\nval: [., missing.txt]\nnames: [a]\n", "val 'missing.txt'"),
    ("path: {tmp}\ntest: .\nnames: [a]\n", "neither a 'train' nor a 'val'"),
])
def test_bad_data_yaml_is_one_user_error_naming_the_file(tmp_path, text, message):
    f = tmp_path / "d.yaml"
    if text is not None:
        f.write_text(text.format(tmp=tmp_path))
    with pytest.raises(UserError, match=message) as exc:
        load_data_config(f)
    assert str(f) in str(exc.value) and "\n" not in str(exc.value)


def test_hyp_files_have_every_augmentation_key():
    high = load_hyp(ROOT / "data" / "hyps" / "hyp.scratch-high.yaml")
    qat = load_hyp(ROOT / "data" / "hyps" / "hyp.qat.yaml")
    assert (high["lr0"], high["mosaic"], high["scale"], high["mixup"]) == (0.01, 1.0, 0.9, 0.15)
    assert qat["mosaic"] == 0 and qat["mixup"] == 0 and qat["lr0"] < high["lr0"]
    assert set(high) == set(qat)


def test_hyp_missing_keys_is_user_error(tmp_path):
    with pytest.raises(UserError, match="lacks .*mosaic"):
        load_hyp(write(tmp_path / "h.yaml", "lr0: 0.01\n"))


def test_cli_reports_data_yaml_pointing_nowhere_with_exit_2(tmp_path):
    f = write(tmp_path / "d.yaml", f"path: {tmp_path}/gone\ntrain: images\nval: images\nnames: [a]\n")
    code = ("from utils.errors import run_cli; from utils.data.config import load_data_config; "
            f"run_cli(lambda: load_data_config({str(f)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
