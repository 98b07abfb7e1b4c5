"""README flag tables and the BENCHMARKS.md records table are generated; they must be current."""
import json

from bench import report
from tools import readme_flags


def test_readme_flag_tables_match_the_parsers():
    text = readme_flags.README.read_text()
    assert readme_flags.refreshed_readme(text) == text, "run: python tools/readme_flags.py --write"


def test_readme_documents_every_script():
    text = readme_flags.README.read_text()
    for script in readme_flags.SCRIPTS:
        assert f"<!-- flags:{script} -->" in text


def test_benchmarks_table_matches_the_records():
    text = report.BENCHMARKS.read_text()
    assert report.refreshed(text, report.load_records()) == text, "run: python bench/report.py --write"


def test_readme_results_table_matches_the_records():
    text = report.README.read_text()
    assert "<!-- readme-results -->" in text
    assert report.refreshed_readme(text, report.load_records()) == text, "run: python bench/report.py --write"


def test_every_record_names_command_machine_and_date():
    for rec in report.load_records():
        assert rec["command"] and rec["machine"] and rec["date"], rec["name"]


def test_a_record_without_a_machine_is_refused(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"name": "x", "value": 1.0}))
    try:
        report.load_records(tmp_path)
    except ValueError as exc:
        assert "machine" in str(exc)
    else:
        raise AssertionError("an incomplete record was accepted")
