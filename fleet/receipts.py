"""Receipts (``docs/protocol.md``): telling MQTT 5 devices which of their messages the fleet committed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from core.errors import ProtocolError
from core.protocol import RECEIPT_KINDS, Receipt, TopicScheme

__all__ = ["parse_oid", "publish_receipts", "RECEIPT_MAX_IDS", "ReceiptBook"]

log = logging.getLogger(__name__)

# Receipts are QoS 0 JSON: ~8 bytes an id keeps one well under a 128 KiB broker limit.
RECEIPT_MAX_IDS = 4096


def parse_oid(value: Any) -> int | None:
    """The ``oid`` user property: a non-negative decimal integer, else None (no receipt)."""
    if isinstance(value, str) and 0 < len(value) <= 19 and value.isascii() and value.isdigit():
        return int(value)
    return None


def publish_receipts(client: Any, topics: TopicScheme, receipts: dict[str, set[int]], stats: Any) -> None:
    """One :class:`Receipt` per device (split every ``RECEIPT_MAX_IDS`` ids), QoS 0; counts what paho took
    in ``stats.receipts`` / ``stats.receipted``."""
    ts = time.time()
    for device_id, ids in receipts.items():
        topic = topics.command(device_id, "receipt")
        ordered = sorted(ids)
        for i in range(0, max(1, len(ordered)), RECEIPT_MAX_IDS):  # an empty one too: "I receipt"
            part = tuple(ordered[i:i + RECEIPT_MAX_IDS])
            try:
                info = client.publish(topic, Receipt(part, ts=ts).encode(), qos=0)
            except Exception as exc:  # noqa: BLE001 - a lost receipt costs a re-send, nothing more
                log.warning("receipt to %s not sent: %s", device_id, exc)
                continue
            if getattr(info, "rc", 0):  # not connected: paho drops QoS 0 at once
                log.debug("receipt to %s not sent: paho rc %s", device_id, info.rc)
                continue
            stats.receipts += 1
            stats.receipted += len(part)


class ReceiptBook:
    """The ingest writer's pending receipts: device id -> outbox ids ready to be receipted.

    Touched by the writer thread only.  Ids join when their batch is committed
    (:meth:`committed`) or at once for messages that will never be accepted
    (:meth:`queue`, :meth:`final`); :meth:`flush` publishes one :class:`Receipt` per device
    at most every ``interval_ms``.  ``client`` returns the connection to publish on (None:
    nobody to tell); with ``enabled`` false nothing is ever published.
    """

    def __init__(self, topics: TopicScheme, stats: Any, client: Callable[[], Any], *, interval_ms: float,
                 enabled: bool) -> None:
        self.topics = topics
        self.stats = stats
        self._client = client
        self.interval_ms = interval_ms
        self.enabled = enabled
        self.ready: dict[str, set[int]] = {}
        self._last = time.monotonic()

    def __bool__(self) -> bool:
        return bool(self.ready)

    def queue(self, acks: Iterable[tuple[str, int]]) -> None:
        """Queue receipts that do not wait for a commit."""
        for device_id, oid in acks:
            self.ready.setdefault(device_id, set()).add(oid)

    def committed(self, acks: Sequence[tuple[str, int]], born: set[str]) -> None:
        """A batch was committed: its ``acks`` are ready.  A device that (re)connected in it
        (``born``) hears at once, not at the next interval, that this fleet receipts: a
        Receipt (empty, or with what is ready for it) makes it hold its messages from then
        on, so even its first ones survive a broker restart."""
        ready = self.ready
        for device_id, oid in acks:
            ids = ready.get(device_id)
            if ids is None:
                ids = ready[device_id] = set()
            ids.add(oid)
        if born:
            self.publish({d: ready.pop(d, set()) for d in born})

    def final(self, topic: str, oid: int | None) -> None:
        """A message that will never be accepted: let the device stop sending it."""
        if oid is not None:
            try:
                device_id, kind = self.topics.parse(topic)
            except ProtocolError:
                return
            if kind in RECEIPT_KINDS:
                self.queue([(device_id, oid)])

    def flush(self, *, force: bool = False) -> None:
        """Publish one :class:`Receipt` per device, at most every ``interval_ms``."""
        if not self.ready:
            return
        now = time.monotonic()
        if not force and (now - self._last) * 1000 < self.interval_ms:
            return
        self._last = now
        receipts, self.ready = self.ready, {}
        self.publish(receipts)

    def publish(self, receipts: dict[str, set[int]]) -> None:
        client = self._client()
        if client is not None and self.enabled:  # else: nobody to tell
            publish_receipts(client, self.topics, receipts, self.stats)

    def clear(self) -> None:
        self.ready.clear()
