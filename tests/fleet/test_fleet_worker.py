"""fleet.worker: the trigger check sees concept-drift alarms (feedback labels) of the model in service."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from core import signing
from core.bundle import write_bundle
from fleet.concept_drift import ConceptDriftConfig
from fleet.config import default_config
from fleet.registry import Registry, SampleRecord
from fleet.rollout import RolloutPlan
from fleet.worker import FleetWorker, settings_from_config
from tests.plugins.bundles import FILES, make_manifest


def _fleet(tmp_path: Path, *, flipped: set[str]) -> Registry:
    """Four cameras serving digits 2; 3,000 feedback labels, 95 % right; on ``flipped`` cameras the
    operators' label for class 3 becomes 8 after the first 1,000 (the inputs are untouched)."""
    reg = Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    priv, pub = signing.generate_keypair()
    bundle = write_bundle(tmp_path / "digits-2.elb", make_manifest(version="2"), FILES, signing_key=priv)
    model = reg.register_model(bundle, trusted_key=pub, status="accepted")
    for i in range(4):
        reg.devices.upsert(f"cam-{i}", tags={"group": "north" if i < 2 else "south"})
    rng = np.random.default_rng(5)
    t0 = max(model.created, time.time()) + 1
    rows, labels = [], []
    for i in range(3000):
        dev = f"cam-{i % 4}"
        y = int(rng.integers(0, 10))
        pred = str(y if rng.random() < 0.95 else (y + 1) % 10)
        true = "8" if (i >= 1000 and dev in flipped and y == 3) else str(y)
        rows.append(SampleRecord(f"s{i:05d}", dev, t0 + i, f"{dev}/s{i}.bin", 1, received=t0 + i,
                                 model_version="2", prediction=pred))
        labels.append((f"s{i:05d}", true, "feedback"))
    reg.add_samples(rows)
    reg.labels.apply(labels)
    return reg


def _worker(tmp_path: Path, reg: Registry, **trigger: object) -> FleetWorker:
    cfg = dataclasses.replace(default_config(tmp_path / "fleet"), concept=ConceptDriftConfig(horizon=1000, warmup=300))
    settings = settings_from_config(cfg)
    settings = dataclasses.replace(settings, policy=dataclasses.replace(settings.policy, **trigger))
    return FleetWorker(reg, driver=None, settings=settings, plan=RolloutPlan(), model_name="digits")  # type: ignore[arg-type]


def test_the_worker_snapshot_carries_concept_alarms_to_the_trigger(tmp_path: Path) -> None:
    reg = _fleet(tmp_path, flipped={"cam-2", "cam-3"})
    try:
        snap = _worker(tmp_path, reg).snapshot(time.time())
        assert snap is not None and "group:south" in snap.concept_alarms
        assert "group:north" not in snap.concept_alarms
        off = _worker(tmp_path, reg, concept_drift=False).snapshot(time.time())
        assert off is not None and off.concept_alarms == ()  # [trigger].concept_drift = false: not even computed
    finally:
        reg.close()


def test_no_concept_alarm_when_labels_keep_their_meaning(tmp_path: Path) -> None:
    reg = _fleet(tmp_path, flipped=set())
    try:
        snap = _worker(tmp_path, reg).snapshot(time.time())
        assert snap is not None and snap.concept_alarms == ()
    finally:
        reg.close()
