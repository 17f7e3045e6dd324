"""Which inference inputs a device keeps for retraining, and their compact wire form.

``SampleSelector.offer`` looks at every inference and captures:

* ``"drift"`` — the per-sample drift score (``DriftMonitor.score_samples``) is above
  ``drift_threshold`` (default: the baseline's 99th percentile on undrifted data);
* ``"low_confidence"`` — max-softmax confidence below ``low_confidence``;

both through a token bucket (``rate`` per second, ``burst``) so a drifted camera cannot
flood the uplink; and keeps a uniform reservoir (Algorithm L: Li's skip-ahead form of
Algorithm R, the same uniform sample with a random draw per *kept* input instead of per
input, so an ordinary inference costs one integer comparison) of ``reservoir_size``
ordinary inputs, handed out by ``take_reservoir``: unbiased samples of what the device sees,
so retraining is not fed only the hard cases.  Memory is bounded by the reservoir; captured
samples are returned to the caller (the agent's outbox), never accumulated here.
"""

from __future__ import annotations

import json
import math
import struct
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ConfigError, ProtocolError

__all__ = [
    "SAMPLE_SCHEMA_VERSION",
    "REASONS",
    "DriftSample",
    "TokenBucket",
    "SampleSelector",
    "encode_sample",
    "decode_sample",
]

SAMPLE_SCHEMA_VERSION = 1
REASONS = ("low_confidence", "drift", "reservoir")
_MAGIC = b"ELDS"
_MAX_DECODED = 64 * 1024 * 1024  # refuse decompression bombs


