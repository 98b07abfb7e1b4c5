"""Wall time of ``python qat.py demo`` with its default flags, as a newcomer runs it (issue 7: under
10 minutes on a 2-core CPU), and the accuracy it reaches.

    python bench/bench_demo.py --project /tmp/bench_demo
    -> bench/results/demo_wall_seconds.json, bench/results/demo_qat_map50_95.json
    python bench/bench_demo.py --project /tmp/bench_demo --busy 2
    -> bench/results/demo_wall_seconds_beside_2_busy.json
    python bench/bench_demo.py --project /tmp/bench_demo --threads 2
    -> bench/results/demo_wall_seconds_threads_2.json
    python bench/bench_demo.py --project /tmp/bench_demo --train
    -> bench/results/demo_wall_seconds_train.json (the FP32 model trained in the demo, not the shipped one)

The demo runs as a child process, so the time includes Python's start and every import; the load
average before it starts goes into the record, since other jobs on the machine slow it down.
``--busy N`` runs N busy loops beside it, to see the demo on a machine that other jobs share.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import write_record  # noqa: E402
from bench.timing import children_cpu_seconds  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", default=str(ROOT / "runs/bench_demo"), help="the demo's --project")
    p.add_argument("--busy", type=int, default=0,
                   help="CPU-bound processes to run beside the demo, as on a machine other jobs share")
    p.add_argument("--threads", type=int, default=None,
                   help="the demo's --threads (default: its own); the record then names the count")
    p.add_argument("--train", action="store_true", help="the demo's --train: it trains its FP32 model first")
    p.add_argument("--results-dir", default=None, help="default bench/results")
    args = p.parse_args(argv)

    load = os.getloadavg()[0]
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        threads = [] if args.threads is None else ["--threads", str(args.threads)]
        train = ["--train"] if args.train else []
        t, cpu = time.perf_counter(), children_cpu_seconds()
        proc = subprocess.run([sys.executable, "qat.py", "demo", "--project", args.project, *threads, *train],
                              cwd=ROOT, capture_output=True, text=True)
        seconds, cpu = time.perf_counter() - t, children_cpu_seconds() - cpu
    finally:
        for hog in hogs:
            hog.kill()
    if proc.returncode:
        raise RuntimeError(f"qat.py demo failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    run = Path(next(line.split()[-1] for line in proc.stdout.splitlines() if line.strip().startswith("table")))
    summary = json.loads((run.parent / "demo.json").read_text())
    rows = summary["rows"]
    common = {"model": "gelan-demo (models/demo/gelan-demo.yaml)", "dataset": f"built-in shapes, {summary['imgsz']} px",
              "results_dir": args.results_dir}
    qat = rows["QAT (best)"]["map50_95"]
    beside = ((f"_beside_{args.busy}_busy" if args.busy else "") + (f"_threads_{args.threads}" if threads else "")
              + ("_train" if train else ""))
    written = [write_record(f"demo_wall_seconds{beside}", seconds, "s", extra={
        "load_average_before": load, "busy_processes": args.busy, "demo_reported_seconds": summary["seconds"],
        "threads": args.threads, "trained_here": args.train, "cpu_seconds": cpu, "rows": rows, "run": str(run.parent),
        "note": "python qat.py demo with its defaults and the flags above, child process wall time"},
        **common)]
    if not (args.busy or threads or train):  # seeded: neighbours change its time, not its table (threads change both)
        written.append(write_record("demo_qat_map50_95", qat, "mAP50-95", extra={
            "fp32_map50_95": rows["Origin (FP32)"]["map50_95"], "rows": rows, "split": "val"}, **common))
    print(f"qat.py demo: {seconds:.0f} s wall, {cpu:.0f} s CPU (load average {load:.2f} before), "
          f"QAT mAP50-95 {qat:.4f}")
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    run_cli(main)
