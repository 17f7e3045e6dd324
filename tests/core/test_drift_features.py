"""core.drift for every task: class-mix invariance, models without an embedding, detection and tensor
outputs, window sizes the held-out data is too small for, and the combination statistics (no torch)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from core import drift_stats as st
from core.drift import DriftFeatures, DriftMonitor, calibrate, calibration_summary
from core.drift_calibrate import calibrate_heldout
from core.drift_features import detection_summary, tensor_summary, thumb_shape, thumbnail
from core.errors import DataError, InputError

K, D = 5, 6
CENTRES = np.random.default_rng(99).normal(scale=3.0, size=(K, D))
PATTERNS = np.random.default_rng(98).uniform(0.2, 0.8, size=(K, 1, 8, 8)).astype(np.float32)


def _classes(rng: np.random.Generator, n: int, *, shift: float = 0.0, classes: tuple[int, ...] = tuple(range(K)),
             gain: float = 1.0, with_emb: bool = True) -> DriftFeatures:
    """A toy classifier's features: per-class embedding clusters and image patterns.

    ``shift`` moves embeddings within their class (covariate shift the model feels),
    ``gain`` darkens the images, ``classes`` restricts the class mix (label shift).
    """
    y = rng.choice(classes, size=n)
    emb = CENTRES[y] + rng.normal(size=(n, D)) + shift
    logits = -0.5 * ((emb[:, None, :] - CENTRES[None]) ** 2).sum(-1)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    x = np.clip(PATTERNS[y] + rng.normal(scale=0.1, size=(n, 1, 8, 8)), 0, 1).astype(np.float32) * gain
    return DriftFeatures(inputs=x, probs=probs, embedding=emb if with_emb else None)


@pytest.fixture(scope="module")
def class_baseline():
    rng = np.random.default_rng(1)
    return calibrate(_classes(rng, 300), _classes(rng, 300), windows=(25,), n_boot=800)


def test_class_mix_change_is_a_signal_not_an_alarm(class_baseline) -> None:
    rng = np.random.default_rng(2)
    mon = DriftMonitor(class_baseline, window=25)
    reps = mon.update(_classes(rng, 25 * 200, classes=(0, 1)))
    assert np.mean([r.class_shift for r in reps]) > 0.9  # the mix change is reported ...
    # ... and the model is not said to be at risk (an unconditional MMD flagged ~all of these windows)
    assert np.mean([r.alarm for r in reps]) <= 0.03
    assert reps[0].class_counts[2:] == (0, 0, 0)
    shifted = DriftMonitor(class_baseline, window=25).update(_classes(rng, 25 * 20, classes=(0, 1), shift=1.5))
    assert np.mean([r.alarm for r in shifted]) > 0.9


def test_false_alarms_follow_the_budget(class_baseline) -> None:
    rng = np.random.default_rng(3)
    reps = DriftMonitor(class_baseline, window=25).update(_classes(rng, 25 * 600))
    # budget 1 % for "input changed", 0.5 % for the alarm; margins for 600 windows and 300 calibration images
    assert np.mean([r.input_shift for r in reps]) <= 0.04
    assert np.mean([r.alarm for r in reps]) <= 0.03
    summary = calibration_summary(class_baseline)["per_window"]["25"]
    lo, hi = summary["input_ci95"]
    assert lo < 0.01 < hi and summary["input_sd_calibration"] >= 0.0


def test_mild_darkening_is_seen_by_the_input_tests(class_baseline) -> None:
    rng = np.random.default_rng(4)
    reps = DriftMonitor(class_baseline, window=25).update(_classes(rng, 25 * 100, gain=0.95))
    assert np.mean([r.input_shift for r in reps]) > 0.6  # the digits benchmark measures the real target


def test_model_without_embedding_gets_drift_detection() -> None:
    rng = np.random.default_rng(5)
    b = calibrate(_classes(rng, 200, with_emb=False), _classes(rng, 200, with_emb=False), windows=(25,), n_boot=500)
    assert "embedding" not in b.kinds and "confidence_ks" in b.tests
    mon = DriftMonitor(b)
    clean = mon.update(_classes(rng, 25 * 100, with_emb=False))
    assert np.mean([r.alarm for r in clean]) <= 0.05
    shifted = mon.update(_classes(rng, 25 * 20, shift=5.0, with_emb=False))
    assert np.mean([r.alarm for r in shifted]) >= 0.8


def _frames(rng: np.random.Generator, n: int, *, lam: float = 3.0, score: float = 0.8) -> DriftFeatures:
    scores = [np.clip(rng.normal(score, 0.05, size=rng.poisson(lam)), 0, 1) for _ in range(n)]
    boxes = []
    for s in scores:
        xy = rng.uniform(0, 0.7, size=(len(s), 2))
        boxes.append(np.concatenate([xy, xy + rng.uniform(0.1, 0.3, size=(len(s), 2))], axis=1))
    x = rng.uniform(0, 1, size=(n, 3, 64, 48)).astype(np.float32)
    return DriftFeatures(inputs=x, outputs=detection_summary(scores, boxes, min_score=0.3))


def test_detector_outputs_drive_the_alarm() -> None:
    rng = np.random.default_rng(6)
    b = calibrate(_frames(rng, 200), _frames(rng, 200), windows=(25,), n_boot=500)
    assert b.tests[-2:] == ("output_ks", "output_z") and "embedding_mmd" not in b.tests
    assert b.input_shape == (3, 64, 48)
    mon = DriftMonitor(b)
    assert np.mean([r.alarm for r in mon.update(_frames(rng, 25 * 80))]) <= 0.05
    low = mon.update(_frames(rng, 25 * 10, score=0.6))  # the detector grows unsure
    assert np.mean([r.alarm for r in low]) > 0.8 and not low[-1].input_shift
    with pytest.raises(InputError, match="outputs"):
        mon.update(DriftFeatures(inputs=np.zeros((1, 3, 64, 48), np.float32)))


def test_tensor_model_inputs_and_outputs() -> None:
    rng = np.random.default_rng(7)

    def batch(n: int, scale: float = 1.0) -> DriftFeatures:
        t = rng.normal(size=(n, 40, 3)) * scale
        return DriftFeatures(inputs=t, outputs=tensor_summary(t.sum(axis=2)))

    b = calibrate(batch(200), batch(200), windows=(25,), n_boot=500)
    mon = DriftMonitor(b)
    assert np.mean([r.alarm for r in mon.update(batch(25 * 60))]) <= 0.05
    assert np.mean([r.input_shift and r.alarm for r in mon.update(batch(25 * 10, scale=1.6))]) > 0.8


def test_window_too_large_for_the_held_out_set_is_skipped_and_explained() -> None:
    rng = np.random.default_rng(8)
    b = calibrate_heldout(_classes(rng, 240), windows=(25, 50, 100), n_boot=300)
    assert b.windows == (25, 50) and b.default_window == 50
    assert calibration_summary(b)["skipped"] == {"100": {"calibration_images_needed": 200}}
    with pytest.raises(InputError, match="needs 200"):
        DriftMonitor(b, window=100)
    with pytest.raises(InputError, match=r"\[25, 50\]"):
        DriftMonitor(b, window=30)
    with pytest.raises(DataError, match="hold out at least"):
        calibrate_heldout(_classes(rng, 40), windows=(25,), n_boot=100)


def test_thumbnails_bound_per_inference_work() -> None:
    x = np.random.default_rng(9).uniform(size=(2, 3, 224, 224)).astype(np.float32)
    t = thumbnail(x)
    assert t.shape == (2, *thumb_shape((3, 224, 224))) == (2, 3, 32, 32)
    np.testing.assert_allclose(t[0, 0, 0, 0], x[0, 0, :7, :7].mean(), rtol=1e-5)
    small = np.zeros((1, 1, 28, 28), np.float32)
    assert thumbnail(small) is not None and thumbnail(small).shape == (1, 1, 28, 28)


def test_combination_statistics_match_scipy() -> None:
    rng = np.random.default_rng(10)
    u = rng.uniform(size=(4, 30))
    for row in u:
        assert st.ks_uniform(row) == pytest.approx(stats.kstest(row, "uniform").statistic, abs=1e-12)
    p = np.array([[0.5, 0.2, 0.01], [0.9, 0.8, 0.7]])
    t = np.tan((0.5 - p) * np.pi).mean(axis=1)
    np.testing.assert_allclose(st.cauchy_combine(p), -np.log10(stats.cauchy.sf(t)), rtol=1e-9)
    null = np.sort(rng.normal(size=(99, 2)), axis=0)
    ps = st.empirical_pvalues(np.array([[null[-1, 0] + 1, null[0, 1] - 1]]), null)
    assert ps[0, 0] < 0.01 and ps[0, 1] == 1.0  # beyond every null draw: extrapolated tail, not 1 / (n + 1)


def test_class_reweighted_mmd_is_unbiased_under_label_shift() -> None:
    rng = np.random.default_rng(11)
    centres = rng.normal(scale=2.0, size=(3, 4))
    ref_y = rng.integers(0, 3, 300)
    ref = centres[ref_y] + rng.normal(size=(300, 4))
    gamma = 0.2
    kern = np.exp(-gamma * st.sq_distances(ref, ref))
    np.fill_diagonal(kern, 0.0)
    onehot = np.eye(3)[ref_y]
    cnt = onehot.sum(0)
    m = (onehot.T @ kern @ onehot) / (np.outer(cnt, cnt) - np.diag(cnt))
    vals = []
    for _ in range(300):
        y = rng.choice([0, 0, 0, 1], size=20)  # a skewed mix, class 2 absent
        x = centres[y] + rng.normal(size=(20, 4))
        kw = np.exp(-gamma * st.sq_distances(x, x))
        within = (kw.sum() - 20) / (20 * 19)
        kr = (np.exp(-gamma * st.sq_distances(x, ref)) @ (onehot / cnt)).mean(0)
        vals.append(st.class_mmd2(np.array([within]), kr[None], np.bincount(y, minlength=3)[None] * 1.0, m)[0])
    vals = np.array(vals)
    assert abs(vals.mean()) < 3 * vals.std() / np.sqrt(len(vals)) + 1e-3


def _bars(rng: np.random.Generator, n: int, degrees: float = 0.0) -> DriftFeatures:
    """Oriented strokes, one angle per class (+- 4 degrees of 'handwriting'), optionally all tilted by ``degrees``."""
    from scipy import ndimage

    y = rng.integers(0, 4, n)
    x = np.zeros((n, 1, 16, 16), np.float32)
    for i in range(n):
        img = np.zeros((16, 16), np.float32)
        img[3:13, 7:9] = 1.0
        img = ndimage.rotate(img, 40.0 * y[i] + rng.normal(scale=4.0) + degrees, reshape=False, order=1)
        x[i, 0] = img + rng.normal(scale=0.05, size=(16, 16))
    probs = np.full((n, 4), 0.02)
    probs[np.arange(n), y] = 0.94
    return DriftFeatures(inputs=x, probs=probs)


def test_small_rotation_is_seen_by_the_class_template_tangent() -> None:
    rng = np.random.default_rng(11)
    b = calibrate(_bars(rng, 200), _bars(rng, 200), windows=(25,), n_boot=600)
    assert {"image_rotation", "image_shift"} <= set(b.tests)
    quiet = DriftMonitor(b, window=25).update(_bars(rng, 25 * 40))
    tilted = DriftMonitor(b, window=25).update(_bars(rng, 25 * 40, degrees=5.0))
    assert np.mean([r.test("image_rotation").flag for r in quiet]) <= 0.1
    # 5 degrees against 4 degrees of per-image spread: the class-blind tests barely move, the tangent does
    assert np.mean([r.test("image_rotation").flag for r in tilted]) > 0.8
    assert np.mean([r.input_shift for r in tilted]) > 0.5  # combined with 6 other tests (digits: see the bench)


def test_a_baseline_without_class_templates_still_runs(class_baseline) -> None:
    import dataclasses

    keep = [i for i, t in enumerate(class_baseline.tests) if t not in ("image_rotation", "image_shift")]
    old = dataclasses.replace(class_baseline, tangent_mean=None, tangent_sd=None, tangent_slot=None, knn_ref=None,
                              null=class_baseline.null[:, :, keep])
    from core.drift import Baseline

    old = Baseline.load(old.to_bytes())
    assert "image_rotation" not in old.tests
    reps = DriftMonitor(old, window=25).update(_classes(np.random.default_rng(12), 25 * 4))
    assert len(reps) == 4 and "image_rotation" not in {t.name for t in reps[0].tests}


def test_drift_budgets_in_the_agent_config(class_baseline) -> None:
    from core.agent_config import parse_config
    from core.errors import ConfigError

    dev = {"agent": {"allow_unsigned": True}}
    cfg = parse_config({**dev, "drift": {"window": 25, "input_budget": 0.05, "alarm_rate": 0.02}})
    assert (cfg.drift.input_budget, cfg.drift.alarm_budget) == (0.05, 0.02)  # alarm_rate: the monitor's name
    assert parse_config(dev).drift.input_budget == 0.0  # 0: the bundle's calibrated budget
    with pytest.raises(ConfigError, match="input_budget"):
        parse_config({**dev, "drift": {"input_budget": 0.7}})
    # what the agent does with them: the monitor's thresholds for that budget, from the same calibrated null
    loose = DriftMonitor(class_baseline, window=25, input_budget=cfg.drift.input_budget,
                         alarm_rate=cfg.drift.alarm_budget)
    strict = DriftMonitor(class_baseline, window=25)
    assert loose.input_threshold < strict.input_threshold and loose.risk_threshold < strict.risk_threshold
