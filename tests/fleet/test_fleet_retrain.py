"""The retraining job: stable stratified split, versions, the gate, and a real fine-tune + export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleet.policy import GatePolicy, RetrainPolicyConfig
from fleet.retrain import gate_verdict, next_version, split_labelled


def test_split_is_stratified_and_stable() -> None:
    ids = [f"s{i}" for i in range(100)]
    labels = [str(i % 4) for i in range(100)]
    tr, ho = split_labelled(ids, labels, 0.3, seed=1)
    assert sorted(tr + ho) == list(range(100)) and not set(tr) & set(ho)
    per_class = {c: sum(1 for i in ho if labels[i] == c) for c in "0123"}
    assert all(2 <= n <= 14 for n in per_class.values()), per_class  # 0.3 * 25 in expectation
    # more samples arrive: every old sample stays on its side
    ids2, labels2 = ids + [f"t{i}" for i in range(40)], labels + [str(i % 4) for i in range(40)]
    tr2, ho2 = split_labelled(ids2, labels2, 0.3, seed=1)
    assert {ids[i] for i in ho} == {ids2[i] for i in ho2 if i < 100}
    assert split_labelled(ids, labels, 0.3, seed=1) == (tr, ho)
    # a class with one sample trains, never holds out
    tr, ho = split_labelled(["a", "b", "c"], ["x", "x", "y"], 0.5)
    assert ho == [0] or ho == [1]
    assert 2 in tr


def test_next_version() -> None:
    assert next_version("1.0.0") == "1.1.0"
    assert next_version("1.0.0", ["1.1.0", "1.2.0"]) == "1.3.0"
    assert next_version("2024-05-01") == "2024-05-01.1"


def test_gate_verdict() -> None:
    gate = GatePolicy(min_improvement=0.02, max_original_drop=0.01)
    status, reason = gate_verdict(gate, 0.60, 0.95, 0.98, 0.975)
    assert status == "accepted" and "0.600 -> 0.950" in reason
    status, reason = gate_verdict(gate, 0.60, 0.61, 0.98, 0.98)
    assert status == "rejected" and "gain +0.010" in reason
    status, reason = gate_verdict(gate, 0.60, 0.95, 0.98, 0.96)
    assert status == "rejected" and "original test accuracy" in reason


# --------------------------------------------------------------------------- a real job


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory: pytest.TempPathFactory, digits_run: Path) -> dict:
    """A registry with digits 1.0.0 accepted, and 200 labelled samples from a shifted camera."""
    from core.sampling import DriftSample, encode_sample
    from core.signing import load_public_key, save_keypair
    from demo.shifts import DEMO_SHIFT
    from export.pipeline import export_run
    from fleet.registry import Registry
    from fleet.samples import SampleStore, sample_record
    from train.api import load_run

    root = tmp_path_factory.mktemp("retrain-fleet")
    keys = save_keypair(root / "keys" / "fleet")
    (root / "bundles").mkdir()
    rep = export_run(digits_run, out=root / "bundles", formats=("onnx",), onnx_precisions=("fp32",),
                     sign_key=keys.private, version="1.0.0", name="digits", max_drop=1.0)
    reg = Registry.open(f"sqlite:///{root / 'fleet.db'}")
    reg.register_model(rep.bundle, trusted_key=load_public_key(keys.public), status="accepted")
    run = load_run(digits_run)
    images, labels = run.images("val")
    rng = np.random.default_rng(0)
    shifted = DEMO_SHIFT.apply(images[:200], rng)
    store = SampleStore(root / "samples")
    recs = []
    for i, (img, _y) in enumerate(zip(shifted, labels[:200], strict=True)):
        s = DriftSample(f"cam-1-{i}", "cam-1", 1000.0 + i, "1.0.0", 0, 0.4, 1.0, "low_confidence", img)
        rec = sample_record(store, "cam-1", s.sample_id, encode_sample(s), {}, received=1000.0 + i)
        recs.append(rec)
    reg.add_samples(recs)
    reg.label_samples([(r.id, run.labels[int(y)], "operator") for r, y in zip(recs, labels[:200], strict=True)])
    return {"root": root, "registry": reg, "keys": keys, "runs_dir": digits_run.parent}


@pytest.mark.slow
def test_retrain_gate_rejects_a_candidate_that_misses_the_margin(fleet_dir: dict) -> None:
    """The candidate improves a lot on the shifted camera, but the margin asked for is impossible:
    it is rejected, and stays in the registry with its metrics and the reason."""
    from fleet.retrain import RetrainSettings, run_retrain

    root, reg = fleet_dir["root"], fleet_dir["registry"]
    policy = RetrainPolicyConfig(fine_tune_epochs=3, gate=GatePolicy(min_improvement=1.0, min_holdout=20))
    settings = RetrainSettings(runs_dir=fleet_dir["runs_dir"], bundles_dir=root / "bundles",
                               samples_dir=root / "samples", signing_key=fleet_dir["keys"].private,
                               public_key=fleet_dir["keys"].public, policy=policy, threads=2)
    out = run_retrain(reg, settings, "digits", trigger="labels")
    assert out.status == "rejected" and "gain" in out.reason
    assert out.n_labelled == 200 and 40 <= out.n_holdout <= 80 and out.n_train == 200 - out.n_holdout
    # the fine-tune learned the shifted camera: held-out accuracy went well up
    assert out.holdout_candidate is not None and out.holdout_current is not None
    assert out.holdout_candidate - out.holdout_current > 0.15
    assert out.test_candidate is not None and out.test_candidate > 0.9
    rec = reg.model("digits", "1.1.0")
    assert rec is not None and rec.status == "rejected" and rec.reason == out.reason
    assert rec.parent_version == "1.0.0" and rec.lineage["trigger"] == "labels"
    assert rec.metrics["gate"]["passed"] is False
    assert len(rec.lineage["samples"]["holdout"]) == out.n_holdout
    # the model in service is unchanged
    assert reg.latest_model("digits").version == "1.0.0"
