"""Job-status reporting: the one narrow interface through which updates and fleet commands
tell the fleet what they are doing.

:mod:`edge_agent.updates` (install, rollback, boot counter) and :mod:`edge_agent.deploy`
(fleet commands) report every step through a :class:`JobReporter`; the agent's
:class:`JobLog` keeps the recent steps (``agent.jobs``, ``edgeloop agent status``, tests)
and queues each one as a :class:`~core.protocol.JobStatus` on the outbox.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

from core.protocol import JobStatus, Message

__all__ = ["JobReporter", "JobLog"]

log = logging.getLogger(__name__)


class JobReporter(Protocol):
    """What updates and commands need to report a job step (implemented by :class:`JobLog`)."""

    def report(self, job_id: str, version: str, step: str, ok: bool = True, detail: str = "",
               progress: float | None = None, previous: str | None = None) -> None:
        """Record one step of job ``job_id`` and send it to the fleet."""
        ...

    def last_step(self, job_id: str) -> str | None:
        """The newest step reported for ``job_id``, or None."""
        ...


class JobLog:
    """Keeps the last ``keep`` job steps and sends each one through ``send``."""

    def __init__(self, device_id: str, send: Callable[[Message], None], *, keep: int = 200) -> None:
        self.device_id = device_id
        self._send = send
        self.recent: deque[JobStatus] = deque(maxlen=keep)

    def report(self, job_id: str, version: str, step: str, ok: bool = True, detail: str = "",
               progress: float | None = None, previous: str | None = None) -> None:
        msg = JobStatus(device_id=self.device_id, job_id=job_id, version=version, step=step, ok=ok,
                        detail=detail[:2000], progress=progress, previous_version=previous)
        self.recent.append(msg)
        (log.info if ok else log.warning)("job %s %s: %s %s", job_id, version, step, detail)
        self._send(msg)

    def last_step(self, job_id: str) -> str | None:
        for msg in reversed(self.recent):
            if msg.job_id == job_id:
                return msg.step
        return None
