"""The TensorRT code CI cannot run uses only TensorRT 10 Python API that exists, called with arguments
that fit: checked against the tensorrt-stubs releases pinned in tests/data/tensorrt_stubs_versions.txt
(installed by scripts/install_trt_stubs.sh; missing stubs fail here, they never skip)."""
from __future__ import annotations

import pytest

from tests import trt_api_check
from tests.trt_api_check import check_source, load_stubs, pinned_versions, tensorrt_callers
from utils.paths import ROOT

# Each line marked "# wrong" must be reported, and no other; "# wrong before 10.13" only by older stubs.
MISUSES = '''
import tensorrt as trt
from tensorrt import TensorIOMode

logger = trt.Logger(trt.Logger.WARN)  # wrong: the member is WARNING
builder = trt.Builder(logger)
network = builder.create_network(flags=0)
config = builder.create_builder_config()
config.max_workspace_size = 1 << 30  # wrong: removed in TensorRT 10
config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
config.builder_optimization_level = 3
config.set_flag(trt.BuilderFlag.INT8, True)  # wrong: one argument
engine = builder.build_engine(network, config)  # wrong: removed in TensorRT 10
parser = trt.OnnxParser(network)  # wrong: the logger is required
parsed = trt.OnnxParser(network, logger).parse_from_file("model.onnx")
inputs = network.num_inputs()  # wrong: a property
first = network.get_input  # wrong: a method used as a value
message = parser.get_error(0).desc()  # wrong: the stubs leave get_error's type open, so nothing is checked
trt.init_libnvinfer_plugins(logger, "")
config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
config.set_timing_cache(config.create_timing_cache(b""), ignore=False)  # wrong: no such keyword
orphan = trt.ICudaEngine()  # wrong: engines come from a Runtime


class Runner:
    def __init__(self, engine: trt.ICudaEngine):
        self.engine = engine
        self.context = engine.create_execution_context()
        self.is_input = engine.get_tensor_mode("images") == TensorIOMode.INPUT
        self.configured = engine.create_execution_context(runtime_config=None)  # wrong before 10.13

    def run(self, stream: int) -> None:
        self.context.execute_async_v2([], stream)  # wrong: removed in TensorRT 10
        self.context.set_input_shape("images")  # wrong: the shape is required
        self.context.set_tensor_address(name="images", ptr=0)  # wrong: the keyword is memory
        self.context.execute_async_v3(stream_handle=stream)
        largest = self.engine.get_tensor_profile_shape("images", 0)[2][0]
        for shape in self.engine.get_tensor_profile_shape("images", 0):
            shape.volume  # wrong: Dims has no volume (trt.volume(dims) is a function)


with trt.Runtime(logger) as runtime:
    count = runtime.deserialize_cuda_engine(b"").num_io_tensors
    typo = runtime.deserialize_cuda_engine(b"").num_io_tensor  # wrong: the property is num_io_tensors
'''


@pytest.fixture(scope="module", params=pinned_versions())
def api(request) -> trt_api_check.StubAPI:
    try:
        return load_stubs(request.param)
    except FileNotFoundError as err:
        pytest.fail(str(err), pytrace=False)


def test_every_tensorrt_caller_uses_api_the_stubs_describe(api):
    callers = tensorrt_callers(ROOT)
    assert callers, "no project file imports tensorrt: this check would check nothing"
    for path in callers:
        findings, uses = check_source(api, path.read_text(), str(path.relative_to(ROOT)))
        assert not findings, "\n".join(map(str, findings))
        assert uses, f"{path}: imports tensorrt but no TensorRT name in it could be followed"


def test_misspelt_removed_and_misused_api_is_reported(api):
    findings, _ = check_source(api, MISUSES)
    reported = {finding.line for finding in findings}
    older = tuple(int(part) for part in api.version.split(".")[:2]) < (10, 13)
    expected = {number for number, line in enumerate(MISUSES.splitlines(), 1)
                if "# wrong" in line and ("before 10.13" not in line or older)}
    assert reported == expected, "\n".join(map(str, findings))


def test_the_callers_are_found_by_their_imports(tmp_path):
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "engine.py").write_text("def load():\n    import tensorrt as trt\n    return trt\n")
    (tmp_path / "runtime" / "plugins.py").write_text("from tensorrt import Logger\n")
    (tmp_path / "other.py").write_text("import tensorrt_llm\nfrom .tensorrt import x\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "copy.py").write_text("import tensorrt\n")
    assert [p.relative_to(tmp_path).as_posix() for p in tensorrt_callers(tmp_path)] == \
        ["runtime/engine.py", "runtime/plugins.py"]


def test_missing_stubs_say_how_to_install_them(monkeypatch, tmp_path):
    monkeypatch.setattr(trt_api_check, "STUBS_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"not installed; run scripts/install_trt_stubs.sh"):
        load_stubs("10.8.0.43.1")
