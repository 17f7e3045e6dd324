"""Frame sources: the URI table, OpenCV video files and MJPEG streams, folders, tensor streams, rate and ROI."""

from __future__ import annotations

import io
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from core.agent_config import parse_config
from core.errors import ConfigError, SourceError
from edge_agent.sources import FrameGate, SourceLost, crop, make_source
from edge_agent.sources.folder import DirSource
from edge_agent.sources.opencv import OpenCVSource
from edge_agent.sources.picamera import PicameraSource
from edge_agent.sources.tensor import NpySource, StdinSource
from tests.plugins.streams import MjpegServer, write_video


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again on exit: nothing listens there


@pytest.mark.parametrize("uri, cls, kind", [
    ("camera:0", OpenCVSource, "camera"), ("/dev/video2", OpenCVSource, "camera"),
    ("rtsp://10.0.0.5:554/stream1", OpenCVSource, "stream"), ("http://cam.local/stream.mjpg", OpenCVSource, "stream"),
    ("clip.mp4", OpenCVSource, "file"), ("CLIP.AVI", OpenCVSource, "file"), ("picamera", PicameraSource, None),
    ("picamera:1", PicameraSource, None), ("npy:windows.npy", NpySource, None), ("stdin", StdinSource, None),
    ("dir:/some/where", DirSource, None),
])
def test_uri_table_picks_the_plugin(uri: str, cls: type, kind: str | None) -> None:
    src = make_source(uri)
    assert type(src) is cls
    if kind is not None:
        assert src.kind == kind  # type: ignore[attr-defined]
        assert src.live is (kind != "file")


def test_a_plain_folder_is_a_folder_source(tmp_path: Path) -> None:
    assert isinstance(make_source(str(tmp_path)), DirSource)


