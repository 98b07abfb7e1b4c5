"""Q/DQ lint over all ten detection configs, QAT-prepared and calibrated (CPU, ~10-30 min on 2 cores).

Each config is built from its YAML (random init), prepared with the QAT placement rules,
calibrated on random images (placement and scale sharing do not depend on the values), exported
to ONNX (raw prediction and both End2End tails) and linted. The sum of findings is the figure
the export issue asks to be zero.

    python bench/bench_qdq_lint.py --imgsz 64
    -> bench/results/qdq_lint_findings_total.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.record import write_record  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402

CONFIGS = sorted(p.stem for p in (ROOT / "models" / "detect").glob("*.yaml"))


def lint_config(cfg: str, imgsz: int, out_dir: Path) -> dict:
    """Findings per export kind for one config, and what the Q/DQ graph holds."""
    from models.quantize import calibrate, float_conv_names, prepare
    from models.yolo import DetectionModel
    from utils.deployment.onnx_export import export_onnx, trace_prediction
    from utils.deployment.qdq_lint import counts

    torch.manual_seed(0)
    model = prepare(DetectionModel(f"{cfg}.yaml"))
    calibrate(model, [torch.rand(2, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))])
    floats = float_conv_names(model)
    pred = trace_prediction(model.eval(), imgsz, dynamic=True)
    row = {}
    for kind in ("raw", "nms", "topk"):
        r = export_onnx(model, out_dir / f"{cfg}-qat-{kind}.onnx", postprocess=kind, float_convs=floats,
                        prediction=pred)
        row[kind] = {"findings": len(r.findings), "by_category": {k: v for k, v in counts(r.findings).items() if v},
                     "first": [f"{f.category}: {f.node}" for f in r.findings[:5]]}
        if kind == "raw":
            row.update(qdq_pairs=r.qdq_pairs, float_convs=len(r.float_convs))
    return row


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated config names")
    p.add_argument("--imgsz", type=int, default=64, help="export size (the graph is the same at any size)")
    p.add_argument("--out", help="folder for the ONNX files and lint reports (default: temporary)")
    p.add_argument("--results-dir", type=Path, default=None)
    opt = p.parse_args(argv)
    out_dir = Path(opt.out or tempfile.mkdtemp(prefix="qdq_lint_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    per_config, start = {}, time.time()
    for cfg in opt.configs.split(","):
        t = time.time()
        per_config[cfg] = lint_config(cfg, opt.imgsz, out_dir)
        total_cfg = sum(per_config[cfg][k]["findings"] for k in ("raw", "nms", "topk"))
        print(f"{cfg}: {total_cfg} finding(s), {per_config[cfg]['qdq_pairs']} Q/DQ pairs, "
              f"{per_config[cfg]['float_convs']} float conv(s), {time.time() - t:.0f}s", flush=True)
    total = sum(row[k]["findings"] for row in per_config.values() for k in ("raw", "nms", "topk"))
    return write_record("qdq_lint_findings_total", total, "findings", "all ten detection configs (QAT-prepared)",
                        "random calibration images", extra={"imgsz": opt.imgsz, "configs": per_config,
                                                           "seconds": round(time.time() - start)},
                        results_dir=opt.results_dir)


if __name__ == "__main__":
    run_cli(main)
