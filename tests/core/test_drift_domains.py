"""core.drift_domains: one baseline per known domain, a window alarms only when it matches none (issue 11 §2);
the manifest's ``drift_domains`` through a signed bundle and into the agent's monitor."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from core.bundle import open_bundle, write_bundle
from core.drift import DriftMonitor, calibrate
from core.drift_domains import DomainDriftMonitor, DomainDriftReport, drift_monitor
from core.errors import BundleError, InputError
from tests.core.test_drift_features import _classes
from tests.plugins.bundles import make_manifest

W = 25
ADAPTED = {"shift": 2.5, "gain": 0.6}  # the domain a retrained model was adapted to: darker, embeddings moved


def _domain(rng: np.random.Generator, n: int, name: str):
    if name == "clean":
        return _classes(rng, n)
    if name == "adapted":
        return _classes(rng, n, **ADAPTED)
    return _classes(rng, n, shift=-2.5, gain=1.0)  # a third shift, unlike either


@pytest.fixture(scope="module")
def domains():
    rng = np.random.default_rng(11)
    return {name: calibrate(_domain(rng, 300, name), _domain(rng, 300, name), windows=(W,), n_boot=800, seed=i)
            for i, name in enumerate(("clean", "adapted"))}


@pytest.mark.parametrize("name", ["clean", "adapted"])
def test_pure_windows_of_either_domain_stay_within_the_budget(domains, name: str) -> None:
    rng = np.random.default_rng(21)
    reps = DomainDriftMonitor(domains, window=W).update(_domain(rng, W * 400, name))
    assert len(reps) == 400 and all(isinstance(r, DomainDriftReport) for r in reps)
    # budgets: alarm 0.5 %, input 1 %; margins for 400 windows and 300 calibration images
    assert np.mean([r.alarm for r in reps]) <= 0.03
    assert np.mean([r.input_shift for r in reps]) <= 0.04
    assert np.mean([r.domain == name for r in reps]) > 0.95  # the report names the domain it matched
    r = reps[0]
    assert [d for d, _, _ in r.domain_risks] == ["clean", "adapted"]
    assert (r.risk > r.risk_threshold) == r.risk_flag and (r.input_score > r.input_threshold) == r.input_shift
    other = "adapted" if name == "clean" else "clean"  # the other domain's baseline alone alarms: why AND
    alone = DriftMonitor(domains[other], window=W).update(_domain(rng, W * 40, name))
    assert np.mean([x.alarm for x in alone]) > 0.9


def test_a_window_of_no_known_domain_alarms(domains) -> None:
    reps = DomainDriftMonitor(domains, window=W).update(_domain(np.random.default_rng(22), W * 40, "third"))
    assert np.mean([r.risk_flag for r in reps]) > 0.9 and np.mean([r.alarm for r in reps]) > 0.9
    assert reps[-1].to_dict()["domain"] in ("clean", "adapted")


def test_background_gives_the_synchronous_reports(domains) -> None:
    rng = np.random.default_rng(23)
    parts = [_domain(rng, W * 3 + 7, name) for name in ("clean", "third", "adapted", "third", "clean")]
    sync = DomainDriftMonitor(domains, window=W)
    want = [r for f in parts for r in sync.update(f)]
    got: list = []
    bg = DomainDriftMonitor(domains, window=W, background=True, on_report=got.append)
    for f in parts:
        for i in range(f.n):
            assert bg.append(f.inputs[i:i + 1], f.probs[i:i + 1], f.embedding[i:i + 1]) == []
    assert bg.flush(timeout=60)
    bg.close()
    assert len(got) == len(want) > 10 and any(r.alarm for r in want) and not all(r.alarm for r in want)
    assert [r.to_dict() for r in got] == [r.to_dict() for r in want]
    assert bg.alarm == sync.alarm


def test_one_baseline_is_the_plain_monitor(domains) -> None:
    clean = domains["clean"]
    assert type(drift_monitor({"default": clean}, window=W)) is DriftMonitor
    f = _domain(np.random.default_rng(24), W * 30, "adapted")
    plain = DriftMonitor(clean, window=W).update(f)
    wrapped = DomainDriftMonitor({"default": clean}, window=W).update(f)
    strip = ("domain", "domain_risks")
    assert [{k: v for k, v in r.to_dict().items() if k not in strip} for r in wrapped] == [r.to_dict() for r in plain]
    x = f.embedding[:5]
    assert np.allclose(DomainDriftMonitor(domains, window=W).score_samples(x),
                       np.minimum(*(DriftMonitor(b, window=W).score_samples(x) for b in domains.values())))


def test_a_domain_without_the_window_is_refused_or_left_out(domains, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(25)
    small = calibrate(_domain(rng, 150, "adapted"), _domain(rng, 150, "adapted"), windows=(10,), n_boot=200)
    with pytest.raises(InputError, match="'small' is not calibrated for window 25") as info:
        DomainDriftMonitor({"clean": domains["clean"], "small": small}, window=W)
    assert "\n" not in str(info.value)
    with caplog.at_level(logging.WARNING):
        mon = drift_monitor({"clean": domains["clean"], "small": small, "adapted": domains["adapted"]}, window=W)
    assert isinstance(mon, DomainDriftMonitor) and mon.names == ("clean", "adapted")
    assert "small left out" in caplog.text


def test_manifest_drift_domains_round_trip_and_are_checked() -> None:
    plain = make_manifest()
    assert "drift_domains" not in plain.to_dict()  # manifests without domains are what they were
    m = make_manifest(drift_domains={"adapted": "baselines/adapted.npz"})
    assert type(m).from_dict(json.loads(json.dumps(m.to_dict()))) == m
    for bad in ({"default": "baselines/x.npz"}, {"x": "../x.npz"}, {"x": "baseline.npz"}, {"": "b.npz"}):
        with pytest.raises(BundleError, match="drift_domains"):
            make_manifest(drift_domains=bad)


def _inverted_baseline() -> bytes:
    """A baseline of the tiny MLP for inverted digits (a domain of its own), calibrated as ``baseline_bytes``."""
    from core.drift import compute_baseline
    from edge_agent.inference import softmax
    from tests.plugins.agent_kit import _forward, _prep, digits

    x = _prep(255 - digits().train_x)
    logits, emb = _forward(x)
    probs, half = softmax(logits), len(x) // 2
    return compute_baseline(x[:half], probs[:half], emb[:half], x[half:], probs[half:], emb[half:],
                            window=(50, 100), n_boot=300, seed=0).to_bytes()


def test_a_two_domain_bundle_round_trips_into_the_agents_monitor(tmp_path: Path) -> None:
    from core.signing import load_private_key
    from edge_agent.inference import InferencePipeline, LoadedModel
    from edge_agent.telemetry import InferenceStats
    from tests.plugins.agent_kit import digits, keys, make_bundle

    src = open_bundle(make_bundle(tmp_path / "plain.elb"), trusted_key=keys().public)
    m = dataclasses.replace(src.manifest, drift_domains={"inverted": "baselines/inverted.npz"})
    files: dict[str, bytes] = {n: src.read(n) for n in m.members if n != "labels.txt"}
    with pytest.raises(BundleError, match="baselines/inverted.npz"):
        write_bundle(tmp_path / "missing.elb", m, files)
    files["baselines/inverted.npz"] = _inverted_baseline()
    path = write_bundle(tmp_path / "two.elb", m, files, signing_key=load_private_key(keys().private))
    bundle = open_bundle(path, trusted_key=keys().public)
    assert bundle.manifest.drift_domains == {"inverted": "baselines/inverted.npz"}
    assert "baselines/inverted.npz" in bundle.manifest.members  # hashed, so under the signature
    model = LoadedModel(bundle.extract_to(tmp_path / "slot"), "onnx-fp32")
    try:
        mon = model.monitor
        assert isinstance(mon, DomainDriftMonitor) and mon.names == ("default", "inverted")
        assert model.baseline is mon.baseline  # the default domain's (sample-score threshold, windows)
        got: list = []
        pipe = InferencePipeline(model, stats=InferenceStats(), on_report=lambda rep, _m: got.append(rep))
        for img in 255 - digits().test_x[: 2 * mon.window]:  # a camera that shows inverted digits only
            pipe.predict(img)
        assert model.flush_drift(timeout=60)
        assert len(got) == 2 and all(r.domain == "inverted" and not r.alarm for r in got)
    finally:
        model.close()
