"""Where the distillation teacher's time goes (GPU; a diagnosis tool, no record): one QAT student and its
fused FP32 teacher as bench/bench_qat_step.py builds them, batch 16 at 640 px, bf16, channels-last.

    python bench/profile_teacher.py --cfg gelan-c.yaml --data .data/bccd/bccd.yaml --out runs/profile_teacher

Times, in ms per call: the teacher's pass with its reference terms (what ``FeatureDistillation`` runs
each step) eagerly and replayed from a CUDA graph, the graphed pass without the reference terms, and
(unless ``--no-compile``) the pass compiled by Inductor and then graphed, with the compile's seconds;
then the distillation error and its backward on detached student features. ``teacher_ops.txt`` lists
the teacher's operators by GPU time for three eager passes, run as a pass recorded into a CUDA graph
runs (inside ``models.fused_ops.graph_recording``), grouped by name and by input shape.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_qat_step import add_build_arguments  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402


def ms_per_call(fn, x, iters: int = 20) -> float:
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn(x)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / iters


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_build_arguments(p, cfg="gelan-c.yaml")
    p.add_argument("--no-compile", action="store_true", help="skip the Inductor-compiled pass")
    p.add_argument("--out", default=str(ROOT / "runs/profile_teacher"))
    args = p.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    from bench.bench_qat_step import build_models
    from models import fused_ops
    from utils.quantization.distill import FeatureDistillation, supervised_layers
    from utils.training.acceleration import memory_format
    from utils.training.cuda_graphs import GraphedInference

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda:0")
    torch.backends.cudnn.benchmark = True
    built = build_models(args.cfg, args.data, args.imgsz, args.batch_size, args.workers, device)
    student, teacher = built["student"], built["teacher"]
    imgs = built["batch"][0].to(device).contiguous(memory_format=memory_format(student)).float() / 255
    distill = FeatureDistillation(student, teacher, supervised_layers(len(student.model), 1))
    references = distill._teacher_references  # the teacher's pass and its side of every error term
    res = {"cfg": args.cfg, "batch": args.batch_size, "imgsz": args.imgsz, "gpu": torch.cuda.get_device_name(device)}
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        res["teacher_refs_eager_ms"] = ms_per_call(references, imgs)
        res["teacher_refs_graphed_ms"] = ms_per_call(GraphedInference(references), imgs)
        res["teacher_forward_only_graphed_ms"] = ms_per_call(GraphedInference(distill.teacher), imgs)
        with fused_ops.graph_recording(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                                                  record_shapes=True) as prof:
            for _ in range(3):
                references(imgs)
            torch.cuda.synchronize()
        (out / "teacher_ops.txt").write_text(
            prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40) + "\n\n"
            + prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=40))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        student(imgs)
        features = [s.detach().requires_grad_() for n in distill.sites for s in distill._student_out.get(n, [])]
        distill._student_out.clear()
        with torch.no_grad():
            refs = references(imgs)

        def error_both_ways(_):
            distill._error(features, refs).backward()
        res["error_fwd_bwd_eager_ms"] = ms_per_call(error_both_ways, None)
        res["n_features"] = len(features)
        res["feature_elements"] = sum(f.numel() for f in features)
    if not args.no_compile:
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
            compiled = GraphedInference(torch.compile(references))
            compiled(imgs)
            torch.cuda.synchronize()
            res["teacher_refs_compile_s"] = time.perf_counter() - t
            res["teacher_refs_compiled_graphed_ms"] = ms_per_call(compiled, imgs)
    (out / "teacher.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    run_cli(main)
