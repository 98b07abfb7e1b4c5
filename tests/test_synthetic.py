"""The demo dataset must be deterministic and its labels must match what was drawn."""
import cv2
import numpy as np
import yaml

from utils.data.synthetic import CLASS_NAMES, make_shapes_dataset


def test_same_seed_same_dataset(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", n_train=3, n_val=1, imgsz=96, seed=7)
    b = make_shapes_dataset(tmp_path / "b", n_train=3, n_val=1, imgsz=96, seed=7)
    for rel in ("images/train/train_00002.png", "labels/train/train_00002.txt"):
        assert (a.parent / rel).read_bytes() == (b.parent / rel).read_bytes()


def test_labels_cover_drawn_pixels(tmp_path):
    data = yaml.safe_load(make_shapes_dataset(tmp_path, n_train=5, n_val=2, imgsz=128, seed=1).read_text())
    assert data["names"] == list(CLASS_NAMES) and data["nc"] == 3
    for lbl in sorted((tmp_path / "labels" / "train").glob("*.txt")):
        rows = np.loadtxt(lbl, ndmin=2)
        assert len(rows) >= 1
        assert ((rows[:, 1:] > 0) & (rows[:, 1:] <= 1)).all()
        img = cv2.imread(str(tmp_path / "images" / "train" / (lbl.stem + ".png")))
        assert img.shape == (128, 128, 3)


def test_a_test_split_of_its_own_leaves_train_and_val_as_they_were(tmp_path):
    """n_test draws images after train and val, so a study's test split changes none of the others."""
    plain = make_shapes_dataset(tmp_path / "plain", n_train=2, n_val=1, imgsz=64, seed=5, masks=True)
    split = make_shapes_dataset(tmp_path / "split", n_train=2, n_val=1, imgsz=64, seed=5, masks=True, n_test=2)
    assert yaml.safe_load(plain.read_text())["test"] == "images/val"
    assert yaml.safe_load(split.read_text())["test"] == "images/test"
    assert sorted(p.name for p in (split.parent / "labels" / "test").iterdir()) == ["test_00000.txt",
                                                                                   "test_00001.txt"]
    for rel in ("images/train/train_00001.png", "labels/val/val_00000.txt"):
        assert (plain.parent / rel).read_bytes() == (split.parent / rel).read_bytes()
