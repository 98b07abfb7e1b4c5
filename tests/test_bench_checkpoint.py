"""bench_checkpoint.py times both ways on real files and leaves none behind."""
import json
from pathlib import Path

from bench.bench_checkpoint import main

TINY = str(Path(__file__).resolve().parent / "assets" / "gelan-tiny.yaml")


def test_both_ways_are_timed_and_the_folder_is_removed(tmp_path):
    record = main(["--cfg", TINY, "--repeats", "2", "--dir", str(tmp_path / "w"),
                   "--results-dir", str(tmp_path / "r")])
    extra = json.loads(record.read_text())["extra"]
    assert [len(s) for s in extra["seconds"].values()] == [2, 2] and extra["file_bytes"] > 0
    assert not (tmp_path / "w").exists()
