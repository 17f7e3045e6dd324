"""A sender's window onto the outbox (transport-neutral; the MQTT link keys it by paho mid)."""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

from .outbox_store import OutboxMessage

if TYPE_CHECKING:
    from .outbox import Outbox

__all__ = ["SendWindow"]


class SendWindow:
    """A sender's view of the outbox: what it has read ahead, what is in flight, what is
    delivered but not yet written back.  Transport-neutral (the MQTT link keys it by paho mid).

    A message sent with ``receipt=True`` is marked sent on delivery (it waits for the
    fleet's receipt); any other is deleted.  Costs one SQLite read per ``2 * max_inflight``
    messages while draining a backlog (it re-reads early only when a put may have queued
    something more urgent) and one write per ``max_inflight // 2`` deliveries.  A crash
    loses at most the unflushed writes: those messages are sent again (at-least-once).
    Use from one thread.
    """

    def __init__(self, outbox: Outbox, max_inflight: int = 16) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.outbox = outbox
        self.max_inflight = max_inflight
        self.inflight: dict[int, int] = {}  # token (e.g. MQTT mid) -> outbox id
        self._receipt: set[int] = set()  # tokens whose message waits for a receipt once delivered
        self._ahead: collections.deque[OutboxMessage] = collections.deque()
        self._delivered: list[int] = []  # to delete
        self._held: list[int] = []  # to mark sent
        self._puts_seen = -1

    def next(self) -> OutboxMessage | None:
        """The next message to send, or None when the window is full or nothing is queued."""
        if len(self.inflight) >= self.max_inflight:
            return None
        if not self._ahead or self._puts_seen != self.outbox.puts:
            self._puts_seen = self.outbox.puts  # read before peeking: a later put forces a re-read
            skip = [*self.inflight.values(), *self._delivered, *self._held]
            self._ahead = collections.deque(self.outbox.peek_batch(2 * self.max_inflight, exclude=skip))
        return self._ahead.popleft() if self._ahead else None

    def unsend(self, msg: OutboxMessage) -> None:
        """Give back a message that could not be handed to the transport; it goes first next time."""
        self._ahead.appendleft(msg)

    def sent(self, token: int, msg: OutboxMessage, *, receipt: bool = False) -> None:
        """``msg`` is in flight under ``token``; ``receipt``: keep it after delivery until
        the fleet's receipt (:meth:`Outbox.mark_sent`) instead of deleting it."""
        self.inflight[token] = msg.id
        if receipt:
            self._receipt.add(token)
        else:
            self._receipt.discard(token)  # a reused token

    def delivered(self, token: int, *, failed: bool = False) -> int | None:
        """The transport confirmed ``token``; returns the outbox id (None for an unknown token).

        ``failed``: the broker refused the message (e.g. MQTT 5 "Not authorized"); it is
        deleted even if it wanted a receipt, since none will ever come and a retry would
        block the queue.
        """
        oid = self.inflight.pop(token, None)
        held = token in self._receipt
        self._receipt.discard(token)
        if oid is not None:
            (self._held if held and not failed else self._delivered).append(oid)
            if len(self._delivered) + len(self._held) >= max(1, self.max_inflight // 2) or not self.inflight:
                self.flush()
        return oid

    def flush(self) -> None:
        """Write the deliveries back now: delete, or mark sent (one transaction)."""
        if self._delivered or self._held:
            self.outbox._settle(self._delivered, self._held, time.time())
            self._delivered, self._held = [], []

    def reset(self) -> None:
        """Forget what is in flight (the transport lost it); it is read from the outbox again."""
        self.inflight.clear()
        self._receipt.clear()
        self._ahead.clear()
        self._puts_seen = -1

    @property
    def idle(self) -> bool:
        """Nothing in flight and nothing waiting to be written back."""
        return not self.inflight and not self._delivered and not self._held
