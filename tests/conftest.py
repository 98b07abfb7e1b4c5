"""Shared test fixtures: where the real datasets live, skips for missing hardware, the full-width
quantized models that more than one test file exports, and two settings that keep the suite fast on
a small shared CPU (one PyTorch thread; the ONNX exporter's own IR self-check skipped)."""
from __future__ import annotations

import os
from pathlib import Path

# One PyTorch (OpenMP) thread in the test process and every subprocess it starts, set before torch
# loads: the tests' models are tiny, and on a 2-core machine shared with other jobs a second thread
# spin-waits on every small op (a gelan-tiny training step measured 0.04 s on one thread against
# 0.25-0.32 s on two, under load). OMP_NUM_THREADS=2 pytest still runs the suite on two.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without an NVIDIA driver Triton's kernels (models/fused_kernels.py) can only run in its interpreter,
# which must be chosen before anything imports Triton (torch and Model Optimizer may): tests/test_fused_ops.py
# runs them there on CPU tensors.
if not Path("/proc/driver/nvidia").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"


# Session fixtures that take tens of seconds to build and serve tests in more than one file.
SHARED_SESSION_FIXTURES = ("conformance_model",)


def _shared_fixture_group(item) -> str | None:
    """The one worker group of a test that shares an expensive fixture: a fixture of
    ``SHARED_SESSION_FIXTURES`` names its group, a module-scoped fixture its module's. Without
    groups pytest-xdist hands consecutive runs of tests to either worker, and both built the fixture:
    tests/test_export_segment.py's seg_exports took 26-27 s on each."""
    for name in SHARED_SESSION_FIXTURES:
        if name in item.fixturenames:
            return name
    defs = item._fixtureinfo.name2fixturedefs.values()
    if any(chain and chain[-1].scope == "module" for chain in defs):
        return item.path.stem
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook turns the marks into its work units
def pytest_collection_modifyitems(config, items):
    # torch and the backends module are imported here and in the fixtures, not at the top: with
    # -n 2 the controlling process loads this file too, and does so before it starts the workers
    # (it never collects or runs a test), so a top-level import delayed every worker by ~3.5 s
    import torch

    from utils.deployment.backends import have_tensorrt

    for item in items:
        group = _shared_fixture_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    no_trt = pytest.mark.skip(reason="needs TensorRT (pip install tensorrt from NVIDIA's index); not installed here")
    have_trt = have_tensorrt()
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "tensorrt" in item.keywords and not have_trt:
            item.add_marker(no_trt)


def pytest_collection_finish(session):
    """Python's cyclic garbage collector walks every live object on each full pass; after collection a
    worker holds ~440,000 (torch, Model Optimizer, ONNX, the test modules) that never become garbage.
    Frozen, they are left out of every pass, and a larger first threshold makes passes rarer: in
    test_qat, test_export and test_conformance run together the collector's time fell from 9.4 s to 3.1 s."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


@pytest.fixture(autouse=True)
def _thread_count_kept():
    """A test that sets PyTorch's thread count (a tool's --threads, a bench job) sets it for the
    process: put it back, so no later test runs on another count than the one chosen above."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def torchscript_graph_lint():
    """PyTorch's TorchScript ONNX exporter lints its own IR ten times per export (``_jit_pass_lint``,
    a self-check that asserts and changes nothing): a third of every QAT trace here, 0.2-0.6 s a
    call. The tests skip it and check every export themselves (onnx.checker, the Q/DQ lint, ONNX
    Runtime against PyTorch); yields the real pass, which
    tests/test_export.py::test_torch_ir_lint_passes_and_skipping_it_changes_no_export runs on a QAT
    export, showing the bytes are the same either way."""
    import torch

    real = torch._C._jit_pass_lint
    torch._C._jit_pass_lint = lambda graph: None
    yield real
    torch._C._jit_pass_lint = real


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not DATASETS.is_dir():
        pytest.fail(f"{DATASETS}: the shared datasets must sit beside the project (see README)")
    return DATASETS


@pytest.fixture(scope="session")
def coco128_dir(datasets_dir) -> Path:
    return datasets_dir / "coco128"


@pytest.fixture(scope="session")
def bccd_dir(datasets_dir) -> Path:
    return datasets_dir / "bccd"


@pytest.fixture(scope="session")
def conformance_model():
    """``get(cfg, nc, batch_mode, shape)``: bench/conformance.py's full-width quantized model and its
    trace, each built once per session on first use. Quantizing and tracing a full-width QAT model
    takes a minute on 2 CPU cores; tests/test_conformance.py and tests/test_export.py share them."""
    from bench import conformance as cf

    models, traces = {}, {}

    def get(cfg: str, nc: int, batch_mode: str, shape: str):
        if (cfg, nc) not in models:
            models[cfg, nc] = cf.quantized_model(cfg, nc)
        key = (cfg, nc, batch_mode, shape)
        if key not in traces:
            traces[key] = cf.trace(models[cfg, nc], batch_mode, shape)
        return models[cfg, nc], traces[key]

    return get
