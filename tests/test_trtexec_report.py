"""trtexec log parsing and the shared benchmark report.

The logs in tests/data are written by hand from the documented TensorRT 10 trtexec output
format (timings are illustrative, not measured); TensorRT cannot be installed here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from utils.deployment.benchmark_report import summarize, to_markdown, write_report
from utils.deployment.trtexec_log import parse_latency_stats, parse_trtexec_file, parse_trtexec_log
from utils.errors import UserError
from utils.paths import ROOT

DATA = Path(__file__).parent / "data"


def test_sweep_log_with_inference_shape():
    row = parse_trtexec_file(DATA / "trtexec_sweep_bs8.log")
    assert row.batch == 8
    assert row.qps == pytest.approx(453.392)
    assert (row.latency_mean_ms, row.latency_median_ms, row.latency_p99_ms) == pytest.approx((2.20463, 2.20410, 2.21777))
    assert row.images_per_s == pytest.approx(8 * 453.392)


def test_build_log_falls_back_to_opt_shape_and_reads_latency_not_gpu_time():
    row = parse_trtexec_file(DATA / "trtexec_build_opt4.log")
    assert row.batch == 4
    assert row.latency_mean_ms == pytest.approx(2.65112)  # 'Latency' includes H2D/D2H here
    assert parse_trtexec_file(DATA / "trtexec_build_opt4.log", batch=2).batch == 2


def test_failed_run_is_a_user_error_naming_the_file():
    with pytest.raises(UserError, match="trtexec_failed.log.*Performance summary"):
        parse_trtexec_file(DATA / "trtexec_failed.log")
    with pytest.raises(UserError, match="no input shape"):
        parse_trtexec_log("=== Performance summary ===\nThroughput: 1 qps\nLatency: mean = 1 ms, median = 1 ms, "
                          "percentile(99%) = 2 ms\n")


def test_latency_stats_keys():
    stats = parse_latency_stats("min = 1 ms, max = 5 ms, mean = 2.5 ms, median = 2 ms, percentile(90%) = 4 ms, "
                                "percentile(99%) = 4.9 ms")
    assert stats == {"min": 1.0, "max": 5.0, "mean": 2.5, "median": 2.0, "p90": 4.0, "p99": 4.9}


def test_summarize_and_report(tmp_path):
    row = summarize(4, [10.0] * 98 + [20.0, 30.0])
    assert row.latency_median_ms == 10.0 and row.latency_p99_ms > 19.0
    assert row.qps == pytest.approx(1000 / row.latency_mean_ms) and row.images_per_s == pytest.approx(4 * row.qps)
    paths = write_report([row, summarize(1, [5.0, 5.0])], tmp_path, "b", "t")
    data = json.loads(paths["json"].read_text())
    assert [r["batch"] for r in data["rows"]] == [1, 4] and data["rows"][0]["images_per_s"] == pytest.approx(200.0)
    assert paths["plot"].stat().st_size > 1000 and paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert "| 4 |" in to_markdown([row])


def test_cli_over_a_sweep(tmp_path):
    logs = [DATA / "trtexec_sweep_bs8.log", DATA / "trtexec_build_opt4.log"]
    cli = [sys.executable, str(ROOT / "tools" / "trtexec_report.py"), *map(str, logs), "--out", str(tmp_path)]
    run = subprocess.run(cli, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.index("| 4 |") < run.stdout.index("| 8 |")
    rows = json.loads((tmp_path / "trtexec_benchmark.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [4, 8]
    bad = subprocess.run(cli[:2] + [str(DATA / "trtexec_failed.log"), "--out", str(tmp_path)], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "error:" in bad.stderr


def _stub_trtexec(tmp_path: Path) -> Path:
    """A fake trtexec that records its arguments and replays the recorded log at the asked batch."""
    stub = tmp_path / "trtexec"
    stub.write_text(f"""#!/usr/bin/env bash
echo "$@" >> {tmp_path}/calls.txt
shapes=$(printf '%s\\n' "$@" | sed -n 's/^--shapes=images:\\([0-9]*\\)x.*/\\1/p')
[ -n "$shapes" ] || exit 0
sed "s/8x3x640x640/${{shapes}}x3x640x640/g" {DATA / 'trtexec_sweep_bs8.log'}
""")
    stub.chmod(0o755)
    return stub


@pytest.mark.parametrize("one_engine", [False, True])
def test_benchmark_script_sweeps_batches_with_the_timing_flags(tmp_path, one_engine):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"stub")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "TRTEXEC": str(_stub_trtexec(tmp_path))}
    cmd = ["bash", str(ROOT / "scripts" / "benchmark_trt.sh"), str(onnx_file), "--batch-sizes", "1,4,16",
           "--out", str(tmp_path / "out")] + (["--one-engine"] if one_engine else [])
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr + run.stdout
    rows = json.loads((tmp_path / "out" / "trtexec_benchmark.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 4, 16]
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    timed = [c for c in calls if "--shapes=" in c]
    assert len(timed) == 3 and all("--useCudaGraph --noDataTransfers --useSpinWait" in c for c in timed)
    assert all("--int8" in c for c in calls if "--onnx=" in c)
    assert len([c for c in calls if "--onnx=" in c]) == (1 if one_engine else 3)


def test_generate_engine_script_profile(tmp_path):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"stub")
    env = {"PATH": "/usr/bin:/bin", "TRTEXEC": str(_stub_trtexec(tmp_path))}
    cmd = ["bash", str(ROOT / "scripts" / "generate_trt_engine.sh"), str(onnx_file), "--imgsz", "320",
           "--opt-batch", "4", "--max-batch", "16", "--fp16-only"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    call = (tmp_path / "calls.txt").read_text()
    assert "--minShapes=images:1x3x320x320 --optShapes=images:4x3x320x320 --maxShapes=images:16x3x320x320" in call
    assert "--fp16" in call and "--int8" not in call and "--timingCacheFile=" in call
    bad = subprocess.run(cmd[:3] + ["--opt-batch", "64"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "min-batch" in bad.stderr
