"""bench_import.py times each way in its own interpreter and says which one loaded transformers."""
import json

import bench.bench_import as bench_import


def test_each_way_in_a_fresh_process_with_what_it_loaded_and_printed(tmp_path, monkeypatch):
    (tmp_path / "transformers").mkdir()  # a stand-in: only whether it gets imported matters
    (tmp_path / "transformers" / "__init__.py").write_text("import warnings\nwarnings.warn('stand-in imported')\n")
    (tmp_path / "with_plugins.py").write_text("import transformers\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(bench_import, "WAYS", {"adapter": "json", "direct": "with_plugins"})
    record = json.loads(bench_import.main(["--repeats", "2", "--results-dir", str(tmp_path / "r")]).read_text())
    extra = record["extra"]
    assert record["name"] == "modelopt_import_time_ratio" and record["value"] > 0
    assert [len(s) for s in extra["seconds"].values()] == [2, 2]
    assert extra["transformers_imported"] == {"adapter": False, "direct": True}
    assert extra["warnings_printed"]["adapter"] == [] and "stand-in imported" in extra["warnings_printed"]["direct"][0]
