"""Bootstrap intervals over images: the fast resampling equals a brute-force recomputation."""
from __future__ import annotations

import numpy as np
import pytest

from bench.bench_bootstrap import brute_force_map
from utils.evaluation.bootstrap import _Scorer, interval, paired_delta, resample_indices
from utils.evaluation.metrics import DetectionStats, PerImageStats


def _evaluation(seed: int, n_images: int = 7, nc: int = 3, jitter: float = 6.0, ties: bool = False) -> PerImageStats:
    """Matches of a made-up detector: jittered copies of the labels plus false positives (one
    image has no labels, one no detections); ``ties`` rounds the scores to quarters."""
    rng = np.random.default_rng(seed)
    labels_rng = np.random.default_rng(1234)  # every 'model' sees the same ground truth
    stats = DetectionStats()
    for i in range(n_images):
        m = 0 if i == 2 else int(labels_rng.integers(1, 6))
        xy = labels_rng.uniform(0, 200, (m, 2))
        wh = labels_rng.uniform(10, 60, (m, 2))
        labels = np.column_stack([labels_rng.integers(0, nc, m), xy, xy + wh])
        hits = labels[rng.random(m) < 0.8]
        boxes = hits[:, 1:] + rng.normal(0, jitter, (len(hits), 4))
        k = int(rng.integers(0, 4))
        fxy = rng.uniform(0, 200, (k, 2))
        boxes = np.vstack([boxes, np.column_stack([fxy, fxy + rng.uniform(10, 60, (k, 2))])])
        cls = np.r_[hits[:, 0], rng.integers(0, nc, k)]
        scores = rng.uniform(0.05, 1.0, len(cls))
        det = np.column_stack([boxes, np.round(scores * 4) / 4 if ties else scores, cls])
        stats.add(det if i != 4 else np.zeros((0, 6)), labels, image=f"img_{i:03d}.jpg")
    return stats.per_image()


@pytest.mark.parametrize("nc", [3, 1], ids=["3-classes", "one-class"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct-scores", "tied-scores"])
def test_paired_delta_matches_brute_force_recomputation(ties, nc):
    model, reference = _evaluation(1, nc=nc, ties=ties), _evaluation(2, nc=nc, jitter=12.0, ties=ties)
    assert _Scorer(model).reorder == ties  # tied matches within an image interleave when it is drawn twice
    resamples, seed = 40, 5
    result = paired_delta(model, reference, resamples=resamples, seed=seed)
    rows = resample_indices(len(model), resamples, seed)
    deltas = np.stack([brute_force_map(model, row) - brute_force_map(reference, row) for row in rows])
    low, high = np.percentile(deltas, (2.5, 97.5), axis=0)
    everything = brute_force_map(model, range(len(model))) - brute_force_map(reference, range(len(model)))
    for i, name in enumerate(("map50_95", "map50")):
        assert result[name].value == pytest.approx(everything[i], abs=1e-12)
        assert (result[name].low, result[name].high) == pytest.approx((low[i], high[i]), abs=1e-12)
        assert result[name].low < result[name].value < result[name].high  # a real spread, not a constant
    single = interval(model, resamples=resamples, seed=seed)["map50_95"]
    ones = np.stack([brute_force_map(model, row) for row in rows])[:, 0]
    assert (single.low, single.high) == pytest.approx(tuple(np.percentile(ones, (2.5, 97.5))), abs=1e-12)


def test_identical_models_give_a_degenerate_interval():
    stats = _evaluation(3)
    for iv in paired_delta(stats, _evaluation(3)).values():
        assert (iv.value, iv.low, iv.high) == (0.0, 0.0, 0.0)


def test_the_interval_is_seeded():
    model, reference = _evaluation(4), _evaluation(5, jitter=12.0)
    first = paired_delta(model, reference, resamples=50, seed=11)
    assert paired_delta(model, reference, resamples=50, seed=11) == first
    assert paired_delta(model, reference, resamples=50, seed=12)["map50_95"] != first["map50_95"]


def test_pairing_follows_image_names_and_refuses_different_images():
    model, reference = _evaluation(6), _evaluation(7)
    order = list(reversed(range(len(reference))))
    shuffled = PerImageStats([reference.images[i] for i in order],
                             *([parts[i] for i in order] for parts in
                               (reference.correct, reference.conf, reference.cls, reference.target_cls)))
    assert paired_delta(model, shuffled, resamples=20) == paired_delta(model, reference, resamples=20)
    other = PerImageStats(["x.jpg", *reference.images[1:]], reference.correct, reference.conf, reference.cls,
                          reference.target_cls)
    with pytest.raises(ValueError, match="different images"):
        paired_delta(model, other)


def test_bench_agrees_with_brute_force_on_real_labels(coco128_dir, tmp_path):
    """bench/bench_bootstrap.py on COCO128's labels, scores rounded so that images hold ties."""
    import json

    from bench import bench_bootstrap

    path = bench_bootstrap.main(["--data-dir", str(coco128_dir), "--copies", "1", "--resamples", "20",
                                 "--results-dir", str(tmp_path)])
    record = json.loads(path.read_text())
    assert record["name"] == "bootstrap_time_ratio" and record["value"] > 0
    extra = record["extra"]
    assert extra["intervals_agree_to_1e-12"] and extra["images"] == 128 and extra["classes"] > 50
    low, high = extra["interval"]["map50_95"]["ci95_low"], extra["interval"]["map50_95"]["ci95_high"]
    assert low < high
