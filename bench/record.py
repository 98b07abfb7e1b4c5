"""Write one measured figure as a JSON record in bench/results/<name>.json.

Every figure quoted in BENCHMARKS.md comes from such a record, written by the command that
measured it, so a number can always be traced back to a command, a machine and a date.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def processor() -> str:
    """The architecture and, where /proc/cpuinfo gives them, the CPU's model name and family: two
    "2-core" machines of this workplace ran the demo in 111 s (a Xeon with AMX) and 388 s (an AVX2-only
    EPYC, family 23), so a figure names its processor."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}  # all alike
    name = fields.get("model name")
    if not name:
        return platform.machine()
    family = f", family {fields['cpu family']}" if "cpu family" in fields else ""
    return f"{platform.machine()}, {name}{family}"


def machine_name() -> str:
    """The accelerator (if any), the CPU count and processor and, CPU only, whether it computes bf16
    natively: enough to tell which machine gave a figure. A process pinned to some cores (taskset, as
    bench/gpu_speed.sh runs its lanes) names how many it could use."""
    import os

    import torch

    from utils.training.acceleration import cpu_computes_bf16  # the project root is on the path, as for bench.*

    total = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    cores = f"{total}" if usable == total else f"{usable} of {total}"
    cpu = f"{cores} CPU cores ({processor()}"
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n}x {torch.cuda.get_device_name(0)}, {cpu})"
    return f"CPU only, {cpu}; {'native bf16' if cpu_computes_bf16() else 'no native bf16'})"


def this_command() -> str:
    """The command line that is running, as a person would retype it."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def write_record(name: str, value: float, unit: str, model: str, dataset: str,
                 command: str | None = None, machine: str | None = None,
                 extra: dict | None = None, results_dir: Path | None = None) -> Path:
    """Write ``results_dir/<name>.json`` with the fields BENCHMARKS.md relies on; return its path."""
    record = {
        "name": name,
        "value": float(value),
        "unit": unit,
        "model": model,
        "dataset": dataset,
        "command": command or this_command(),
        "machine": machine or machine_name(),
        "date": _dt.date.today().isoformat(),
    }
    if extra:
        record["extra"] = extra
    out_dir = Path(results_dir) if results_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
