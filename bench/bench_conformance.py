"""Export conformance matrix: every detection and segmentation config x nc x End2End variant x batch mode x input shape.

Each (config, nc) is quantized once (random init, calibrated on random images), traced once per
(batch mode, input shape), and each variant's tail is appended to that trace; every case is then
checked by ``bench.conformance.run_case`` (ONNX checker, lint, ONNX Runtime, PyTorch parity,
EfficientNMS_TRT contract; a segmentation model's masks). CPU only, one thread a block; the full
matrix (10 detection + 3 segmentation configs: 468 cases) takes hours on a shared 2-core machine,
so each (config, nc) block is saved as it ends and ``--resume`` continues; ``--jobs N`` runs N
blocks at once on a many-core machine.

    nice python bench/bench_conformance.py [--resume] [--jobs N]
    -> bench/results/conformance_cases_total.json, conformance_failures_total.json,
       bench/results/conformance/conformance_table.{md,json}
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import conformance as cf  # noqa: E402
from bench.record import RESULTS_DIR, machine_name, write_record  # noqa: E402
from bench.report import conformance_table  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402

TABLE_STEM = "conformance_table"


def run_block(cfg: str, nc: int, out_dir: Path, contract: dict, log=print) -> list[dict]:
    """Every case of one (config, nc): one quantized model, one trace per (batch mode, shape)."""
    start = time.time()
    model = cf.quantized_model(cfg, nc)
    results = []
    for batch_mode in cf.BATCH_MODES:
        for shape in cf.SHAPES:
            pred = cf.trace(model, batch_mode, shape)
            for variant in cf.VARIANTS:
                r = cf.run_case(model, pred, cf.Case(cfg, nc, variant, batch_mode, shape), out_dir, contract)
                results.append(r)
                if not r.passed:
                    log(f"FAIL {r.case.name}: {'; '.join(r.problems)}")
    log(f"{cfg} nc={nc}: {sum(r.passed for r in results)}/{len(results)} passed, {time.time() - start:.0f}s")
    return [r.to_dict() for r in results]


def _save_block(cfg: str, nc: int, out_dir: Path, block: Path, threads: int = 1) -> None:
    """Run one (config, nc) block and save it; a child process of ``--jobs`` starts here."""
    torch.set_num_threads(threads)
    cases = run_block(cfg, nc, out_dir, cf.load_contract(), log=lambda m: print(m, flush=True))
    saved = {"machine": machine_name(), "date": datetime.date.today().isoformat(), "cases": cases}
    block.write_text(json.dumps(saved, indent=1) + "\n")


def run_matrix(configs: list[str], ncs: list[int], out_dir: Path, blocks_dir: Path, resume: bool = False,
               jobs: int = 1, threads: int = 1) -> list[dict]:
    """Every (config, nc) block of ``configs`` x ``ncs``: {machine, date, cases}. Each block is saved
    as it ends (``blocks_dir``), so an interrupted run continues with ``resume`` where it stopped;
    ``jobs`` > 1 runs that many blocks at once in child processes (a many-core machine)."""
    blocks_dir.mkdir(parents=True, exist_ok=True)
    paths = {(cfg, nc): blocks_dir / f"{cfg}-nc{nc}.json" for cfg in configs for nc in ncs}
    todo = [key for key, block in paths.items() if not (resume and block.is_file())]
    if jobs > 1 and len(todo) > 1:
        # spawn: a forked child would inherit the parent's PyTorch thread pool state
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in [pool.submit(_save_block, cfg, nc, out_dir, paths[cfg, nc], threads) for cfg, nc in todo]:
                future.result()
    else:
        for cfg, nc in todo:
            _save_block(cfg, nc, out_dir, paths[cfg, nc], threads)
    return [json.loads(block.read_text()) for block in paths.values()]


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {}
    q = np.quantile(np.array(values), [0.5, 0.9, 0.99, 1.0])
    return {"cases": len(values), "median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(q[3])}


def summarize(results: list[dict], cases: list[cf.Case]) -> dict:
    """Pass / fail counts by config, nc and variant, the error distributions, and the failures."""
    by_name = {r["case"]: r for r in results}
    table: dict = {}
    for case in cases:
        row = table.setdefault(case.cfg, {}).setdefault(str(case.nc), {})
        cell = row.setdefault(case.variant, {"passed": 0, "failed": 0})
        cell["passed" if by_name[case.name]["passed"] else "failed"] += 1
    measured = [by_name[c.name] for c in cases if by_name[c.name]["box_err"] is not None]
    return {
        "cases": len(cases), "failures": sum(not by_name[c.name]["passed"] for c in cases),
        "by_config_nc_variant": table,
        "error_distribution": {"box_px": _quantiles([r["box_err"] for r in measured]),
                               "score": _quantiles([r["score_err"] for r in measured]),
                               "mask": _quantiles([r["mask_err"] for r in results if r.get("mask_err") is not None]),
                               "bounds": {"box_px": cf.BOX_TOL_PX, "score": cf.SCORE_TOL, "mask": cf.MASK_TOL,
                                          "mask_mean": cf.MASK_MEAN_TOL}},
        "failed_cases": [by_name[c.name] for c in cases if not by_name[c.name]["passed"]],
    }


def to_markdown(summary: dict) -> str:
    """The table of cases by config / nc / variant and one line on failures and errors."""
    dist = summary["error_distribution"]
    return (conformance_table(summary["by_config_nc_variant"]) + "\n\n"
            f"{summary['cases']} cases, {summary['failures']} failed. Each cell: cases passed / cases "
            f"(2 batch modes x 2 input shapes). Max |ONNX Runtime - PyTorch| over raw and plugin-input cases: "
            f"boxes {dist['box_px'].get('max', 0):.3g} px (bound {cf.BOX_TOL_PX}), "
            f"scores {dist['score'].get('max', 0):.3g} (bound {cf.SCORE_TOL})"
            + (f"; mask probabilities {dist['mask']['max']:.3g} (bound {cf.MASK_TOL})" if dist.get("mask") else "")
            + ".\n")


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(cf.CONFIGS), help="comma-separated config names")
    p.add_argument("--nc", default=",".join(map(str, cf.NCS)), help="comma-separated class counts")
    p.add_argument("--out", help="folder for the exported ONNX files (default: temporary)")
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--resume", action="store_true", help="keep the (config, nc) blocks an earlier run finished")
    p.add_argument("--jobs", type=int, default=1, help="(config, nc) blocks run at once, each in its own process")
    p.add_argument("--threads", type=int, default=1,
                   help="PyTorch / ONNX Runtime threads (1: on a shared CPU, more threads only wait for each other)")
    opt = p.parse_args(argv)
    torch.set_num_threads(opt.threads)
    configs = opt.configs.split(",")
    unknown = sorted(set(configs) - set(cf.CONFIGS))
    if unknown:
        raise UserError(f"--configs: unknown config(s) {unknown}; expected some of {list(cf.CONFIGS)}")
    ncs = [int(n) for n in opt.nc.split(",")]
    start = time.time()
    results_dir = Path(opt.results_dir) if opt.results_dir else RESULTS_DIR
    table_dir = results_dir / "conformance"
    with tempfile.TemporaryDirectory(prefix="conformance_") as tmp:
        out_dir = Path(opt.out or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        blocks = run_matrix(configs, ncs, out_dir, table_dir / "blocks", opt.resume, opt.jobs, opt.threads)
    results = [case for block in blocks for case in block["cases"]]
    machines = sorted({block["machine"] for block in blocks})
    dates = sorted({block["date"] for block in blocks})
    cases = [cf.Case(cfg, nc, v, b, s) for cfg in configs for nc in ncs for b in cf.BATCH_MODES for s in cf.SHAPES
             for v in cf.VARIANTS]
    summary = summarize(results, cases)
    (table_dir / f"{TABLE_STEM}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (table_dir / f"{TABLE_STEM}.md").write_text(to_markdown(summary))
    matrix = f"{len(configs)} config(s) x nc {ncs} x {len(cf.VARIANTS)} variants x 2 batch modes x 2 shapes"
    data = f"random images {', '.join('x'.join(map(str, s)) for s in cf.SHAPES.values())} (calibrated on random images)"
    extra = {"seconds_this_invocation": round(time.time() - start), "table": f"bench/results/conformance/{TABLE_STEM}.md",
             "case_dates": dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"}
    where = dict(machine="; ".join(machines), results_dir=results_dir)
    write_record("conformance_cases_total", summary["cases"], "cases", matrix, data, **where,
                 extra={**extra, "by_config_nc_variant": summary["by_config_nc_variant"]})
    return write_record("conformance_failures_total", summary["failures"], "failed cases", matrix, data, **where,
                        extra={**extra, "failed_cases": [r["case"] for r in summary["failed_cases"]],
                               "error_distribution": summary["error_distribution"]})


if __name__ == "__main__":
    run_cli(main)