@dataclass(frozen=True, eq=False)
class DriftSample:
    """One captured input with what the model said about it.  ``image`` is the raw uint8 image."""

    sample_id: str
    device_id: str
    timestamp: float
    model_version: str
    prediction: int
    confidence: float
    drift_score: float
    reason: str
    image: np.ndarray
    scores: dict[str, float] = field(default_factory=dict)
    schema_version: int = SAMPLE_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ProtocolError(f"unknown drift-sample reason {self.reason!r}", hint=f"one of {REASONS}")
        if not isinstance(self.image, np.ndarray) or self.image.dtype != np.uint8 or self.image.ndim not in (2, 3):
            raise ProtocolError("drift-sample image must be a uint8 array (H, W) or (H, W, C)",
                                hint="pass the raw camera image, not the preprocessed tensor")
        if self.schema_version != SAMPLE_SCHEMA_VERSION:
            raise ProtocolError(f"drift-sample schema_version {self.schema_version} unsupported",
                                hint=f"this agent reads version {SAMPLE_SCHEMA_VERSION}")

    def metadata(self) -> dict[str, Any]:
        """Everything but the image, JSON-ready."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "image"}


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``clock`` is injectable so tests need no sleeping."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if rate < 0 or burst < 1:
            raise ConfigError(f"token bucket rate={rate} burst={burst}", hint="rate >= 0 and burst >= 1")
        self.rate, self.burst, self._clock = float(rate), int(burst), clock
        self._tokens = float(burst)
        self._last = clock()

    def try_take(self) -> bool:
        """Take a token if one is available."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class SampleSelector:
    """Decides which inputs to capture; bounded memory (the reservoir), rate-limited captures."""

    def __init__(
        self,
        device_id: str,
        model_version: str,
        *,
        low_confidence: float = 0.5,
        drift_threshold: float = math.inf,
        reservoir_size: int = 32,
        rate: float = 0.2,
        burst: int = 10,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= low_confidence <= 1.0:
            raise ConfigError(f"low_confidence {low_confidence} not in [0, 1]", hint="a max-softmax probability")
        if reservoir_size < 0:
            raise ConfigError(f"reservoir_size {reservoir_size} < 0", hint="use 0 to disable the reservoir")
        self.device_id, self.model_version = device_id, model_version
        self.low_confidence, self.drift_threshold = low_confidence, drift_threshold
        self.reservoir_size = reservoir_size
        self._bucket = TokenBucket(rate, burst, clock=clock)
        self._wall = wall_clock
        self._rng = np.random.default_rng(seed)
        self._reservoir: list[DriftSample] = []
        self._seen = 0  # ordinary inputs offered since the reservoir was last taken
        self._next = 0  # Algorithm L: the input count at which the next one is kept (once full)
        self._w = 1.0
        self.dropped = 0  # captures refused by the rate limit

    def _make(self, image: np.ndarray, pred: int, conf: float, score: float, reason: str) -> DriftSample:
        return DriftSample(
            sample_id=uuid.uuid4().hex, device_id=self.device_id, timestamp=self._wall(),
            model_version=self.model_version, prediction=int(pred), confidence=float(conf),
            drift_score=float(score), reason=reason, image=np.array(image, dtype=np.uint8, copy=True),
        )

    def offer(
        self,
        images: Sequence[np.ndarray] | np.ndarray,
        predictions: np.ndarray,
        confidences: np.ndarray,
        drift_scores: np.ndarray | None = None,
    ) -> list[DriftSample]:
        """Look at a batch of inferences; returns the captures to send now (drift / low confidence)."""
        n = len(images)
        scores = np.zeros(n) if drift_scores is None else np.asarray(drift_scores, dtype=np.float64)
        out: list[DriftSample] = []
        for i in range(n):
            out += self.offer_one(images[i], predictions[i], confidences[i], scores[i])
        return out

    def offer_one(self, image: np.ndarray, prediction: int, confidence: float, drift_score: float = 0.0) -> list[DriftSample]:
        """:meth:`offer` for one inference given as scalars (the agent's per-inference call: no arrays to build)."""
        if drift_score > self.drift_threshold:
            reason: str | None = "drift"
        elif confidence < self.low_confidence:
            reason = "low_confidence"
        else:
            self._reservoir_add(image, prediction, confidence, drift_score)
            return []
        if self._bucket.try_take():
            return [self._make(image, prediction, confidence, drift_score, reason)]
        self.dropped += 1
        return []

    def _reservoir_add(self, image: np.ndarray, pred: int, conf: float, score: float) -> None:
        # Algorithm L: after t items each has been kept with probability k / t (as Algorithm R),
        # the gap to the next kept item drawn ahead; the image is copied only when kept.
        self._seen += 1
        k = self.reservoir_size
        if k == 0 or self._seen < self._next:
            return
        if len(self._reservoir) < k:
            self._reservoir.append(self._make(image, pred, conf, score, "reservoir"))
            if len(self._reservoir) == k:
                self._w = math.exp(math.log(self._uniform()) / k)
                self._skip()
            return
        self._reservoir[int(self._rng.integers(0, k))] = self._make(image, pred, conf, score, "reservoir")
        self._w *= math.exp(math.log(self._uniform()) / k)
        self._skip()

    def _uniform(self) -> float:
        return float(self._rng.random()) or 1e-300  # (0, 1): log() needs it positive

    def _skip(self) -> None:
        """Draw the position of the next kept item (geometric gap with success probability ``w``)."""
        w = min(self._w, 1.0 - 1e-16)
        self._next = self._seen + int(math.floor(math.log(self._uniform()) / math.log1p(-w))) + 1

    def take_reservoir(self) -> list[DriftSample]:
        """Hand out the reservoir (a uniform sample of ordinary inputs since the last take) and restart it."""
        out, self._reservoir, self._seen, self._next, self._w = self._reservoir, [], 0, 0, 1.0
        return out

    @property
    def reservoir_len(self) -> int:
        """Samples currently held in the reservoir (never more than ``reservoir_size``)."""
        return len(self._reservoir)


def encode_sample(sample: DriftSample) -> bytes:
    """Compact wire form: zlib( b"ELDS" | u32 header length | JSON header | raw image bytes )."""
    header = sample.metadata()
    header["shape"] = list(sample.image.shape)
    hb = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw = _MAGIC + struct.pack("<I", len(hb)) + hb + np.ascontiguousarray(sample.image).tobytes()
    return zlib.compress(raw, 6)


def decode_sample(data: bytes) -> DriftSample:
    """Inverse of ``encode_sample``; raises ``ProtocolError`` on anything malformed."""
    hint = "the sender must use core.sampling.encode_sample"
    try:
        d = zlib.decompressobj()
        raw = d.decompress(data, _MAX_DECODED)
        if d.unconsumed_tail:
            raise ProtocolError("drift sample too large", hint=hint)
    except zlib.error as e:
        raise ProtocolError(f"drift sample is not zlib data: {e}", hint=hint) from e
    if raw[:4] != _MAGIC or len(raw) < 8:
        raise ProtocolError("not a drift sample (bad magic)", hint=hint)
    (hlen,) = struct.unpack("<I", raw[4:8])
    try:
        header = json.loads(raw[8:8 + hlen])
        shape = tuple(int(s) for s in header.pop("shape"))
    except (ValueError, KeyError, TypeError) as e:
        raise ProtocolError(f"drift sample header unreadable: {e}", hint=hint) from e
    body = raw[8 + hlen:]
    if len(body) != int(np.prod(shape)):
        raise ProtocolError(f"drift sample image has {len(body)} bytes, header says {shape}", hint=hint)
    image = np.frombuffer(body, dtype=np.uint8).reshape(shape).copy()
    try:
        return DriftSample(image=image, **header)
    except TypeError as e:
        raise ProtocolError(f"drift sample header has unexpected fields: {e}", hint=hint) from e
