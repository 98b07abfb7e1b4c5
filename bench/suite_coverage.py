"""Which statements the default test suite runs, every process it starts included, and which of them
an earlier measurement ran that this one does not: the check behind "a faster suite, no coverage lost".

    pip install coverage                  # coverage.py 7.10 or later; not a requirement of the project
    python bench/suite_coverage.py run --out runs/coverage/HEAD.json
    -> bench/results/suite_statement_coverage.json, and every statement that ran in --out
    python bench/suite_coverage.py compare runs/coverage/OLD.json runs/coverage/HEAD.json

``run`` runs ``pytest`` under coverage.py with its subprocess patch, so that pytest-xdist's workers, the
tools the tests start and torchrun's ranks are measured too (tests/ itself is not measured), and
writes, per file, the text of each statement that ran. ``compare`` matches statements by file and
text, since an edit moves line numbers, and lists each one the earlier run reached and the later
did not; its exit code is 1 when there is one.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import write_record  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402


def _config(folder: Path) -> Path:
    rc = folder / "coveragerc"
    rc.write_text(f"[run]\nsource = {ROOT}\nomit = {ROOT / 'tests'}/*\nparallel = true\npatch = subprocess\n"
                  f"data_file = {folder / '.coverage'}\n")
    return rc


def statements_run(rc: Path) -> dict[str, dict]:
    """Per file under the project (relative path): its statement count and the text of each that ran."""
    import coverage

    cov = coverage.Coverage(config_file=str(rc))
    cov.combine()
    cov.save()
    out = {}
    for file in sorted(cov.get_data().measured_files()):
        _, statements, _, missing, _ = cov.analysis2(file)
        lines = Path(file).read_text(encoding="utf-8").splitlines()
        ran = sorted(set(statements) - set(missing))
        out[str(Path(file).relative_to(ROOT))] = {"statements": len(statements),
                                                  "run": [lines[i - 1].strip() for i in ran]}
    return out


def totals(files: dict[str, dict]) -> tuple[int, int]:
    """(statements that ran, statements) over every file of a measurement."""
    return sum(len(f["run"]) for f in files.values()), sum(f["statements"] for f in files.values())


def run(out: Path, pytest_args: list[str], results_dir: Path | None = None) -> Path:
    """Run pytest under coverage (its subprocesses too); write what ran to ``out`` and the record."""
    try:
        import coverage
    except ImportError:
        raise UserError("coverage.py is not installed: pip install coverage (7.10 or later)") from None
    if tuple(int(p) for p in coverage.__version__.split(".")[:2]) < (7, 10):
        raise UserError(f"coverage.py {coverage.__version__}: the subprocess patch needs 7.10 or later")
    with tempfile.TemporaryDirectory() as tmp:
        rc = _config(Path(tmp))
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", "coverage", "run", f"--rcfile={rc}", "-m", "pytest",
                                *pytest_args], cwd=ROOT)
        seconds = time.perf_counter() - start
        if code != 0:
            raise UserError(f"pytest exited {code}: the coverage of a failing suite is not recorded")
        files = statements_run(rc)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(files, indent=1) + "\n")
    ran, statements = totals(files)
    print(f"{ran} of {statements} statements ran ({100 * ran / statements:.1f}%); each listed in {out}")
    return write_record("suite_statement_coverage", 100 * ran / statements, "%", "-",
                        "the default test suite (pytest from the project root), tests/ not measured",
                        extra={"statements": statements, "run": ran, "files": len(files),
                               "pytest_args": pytest_args, "seconds_under_coverage": round(seconds, 1),
                               "coverage_version": coverage.__version__}, results_dir=results_dir)


def lost_statements(old: dict, new: dict) -> list[tuple[str, str]]:
    """(file, statement text) for each statement ``old`` ran more often than ``new`` (by file and text)."""
    lost = []
    for file, entry in sorted(old.items()):
        missing = Counter(entry["run"]) - Counter(new.get(file, {"run": []})["run"])
        lost += [(file, text) for text, n in sorted(missing.items()) for _ in range(n)]
    return lost


def compare(old_path: Path, new_path: Path) -> int:
    old, new = (json.loads(Path(p).read_text()) for p in (old_path, new_path))
    lost = lost_statements(old, new)
    for name, files in (("old", old), ("new", new)):
        print("{}: {} of {} statements ran".format(name, *totals(files)))
    if lost:
        print(f"\n{len(lost)} statement(s) ran before and not now:\n\n| file | statement |\n|---|---|")
        for file, text in lost:
            print(f"| {file} | `{text}` |")
    else:
        print("no statement that ran before is left unrun")
    return 1 if lost else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run pytest under coverage; write the statements that ran and the record")
    r.add_argument("--out", type=Path, required=True, help="JSON of the statements that ran, per file")
    r.add_argument("--results-dir", type=Path, default=None, help="where the record goes (default bench/results)")
    r.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    c = sub.add_parser("compare", help="statements an earlier run reached and a later one did not")
    c.add_argument("old", type=Path)
    c.add_argument("new", type=Path)
    opt = p.parse_args(argv)
    if opt.cmd == "run":
        print(f"wrote {run(opt.out, opt.pytest_args, opt.results_dir)}")
        return 0
    for path in (opt.old, opt.new):
        if not path.is_file():
            raise UserError(f"{path}: not found (write it with: python bench/suite_coverage.py run --out {path})")
    return compare(opt.old, opt.new)


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
