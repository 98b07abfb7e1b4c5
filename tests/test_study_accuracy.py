"""The accuracy study driver's own logic: the convergence check and how jobs are spread over GPUs
(the whole driver runs end to end with `python bench/study_accuracy.py all --dry-run`)."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from bench.convergence import convergence
from bench.study_accuracy import COST, MODELS, RECORDS, Plan, pack, spread


def test_a_curve_still_rising_at_the_end_has_not_converged():
    epochs = np.arange(100)
    rising = list(0.6 * (1 - np.exp(-epochs / 60)))  # still gaining ~0.02 over the last 20 epochs
    check = convergence(rising)
    assert not check["converged"] and check["window_epochs"] == 20 and check["trend_rise"] > 0.005


def test_a_noisy_plateau_has_converged():
    rng = np.random.default_rng(0)
    epochs = np.arange(100)
    plateau = list(0.6 * (1 - np.exp(-epochs / 10)) + rng.normal(0, 0.002, 100))
    check = convergence(plateau)
    assert check["converged"] and abs(check["trend_rise"]) < 0.005
    falling = plateau[:80] + list(np.linspace(plateau[79], plateau[79] - 0.02, 20))
    assert convergence(falling)["converged"]  # over-fitting is no further gain to wait for


def test_too_few_epochs_cannot_be_judged():
    check = convergence([0.1, 0.2, 0.3])
    assert not check["converged"] and "too few" in check["reason"]


def test_jobs_are_spread_slowest_first_over_the_gpus():
    queues = spread(list(MODELS), ["0", "1"])
    assert sorted(m for q in queues.values() for m in q) == sorted(MODELS)
    loads = [sum(COST[m] for m in q) for q in queues.values()]
    assert max(loads) - min(loads) <= min(COST.values())
    assert all(q == sorted(q, key=lambda m: -COST[m]) for q in queues.values())
    assert spread(["gelan-t"], ["cpu"]) == {"cpu": ["gelan-t"]}


def test_held_lr_window_leaves_an_epoch_to_anneal():
    from bench.convergence import hold_epochs

    assert hold_epochs(12) == 3  # the segmentation study's 12 epochs: the last 3 at the final LR
    assert hold_epochs(160) == 32
    assert hold_epochs(1) == 0  # a dry run's single epoch still anneals


def test_seg_table_says_whether_fp32_was_flat():
    from bench.convergence import convergence
    from bench.report import _flatness

    rising = convergence([0.1 * i for i in range(12)])
    assert "**not flat** over the last 3" in _flatness({"convergence": rising})
    flat = _flatness({"convergence": convergence([0.5] * 12)})
    assert "flat over the last 3" in flat and "not flat" not in flat
    assert "not judged" in _flatness({"convergence": convergence([0.5] * 3)})
    assert _flatness({}) == ""  # records from before the check existed


def test_a_stage_packs_only_its_own_records(tmp_path):
    """On the device the checkout's records folder also holds git's last study: a quantize stage run in
    its own command must not send back the FP32 records found there, nor train the QAT ones."""
    results = tmp_path / "results"
    results.mkdir()
    for name in (n for names in RECORDS.values() for n in names):
        (results / f"{name}_gelan-s.json").write_text("{}")
    plan = Plan(root=str(tmp_path / "study"), data="", unlabelled={}, results=str(results))
    packed = {}
    for stage in ("train", "quantize", "all"):
        (tar_path,) = pack(plan, ["gelan-s"], stage, tmp_path / stage, with_weights=False)
        with tarfile.open(tar_path) as tar:
            packed[stage] = {Path(n).name.removesuffix("_gelan-s.json") for n in tar.getnames()}
    assert packed["train"] == set(RECORDS["train"])
    assert packed["quantize"] == set(RECORDS["quantize"])
    assert packed["all"] == packed["train"] | packed["quantize"]
