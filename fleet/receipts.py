"""Receipts (``docs/protocol.md``): telling MQTT 5 devices which of their messages the fleet committed."""

from __future__ import annotations

import logging
import time
from typing import Any

from core.protocol import Receipt, TopicScheme

__all__ = ["parse_oid", "publish_receipts", "RECEIPT_MAX_IDS"]

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
