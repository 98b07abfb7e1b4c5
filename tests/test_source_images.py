"""utils/data/source_images.py: matching annotations to images in folders laid out as users have them."""
from __future__ import annotations

from pathlib import Path

import pytest

from utils.data.source_images import ImageIndex, match_annotations, readable_images
from utils.errors import UserError


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_nested_folders_any_extension_case_and_stem_fallback(tmp_path):
    touch(tmp_path, "a.jpg", "b.JPEG", "day2/c.Png", "day2/d.jpg", "notes.txt")
    index = ImageIndex.scan(tmp_path)
    assert [p.name for p in index.images] == ["a.jpg", "b.JPEG", "c.Png", "d.jpg"]  # notes.txt is no image
    # XML files laid out flat although the images are nested: found by stem; "day2/d" by its exact path.
    m = match_annotations(index, {"a": "A", "b": "B", "c": "C", "day2/d": "D", "e": "E"})
    assert sorted((p.name, ann) for p, ann in m.pairs) == [("a.jpg", "A"), ("b.JPEG", "B"), ("c.Png", "C"),
                                                           ("d.jpg", "D")]
    assert m.orphans == ["e"] and m.unannotated == [] and m.clashes == []
    assert index.output_name(tmp_path / "day2" / "c.Png") == "day2__c.Png"


def test_coco_style_names_keep_their_extension(tmp_path):
    touch(tmp_path, "x.jpg", "x.png", "sub/y.jpg")
    index = ImageIndex.scan(tmp_path)
    annotations = {"x.png": 1, "train2017\\y.jpg": 2, "/abs/path/z.jpg": 3}
    m = match_annotations(index, annotations, backgrounds=False)
    assert sorted((p.name, ann) for p, ann in m.pairs) == [("x.png", 1), ("y.jpg", 2)]
    assert m.orphans == ["/abs/path/z.jpg"] and m.unannotated == [tmp_path / "x.jpg"]
    # Kept as a background, x.jpg would share x.txt with the annotated x.png: both are left out.
    m = match_annotations(index, annotations, backgrounds=True)
    assert m.pairs == [(tmp_path / "sub" / "y.jpg", 2)] and m.unannotated == []
    assert {Path(name).name for name, _ in m.clashes} == {"x.jpg", "x.png"}


def test_ambiguous_and_twice_claimed_images_are_left_out_with_reasons(tmp_path):
    touch(tmp_path, "cam1/p.jpg", "cam2/p.jpg", "cam1/q.jpg", "r.jpg")
    index = ImageIndex.scan(tmp_path)
    m = match_annotations(index, {"p": "flat p", "cam1/q": "exact q", "other/q": "stem q"})
    assert m.pairs == [(tmp_path / "cam1" / "q.jpg", "exact q")]  # the exact match wins
    reasons = dict(m.clashes)
    assert "several images fit (cam1/p.jpg, cam2/p.jpg)" in reasons["p"]
    assert "already matched by cam1/q" in reasons["other/q"]
    # The p images might be what "p" describes: neither paired nor background.
    assert m.unannotated == [tmp_path / "r.jpg"]


def test_one_folder_holding_images_and_xml(tmp_path):
    touch(tmp_path, "a.jpg", "a.xml", "b.jpg")
    index = ImageIndex.scan(tmp_path)
    m = match_annotations(index, {"a": "xml"})
    assert m.pairs == [(tmp_path / "a.jpg", "xml")] and m.unannotated == [tmp_path / "b.jpg"]


def test_missing_or_empty_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match=f"^{tmp_path / 'none'}: folder of images not found$"):
        ImageIndex.scan(tmp_path / "none")
    touch(tmp_path, "readme.md")
    with pytest.raises(UserError, match=f"^{tmp_path}: no images found"):
        ImageIndex.scan(tmp_path)


def test_unreadable_images_come_back_with_the_reason(tmp_path, bccd_dir):
    good = bccd_dir / "BCCD" / "JPEGImages" / "BloodImage_00000.jpg"
    truncated, garbage = tmp_path / "cut.jpg", tmp_path / "garbage.jpg"
    truncated.write_bytes(good.read_bytes()[:3000])
    garbage.write_bytes(b"not an image at all")
    sizes, bad = readable_images([good, truncated, garbage])
    assert sizes == {good: (640, 480)}
    assert [p for p, _ in bad] == [truncated, garbage]
    assert all(why.startswith("unreadable image") for _, why in bad)
