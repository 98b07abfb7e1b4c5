"""bench/bench_ort.py threads at a toy size: both sessions run, the record says what was compared."""
from __future__ import annotations

import json

import torch

from bench import bench_ort


def test_threads_mode_compares_our_sessions_with_ort_default_pool(tmp_path):
    threads = torch.get_num_threads()
    path = bench_ort.main(["threads", "--runs", "3", "--blocks", "1", "--busy-cores", "0", "--torch-threads",
                           str(threads), "--out", str(tmp_path / "onnx"), "--results-dir", str(tmp_path)])
    record = json.loads(path.read_text())
    extra = record["extra"]
    assert record["name"] == "ort_threads_cpu_ratio" and record["value"] > 0
    assert extra["intra_op_threads"]["ours"] == threads and extra["runs"] == 6
    assert set(extra["cpu_seconds"]) == {"ours", "ort_default"} and all(v > 0 for v in extra["wall_seconds"].values())
