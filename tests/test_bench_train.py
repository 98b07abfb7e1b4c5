"""bench_train.py's ddp mode may take its one-GPU run from a record: only one of the same settings."""
import pytest

from bench.bench_train import one_gpu_result, parse_args, settings
from bench.record import machine_name, write_record
from utils.errors import UserError

ONE_GPU = {"images_per_s": 250.0, "images": 1600, "seconds": 6.4, "fixed_batch_images_per_s": 300.0,
           "processes": 1, "accumulate": 2, "memory_gb": 20.0}


def _ddp_args(record, *more):
    return parse_args(["ddp", "--cfg", "gelan-c.yaml", "--imgsz", "640", "--batch-size", "32", "--workers", "14",
                       "--cache", "--one-gpu-record", str(record), *more])


def test_one_gpu_figures_come_from_a_record_of_the_same_settings(tmp_path):
    measured = parse_args(["throughput", "--cfg", "gelan-c.yaml", "--imgsz", "640", "--batch-size", "32",
                           "--workers", "14", "--cache"])
    record = write_record("train_throughput_gelan-c", 250.0, "images/s", "gelan-c", "bccd",
                          extra={**ONE_GPU, **settings(measured)}, results_dir=tmp_path)
    assert one_gpu_result(_ddp_args(record)) == {**ONE_GPU, "from_record": str(record), "machine": machine_name()}
    with pytest.raises(UserError, match="other settings.*'workers': \\(14, 7\\)"):
        one_gpu_result(_ddp_args(record, "--workers", "7"))
    with pytest.raises(UserError, match="not a one-GPU throughput record of gelan-s"):
        one_gpu_result(_ddp_args(record, "--cfg", "gelan-s.yaml"))