@pytest.mark.parametrize("uri, says", [
    ("ftp://x/y", "not a camera, stream, video file"), ("notes.txt", "not a camera"),
    ("data.npy", "use npy:data.npy"),
])
def test_unknown_uri_is_a_one_line_error(uri: str, says: str) -> None:
    with pytest.raises(SourceError) as err:
        make_source(uri)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_video_file_frames_in_order_rgb(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    path = write_video(tmp_path / "clip.avi", 12)
    red = tmp_path / "red.avi"
    w = cv2.VideoWriter(str(red), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    for _ in range(2):
        w.write(np.dstack([np.zeros((32, 32), np.uint8)] * 2 + [np.full((32, 32), 250, np.uint8)]))  # BGR: red
    w.release()
    stop = threading.Event()
    src = make_source(str(path))
    src.open()
    frames = []
    while (f := src.read(stop)) is not None:
        frames.append(f)
    src.close()
    assert len(frames) == 12 and frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    assert [round(int(f[20, 40, 0]) / 7) for f in frames[:5]] == [0, 1, 2, 3, 4]  # gray level i*7, in order
    src = make_source(str(red))
    src.open()
    r, g, b = src.read(stop)[16, 16]
    src.close()
    assert r > 200 and g < 40 and b < 40


def test_video_file_loops_when_asked(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4", 5)
    src = make_source(str(path), loop=True)
    src.open()
    stop = threading.Event()
    assert all(src.read(stop) is not None for _ in range(12))
    src.close()


@pytest.mark.parametrize("make_uri", [
    lambda tmp: str(tmp / "missing.mp4"),
    lambda tmp: f"http://127.0.0.1:{_closed_port()}/stream.mjpg",
    lambda tmp: "/dev/video97",
    lambda tmp: f"dir:{tmp / 'nope'}",
    lambda tmp: f"npy:{tmp / 'nope.npy'}",
])
def test_uri_that_cannot_be_opened_is_a_one_line_error(tmp_path: Path, make_uri) -> None:  # noqa: ANN001
    pytest.importorskip("cv2")
    uri = make_uri(tmp_path)
    src = make_source(uri)
    with pytest.raises(SourceError) as err:
        src.open()
    text = str(err.value)
    assert text.startswith(f"cannot open source {uri}") and "\n" not in text and err.value.hint


def test_mjpeg_stream_frames_then_lost_when_the_camera_dies(mjpeg_server: MjpegServer) -> None:
    src = make_source(mjpeg_server.url)
    src.open()
    stop = threading.Event()
    first = [src.read(stop) for _ in range(3)]
    assert all(f is not None and f.shape == (48, 64, 3) for f in first)
    mjpeg_server.stop()
    with pytest.raises(SourceLost):
        for _ in range(1_000_000):  # what the socket buffered, then the loss
            src.read(stop)
    src.close()


def test_frame_gate_every_and_fps() -> None:
    g = FrameGate(every=3)
    assert [g.keep(0.0) for _ in range(7)] == [True, False, False, True, False, False, True]
    g = FrameGate(fps=10.0)  # 30 fps in -> every third frame out
    kept = [g.keep(i / 30.0) for i in range(30)]
    assert sum(kept) == 10 and kept[:4] == [True, False, False, True]
    g = FrameGate(fps=10.0)  # a slow source is never held back, and builds no burst credit
    assert all(g.keep(float(i)) for i in range(5))
    with pytest.raises(ValueError):
        FrameGate(every=0)


def test_roi_is_a_view_clipped_to_the_frame() -> None:
    img = np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3)
    view = crop(img, (10, 5, 20, 8))
    assert view.shape == (8, 20, 3) and np.shares_memory(view, img) and view[0, 0, 0] == img[5, 10, 0]
    assert crop(img, (60, 40, 100, 100)).shape == (8, 4, 3)
    assert crop(img, ()) is img
    with pytest.raises(SourceError, match="outside the 64x48 frame"):
        crop(img, (70, 0, 5, 5))


def test_folder_source_yields_each_new_image_once(tmp_path: Path) -> None:
    stop = threading.Event()
    src = make_source(f"dir:{tmp_path}")
    src.open()
    np.save(tmp_path / "a.npy", np.zeros((8, 8), np.uint8))
    assert src.read(stop).shape == (8, 8) and src.ref == "a.npy"
    np.save(tmp_path / "b.npy", np.ones((8, 8), np.uint8))
    assert src.read(stop)[0, 0] == 1 and src.ref == "b.npy"
    stop.set()
    assert src.read(stop) is None  # nothing new and stopping


def test_npy_rows_and_stdin_arrays(tmp_path: Path) -> None:
    stop = threading.Event()
    rows = np.random.default_rng(0).normal(size=(4, 10, 3)).astype(np.float32)
    np.save(tmp_path / "w.npy", rows)
    src = make_source(f"npy:{tmp_path / 'w.npy'}")
    src.open()
    got = []
    while (x := src.read(stop)) is not None:
        got.append(x)
    assert np.array_equal(np.stack(got), rows) and src.ref == "w.npy[3]"
    buf = io.BytesIO()
    for r in rows:
        np.save(buf, r)
    buf.seek(0)
    s = StdinSource(stream=buf)
    s.open()
    out = []
    while (x := s.read(stop)) is not None:
        out.append(x)
    assert np.array_equal(np.stack(out), rows)
    bad = StdinSource(stream=io.BytesIO(b"definitely not numpy"))
    bad.open()
    with pytest.raises(SourceError, match="not a stream of .npy arrays"):
        bad.read(stop)
    np.save(tmp_path / "flat.npy", np.zeros(5))
    with pytest.raises(SourceError, match=r"expected \(N, \.\.\.\)"):
        make_source(f"npy:{tmp_path / 'flat.npy'}").open()


def test_sources_config_tables() -> None:
    cfg = parse_config({"agent": {"allow_unsigned": True},
                        "sources": [{"uri": "camera:0", "fps": 5, "roi": [0, 0, 320, 240]},
                                    {"uri": "clip.mp4", "drop": "never", "loop": True}],
                        "results": {"mqtt_per_s": 0, "jsonl": "results.jsonl"}})
    assert [s.uri for s in cfg.sources] == ["camera:0", "clip.mp4"]
    assert cfg.sources[0].roi == (0, 0, 320, 240) and cfg.sources[0].fps == 5.0 and cfg.sources[1].loop
    assert cfg.results.jsonl == "results.jsonl" and cfg.results.mqtt_per_s == 0
    for bad, key in (({"uri": ""}, "uri"), ({"uri": "camera:0", "roi": [1, 2, 3]}, "roi"),
                     ({"uri": "camera:0", "drop": "newest"}, "drop"), ({"uri": "camera:0", "every": 0}, "every")):
        with pytest.raises(ConfigError, match=rf"\[sources\]\[0\]\.{key}"):
            parse_config({"agent": {"allow_unsigned": True}, "sources": [bad]})


def _smooth_frame(h: int = 240, w: int = 320) -> np.ndarray:
    """A BGR frame with edges, gradients and noise (what a camera gives, not a flat test card)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(xx / 13.0), 128 + 100 * np.cos(yy / 7.0), (xx + yy) % 256], -1)
    return np.clip(img + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["bilinear", "area", "bilinear-cv", "nearest"])
@pytest.mark.parametrize("channels, size, fit", [(1, (32, 32), "stretch"), (3, (224, 224), "stretch"),
                                                 (3, (200, 400), "stretch"), (3, (96, 96), "center-crop")])
def test_shaped_frame_is_what_core_preprocess_computes(mode: str, channels: int, size: tuple[int, int],
                                                       fit: str) -> None:
    """The capture-side 8-bit resize agrees with the float one within a grey level or so (one 8-bit rounding per
    step: two where luminance or a mixed shrink/enlarge area resize take two), for every mode."""
    from core.manifest import Preprocessing
    from core.preprocess import preprocess
    from edge_agent.sources.shape import frame_shaper

    spec = Preprocessing(size=size, channels=channels, mean=(0.0,) * channels, std=(1.0,) * channels, scale=1.0,
                         resize=mode, fit=fit)
    shape = frame_shaper(spec)
    assert shape is not None
    bgr = _smooth_frame()
    for frame in (bgr[:, :, ::-1], np.ascontiguousarray(bgr[:, :, ::-1]), bgr[10:200, 20:300, ::-1]):
        small = shape(frame)  # an RGB view of a BGR buffer (OpenCV), a plain RGB frame, an ROI
        assert small.shape[:2] == size and small.dtype == np.uint8
        assert (small.ndim == 2) == (channels == 1)
        got, want = preprocess([small], spec), preprocess([frame], spec)
        assert np.abs(got - want).max() <= 1.5, mode
        assert np.abs(got - want).mean() < 0.5


def test_frames_stay_whole_where_the_model_needs_them_so() -> None:
    from core.manifest import Preprocessing
    from edge_agent.sources.shape import frame_shaper

    spec = Preprocessing(size=(32, 32), channels=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    assert frame_shaper(None) is None  # a tensor model
    assert frame_shaper(spec, "detection") is None  # boxes are mapped back to the frame
    assert frame_shaper(Preprocessing(size=(32, 32), fit="letterbox")) is None
    assert frame_shaper(Preprocessing(size=(32, 32), fit="center-crop", crop_fraction=0.875)) is None  # not idempotent
    shape = frame_shaper(spec)
    assert shape is not None
    odd = np.zeros((40, 40, 2), np.uint8)
    floats = np.zeros((40, 40, 3), np.float32)
    assert shape(odd) is odd and shape(floats) is floats  # the agent's own checks answer for these
    assert shape(np.zeros((40, 40, 4), np.uint8)).shape == (32, 32, 3)  # alpha dropped
    assert shape(np.zeros((40, 40), np.uint8)).shape == (32, 32)  # gray stays gray (the agent replicates it)


def test_frames_the_gate_skips_are_grabbed_not_decoded(tmp_path: Path) -> None:
    """grab() advances without decoding; retrieve() decodes the grabbed frame: the same frames as read()."""
    video = write_video(tmp_path / "g.avi", 6)
    a, b = make_source(str(video)), make_source(str(video))
    a.open()
    b.open()
    stop = threading.Event()
    try:
        whole = [a.read(stop) for _ in range(6)]
        picked = []
        for i in range(6):
            assert b.grab(stop)
            if i % 2 == 0:
                picked.append(b.retrieve())
        assert not b.grab(stop) and a.read(stop) is None  # the end, both ways
        assert all(np.array_equal(p, w) for p, w in zip(picked, whole[::2], strict=True))
    finally:
        a.close()
        b.close()
