"""Every flag our scripts pass to trtexec is one trtexec documents in every TensorRT 10 release
(tests/data/trtexec10_flags.txt, read from NVIDIA/TensorRT's trtexec help text at the tags it names)."""
from __future__ import annotations

from tests.trtexec_flag_check import documented_flags, runs_trtexec, trtexec_flag_uses, trtexec_scripts
from utils.paths import ROOT

# A script in the shape of ours: flags written out, in variables set in several branches, in arrays.
SCRIPT = '''#!/usr/bin/env bash
TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
[ -x "$TRTEXEC" ] || { echo "error: trtexec not found (pass --onnx to it)" >&2; exit 2; }
precision="--fp16 --int8"; joined="--fp16 --int8"
case "$1" in
  --legacy) precision="--explicitBatch"; shift ;;
  --fp16-only) precision="--fp16"; shift ;;
esac
timing=(--useCudaGraph "--workspace=64" "--warmUp=$warmup")
# trtexec --notAFlag: comments do not run
"$TRTEXEC" --onnx="$onnx" --saveEngine="$engine" $precision "${timing[@]}" \\
  --minShapes="images:1x3x64x64" --verbose 2>&1 | tee build.log
cd runs && trtexec --loadEngine=m.engine --batch=4 > run.log
/usr/src/tensorrt/bin/trtexec --onnx=m.onnx $unset_flags
if "$TRTEXEC" --onnx=m.onnx "$joined"; then echo built; fi
'''


def test_our_scripts_pass_only_documented_flags():
    documented = documented_flags()
    scripts = trtexec_scripts(ROOT)
    assert scripts, "no script runs trtexec: this check would check nothing"
    for script in scripts:
        uses, problems = trtexec_flag_uses(script.read_text(), str(script.relative_to(ROOT)))
        assert uses and not problems, problems or f"{script}: runs trtexec but no flag was collected"
        unknown = [str(use) for use in uses if use.flag not in documented]
        assert not unknown, "flags trtexec 10 does not document:\n" + "\n".join(unknown)


def test_unknown_flags_are_reported_wherever_they_are_written():
    uses, problems = trtexec_flag_uses(SCRIPT)
    documented = documented_flags()
    unknown = {(use.line, use.flag, use.via) for use in uses if use.flag not in documented}
    assert unknown == {
        (11, "--explicitBatch", "precision"),  # TensorRT 8's flag, set in one branch only
        (11, "--workspace", "timing"),  # TensorRT 8's flag, inside an array
        (13, "--batch", ""),  # implicit batch is gone in TensorRT 10
        (15, "--fp16 --int8", "joined"),  # quoted: trtexec receives one argument
    }
    assert {use.flag for use in uses if use.line == 11} == {
        "--onnx", "--saveEngine", "--fp16", "--int8", "--explicitBatch", "--useCudaGraph", "--workspace", "--warmUp",
        "--minShapes", "--verbose"}
    assert problems == ["<script>:14: $unset_flags on a trtexec line is never assigned in the script"]


def test_only_commands_that_run_trtexec_count():
    assert not runs_trtexec("# trtexec --onnx=m.onnx\necho 'run trtexec --onnx=m.onnx'\n[ -x \"$TRTEXEC\" ]\n")
    assert runs_trtexec("FOO=1 trtexec --help\n")
    assert "--notAFlag" not in {use.flag for use in trtexec_flag_uses(SCRIPT)[0]}
