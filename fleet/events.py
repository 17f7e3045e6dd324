"""What ``fleet serve`` tells its log: devices joining and leaving, drift alarms raised and cleared.

An ingest hook (:meth:`fleet.ingest.IngestService.add_hook`) that logs *changes* at INFO,
never one line per message: a device's first sign of life and its return after going
offline, its Last Will, a drift alarm starting and ending, a failed update step.  Retrain
triggers and candidates (:mod:`fleet.worker`, :mod:`fleet.retrain`), rollout waves and
canary verdicts (:mod:`fleet.rollout_driver`) are logged where they are decided.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from core.protocol import DeviceState, DriftReportMsg, JobStatus

__all__ = ["EventLog"]

log = logging.getLogger("fleet.events")


class EventLog:
    """Call with each committed batch's decoded messages; keeps one flag per device and kind."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self._log = logger
        self._online: dict[str, bool] = {}
        self._alarm: dict[str, bool] = {}

    def __call__(self, messages: Sequence[Any]) -> None:
        for msg in messages:
            if isinstance(msg, DeviceState):
                self._state(msg)
            elif isinstance(msg, DriftReportMsg):
                self._drift(msg)
            elif isinstance(msg, JobStatus) and not msg.ok:
                self._log.warning("device %s: update to %s failed at %s: %s", msg.device_id, msg.version, msg.step,
                                  msg.detail)

    def _state(self, msg: DeviceState) -> None:
        was = self._online.get(msg.device_id)
        self._online[msg.device_id] = msg.online
        if msg.online and not was:
            self._log.info("device %s %s: %s %s (%s)", msg.device_id, "joined" if was is None else "is back",
                           msg.model_name or "no model", msg.model_version or "", msg.variant or "-")
        elif not msg.online and was is not False:
            self._log.info("device %s went offline", msg.device_id)

    def _drift(self, msg: DriftReportMsg) -> None:
        was = self._alarm.get(msg.device_id, False)
        self._alarm[msg.device_id] = msg.alarm
        if msg.alarm and not was:
            self._log.warning("device %s: DRIFT ALARM on %s (risk %.2f over %d inferences)", msg.device_id,
                              msg.model_version or "?", msg.risk, msg.n)
        elif was and not msg.alarm:
            self._log.info("device %s: drift alarm cleared (risk %.2f)", msg.device_id, msg.risk)
