"""Every real third-party model in ../shared/models, from the CLI alone: bundle create -> agent install ->
agent predict --json -> HTTP /predict -> bench, with predictions matching the upstream references
(classifiers: same top-1, confidence within 0.01; detectors: IoU >= 0.9, score within 0.02)."""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from core.bundle import read_manifest_unverified
from tests.plugins.agent_kit import keys
from tests.plugins.models import SHARED, agent_toml, cli, npy, require_models

pytestmark = pytest.mark.usefixtures("shared_bundles")


def _iou(a: list[float], b: list[float]) -> float:
    from core.tasks import box_iou

    return float(box_iou(np.asarray(a)[None], np.asarray(b)[None])[0, 0])


def _install_and_predict(key: str, bundles: dict[str, Path], tmp: Path, inputs: list[Path],
                         capsys: pytest.CaptureFixture[str], *, variant: str = "auto") -> list[dict]:
    cfg = agent_toml(tmp / "agent.toml", tmp / "state", keys().public, variant=variant)
    rc, out = cli(["agent", "install", "-c", cfg, bundles[key]], capsys)
    assert rc == 0, out
    preds = []
    for f in inputs:
        rc, out = cli(["agent", "predict", "-c", cfg, f, "--json"], capsys)
        assert rc == 0, out
        preds.append(json.loads(out))
    return preds


def _match_detections(got: list[dict], want: list[tuple[int, float, list[float]]], score_tol: float) -> None:
    for cls, score, box in want:
        best = max((d for d in got if d["index"] == cls), key=lambda d: _iou(d["box"], box), default=None)
        assert best is not None, f"class {cls} not detected in {got}"
        assert _iou(best["box"], box) >= 0.9, (best, box)
        assert abs(best["score"] - score) <= score_tol, (best, score)


