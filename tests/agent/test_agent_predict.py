"""Agent.predict and `edgeloop agent predict`: real ONNX Runtime on a real signed bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.errors import EdgeloopError, InputError
from edge_agent.agent import Agent
from tests.plugins.agent_kit import agent_config, digits


@pytest.fixture()
def agent(tmp_path: Path, tiny_bundles: dict[str, Path]) -> Agent:
    a = Agent(agent_config(tmp_path / "state")).start()
    a.install(tiny_bundles["v1"])
    yield a
    a.close()


def test_predict_matches_labels_and_reports_everything(agent: Agent) -> None:
    d = digits()
    preds = [agent.predict(img) for img in d.test_x[:200]]
    acc = np.mean([p.index for p in preds] == d.test_y[:200])
    assert acc > 0.9
    p = preds[0]
    assert p.label == str(p.index) and p.model_version == "1.0.0" and p.variant == "onnx-fp32"
    assert 0.0 < p.confidence <= 1.0 and abs(sum(p.probs) - 1.0) < 1e-4
    assert p.latency_ms > 0 and p.drift_alarm is False
    assert any(q.sample_score is not None for q in preds)  # scored at most [sampling] score_rate times a second
    assert agent.stats.snapshot().inferences == 200


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((8, 8, 2), np.uint8), r"shape \(8, 8, 2\)"),  # wrong channel count
        (np.zeros((2, 3, 8, 8), np.uint8), r"shape \(2, 3, 8, 8\)"),  # a batch / tensor, not an image
        (np.array([["a", "b"]]), "dtype"),  # wrong dtype
        (np.full((8, 8), 300.0), r"values in \[300, 300\]"),  # not raw pixels
        (b"not an array", "takes an image array"),
    ],
)
def test_wrong_input_is_a_clear_error_and_the_agent_keeps_serving(agent: Agent, bad: object, message: str) -> None:
    img = digits().test_x[0]
    before = agent.predict(img)
    with pytest.raises(InputError, match=message) as info:
        agent.predict(bad)
    assert "\n" not in str(info.value)
    after = agent.predict(img)
    assert after.index == before.index and after.probs == pytest.approx(before.probs)
    assert agent.stats.snapshot().errors == 1


def test_other_sizes_resize_unless_strict(tmp_path: Path, tiny_bundles: dict[str, Path]) -> None:
    img = np.kron(digits().test_x[0], np.ones((4, 4), np.uint8))  # 32x32: the camera sees bigger frames
    with Agent(agent_config(tmp_path / "a")).start() as a:
        a.install(tiny_bundles["v1"])
        assert a.predict(img).index == a.predict(digits().test_x[0]).index
    with Agent(agent_config(tmp_path / "b", model={"strict_size": True})).start() as a:
        a.install(tiny_bundles["v1"])
        with pytest.raises(InputError, match="image is 32x32; this model takes 8x8"):
            a.predict(img)
        assert a.predict(digits().test_x[0]).model_version == "1.0.0"


def test_predict_without_model_says_how_to_install(tmp_path: Path) -> None:
    with Agent(agent_config(tmp_path / "s")).start() as a:
        with pytest.raises(EdgeloopError, match="no model is installed") as info:
            a.predict(digits().test_x[0])
        assert "edgeloop agent install" in str(info.value)


def _config_file(tmp_path: Path, state: Path) -> Path:
    from tests.plugins.agent_kit import keys

    p = tmp_path / "agent.toml"
    p.write_text(f'[agent]\ndevice_id = "cli-dev"\nstate_dir = "{state}"\ntrusted_key = "{keys().public}"\n'
                 '[broker]\nenabled = false\n[http]\nenabled = false\n[model]\nbenchmark_runs = 3\n'
                 '[update]\nmin_free_mb = 0.0\n')
    return p


def test_cli_install_predict_file_and_folder(tmp_path: Path, tiny_bundles: dict[str, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from edgeloop.cli import main

    cfg = _config_file(tmp_path, tmp_path / "state")
    assert main(["agent", "install", "-c", str(cfg), str(tiny_bundles["v1"]), "--json"]) == 0
    installed = json.loads(capsys.readouterr().out)
    assert installed["version"] == "1.0.0" and installed["choice"]["variant"] == "onnx-fp32"

    d = digits()
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        np.save(folder / f"img{i}.npy", d.test_x[i])
    assert main(["agent", "predict", "-c", str(cfg), str(folder / "img0.npy"), "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["index"] == int(d.test_y[0]) or one["confidence"] < 0.9
    assert main(["agent", "predict", "-c", str(cfg), str(folder), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["file"]).name for r in rows] == [f"img{i}.npy" for i in range(5)]
    assert rows[0]["probs"] == pytest.approx(one["probs"])

    np.save(folder / "img9.npy", np.zeros((8, 8, 2), np.uint8))  # one bad file: reported, the rest served
    assert main(["agent", "predict", "-c", str(cfg), str(folder), "--json"]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 6 and "error" in rows[-1] and "label" in rows[0]

    assert main(["agent", "status", "-c", str(cfg), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["model_version"] == "1.0.0" and st["choice"]["mode"] == "auto"
    assert st["choice"]["latency_ms"]["onnx-fp32"] > 0


def test_an_older_drift_baseline_is_served_without_drift_and_windows_are_never_swapped(
        agent: Agent, tmp_path: Path) -> None:
    import shutil

    from edge_agent.inference import LoadedModel

    slot = agent.model.slot_dir
    old = tmp_path / "old-slot"
    shutil.copytree(slot, old)
    manifest = json.loads((old / "manifest.json").read_text())
    np.savez(old / manifest["baseline"], schema_version=np.array(1))  # what an older export wrote
    m = LoadedModel(old, agent.model.variant.id)
    try:  # the bundle still serves; drift is off, with a warning in the log
        assert m.monitor is None and m.predict_result(digits().test_x[0]) is not None
    finally:
        m.close()
    calibrated = agent.model.baseline.windows
    other = next(w for w in (10, 20, 30, 40) if w not in calibrated)
    with pytest.raises(InputError, match="calibrated"):
        LoadedModel(slot, agent.model.variant.id, drift_window=other)
    # agent.toml's [drift] budgets reach the monitor (0: the bundle's), a rate outside (0, 0.5) is refused
    m = LoadedModel(slot, agent.model.variant.id, drift_budgets=(0.05, 0.02))
    try:
        assert m.monitor is not None and (m.monitor.input_budget, m.monitor.alarm_rate) == (0.05, 0.02)
    finally:
        m.close()
    with pytest.raises(InputError, match="out of range"):
        LoadedModel(slot, agent.model.variant.id, drift_budgets=(0.7, 0.0))


def test_serving_path_gives_the_plain_path_and_windows_close_on_their_thread(agent: Agent) -> None:
    """prepare_serving / run_trusted / DriftMonitor.append give what prepare / run_outputs / update give:
    the same answers, and window for window the same drift reports (closed on the monitor's own thread)."""
    from core.drift import DriftMonitor
    from core.drift_baseline import probs_embedding

    model = agent.model
    assert model is not None and model.monitor is not None
    sync = DriftMonitor(model.baseline, window=model.monitor.window)
    got: list = []
    agent.pipeline.on_report = lambda rep, m: got.append(rep)
    want = []
    imgs = digits().test_x[: 2 * model.monitor.window + 3]
    agent.pipeline.score_interval_s = 0.0  # every input scored, as [sampling] score_rate = 0 does
    for img in imgs:
        p = agent.predict(img)
        plain = model.task.prepare(img)
        outs = model.task.run(plain)
        res = model.task.decode(outs, plain)
        assert (p.index, p.probs) == (res.index, res.probs)
        feats = model.task.drift_features(plain, outs, res)
        want += sync.update(feats)
        emb = feats.embedding if "embedding" in sync.kinds else probs_embedding(feats.probs)
        assert p.sample_score == pytest.approx(float(sync.score_samples(emb)[0]), rel=1e-9)
    assert model.flush_drift(timeout=60)
    assert [r.to_dict() for r in got] == [r.to_dict() for r in want] and len(want) == 2
    assert agent.pipeline.last_report is not None and agent.pipeline.last_report.to_dict() == want[-1].to_dict()
    assert model.monitor.buffered == 3
    agent.pipeline.score_interval_s = 1.0 / 30.0


def test_inputs_are_scored_at_the_configured_rate_and_windows_still_see_every_input(agent: Agent) -> None:
    """``[sampling] score_rate``: one input per interval gets its drift score; the drift window
    still counts every input (its statistics are computed per window, not per input)."""
    model = agent.model
    assert model is not None and model.monitor is not None
    assert agent.pipeline.score_interval_s == pytest.approx(1.0 / 30.0)  # the default, 30 inputs a second
    before = model.monitor.buffered
    agent.pipeline.score_interval_s, agent.pipeline._next_score = 3600.0, 0.0
    try:
        preds = [agent.predict(img) for img in digits().test_x[:12]]
    finally:
        agent.pipeline.score_interval_s = 1.0 / 30.0
    assert preds[0].sample_score is not None and all(p.sample_score is None for p in preds[1:])
    assert preds[0].to_dict()["sample_score"] is not None and preds[1].to_dict()["sample_score"] is None
    assert model.monitor.buffered == (before + 12) % model.monitor.window


def test_a_closed_background_monitor_drops_windows_and_never_blocks(agent: Agent) -> None:
    from core.drift import DriftMonitor

    model = agent.model
    assert model is not None and model.monitor is not None
    got: list = []
    mon = DriftMonitor(model.baseline, window=model.monitor.window, background=True, on_report=got.append)
    task = model.task
    img = digits().test_x[0]
    p = task.prepare(img)
    outs = task.run(p)
    arrays = task.drift_arrays(p, outs, task.decode(outs, p))
    for _ in range(mon.window):
        mon.append(*arrays)
    mon.close()  # the full window is still closed and reported
    assert len(got) == 1 and mon.flush(timeout=1)
    for _ in range(3 * mon.window):  # after close: windows are dropped, nothing waits for the gone thread
        mon.append(*arrays)
    assert len(got) == 1
