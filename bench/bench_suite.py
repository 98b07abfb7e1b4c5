"""How long the CI command takes from a clean clone (issue 15, goal 5: the test suite in 6 minutes on the
2-core machine), optionally against an earlier commit run back to back on the same machine.

    python bench/bench_suite.py                             # HEAD once
    python bench/bench_suite.py --baseline 856750a --repeats 2
    -> bench/results/suite_wall_seconds.json, and with --baseline bench/results/suite_wall_time_ratio.json

Each run clones the repository at its commit into --work, beside a link to the shared datasets, and runs
``bash .ci/run`` there (the requirements' install and ``pytest``), as CI does. With a baseline the runs
alternate (baseline, HEAD, HEAD, baseline, ...), so a machine that speeds up or slows down during the
bench (this workplace's 2-core machines do, by 10-20% within an hour) weighs on both sides alike.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from bench.record import write_record  # noqa: E402
from bench.timing import children_cpu_seconds  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402

# pytest's last line, e.g. "==== 810 passed, 57 skipped, 9 warnings in 145.40s (0:02:25) ===="
SUMMARY = re.compile(r"^=+ (?P<counts>.+?) in (?P<seconds>[\d.]+)s\b.*=+$")


def pytest_summary(output: str) -> dict:
    """Counts (passed, skipped, failed, ...) and pytest's own seconds from its final summary line."""
    lines = [m for m in map(SUMMARY.match, output.splitlines()) if m]
    if not lines:
        raise ValueError("no pytest summary line in the output")
    last = lines[-1]
    counts = {}
    for part in last["counts"].split(", "):
        number, word = part.split(" ", 1)
        counts[word] = int(number)
    return {"counts": counts, "pytest_seconds": float(last["seconds"])}


def commit_of(repo: Path, rev: str) -> str:
    proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise UserError(f"{repo}: no commit {rev!r}")
    return proc.stdout.strip()


def one_run(repo: Path, commit: str, work: Path, label: str) -> dict:
    """Clone ``commit`` into ``work/label`` and time ``bash .ci/run`` there; the log stays beside it."""
    clone, log = work / label, work / f"{label}.log"
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(repo), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", commit], check=True)
    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), children_cpu_seconds()
    with open(log, "w") as out:
        code = subprocess.call(["bash", ".ci/run"], cwd=clone, stdout=out, stderr=subprocess.STDOUT)
    seconds, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu
    if code:
        raise UserError(f"{log}: .ci/run of {commit[:7]} exited {code}")
    return {"commit": commit, "wall_seconds": seconds, "cpu_seconds": cpu,
            "load_average_before": round(load, 2), **pytest_summary(log.read_text()), "log": str(log)}


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", default="HEAD", help="the commit to time (default HEAD; uncommitted changes never run)")
    p.add_argument("--baseline", default=None, help="an earlier commit, run back to back with --rev")
    p.add_argument("--repeats", type=int, default=1, help="runs of each commit")
    p.add_argument("--repo", type=Path, default=ROOT, help="the git repository to clone (default this one)")
    p.add_argument("--work", type=Path, default=None,
                   help="where the clones and their logs go (default a new folder under the system's temp)")
    p.add_argument("--results-dir", default=None, help="default bench/results")
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: must be at least 1")
    datasets = args.repo.resolve().parent / "shared"
    if not datasets.is_dir():
        raise UserError(f"{datasets}: the shared datasets must sit beside the repository, as the tests expect")
    commits = {"rev": commit_of(args.repo, args.rev)}
    if args.baseline:
        commits["baseline"] = commit_of(args.repo, args.baseline)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_suite_"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "shared").exists():
        (work / "shared").symlink_to(datasets)  # the tests look for ../shared/datasets beside the clone

    order = []  # baseline, rev, rev, baseline, ...: drift of the machine's speed falls on both alike
    for i in range(args.repeats):
        pair = list(commits)[::-1] if i % 2 == 0 else list(commits)
        order += [(side, i) for side in pair]
    runs: dict[str, list[dict]] = {side: [] for side in commits}
    for side, i in tqdm(order, desc=".ci/run", unit="run"):
        label = f"{side}-{commits[side][:7]}-{i}"
        runs[side].append(one_run(args.repo, commits[side], work, label))
        shutil.rmtree(work / label)  # each clone is a few MB, its runs/ more; the log stays

    wall = {side: statistics.median(r["wall_seconds"] for r in rs) for side, rs in runs.items()}
    common = {"model": "-", "dataset": "the default test suite (bash .ci/run in a clean clone)",
              "results_dir": args.results_dir}
    extra = {"commits": commits, "runs": runs, "repeats": args.repeats, "goal_seconds": 360}
    written = [write_record("suite_wall_seconds", wall["rev"], "s", extra=extra, **common)]
    if args.baseline:
        written.append(write_record("suite_wall_time_ratio", wall["rev"] / wall["baseline"], "ratio",
                                    extra={**extra, "median_wall_seconds": wall}, **common))
    for side, rs in runs.items():
        for r in rs:
            print(f"{side} {r['commit'][:7]}: {r['wall_seconds']:.1f} s in all, {r['pytest_seconds']:.1f} s in "
                  f"pytest, {r['cpu_seconds']:.0f} s CPU, {r['counts']} "
                  f"(load average {r['load_average_before']} before)")
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    run_cli(main)
