"""Sample chunk frames from devices -> stored samples, every transfer bound to its sender.

The fleet side of :mod:`core.chunks`: frames are reassembled per device (transfer ids are
the sender's own namespace, budgets are per device, one device never evicts another's
transfer); a completed sample is stored with :func:`fleet.samples.sample_record` and
waits for the batch that commits it.  Receipts (``docs/protocol.md``): a transfer's frame
ids are receipted once it is committed, or when it is given up as corrupt or superseded —
never when it was evicted or expired for lack of room or time: the device sends those again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from core.chunks import SENDER_FAULTS, Completed, Dropped, Reassembler, is_frame, parse_frame
from core.errors import ProtocolError

from .config import FleetConfig
from .ingest_guard import Budgets, Counters, refused
from .registry import Registry, SampleRecord
from .samples import ImageLimits, SampleStore, sample_record

__all__ = ["SampleIntake", "Ack", "TransferKey"]

log = logging.getLogger(__name__)

# (device id, outbox id): one message a device waits to hear about
Ack = tuple[str, int]
# (device id, transfer id): transfer ids are the sender's own namespace
TransferKey = tuple[str, str]

# Ids waiting for one sample transfer to finish.  Beyond this a frame's id is not kept;
# the device sends that frame again, and once the transfer is complete a late duplicate
# is receipted at once, so the cap costs re-sends, never a sample.
_MAX_IDS_PER_TRANSFER = 1024
# Completed samples whose batch failed to commit are retried with the next batches
# (their frames, sent again, would be late duplicates the reassembler ignores).
_MAX_UNSAVED_SAMPLES = 256


class SampleIntake:
    """Reassembles devices' sample transfers; used from the ingest writer thread only."""

    def __init__(self, config: FleetConfig, registry: Registry, store: SampleStore, budgets: Budgets,
                 counters: Counters, stats: Any, *, receipt_now: Callable[[Sequence[Ack]], None]) -> None:
        self.config, self.registry, self.store, self.counters, self.stats = config, registry, store, counters, stats
        self._receipt_now = receipt_now
        self.image_limits = ImageLimits(budgets.max_image_side, budgets.max_image_pixels)
        per_device = max(budgets.buffer_bytes_per_device, config.ingest.max_sample_bytes)
        self.reassembler = Reassembler(
            max_transfers=budgets.transfers_total, max_bytes=max(budgets.buffer_bytes_total, per_device),
            ttl_s=600.0, on_drop=self._on_drop, max_transfers_per_owner=budgets.transfers_per_device,
            max_bytes_per_owner=per_device)
        self.transfer_ids: dict[TransferKey, list[Ack]] = {}  # open sample transfer -> its frames' ids
        # completed sample transfer -> (record, frame ids) until a batch holding it commits
        self.unsaved: dict[TransferKey, tuple[SampleRecord, list[Ack]]] = {}

    def unsaved_records(self) -> list[SampleRecord]:
        return [rec for rec, _ids in self.unsaved.values()]

    def committed(self, acks: list[Ack]) -> None:
        """The batch holding :meth:`unsaved_records` committed: their frames' ids go to ``acks``."""
        for _rec, frame_acks in self.unsaved.values():
            acks.extend(frame_acks)
        self.unsaved.clear()

    def write_failed(self) -> None:
        """The batch did not commit: keep its samples for the next one, up to a bound."""
        while len(self.unsaved) > _MAX_UNSAVED_SAMPLES:  # oldest first: their frames are not receipted
            key = next(iter(self.unsaved))
            log.error("gave up storing sample %s after repeated database errors", key)
            del self.unsaved[key]

    def add_frame(self, device_id: str, payload: bytes, received: float, oid: int | None, acks: list[Ack]) -> None:
        """One sample chunk frame; its id waits for the transfer's fate (see the module docstring)."""
        if not is_frame(payload):
            raise ProtocolError("samples topic carries a non-chunk payload")
        frame = parse_frame(payload)
        key = (device_id, frame.transfer_id)
        # Scoped by sender: another device's frames can neither complete, supersede nor evict
        # this transfer.  May drop this device's own transfers (see _on_drop).
        done = self.reassembler.add(frame, owner=device_id)
        if done is not None:
            ids = self.transfer_ids.pop(key, [])
            try:
                record = self._store(device_id, done, received)
            except ProtocolError:
                self._receipt_now(ids)  # never accepted; this frame's id goes the malformed way
                raise
            if oid is not None:
                ids.append((device_id, oid))
            self.unsaved[key] = (record, ids)
            return
        if oid is None:
            return
        if key in self.reassembler:  # still open
            ids = self.transfer_ids.setdefault(key, [])
            if len(ids) < _MAX_IDS_PER_TRANSFER:
                ids.append((device_id, oid))
        elif key in self.unsaved:  # a late duplicate of a sample not committed yet
            self.unsaved[key][1].append((device_id, oid))
        else:  # a late duplicate of a committed sample
            acks.append((device_id, oid))

    def _store(self, device_id: str, done: Completed, received: float) -> SampleRecord:
        if len(done.data) > self.config.ingest.max_sample_bytes:
            raise ProtocolError(f"sample of {len(done.data)} bytes exceeds ingest.max_sample_bytes")
        sample_id = str(done.meta.get("sample_id") or done.transfer_id)
        owner = self.registry.sample(sample_id)
        if owner is not None and owner.device_id != device_id:
            raise refused("sample_foreign", f"sample id {sample_id!r} belongs to another device")
        record = sample_record(self.store, device_id, done.transfer_id, done.data, done.meta, received=received,
                               limits=self.image_limits)
        self.stats.samples += 1
        return record

    def _on_drop(self, dropped: Dropped) -> None:
        self.stats.dropped_transfers += 1
        ids = self.transfer_ids.pop((dropped.owner, dropped.transfer_id), ())
        if dropped.reason in SENDER_FAULTS:
            # Corrupt or superseded by a newer transfer of the same id: sending it again cannot help.
            self._receipt_now(ids)
        else:
            # Evicted or expired for lack of room or time: never receipted, the device sends it again.
            self.counters.count("transfer_dropped", dropped.owner or None)
        log.info("sample transfer %s of %s dropped: %s (%s)", dropped.transfer_id, dropped.owner, dropped.reason,
                 dropped.detail)
