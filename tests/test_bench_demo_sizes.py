"""bench/bench_demo_sizes.py at two sizes and a few images: a table row per task, part and split, and each
task's record holding the lowest test mAP50 inside the shipped range, the evidence behind SHIPPED_SIZES."""
import json

import bench.bench_demo_sizes as bench_demo_sizes
from utils.demo import SHIPPED_SIZES


def test_rows_table_and_the_lowest_test_score_inside_the_shipped_range(tmp_path, monkeypatch):
    sizes = (64, SHIPPED_SIZES[0])  # one size below the range, one inside it
    monkeypatch.setattr(bench_demo_sizes, "SIZES", sizes)
    written = bench_demo_sizes.main(["--images", "3", "--results-dir", str(tmp_path)])
    rows = json.loads((tmp_path / "demo_sizes.json").read_text())
    assert [(r["task"], r["part"], r["split"]) for r in rows] == [
        ("detect", "boxes", "val"), ("detect", "boxes", "test"),
        ("segment", "boxes", "val"), ("segment", "masks", "val"),
        ("segment", "boxes", "test"), ("segment", "masks", "test")]
    for r in rows:
        for s in sizes:
            m = r["by_size"][str(s)]["map50"]
            assert 0 <= m["ci95_low"] <= m["value"] <= m["ci95_high"] <= 1
    table = (tmp_path / "demo_sizes.md").read_text()
    assert "| 64 px | 96 px |" in table and len([line for line in table.splitlines() if line.startswith("| ")]) == 7
    for path, task in zip(written, ("detect", "segment")):
        record = json.loads(path.read_text())
        assert record["name"] == f"demo_shipped_min_map50_{task}"
        tested = [r for r in rows if r["task"] == task and r["split"] == "test"]
        assert record["value"] == min(r["by_size"][str(SHIPPED_SIZES[0])]["map50"]["value"] for r in tested)
