"""The canary judge (pure): statistics, minimum samples, score, and the fallback without a control group."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import ConfigError
from fleet import canary_stats as st
from fleet.canary import CanaryPolicy, GroupData, judge, verdict_line

POL = CanaryPolicy()


def _latencies(rng: np.random.Generator, medians_ms: list[float], per_interval: int,
               spread: float = 0.35) -> tuple[dict[str, int], tuple[float, ...]]:
    """The summed histogram and the per-interval medians of intervals centred on ``medians_ms``."""
    hist = np.zeros(st.LATENCY_BUCKETS, dtype=np.int64)
    p50s = []
    for m in medians_ms:
        lat = rng.lognormal(np.log(m), spread, per_interval)
        hist += st.samples_hist(lat)
        p50s.append(float(np.median(lat)))
    return {str(k): int(v) for k, v in enumerate(hist) if v}, tuple(p50s)


def group(rng: np.random.Generator, *, median_ms: float = 2.0, n: int = 600, intervals: int = 12, errors: int = 0,
          labels: int = 0, accuracy: float = 0.9, windows: int = 10, alarms: int = 0, conf: float = 0.9,
          devices: int = 3) -> GroupData:
    correct = int(round(labels * accuracy))
    # the intervals' own medians wander a little (the device's load)
    hist, p50s = _latencies(rng, list(median_ms * rng.lognormal(0.0, 0.1, intervals)), max(1, n // intervals))
    return GroupData(devices=tuple(f"d{i}" for i in range(devices)), latency_hist=hist, latency_p50s=p50s,
                     hist_devices=devices, attempts=n + errors, errors=errors, feedback_n=labels,
                     feedback_correct=correct, drift_windows=windows, drift_alarms=alarms,
                     confidences=tuple(rng.normal(conf, 0.02, 12).clip(0, 1)))


def test_mann_whitney_matches_the_textbook_on_ties() -> None:
    # scipy.stats.mannwhitneyu(x, y, alternative="greater", method="asymptotic") on these: p = 0.0281
    rng = np.random.default_rng(0)
    x, y = np.round(rng.normal(5, 1, 300), 1), np.round(rng.normal(4.8, 1, 400), 1)
    r = st.mann_whitney_samples(x, y)
    assert r.p_value == pytest.approx(0.028138150367920844, rel=1e-9)
    assert st.mann_whitney_samples(x, y, larger=False).p_value == pytest.approx(0.9718862198652589, rel=1e-9)
    same = st.mann_whitney(np.array([0, 5, 0]), np.array([0, 7, 0]))  # everything tied
    assert same.p_value == 1.0


def test_two_proportions_and_median_ratio() -> None:
    r, (lo, hi) = st.two_proportions(30, 100, 10, 100)
    assert r.p_value < 0.001 and lo < 0.2 < hi and lo > 0
    r, (lo, hi) = st.two_proportions(0, 50, 0, 50)  # rates at 0: no test, a sane interval
    assert r.p_value == 1.0 and lo < 0 < hi
    rng = np.random.default_rng(1)
    a = rng.lognormal(np.log(6.0), 0.3, 500)
    b = rng.lognormal(np.log(2.0), 0.3, 500)
    ratio, lo, hi = st.shift_ratio_ci(a, b)
    assert 2.6 < lo < ratio < hi < 3.4
    assert st.shift_ratio_ci(a, b) == (ratio, lo, hi)  # fixed seed: the same data, the same verdict


def test_good_model_passes_despite_noise_in_both_groups() -> None:
    rng = np.random.default_rng(2)
    # a loaded machine: both groups' latencies are up and noisy, the canary slightly more so
    v = judge(group(rng, median_ms=7.0, labels=60), group(rng, median_ms=6.5, labels=60), POL)
    assert v.decision == "pass" and v.score == 100.0 and v.mode == "control", v.summary()
    lat = v.metrics[0]
    assert lat.metric == "latency" and lat.p_value is not None and lat.interval is not None


@pytest.mark.parametrize("bad, metric", [
    (dict(median_ms=6.0), "latency"),  # 3x slower
    (dict(errors=600), "errors"),  # crashes on every input
    (dict(labels=80, accuracy=0.7), "accuracy"),  # 20 points less accurate
])
def test_bad_model_fails_on_the_critical_metric(bad: dict, metric: str) -> None:
    rng = np.random.default_rng(3)
    v = judge(group(rng, **{"labels": 80, **bad}), group(rng, median_ms=2.0, labels=80), POL)
    assert v.decision == "fail", v.summary()
    (failed,) = [m for m in v.metrics if m.decision == "fail"]
    assert failed.metric == metric and failed.p_value is not None and failed.p_value < POL.alpha
    assert metric in verdict_line([v.to_dict(wave=0)])


def test_minimum_samples_and_optional_metrics() -> None:
    rng = np.random.default_rng(4)
    few = judge(group(rng, n=20), group(rng), POL)  # latency is required: 20 inferences are not enough
    assert few.decision == "inconclusive" and "latency" in few.notes[-1]
    assert next(m for m in few.metrics if m.metric == "latency").decision == "insufficient"
    # few or no labels: accuracy (optional by default) does not vote, and the verdict says so
    some = judge(group(rng, labels=8), group(rng, labels=8), POL)
    assert some.decision == "pass" and next(m for m in some.metrics if m.metric == "accuracy").decision == "skipped"
    assert "not voting, too few samples: accuracy (8 vs 8)" in some.summary()
    # ... unless the few labels so far say the canary is worse: then it waits for more
    worse = judge(group(rng, labels=8, accuracy=0.5), group(rng, labels=8), POL)
    assert worse.decision == "inconclusive" and "accuracy" in worse.notes[-1]
    # ... or the fleet requires labels
    strict = CanaryPolicy(required=("latency", "errors", "accuracy"))
    wait = judge(group(rng, labels=8), group(rng, labels=8), strict)
    assert wait.decision == "inconclusive" and "accuracy" in wait.notes[-1]
    # a crash decides at once, even while other metrics still wait for data
    crash = judge(group(rng, n=150, errors=400, labels=8), group(rng, labels=8), POL)
    assert crash.decision == "fail"


def test_score_marginal_and_before_after() -> None:
    rng = np.random.default_rng(5)
    # drift and confidence are not critical: failing one of four voting metrics -> score 75 = marginal
    v = judge(group(rng, alarms=9, windows=10), group(rng, alarms=0, windows=10), POL)
    assert v.decision == "marginal" and v.score == 75.0, v.summary()
    ba = judge(group(rng), group(rng), POL, mode="before_after")
    assert ba.mode == "before_after" and "no control group" in ba.summary() and "before/after" in ba.summary()
    assert "before/after" in verdict_line([ba.to_dict(wave=2)])


def test_old_agents_without_histograms_vote_with_interval_medians() -> None:
    rng = np.random.default_rng(6)
    old = GroupData(devices=("a",), latency_p50s=tuple(rng.normal(2.0, 0.1, 8)), attempts=500)
    slow = GroupData(devices=("b",), latency_p50s=tuple(rng.normal(6.0, 0.3, 8)), attempts=500)
    v = judge(slow, old, POL)
    lat = v.metrics[0]
    assert lat.decision == "fail" and "per-interval medians" in lat.note


# A loaded machine's bursts: each second's load factor hits every inference of that interval.
BURSTS = [1.0, 1.0, 1.0, 2.0, 4.0]


def _bursty(rng: np.random.Generator, loads: list[float], median_ms: float = 2.0) -> GroupData:
    hist, p50s = _latencies(rng, [median_ms * f for f in loads], 100, spread=0.25)
    return GroupData(devices=("d0", "d1"), latency_hist=hist, latency_p50s=p50s, hist_devices=2,
                     attempts=100 * len(loads))


def test_latency_counts_intervals_not_inferences() -> None:
    """Issue 11: two identical models; the canary's few intervals fell on busier seconds than the control's.
    Inference by inference that is 'x1.6, p < 1e-20'; interval by interval it settles nothing yet."""
    rng = np.random.default_rng(7)
    canary, control = _bursty(rng, [1, 2, 1, 4, 2, 1, 4, 2]), _bursty(rng, [1, 1, 1, 2, 1])
    pooled = st.mann_whitney(st.hist_array(canary.latency_hist), st.hist_array(control.latency_hist))
    assert pooled.p_value < 1e-20  # what the inference-level test said
    lat = judge(canary, control, POL).metrics[0]
    assert lat.decision == "insufficient" and "not settled" in lat.note and lat.n_canary == 8, lat
    # the soak goes on; forty more seconds of the same bursts on both sides, and the good model passes
    more = judge(_bursty(rng, list(rng.choice(BURSTS, 48))), _bursty(rng, list(rng.choice(BURSTS, 45))), POL)
    lat = more.metrics[0]
    assert lat.decision == "pass" and lat.p_value < POL.alpha and "P(canary<x1.5 control)=" in lat.statistic, lat
    # ... while a model three times as slow fails on the same kind of bursts
    slow = judge(_bursty(rng, list(rng.choice(BURSTS, 10)), 6.0), _bursty(rng, list(rng.choice(BURSTS, 10))), POL)
    assert slow.metrics[0].decision == "fail" and slow.decision == "fail", slow.summary()


def test_latency_must_earn_its_pass() -> None:
    """Enough intervals but too noisy to tell: insufficient while the soak may extend, not a pass."""
    rng = np.random.default_rng(8)
    canary, control = _bursty(rng, [1, 4, 1, 4, 1]), _bursty(rng, [4, 1, 4, 1, 1])
    v = judge(canary, control, POL)
    assert v.metrics[0].decision == "insufficient" and v.decision == "inconclusive", v.summary()
    # before/after latency is not critical: it does not hold the verdict up, it just does not vote
    ba = judge(canary, control, POL, mode="before_after")
    assert ba.metrics[0].decision == "skipped" and ba.decision == "pass", ba.summary()


def test_policy_is_checked() -> None:
    with pytest.raises(ConfigError):
        CanaryPolicy(required=("speed",))
    with pytest.raises(ConfigError):
        CanaryPolicy(on_inconclusive="maybe")
    with pytest.raises(ConfigError):
        CanaryPolicy(pass_score=50, marginal_score=60)


def test_every_threshold_is_a_fleet_toml_key() -> None:
    """fleet.toml [rollout] canary_<field> for every CanaryPolicy field, defaults equal (docs/fleet.md)."""
    import dataclasses

    from fleet.config import RolloutConfig, config_from_dict
    from fleet.rollout_driver import plan_from_config

    for f in dataclasses.fields(CanaryPolicy):
        assert getattr(RolloutConfig(), f"canary_{f.name}") == getattr(POL, f.name), f.name
    cfg = config_from_dict({"rollout": {"canary_on_inconclusive": "hold", "canary_required": ["latency"],
                                        "canary_min_feedback": 50}})
    pol = plan_from_config(cfg.rollout).analysis
    assert pol.on_inconclusive == "hold" and pol.required == ("latency",) and pol.min_feedback == 50
