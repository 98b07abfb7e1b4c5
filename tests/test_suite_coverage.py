"""bench/suite_coverage.py compare: statements matched by file and text, so moved lines are not losses."""
import json

import pytest

from bench.suite_coverage import compare, lost_statements, main
from utils.errors import UserError

OLD = {"utils/a.py": {"statements": 4, "run": ["x = 1", "y = f(x)", "y = f(x)", "return y"]},
       "utils/b.py": {"statements": 1, "run": ["pass"]}}


def test_a_statement_run_fewer_times_or_in_a_file_gone_is_lost():
    moved = {"utils/a.py": {"statements": 5, "run": ["return y", "z = 0", "y = f(x)", "x = 1"]}}
    assert lost_statements(OLD, moved) == [("utils/a.py", "y = f(x)"), ("utils/b.py", "pass")]
    assert lost_statements(OLD, {**moved, "utils/a.py": {"statements": 4, "run": OLD["utils/a.py"]["run"][::-1]},
                                 "utils/b.py": OLD["utils/b.py"]}) == []


def test_compare_exits_1_and_lists_the_losses(tmp_path, capsys):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(OLD))
    new.write_text(json.dumps({**OLD, "utils/b.py": {"statements": 1, "run": []}}))
    assert compare(old, new) == 1
    out = capsys.readouterr().out
    assert "old: 5 of 5 statements ran" in out and "new: 4 of 5 statements ran" in out
    assert "| utils/b.py | `pass` |" in out
    assert compare(old, old) == 0 and "no statement that ran before is left unrun" in capsys.readouterr().out


def test_a_missing_measurement_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nope.json: not found"):
        main(["compare", str(tmp_path / "nope.json"), str(tmp_path / "nope.json")])


def test_run_measures_the_processes_a_test_starts(tmp_path):
    """``run`` itself, on a one-test file whose test starts val.py in a child process: the child's statements
    count (val.py's ``run_cli(main)`` runs only there), and the record adds up what the file lists."""
    pytest.importorskip("coverage", minversion="7.10", reason="coverage.py 7.10+ not installed (not a requirement)")
    from bench.suite_coverage import run

    test = tmp_path / "test_child.py"  # outside tests/: no conftest, so nothing but the child is imported
    test.write_text("import subprocess, sys\n\n\ndef test_a_tool_in_a_child():\n"
                    "    code = subprocess.run([sys.executable, 'val.py', '--weights', 'missing.pt']).returncode\n"
                    "    assert code == 2\n")
    out = tmp_path / "ran.json"
    record = json.loads(run(out, ["-q", "-p", "no:cacheprovider", str(test)], results_dir=tmp_path).read_text())
    files = json.loads(out.read_text())
    assert "run_cli(main)" in files["val.py"]["run"]
    assert record["extra"]["run"] == sum(len(f["run"]) for f in files.values())
    assert record["extra"]["statements"] == sum(f["statements"] for f in files.values())
