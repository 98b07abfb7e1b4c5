"""What importing Model Optimizer costs a command's start-up: through our adapter
(``models.quant_modules``, which hides the libraries modelopt has plugins for) against modelopt
imported directly, each in a fresh Python process, alternating:

    python bench/bench_import.py --repeats 3
    -> bench/results/modelopt_import_time_ratio.json

Both children import torch too, as every command does. Where transformers is installed, the direct
import also loads it for modelopt's plugins (and warns about its version); the record says whether
it is installed and whether each child imported it and printed a warning. The OS file cache is
warm after the first round, as on a user's second command.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import write_record  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402

WAYS = {"adapter": "models.quant_modules", "direct": "modelopt.torch.quantization"}
_CHILD = ("import json, sys, time\nstart = time.perf_counter()\nimport {module}\n"
          "seconds = time.perf_counter() - start\n"
          "print(json.dumps({{'seconds': seconds, 'transformers': 'transformers' in sys.modules}}))")


def time_import(module: str) -> dict:
    """Seconds to import ``module`` in a fresh interpreter, whether transformers came with it, and
    the warnings it printed."""
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(module=module)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise UserError(f"import {module} failed: {proc.stderr.strip().splitlines()[-1:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "warnings": [line for line in proc.stderr.splitlines() if "Warning" in line]}


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="imports each way, alternating")
    p.add_argument("--results-dir", default="", help="where the record goes (default bench/results)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: expected at least 1")
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    for i in range(args.repeats):
        for way, module in WAYS.items():
            runs[way].append(time_import(module))
            print(f"round {i + 1}: {way} ({module}) {runs[way][-1]['seconds']:.2f} s", flush=True)
    median = {way: statistics.median(r["seconds"] for r in rs) for way, rs in runs.items()}
    ratio = median["adapter"] / median["direct"]
    print(f"median: adapter {median['adapter']:.2f} s, direct {median['direct']:.2f} s, ratio {ratio:.3f}")
    installed = importlib.util.find_spec("transformers") is not None
    return write_record(
        "modelopt_import_time_ratio", ratio, "ratio (adapter / direct median import seconds)", "nvidia-modelopt",
        "none", results_dir=Path(args.results_dir) if args.results_dir else None,
        extra={"median_seconds": median, "seconds": {w: [r["seconds"] for r in rs] for w, rs in runs.items()},
               "transformers_installed": importlib.metadata.version("transformers") if installed else False,
               "transformers_imported": {w: any(r["transformers"] for r in rs) for w, rs in runs.items()},
               "warnings_printed": {w: sorted({x for r in rs for x in r["warnings"]}) for w, rs in runs.items()},
               "repeats": args.repeats, "note": "fresh interpreter per import, torch included; OS file cache warm"})


if __name__ == "__main__":
    run_cli(main)
