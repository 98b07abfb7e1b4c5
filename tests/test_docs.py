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


def _record(name: str, value: float, **extra) -> dict:
    return {"name": name, "value": value, "unit": "mAP50-95", "model": "m", "dataset": "BCCD test",
            "command": "python bench/study_accuracy.py all", "machine": "2x H200", "date": "2026-12-01", "extra": extra}


def test_results_tables_show_intervals_the_control_and_agreement():
    ci = {"ci95_low": -0.0041, "ci95_high": 0.0022, "selected_on": "val"}
    records = [
        _record("fp32_val_map50_95_gelan-t", 0.61, converged=True, trend_rise=0.001),
        _record("ptq_delta_map50_95_gelan-t", -0.0031, method="mse", **ci),
        _record("qat_delta_map50_95_gelan-t", -0.0009, fp32_map50_95=0.6012, **ci),
        _record("qat_minus_control_map50_95_gelan-t", -0.0012, **ci),
        _record("ort_int8_minus_qat_map50_95_gelan-t", 0.0001, **ci),
        _record("int8_agreement_map50_95_gelan-t", 0.9312, ci95_low=0.9201, ci95_high=0.9405, selected_on="val"),
    ]
    row = next(line for line in report.render_study(records).splitlines() if line.startswith("| gelan-t |"))
    assert row == ("| gelan-t | 0.6012 | yes | val | -0.0031 [-0.0041, 0.0022] (mse) | -0.0009 [-0.0041, 0.0022] "
                   "| -0.0012 [-0.0041, 0.0022] | +0.0001 [-0.0041, 0.0022] | 0.9312 [0.9201, 0.9405] | - | - |")
    assert "QAT - control" in report.render_study(records)
    assert "| `qat_delta_map50_95_gelan-t` | -0.0009 [-0.0041, 0.0022] |" in report.render(records)
    assert "gelan-e" not in report.render_study(records)  # a model without records gets no row


def test_seg_study_section_renders_the_records_and_marks_a_missed_bar():
    extra = {"fp32": {"map50_95": 0.6, "mask_map50_95": 0.5}, "ci95_low": -0.02, "ci95_high": 0.001,
             "sizes": {"epochs": 30, "images": 2000, "imgsz": 320}, "training_stopped_after_epoch": 12}
    base = {"unit": "mAP50-95", "dataset": "d", "command": "python bench/study_seg.py --out o", "machine": "m",
            "date": "2026-11-30", "model": "gelan-c-seg, from scratch", "extra": extra}
    records = [{**base, "name": f"seg_{kind}_gelan-c-seg", "value": value} for kind, value in
               (("qat_delta_mask_map50_95", -0.01), ("qat_delta_box_map50_95", 0.002),
                ("ort_int8_minus_qat_mask_map50_95", 0.0))]
    text = report.render_seg_study(records)
    assert ("| gelan-c-seg, from scratch | 0.6000 / 0.5000 | +0.0020 [-0.0200, 0.0010] | -0.0100 [-0.0200, 0.0010] | "
            "not run | +0.0000 | **fail** |") in text
    assert "12 epochs of 2000 images, 320 px (time budget)" in text and "`python bench/study_seg.py --out o`" in text
    assert report.render_seg_study(records[1:]).startswith("No records yet")  # a model needs all three
