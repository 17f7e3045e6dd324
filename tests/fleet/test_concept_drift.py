"""fleet.concept_drift: calibrated CUSUM on feedback errors, per slice; concept drift vs input drift."""

from __future__ import annotations

import numpy as np

from core.drift import DriftFeatures, DriftMonitor, calibrate
from fleet.concept_drift import ConceptDriftConfig, ConceptDriftTracker, ErrorCusum, cusum_threshold


def test_cusum_false_alarm_rate_is_the_budget() -> None:
    cfg = ConceptDriftConfig(budget=0.05, horizon=300, warmup=10, reference_error=0.05)
    rng = np.random.default_rng(0)
    fired = 0
    for _ in range(400):
        c = ErrorCusum(cfg)
        fired += any(c.update(bool(e)) for e in rng.random(300) < 0.05)
    assert 0.02 <= fired / 400 <= 0.09  # 5 % budget, 400 streams
    assert cusum_threshold(0.05, 0.1, 300, 0.01) > cusum_threshold(0.05, 0.1, 300, 0.05)


def _stream(rng: np.random.Generator, n: int, flipped: set[str]) -> list[tuple[str, str, str, str]]:
    """(device, group, true, predicted): a 97 %-accurate model; on flipped devices class 3 is now labelled 8."""
    out = []
    for _ in range(n):
        dev = f"cam-{rng.integers(6)}"
        y = str(rng.integers(10))
        pred = y if rng.random() < 0.97 else str(rng.integers(10))
        true = "8" if (dev in flipped and y == "3") else y
        out.append((dev, "north" if dev < "cam-3" else "south", true, pred))
    return out


def test_label_mapping_flip_fires_concept_drift_but_not_input_drift() -> None:
    rng = np.random.default_rng(1)
    tracker = ConceptDriftTracker(ConceptDriftConfig(horizon=2000))
    for dev, group, true, pred in _stream(rng, 3000, set()):
        tracker.update(dev, true, pred, group=group)
    assert tracker.alarms() == []
    for dev, group, true, pred in _stream(rng, 8000, {"cam-4", "cam-5"}):
        tracker.update(dev, true, pred, group=group)
    alarms = tracker.alarms()
    assert {"device:cam-4", "device:cam-5", "group:south"} <= set(alarms)
    assert not any(a in alarms for a in ("device:cam-0", "device:cam-1", "device:cam-2", "group:north"))
    snap = {s.slice: s for s in tracker.snapshot()}
    assert snap["device:cam-4"].accuracy < snap["device:cam-0"].accuracy

    # The inputs are untouched, so the input-drift monitor stays quiet on the same cameras.
    def feats(n: int) -> DriftFeatures:
        y = rng.integers(0, 4, n)
        emb = np.eye(4)[y] * 3 + rng.normal(size=(n, 4))
        p = np.exp(emb)
        return DriftFeatures(inputs=rng.uniform(size=(n, 1, 8, 8)).astype(np.float32), probs=p / p.sum(1, keepdims=True),
                             embedding=emb)

    mon = DriftMonitor(calibrate(feats(200), feats(200), windows=(25,), n_boot=400))
    assert np.mean([r.alarm for r in mon.update(feats(25 * 100))]) <= 0.05
