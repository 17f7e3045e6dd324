"""Per-device rules of ingestion: every device message is bound to its sender, every device has budgets.

The topic names the sender (the broker's ACL ties a device's credentials to its own
topics), so the fleet takes the device id from the topic and checks that everything a
message refers to is that device's own:

* a **job status** must not name another device's job (rollout targets bind a job id to
  one device);
* a **bundle request** must name a job of a rollout that targets this device, for that
  rollout's version, and a device may ask only ``bundle_request_burst`` times, then once
  every ``bundle_request_interval_s`` (each request makes the fleet publish the bundle);
* **feedback** labels only the device's own samples (a label for a sample not stored yet
  waits in ``pending_labels``, bound to the device, at most ``pending_labels_per_device``
  of them), never overwrites an operator's label, must be one of the class names of the
  sample's model, and its ``source`` is always ``device`` — a device claiming to be an
  operator or a teacher is refused;
* a **sample** must not name another device (payload) or take another device's sample id;
* **log lines** (remote logs, :mod:`fleet.remote_logs`) must be the device's own, within
  ``log_message_bytes`` a message, at most ``log_messages_burst`` messages, then
  ``log_messages_per_s`` a second (an answer is a few messages; the store keeps a bounded
  number of lines per device whatever arrives).

Every refusal is counted per rule (and per device, for the top offenders) in
:class:`Counters`, which ``/metrics`` and the dashboard show.  A refusal raises
:class:`ProtocolError` with ``context["budget"]`` naming the rule; ``context["retry"]``
says the device should send the message again later (it is not receipted).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core.errors import EdgeloopError, ProtocolError
from core.protocol import BundleRequest, Feedback, JobStatus
from core.sampling import TokenBucket

from .models import Device, PendingLabel, SampleRow

__all__ = ["Budgets", "Counters", "SenderChecks", "RULES", "OPERATOR_SOURCES", "refused",
           "apply_device_labels", "DeviceLabelResult", "write_device_labels"]

log = logging.getLogger(__name__)

# Where operators' labels may come from (the operator topic, the dashboard, CSV imports, a teacher).
OPERATOR_SOURCES = frozenset({"operator", "import", "teacher"})
# Labels a device's feedback may replace (never an operator's, an import's or a teacher's).
_DEVICE_REPLACEABLE = (None, "device")

RULES: dict[str, str] = {
    "message_size": "a device message over the size limit",
    "frame_size": "a sample chunk frame over the size limit",
    "transfer_budget": "a sample chunk refused: the device's reassembly budget is full (sent again later)",
    "transfer_dropped": "a partial sample transfer evicted or expired (the device sends it again)",
    "image_size": "a sample image over the dimension limit",
    "sample_foreign": "a sample naming another device or taking another device's sample id",
    "label_source": "feedback from a device claiming another source (operator, teacher)",
    "label_foreign": "feedback from a device for another device's sample",
    "label_class": "feedback naming a class the sample's model does not have",
    "pending_labels": "feedback for samples not stored yet, over the per-device limit",
    "job_foreign": "a job status for another device's job",
    "bundle_request_foreign": "a bundle request for a job or version that is not the device's",
    "bundle_request_rate": "bundle requests over the per-device rate",
    "logs_size": "a log lines message over its size limit",
    "logs_rate": "log lines messages over the per-device rate",
}


@dataclass(frozen=True)
class Budgets:
    """What one device may cost the fleet (defaults fit the agent's own settings with room to spare)."""

    max_message_bytes: int = 64 * 1024  # telemetry, drift, jobs, feedback, states, bundle requests
    max_frame_bytes: int = 1024 * 1024 + 16 * 1024  # one sample chunk frame (agent default: 128 KiB)
    transfers_per_device: int = 8  # partial sample transfers open at once
    buffer_bytes_per_device: int = 32 << 20
    transfers_total: int = 4096
    buffer_bytes_total: int = 512 << 20
    pending_labels_per_device: int = 1000
    bundle_request_burst: int = 4
    bundle_request_interval_s: float = 10.0  # the agent asks again at most every 5 s while chunks stop coming
    max_image_side: int = 4096
    max_image_pixels: int = 4096 * 4096
    log_message_bytes: int = 40 * 1024  # one LogLines (the agent keeps each below 32 KiB)
    log_messages_burst: int = 40  # a full answer (1000 lines) is at most ~20 messages
    log_messages_per_s: float = 1.0


def refused(rule: str, message: str, *, retry: bool = False, **context: Any) -> ProtocolError:
    """The error for a message refused by ``rule`` (``retry``: not receipted, the device sends it again)."""
    return ProtocolError(message, budget=rule, retry=retry, **context)


class Counters:
    """Refusals per rule, and per device for at most ``max_devices`` devices (thread-safe)."""

    def __init__(self, max_devices: int = 1000) -> None:
        self._lock = threading.Lock()
        self._rules: dict[str, int] = dict.fromkeys(RULES, 0)
        self._devices: OrderedDict[str, dict[str, int]] = OrderedDict()
        self.max_devices = max_devices

    def count(self, rule: str, device_id: str | None = None, n: int = 1) -> None:
        if n <= 0:
            return
        with self._lock:
            self._rules[rule] = self._rules.get(rule, 0) + n
            if device_id:
                per = self._devices.pop(device_id, None) or {}
                per[rule] = per.get(rule, 0) + n
                self._devices[device_id] = per  # most recent offender last
                while len(self._devices) > self.max_devices:
                    self._devices.popitem(last=False)

    def rules(self) -> dict[str, int]:
        with self._lock:
            return dict(self._rules)

    def devices(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {d: dict(v) for d, v in self._devices.items()}

    def total(self) -> int:
        with self._lock:
            return sum(self._rules.values())


@dataclass
class DeviceLabelResult:
    applied: int = 0
    pending: int = 0
    refused: dict[str, list[str]] = field(default_factory=dict)  # rule -> device ids (one per refusal)


class SenderChecks:
    """The lookups behind the rules above, cached; used from the ingest writer thread only."""

    def __init__(self, registry: Any, budgets: Budgets, counters: Counters, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.budgets = budgets
        self.counters = counters
        self._clock = clock
        self._jobs: OrderedDict[str, tuple[str, str]] = OrderedDict()  # job id -> (device id, rollout id)
        self._versions: OrderedDict[str, str] = OrderedDict()  # rollout id -> version
        self._labels: OrderedDict[tuple[str, str], frozenset[str] | None] = OrderedDict()
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._log_buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    # ------------------------------------------------------------------ jobs
    def _job(self, job_id: str) -> tuple[str, str] | None:
        hit = self._jobs.get(job_id)
        if hit is not None:
            return hit
        target = self.registry.target_for_job(job_id)
        if target is None:
            return None  # not cached: the target may be created later
        hit = self._jobs[job_id] = (target.device_id, target.rollout_id)
        _trim(self._jobs, 20_000)
        return hit

    def check_job(self, device_id: str, msg: JobStatus) -> None:
        owner = self._job(msg.job_id)
        if owner is not None and owner[0] != device_id:
            raise refused("job_foreign", f"job {msg.job_id!r} belongs to {owner[0]!r}, not {device_id!r}")

    def check_bundle_request(self, device_id: str, req: BundleRequest) -> None:
        owner = self._job(req.job_id)
        if owner is None or owner[0] != device_id:
            raise refused("bundle_request_foreign", f"bundle request for job {req.job_id!r}, which is not "
                                                    f"{device_id!r}'s")
        version = self._versions.get(owner[1])
        if version is None:
            rec = self.registry.rollout(owner[1])
            version = self._versions[owner[1]] = rec.version if rec is not None else ""
            _trim(self._versions, 1000)
        if req.version != version:
            raise refused("bundle_request_foreign", f"bundle request for version {req.version!r}; "
                                                    f"job {req.job_id!r} deploys {version!r}")
        bucket = self._buckets.get(device_id)
        if bucket is None:
            b = self.budgets
            bucket = self._buckets[device_id] = TokenBucket(1.0 / b.bundle_request_interval_s,
                                                            b.bundle_request_burst, clock=self._clock)
            _trim(self._buckets, 50_000)
        if not bucket.try_take():
            raise refused("bundle_request_rate", f"{device_id} asks for bundles faster than one every "
                                                 f"{self.budgets.bundle_request_interval_s:g} s")

    # ------------------------------------------------------------------ remote logs
    def check_log_lines(self, device_id: str, size: int) -> None:
        """A LogLines message of ``size`` bytes from ``device_id``: within its size and rate (before decoding)."""
        b = self.budgets
        if size > b.log_message_bytes:
            raise refused("logs_size", f"{size}-byte log lines message (limit {b.log_message_bytes})")
        bucket = self._log_buckets.get(device_id)
        if bucket is None:
            bucket = self._log_buckets[device_id] = TokenBucket(b.log_messages_per_s, b.log_messages_burst,
                                                                clock=self._clock)
            _trim(self._log_buckets, 50_000)
        if not bucket.try_take():
            raise refused("logs_rate", f"{device_id} sends log lines faster than {b.log_messages_per_s:g} "
                                       "messages a second")

    # ------------------------------------------------------------------ labels
    @staticmethod
    def check_feedback_source(payload: bytes) -> None:
        """A device's feedback may say ``source: device`` or nothing: the fleet sets the source."""
        try:
            claimed = json.loads(payload).get("source")
        except (ValueError, AttributeError):
            claimed = None
        if claimed not in (None, "device"):
            raise refused("label_source", f"device feedback claims source {claimed!r}")

    def model_labels(self, name: str | None, version: str | None) -> frozenset[str] | None:
        """The class names of a registered model version, or None when unknown (not checked then)."""
        if not name or not version:
            return None
        key = (name, version)
        if key in self._labels:
            return self._labels[key]
        labels: frozenset[str] | None = None
        rec = self.registry.model(name, version)
        if rec is not None and rec.bundle_path:
            try:
                from core.bundle import open_bundle

                labels = frozenset(open_bundle(rec.bundle_path, require_signature=False).labels) or None
            except (EdgeloopError, OSError) as exc:
                log.warning("cannot read the labels of %s %s: %s", name, version, exc)
        self._labels[key] = labels
        _trim(self._labels, 256)
        return labels


def apply_device_labels(s: Session, items: Sequence[tuple[str, Feedback]], checks: SenderChecks) -> DeviceLabelResult:
    """Write devices' feedback ``(device id, feedback)`` through ``s`` under the rules above."""
    out = DeviceLabelResult()
    latest: dict[tuple[str, str], str] = {}
    for device_id, fb in items:  # the last label a device gives a sample wins
        latest[(device_id, fb.sample_id)] = str(fb.label)
    ids = list({sid for _d, sid in latest})
    samples = {r.id: r for r in s.execute(select(SampleRow.id, SampleRow.device_id, SampleRow.model_version,
                                                 SampleRow.label_source).where(SampleRow.id.in_(ids)))}
    pending = {r.sample_id: r.device_id for r in s.execute(
        select(PendingLabel.sample_id, PendingLabel.device_id).where(PendingLabel.sample_id.in_(ids)))}
    devices = {r.id: r for r in s.execute(select(Device.id, Device.model_name, Device.model_version)
                                          .where(Device.id.in_(list({d for d, _ in latest}))))}
    now = time.time()
    parked: list[dict[str, Any]] = []
    parked_per_device: dict[str, int] = {}

    def refuse(rule: str, device_id: str) -> None:
        out.refused.setdefault(rule, []).append(device_id)

    for (device_id, sample_id), label in latest.items():
        dev = devices.get(device_id)
        row = samples.get(sample_id)
        if row is not None:
            if row.device_id != device_id:
                refuse("label_foreign", device_id)
                continue
            allowed = checks.model_labels(dev.model_name if dev else None, row.model_version)
            if allowed is not None and label not in allowed:
                refuse("label_class", device_id)
                continue
            if row.label_source not in _DEVICE_REPLACEABLE:
                continue  # an operator's (or teacher's) label stays; the feedback is simply superseded
            s.execute(update(SampleRow).where(SampleRow.id == sample_id, SampleRow.device_id == device_id)
                      .values(label=label, label_source="device", label_confidence=None, labelled_at=now))
            out.applied += 1
            continue
        if sample_id in pending and pending[sample_id] != device_id:
            refuse("label_foreign", device_id)  # an operator's or another device's pending label stays
            continue
        allowed = checks.model_labels(dev.model_name, dev.model_version) if dev else None
        if allowed is not None and label not in allowed:
            refuse("label_class", device_id)
            continue
        if sample_id not in pending:
            if device_id not in parked_per_device:
                parked_per_device[device_id] = int(s.scalar(select(func.count()).select_from(PendingLabel)
                                                            .where(PendingLabel.device_id == device_id)) or 0)
            if parked_per_device[device_id] >= checks.budgets.pending_labels_per_device:
                refuse("pending_labels", device_id)
                continue
            parked_per_device[device_id] += 1
        parked.append({"sample_id": sample_id, "label": label, "source": "device", "device_id": device_id,
                       "ts": now})
    if parked:
        s.execute(PendingLabel.__table__.delete().where(PendingLabel.sample_id.in_([p["sample_id"] for p in parked])))
        s.execute(PendingLabel.__table__.insert(), parked)
        out.pending = len(parked)
    return out


def _trim(d: OrderedDict[Any, Any], n: int) -> None:
    while len(d) > n:
        d.popitem(last=False)


def write_device_labels(engine: Any, items: Sequence[tuple[str, Feedback]], checks: SenderChecks) -> int:
    """:func:`apply_device_labels` in one transaction of its own; counts refusals, returns their number."""
    from .db import make_sessionmaker

    with make_sessionmaker(engine).begin() as s:
        result = apply_device_labels(s, items, checks)
    n = 0
    for rule, devices in result.refused.items():
        for device_id in devices:
            checks.counters.count(rule, device_id)
            n += 1
    return n
