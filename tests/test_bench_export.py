"""bench/bench_export.py: a QAT trace without the quantizers' arithmetic gives the ONNX the traced
arithmetic gave, byte for byte, and the record says so: a one-class segmentation model (its head holds
the detection head's quantizers and the mask branch's) on a non-square input with a dynamic batch."""
import json

import pytest

from bench.bench_export import main
from utils.errors import UserError
from utils.paths import ROOT


def test_both_ways_give_the_same_graph_and_a_record(tmp_path):
    record = main(["--cfg", str(ROOT / "tests" / "assets" / "gelan-tiny-seg"), "--nc", "1", "--imgsz", "64", "96",
                   "--dynamic", "--repeats", "1", "--threads", "1", "--results-dir", str(tmp_path)])
    data = json.loads(record.read_text())
    assert record.name == "qat_trace_time_ratio_gelan-tiny-seg.json" and data["value"] > 0
    assert data["extra"]["same_graph_bytes"] is True
    assert [len(s) for s in data["extra"]["seconds"].values()] == [1, 1]
    assert data["dataset"] == "random init, 1 classes, 64x96"


def test_bad_flags_are_user_errors():
    with pytest.raises(UserError, match="--repeats 0"):
        main(["--repeats", "0"])
    with pytest.raises(UserError, match="--imgsz 64 96 128"):
        main(["--imgsz", "64", "96", "128"])
