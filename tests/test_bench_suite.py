"""bench/bench_suite.py on a throwaway repository whose .ci/run only prints a pytest summary: each commit is
cloned clean beside the shared datasets, the runs alternate, and a failing run names its log."""
import json
import statistics
import subprocess

import pytest

import bench.bench_suite as bench_suite
from utils.errors import UserError

CI_RUN = """#!/usr/bin/env bash
test -d ../shared || exit 3  # the datasets' link must sit beside the clone, as for the real suite
test -z "$(git status --porcelain)" || exit 4  # a clean checkout
echo "=========== {counts} in {seconds}s ({clock}) ==========="
exit {code}
"""


def _commit(repo, counts, seconds, code=0):
    (repo / ".ci").mkdir(exist_ok=True)
    (repo / ".ci" / "run").write_text(CI_RUN.format(counts=counts, seconds=seconds, clock="0:00:01", code=code))
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", counts],
                   check=True)


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "shared").mkdir()
    repo = tmp_path / "project"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    _commit(repo, "5 passed, 1 skipped", "2.50")
    _commit(repo, "7 passed, 1 skipped, 2 warnings", "1.25")
    return repo


def test_head_against_a_baseline_back_to_back(repo, tmp_path):
    written = bench_suite.main(["--repo", str(repo), "--baseline", "HEAD~1", "--repeats", "2",
                                "--work", str(tmp_path / "work"), "--results-dir", str(tmp_path / "r")])
    wall, ratio = (json.loads(p.read_text()) for p in written)
    assert wall["name"] == "suite_wall_seconds" and ratio["name"] == "suite_wall_time_ratio"
    runs = wall["extra"]["runs"]
    assert [r["pytest_seconds"] for r in runs["rev"]] == [1.25, 1.25]
    assert runs["rev"][0]["counts"] == {"passed": 7, "skipped": 1, "warnings": 2}
    assert runs["baseline"][0]["counts"] == {"passed": 5, "skipped": 1}
    assert wall["value"] == pytest.approx(statistics.median(r["wall_seconds"] for r in runs["rev"]))
    assert ratio["value"] == pytest.approx(wall["value"] / ratio["extra"]["median_wall_seconds"]["baseline"])
    logs = sorted(p.name for p in (tmp_path / "work").glob("*.log"))  # the clones are gone, the logs stay
    assert len(logs) == 4 and not [p for p in (tmp_path / "work").iterdir() if p.is_dir() and p.name != "shared"]


def test_a_failing_run_names_its_log_and_a_bad_commit_is_refused(repo, tmp_path):
    _commit(repo, "1 failed, 6 passed", "1.00", code=1)
    with pytest.raises(UserError, match=r"rev-\w{7}-0\.log: \.ci/run of \w{7} exited 1"):
        bench_suite.main(["--repo", str(repo), "--work", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r")])
    with pytest.raises(UserError, match="no commit 'nothere'"):
        bench_suite.main(["--repo", str(repo), "--baseline", "nothere", "--results-dir", str(tmp_path / "r")])


def test_the_summary_line_of_pytest():
    out = "....\n=== warnings summary ===\n==== 810 passed, 57 skipped, 9 warnings in 145.40s (0:02:25) ====\n"
    assert bench_suite.pytest_summary(out) == {"counts": {"passed": 810, "skipped": 57, "warnings": 9},
                                               "pytest_seconds": 145.4}
    with pytest.raises(ValueError):
        bench_suite.pytest_summary("error: pytest collected no tests\n")