def test_ssd_mobilenet_detects_the_upstream_boxes(shared_bundles, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    m = SHARED["ssd"]
    exp = m.expected()
    ref = npy(tmp_path / "ref.npy", np.load(m.dir / "ref_input_1x300x300x3_uint8_rgb.npy")[0])
    # the recordings are XNNPACK's (LiteRT's default kernels): pin the variant on the default path, because "auto"
    # times XNNPACK against the builtin int8 kernels and a busy machine can flip that choice (their boxes differ)
    only = read_manifest_unverified(shared_bundles["ssd"]).variants[0].id
    jpg, raw = _install_and_predict("ssd", shared_bundles, tmp_path, [m.dir / "cats_and_dogs.jpg", ref], capsys,
                                    variant=only)
    assert jpg["task"] == "detection" and jpg["label"] == "cat"
    # the JPEG through edgeloop's pipeline vs upstream's test (classes exact, IoU >= 0.9, its own 0.05 score precision)
    up = [(d["class_index"], d["score"], [d["origin_x"], d["origin_y"], d["origin_x"] + d["width"],
                                          d["origin_y"] + d["height"]]) for d in exp["upstream"]["detections"]]
    _match_detections(jpg["detections"], up, exp["upstream"]["upstream_tolerances"]["score_abs"])
    # the stored reference input vs the recorded raw outputs: boxes in the 300x300 input's pixels
    rec = exp["recorded"]["raw_outputs_xnnpack"]
    want = [(int(c), float(s), [b[1] * 300, b[0] * 300, min(b[3], 1) * 300, min(b[2], 1) * 300])
            for b, c, s in zip(rec["boxes_ymin_xmin_ymax_xmax"][:4], rec["classes"][:4], rec["scores"][:4], strict=True)]
    _match_detections(raw["detections"], want, 0.02)


def test_yolox_nano_decodes_and_matches_the_recording(shared_bundles, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    m = SHARED["yolox"]
    rec = m.expected()["recorded"]["detections_score_ge_0.3"]
    canvas = np.load(m.dir / "ref_input_416x416x3_uint8_bgr_letterbox.npy")[..., ::-1]  # stored BGR; edgeloop reads RGB
    ref = npy(tmp_path / "canvas.npy", np.ascontiguousarray(canvas))
    jpg, pre = _install_and_predict("yolox", shared_bundles, tmp_path, [m.dir.parent / SHARED["ssd"].folder /
                                                                       "cats_and_dogs.jpg", ref], capsys)
    want = [(d["class_index"], d["score"], d["x1y1x2y2"]) for d in rec]
    _match_detections(jpg["detections"], want, 0.02)
    r = 416 / 1200  # the stored canvas is already letterboxed: its boxes are the recording's times r
    _match_detections(pre["detections"], [(c, s, [v * r for v in b]) for c, s, b in want], 0.02)
    assert [d["label"] for d in jpg["detections"] if d["score"] >= 0.3] == [d["class_name"] for d in rec]


def test_mobilenet_v1_tflite_classifies_the_burger(shared_bundles, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    m = SHARED["mobilenet"]
    top = m.expected()["recorded"]["top5"][0]
    ref = npy(tmp_path / "ref.npy", np.load(m.dir / "ref_input_224x224x3_uint8_rgb.npy"))
    jpg, raw = _install_and_predict("mobilenet", shared_bundles, tmp_path, [m.dir / "burger.jpg", ref], capsys)
    for p in (jpg, raw):
        assert p["index"] == top["index"] and p["label"] == top["label"]
        assert abs(p["confidence"] - top["prob"]) <= 0.01  # probabilities: never softmax-ed twice
    assert abs(raw["confidence"] - top["prob"]) <= 1e-3


def test_ppocr_orientation_classifier(shared_bundles, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    m = SHARED["ppocr"]
    probs = m.expected()["recorded"]["probs"]
    old = np.load(m.dir / "ref_input_text_cls_v2022_48x192x3_uint8_bgr.npy")[..., ::-1]
    ref = npy(tmp_path / "v2022.npy", np.ascontiguousarray(old))
    new, v2022 = _install_and_predict("ppocr", shared_bundles, tmp_path, [m.dir / "text_cls.jpg", ref], capsys)
    assert new["label"] == "180" and abs(new["confidence"] - probs["text_cls.jpg"][1]) <= 0.01
    assert v2022["label"] == "0" and abs(v2022["confidence"] - probs["text_cls_v2022.jpg_ref_input"][0]) <= 0.01


def test_micro_speech_int8_keyword_spotter(shared_bundles, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    m = SHARED["kws"]
    exp = m.expected()
    clips = list(exp["upstream"]["expected_label"])
    files = [m.dir / f"features_{c}_49x40_int8.npy" for c in clips]
    preds = _install_and_predict("kws", shared_bundles, tmp_path, files, capsys)
    for clip, p in zip(clips, preds, strict=True):
        assert p["label"] == exp["upstream"]["expected_label"][clip], clip
        q = exp["recorded"]["int8_outputs"][clip]
        assert abs(p["confidence"] - (max(q) + 128) / 256) <= 0.01


def test_toycar_autoencoder_anomaly_score(shared_bundles, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    m = SHARED["toycar"]
    frames = np.fromfile(m.dir / "normal_id_01_00000000_hist_librosa.bin", "<f4")
    (one,) = _install_and_predict("toycar", shared_bundles, tmp_path, [npy(tmp_path / "w0.npy", frames[:640])], capsys)
    assert one["task"] == "tensor" and one["outputs"]["Identity"]["shape"] == [1, 640]
    # the upstream score: mean over 196 windows, through the agent's Python API on the installed slot
    from core.agent_config import load_config
    from edge_agent.agent import Agent

    with Agent(load_config(tmp_path / "agent.toml")).start(service=False) as agent:
        scores = [agent.predict(frames[k * 128:k * 128 + 640]).score for k in range(196)]
    assert one["score"] == pytest.approx(scores[0], rel=1e-6)
    want = m.expected()["upstream"]["anomaly_score"]
    assert abs(float(np.mean(scores)) - want) / want <= 0.002


def _post(url: str, body: bytes) -> dict:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_http_predict_serves_every_task(shared_bundles, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from core.agent_config import load_config
    from edge_agent.agent import Agent

    cfg = agent_toml(tmp_path / "agent.toml", tmp_path / "state", keys().public, http_port=0)
    img = (SHARED["ssd"].dir / "cats_and_dogs.jpg").read_bytes()
    buf = io.BytesIO()
    np.save(buf, np.load(SHARED["kws"].dir / "features_no_1000ms_49x40_int8.npy"))
    with Agent(load_config(cfg)).start() as agent:
        url = f"{agent.http.url}/predict"
        agent.install(shared_bundles["yolox"])
        det = _post(url, img)
        assert det["task"] == "detection" and det["detections"][0]["label"] == "cat"
        assert abs(det["detections"][0]["score"] - 0.77496) <= 0.02
        agent.install(shared_bundles["ssd"], force=True)
        ssd = _post(url, img)
        assert ssd["task"] == "detection" and ssd["label"] == "cat"
        agent.install(shared_bundles["mobilenet"], force=True)
        top = SHARED["mobilenet"].expected()["recorded"]["top5"][0]
        burger = _post(url, (SHARED["mobilenet"].dir / "burger.jpg").read_bytes())
        assert burger["label"] == top["label"] and abs(burger["confidence"] - top["prob"]) <= 0.01
        agent.install(shared_bundles["ppocr"], force=True)
        probs = SHARED["ppocr"].expected()["recorded"]["probs"]
        line = _post(url, (SHARED["ppocr"].dir / "text_cls.jpg").read_bytes())
        assert line["label"] == "180" and abs(line["confidence"] - probs["text_cls.jpg"][1]) <= 0.01
        agent.install(shared_bundles["kws"], force=True)
        assert _post(url, buf.getvalue())["label"] == "no"
        agent.install(shared_bundles["toycar"], force=True)
        frames = np.fromfile(SHARED["toycar"].dir / "normal_id_01_00000000_hist_librosa.bin", "<f4")[:640]
        body = json.dumps(frames.tolist()).encode()
        got = _post(url, body)
        assert got["task"] == "tensor" and got["score"] == pytest.approx(agent.predict(frames).score, rel=1e-6)


@pytest.mark.parametrize("key", ["ssd", "yolox", "mobilenet", "ppocr", "kws", "toycar"])
def test_bench_runs_the_bare_model_file(key: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    require_models()
    m = SHARED[key]
    extra = ["--input-shape", "3,48,192"] if key == "ppocr" else []
    rc, out = cli(["bench", m.path, "--threads", "1", "--batch", "1", "--runs", "3", "--warmup", "1", *extra,
                   "--out", tmp_path / "bench", "--json"], capsys)
    assert rc == 0
    result = json.loads(out)
    assert result["failed_cells"] == 0 and result["cells"][0]["latency"]["1"]["p50_ms"] > 0, result


def test_bench_of_a_bundle_with_dynamic_input(shared_bundles, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, out = cli(["bench", shared_bundles["ppocr"], "--threads", "1", "--batch", "1", "--runs", "3", "--warmup", "1",
                   "--out", tmp_path / "bench", "--json"], capsys)
    assert rc == 0 and json.loads(out)["cells"][0]["entry"]["input_shape"] == [3, 48, 192]


def test_a_model_edgeloop_cannot_run_fails_in_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    require_models()
    pre = SHARED["kws"].dir / "audio_preprocessor_int8.tflite"  # TFLM Signal* custom ops: LiteRT cannot run it
    rc, _ = cli(["bundle", "create", "--model", pre, "--name", "fe", "--version", "1", "--out", tmp_path / "x.elb"])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "x.elb").exists()
    line = [x for x in err.splitlines() if x.startswith("edgeloop: error")]
    assert len(line) == 1 and "audio_preprocessor_int8.tflite" in line[0] and "SignalWindow" in line[0]
    assert "Traceback" not in err
