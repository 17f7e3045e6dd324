"""Drift sample payloads on disk: ``<root>/<device>/<sample id>.bin``, indexed in the registry.

The payload is stored exactly as the device encoded it (``core.sampling``), so
the fleet never loses information by re-encoding; :func:`load_sample` decodes it for
labelling tools and retraining.  Writes are atomic (temp file + rename): a crash never
leaves half a sample that the index points to.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import EdgeloopError, FleetError, ProtocolError
from core.protocol import validate_device_id

from .registry import SampleRecord

__all__ = ["SampleStore", "sample_record", "safe_sample_id", "ImageLimits"]

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}$")


def safe_sample_id(sample_id: str) -> str:
    """Sample ids become file names: keep safe ones, hash anything else (stable, never colliding in practice)."""
    if _SAFE_ID.match(sample_id) and ".." not in sample_id:
        return sample_id
    return "h-" + hashlib.sha256(sample_id.encode()).hexdigest()[:40]


class SampleStore:
    """Sample payload files under ``root``; paths in the index are relative to it."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def relpath(self, device_id: str, sample_id: str) -> str:
        return f"{validate_device_id(device_id)}/{safe_sample_id(sample_id)}.bin"

    def put(self, device_id: str, sample_id: str, data: bytes) -> str:
        """Write a payload atomically; returns its path relative to ``root``."""
        rel = self.relpath(device_id, sample_id)
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return rel

    def path(self, record: SampleRecord | str) -> Path:
        """Absolute path of a sample (a record or a relative path from the index)."""
        rel = record.path if isinstance(record, SampleRecord) else record
        p = (self.root / rel).resolve()
        if self.root.resolve() not in p.parents:
            raise FleetError(f"sample path {rel!r} escapes the sample store", path=str(p))
        return p

    def read(self, record: SampleRecord | str) -> bytes:
        try:
            return self.path(record).read_bytes()
        except FileNotFoundError as exc:
            raise FleetError(f"sample file {record if isinstance(record, str) else record.path} is missing",
                             hint="the sample store and the database are out of step") from exc


@dataclass(frozen=True)
class ImageLimits:
    """The largest sample image the fleet keeps: ``max_side`` pixels a side, ``max_pixels`` in all."""

    max_side: int = 4096
    max_pixels: int = 4096 * 4096

    def check(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`ProtocolError` (context ``budget="image_size"``) for an image over the limits."""
        if len(shape) not in (2, 3) or any(s < 1 for s in shape):
            raise ProtocolError(f"sample image of shape {shape} is not an image", budget="image_size")
        h, w = shape[0], shape[1]
        if max(h, w) > self.max_side or h * w > self.max_pixels:
            raise ProtocolError(f"sample image {w}x{h} exceeds the fleet's limit ({self.max_side} a side, "
                                f"{self.max_pixels} pixels)", hint="send smaller samples", budget="image_size")


def _meta_from_payload(data: bytes, device_id: str, limits: ImageLimits | None) -> dict[str, Any]:
    """What the device's sample encoding says about itself (prediction, confidence, ...), if readable.

    A readable payload must name its sender (``device_id``) and respect ``limits``."""
    from core.sampling import decode_sample

    try:
        sample = decode_sample(data)
    except EdgeloopError:  # an undecodable payload is still stored as sent
        return {}
    if limits is not None:
        limits.check(tuple(sample.image.shape))
    meta = sample.metadata()
    if meta.get("device_id") not in (None, "", device_id):
        raise ProtocolError(f"sample payload names device {meta['device_id']!r}, sent by {device_id!r}",
                            budget="sample_foreign")
    if "timestamp" in meta:
        meta["ts"] = meta.pop("timestamp")
    return meta


def sample_record(store: SampleStore, device_id: str, transfer_id: str, data: bytes,
                  meta: dict[str, Any], *, received: float | None = None,
                  limits: ImageLimits | None = None) -> SampleRecord:
    """Store one reassembled sample and build its index record.

    The chunk header's ``meta`` wins over what the payload says about itself (the
    header is what the agent meant to index); the transfer id is the sample id unless
    ``meta`` names one.  A payload naming another device, or an image over ``limits``,
    raises :class:`ProtocolError` before anything is written.
    """
    info = {**_meta_from_payload(data, device_id, limits), **{k: v for k, v in meta.items() if v is not None}}
    if info.get("device_id") not in (None, device_id):
        raise ProtocolError(f"sample meta names device {info['device_id']!r}, sent by {device_id!r}",
                            budget="sample_foreign")
    sample_id = str(info.pop("sample_id", transfer_id))
    rel = store.put(device_id, sample_id, data)
    t = received if received is not None else time.time()
    prediction = info.pop("prediction", None)
    confidence = info.pop("confidence", None)
    label = info.pop("label", None)
    return SampleRecord(
        id=sample_id, device_id=device_id, ts=float(info.pop("ts", t)), path=rel, size=len(data), received=t,
        model_version=info.pop("model_version", None), prediction=None if prediction is None else str(prediction),
        confidence=None if confidence is None else float(confidence), reason=info.pop("reason", None),
        label=None if label is None else str(label), label_source="device" if label is not None else None,
        labelled_at=t if label is not None else None,
        meta={k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, list, dict)) and k != "device_id"})
