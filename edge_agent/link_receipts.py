"""The MQTT link's side of end-to-end receipts (``docs/protocol.md``, "Receipts").

Receipts arrive on paho's thread (:attr:`LinkReceipts.pending`) and are applied by the
link's sender thread (:meth:`LinkReceipts.settle`), which also puts overdue held messages
back in the queue (:meth:`LinkReceipts.requeue_overdue`) and notices a fleet that has
stopped sending receipts altogether.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

from core import protocol as proto
from core.errors import ProtocolError

from .outbox import Outbox

__all__ = ["LinkReceipts"]

log = logging.getLogger(__name__)

_MAX_PENDING_RECEIPTS = 4096  # receipts not yet applied; beyond, the oldest are forgotten (resent later)
# Connected time without any receipt while messages wait for one, in receipt timeouts, after
# which the fleet is taken to have stopped sending receipts: twice the longest back-off.
_RECEIPT_LAPSE_TIMEOUTS = 2 * 2**4


class LinkReceipts:
    """Receipts for one link's outbox; ``enabled=False`` ignores them (deleted on PUBACK)."""

    def __init__(self, outbox: Outbox, *, enabled: bool, grace_s: float, timeout_s: float,
                 reject: Callable[[ProtocolError], None]) -> None:
        self.outbox = outbox
        self.enabled = enabled
        self.grace_s = grace_s
        self.timeout_s = timeout_s
        self._reject = reject
        self.pending: collections.deque[bytes] = collections.deque(maxlen=_MAX_PENDING_RECEIPTS)
        self._silent_s = 0.0  # connected seconds with messages held and no receipt; sender thread
        self._last_tick = time.monotonic()

    def settle(self, before: Callable[[], None]) -> None:
        """Apply the receipts paho's thread queued, all in one outbox transaction.

        ``before`` settles the PUBACKs and writes them back (the link's window)."""
        if not self.pending:
            return
        # Take the receipts first, then every PUBACK paho queued before them (the broker
        # PUBACKs a message before the fleet can receipt it, and paho's thread queues both
        # in wire order), and write those `sent` times: the watermark reads them.
        payloads = [self.pending.popleft() for _ in range(len(self.pending))]
        before()
        ids: list[int] = []
        valid = 0
        for payload in payloads:
            try:
                ids.extend(proto.decode_as(payload, proto.Receipt).ids)
                valid += 1
            except ProtocolError as exc:
                self._reject(exc)
        if not valid:
            return
        if not self.enabled:
            log.debug("receipts are off ([broker].receipts = false); ignored %d", valid)
            return
        self._silent_s = 0.0
        removed = self.outbox.receipt(ids)
        log.debug("fleet receipted %d id(s); %d removed from the outbox", len(ids), removed)

    def requeue_overdue(self, *, connected: bool) -> None:
        """Put overdue held messages back in the queue; notice a fleet that stopped receipting."""
        tick = time.monotonic()
        elapsed, self._last_tick = tick - self._last_tick, tick
        # Only connected time counts: a device cut off from the broker hears no receipts either.
        waiting = self.outbox.receipts_seen and connected and self.outbox.oldest_held() is not None
        n = self.outbox.requeue_overdue(time.time(), watermark=self.outbox.watermark,
                                        grace_s=self.grace_s, timeout_s=self.timeout_s)
        if n:
            log.warning("%d message(s) PUBACKed by the broker but not receipted by the fleet; sending again", n)
        if not waiting:
            return
        self._silent_s += elapsed
        if self._silent_s >= _RECEIPT_LAPSE_TIMEOUTS * self.timeout_s:
            self._silent_s = 0.0
            n = self.outbox.forget_receipts()
            log.warning("no receipt from the fleet for %.0f s while connected; deleting messages on the broker's "
                        "PUBACK again until the next receipt (%d held message(s) go out once more)",
                        _RECEIPT_LAPSE_TIMEOUTS * self.timeout_s, n)
