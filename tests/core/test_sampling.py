"""core.sampling: reservoir uniformity, rate limiting on a fake clock, wire round trip."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from scipy import stats

from core.errors import ConfigError, ProtocolError
from core.sampling import DriftSample, SampleSelector, TokenBucket, decode_sample, encode_sample


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _images(n: int) -> np.ndarray:
    # Image i is filled with i % 256 so a captured sample can be traced back to its input.
    return (np.arange(n, dtype=np.int64) % 256).astype(np.uint8)[:, None, None] * np.ones((1, 4, 4), np.uint8)


def test_reservoir_is_uniform() -> None:
    n, k, reps = 50, 5, 1500
    counts = np.zeros(n)
    sel = SampleSelector("dev", "1", low_confidence=0.0, reservoir_size=k, seed=0)
    imgs = _images(n)
    conf = np.ones(n)
    for _ in range(reps):
        for i in range(0, n, 7):  # uneven batches
            sel.offer(imgs[i:i + 7], np.zeros(7, int), conf[i:i + 7])
        taken = sel.take_reservoir()
        assert len(taken) == k and all(s.reason == "reservoir" for s in taken)
        for s in taken:
            counts[int(s.image[0, 0])] += 1
    assert stats.chisquare(counts).pvalue > 1e-3


def test_reservoir_memory_is_bounded() -> None:
    sel = SampleSelector("dev", "1", low_confidence=0.0, reservoir_size=8, seed=1)
    imgs = _images(100)
    for _ in range(100):
        sel.offer(imgs, np.zeros(100, int), np.ones(100))
    assert sel.reservoir_len == 8


def test_captures_low_confidence_and_drift_with_rate_limit() -> None:
    clock = FakeClock()
    sel = SampleSelector("dev-7", "2.1", low_confidence=0.6, drift_threshold=3.0, rate=1.0, burst=2,
                         reservoir_size=4, clock=clock, wall_clock=lambda: 1234.5, seed=2)
    imgs = _images(6)
    conf = np.array([0.9, 0.3, 0.9, 0.95, 0.2, 0.9])
    score = np.array([1.0, 1.0, 5.0, 1.0, 1.0, 1.0])
    got = sel.offer(imgs, np.arange(6), conf, score)
    # Three candidates (1: low conf, 2: drift, 4: low conf), a burst of two: the third is dropped.
    assert [(int(s.image[0, 0]), s.reason) for s in got] == [(1, "low_confidence"), (2, "drift")]
    assert sel.dropped == 1 and sel.reservoir_len == 3
    s = got[0]
    assert (s.device_id, s.model_version, s.timestamp, s.prediction) == ("dev-7", "2.1", 1234.5, 1)
    assert s.confidence == pytest.approx(0.3) and len(s.sample_id) == 32
    assert sel.offer(imgs[4:5], [0], conf[4:5]) == []  # bucket still empty
    clock.t += 1.0  # one token refills per second
    assert len(sel.offer(imgs[4:5], [0], conf[4:5])) == 1
    clock.t += 100.0  # refills cap at the burst size
    assert len(sel.offer(np.repeat(imgs[1:2], 5, axis=0), np.zeros(5, int), np.full(5, 0.1))) == 2


def test_token_bucket_validation() -> None:
    with pytest.raises(ConfigError):
        TokenBucket(1.0, 0)
    with pytest.raises(ConfigError):
        SampleSelector("d", "v", low_confidence=1.5)


def test_encode_decode_round_trip_and_is_compact() -> None:
    img = np.zeros((64, 64), np.uint8)
    img[20:40, 20:40] = 200
    s = DriftSample(sample_id="abc", device_id="d1", timestamp=1.5, model_version="3", prediction=7,
                    confidence=0.42, drift_score=2.5, reason="drift", image=img, scores={"risk": 1.7})
    blob = encode_sample(s)
    assert len(blob) < img.nbytes // 4
    back = decode_sample(blob)
    assert back.metadata() == s.metadata()
    np.testing.assert_array_equal(back.image, img)
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    back2 = decode_sample(encode_sample(DriftSample("i", "d", 0.0, "v", 1, 0.1, 0.0, "reservoir", rgb)))
    np.testing.assert_array_equal(back2.image, rgb)


def test_decode_rejects_malformed() -> None:
    with pytest.raises(ProtocolError):
        decode_sample(b"garbage")
    with pytest.raises(ProtocolError):
        decode_sample(zlib.compress(b"XXXX" + b"\0" * 10))
    good = zlib.decompress(encode_sample(DriftSample("i", "d", 0.0, "v", 1, 0.1, 0.0, "drift",
                                                     np.zeros((4, 4), np.uint8))))
    with pytest.raises(ProtocolError):
        decode_sample(zlib.compress(good[:-3]))  # truncated image
    with pytest.raises(ProtocolError):
        DriftSample("i", "d", 0.0, "v", 1, 0.1, 0.0, "because", np.zeros((4, 4), np.uint8))
    with pytest.raises(ProtocolError):
        DriftSample("i", "d", 0.0, "v", 1, 0.1, 0.0, "drift", np.zeros((4, 4), np.float32))
