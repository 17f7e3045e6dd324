"""Fleet commands on the device: DeployCommand and RollbackCommand, one job at a time.

Commands arrive on the MQTT link's command thread; a deploy can take minutes (a slow
download, a variant benchmark), and MQTT bundle chunks arrive on that same thread, so
jobs run on a worker thread of their own and the command thread only hands over.

A deploy: ``received`` -> ``downloading`` (HTTP with Range resume and retries, or MQTT
chunk frames requested with ``BundleRequest`` and reassembled, resumable by chunk index)
-> the installer's ``verifying`` / ``installing`` / ``health_check`` -> ``switched`` ->
``completed``, or ``failed`` (+ ``rolled_back`` when the old model was kept because the
new one failed its check).  Each step is reported through the narrow
:class:`~edge_agent.jobs.JobReporter`; installing and rolling back are
:class:`~edge_agent.updates.Updates`' decisions, never this module's.

A corrupt MQTT transfer (the whole fails its sha256, or the chunks contradict each
other) is requested again from chunk 0, up to ``[update].mqtt_corrupt_retries`` times,
each announced by a ``downloading`` step ("transfer corrupt, requesting again (1/2)"),
before the job fails.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.chunks import Reassembler
from core.errors import EdgeloopError, ProtocolError, UpdateError
from core.protocol import (
    BUNDLE_KIND,
    BundleRequest,
    DeployCommand,
    Frame,
    Message,
    RollbackCommand,
    validate_name,
)

from .jobs import JobReporter
from .shadow import DEFAULT_EVERY
from .updater import disk_error, download_http
from .updates import Updates

__all__ = ["CommandWorker"]

log = logging.getLogger(__name__)


_CORRUPT_DROPS = ("corrupt", "inconsistent")  # Reassembler drop reasons a fresh transfer may cure


class _MqttBundle:
    """Chunk frames of one MQTT-delivered bundle, reassembled and checked against the command.

    ``corrupt`` tells a failure that asking again may cure (bad bytes on the way) from one
    it cannot (the agent stopping, a transfer expiring).
    """

    def __init__(self, cmd: DeployCommand) -> None:
        self.cmd = cmd
        self.done = threading.Event()
        self.data: bytes | None = None
        self.error: str | None = None
        self.corrupt = False
        self._lock = threading.Lock()
        self._reasm = Reassembler(max_transfers=1, max_bytes=cmd.size + (1 << 20), ttl_s=3600.0,
                                  on_drop=lambda d: self._fail(f"bundle transfer dropped: {d.reason} {d.detail}",
                                                               corrupt=d.reason in _CORRUPT_DROPS))

    def _fail(self, why: str, *, corrupt: bool = False) -> None:
        if self.error is None:  # the first reason is the real one (a drop also raises)
            self.error = why
            self.corrupt = corrupt
        self.done.set()

    def add(self, frame: Frame) -> None:
        with self._lock:
            if self.done.is_set():
                return  # finished or failed: late chunks belong to no transfer
            try:
                completed = self._reasm.add(frame)
            except ProtocolError as exc:  # sha256 of the whole, size, contradicting chunks
                self._fail(str(exc), corrupt=True)
                return
            if completed is None:
                return
            if completed.sha256 != self.cmd.sha256 or len(completed.data) != self.cmd.size:
                self._fail(f"bundle received over MQTT has sha256 {completed.sha256[:12]}..., "
                           f"the deploy command announced {self.cmd.sha256[:12]}...", corrupt=True)
                return
            self.data = completed.data
            self.done.set()

    def first_missing(self) -> int:
        with self._lock:
            missing = self._reasm.missing(self.cmd.job_id)
        return missing[0] if missing else 0


class CommandWorker:
    """Runs fleet commands for one device on a background thread, in arrival order.

    ``updates`` installs and rolls back, ``jobs`` reports the steps, ``send`` queues the
    bundle requests of an MQTT delivery, ``downloads`` holds bundles while they arrive.
    """

    def __init__(self, updates: Updates, jobs: JobReporter, send: Callable[[Message], None], *, device_id: str,
                 retries: int = 3, retry_wait_s: float = 2.0, mqtt_timeout_s: float = 300.0) -> None:
        self.updates = updates
        self.jobs = jobs
        self.send = send
        self.device_id = device_id
        self.config = updates.config
        self.downloads = self.config.state_dir / "downloads"
        self.retries = retries
        self.retry_wait_s = retry_wait_s
        self.mqtt_timeout_s = mqtt_timeout_s
        self._queue: queue.Queue[DeployCommand | RollbackCommand | None] = queue.Queue(maxsize=64)
        self._stop = threading.Event()
        self._bundle: _MqttBundle | None = None
        self._done_jobs: dict[str, str] = {}  # job id -> final step (QoS 1 redelivers commands)
        self.idle = threading.Event()
        self.idle.set()
        self._thread = threading.Thread(target=self._loop, name=f"jobs-{device_id}", daemon=True)
        self._thread.start()

    # called on the MQTT command thread
    def on_command(self, cmd: Any) -> None:
        """The AgentLink's ``on_command``: queue deploy/rollback, route bundle chunks."""
        if isinstance(cmd, Frame):
            bundle = self._bundle
            if cmd.kind == BUNDLE_KIND and bundle is not None and cmd.transfer_id == bundle.cmd.job_id:
                bundle.add(cmd)
            else:
                log.info("ignoring bundle chunk %s/%d (no matching download)", cmd.transfer_id, cmd.index)
            return
        self.submit(cmd)

    def submit(self, cmd: DeployCommand | RollbackCommand) -> None:
        self.idle.clear()
        try:
            self._queue.put_nowait(cmd)
        except queue.Full:
            log.error("command queue full; dropped %s %s", cmd.TYPE, cmd.job_id)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once every submitted command has finished (tests, shutdown)."""
        return self.idle.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._bundle is not None:
            self._bundle._fail("agent stopping")
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout)

    # worker thread
    def _loop(self) -> None:
        while not self._stop.is_set():
            cmd = self._queue.get()
            if cmd is None:
                return
            try:
                if isinstance(cmd, DeployCommand):
                    self._deploy(cmd)
                else:
                    self._rollback(cmd)
            except Exception:  # a job must never take the agent down
                log.exception("job %s crashed", cmd.job_id)
            finally:
                if self._queue.empty():
                    self.idle.set()

    def _rollback(self, cmd: RollbackCommand) -> None:
        self.updates.stop_shadow()  # a rollback also ends a shadow (the fleet's shadow stage failed)
        if cmd.to_version is not None and self.updates.serving_version() == cmd.to_version:
            self.jobs.report(cmd.job_id, cmd.to_version, "rolled_back", True, "already serving that version")
            return
        try:
            self.updates.rollback(cmd.reason, job_id=cmd.job_id)
        except EdgeloopError as exc:
            self.jobs.report(cmd.job_id, cmd.to_version or "?", "failed", False, f"rollback: {exc}")

    def _deploy(self, cmd: DeployCommand) -> None:
        jobs = self.jobs
        prev = self.updates.serving_version()
        if cmd.job_id in self._done_jobs:
            log.info("job %s already handled (%s); ignoring the redelivery", cmd.job_id, self._done_jobs[cmd.job_id])
            return
        if prev == cmd.version:
            jobs.report(cmd.job_id, cmd.version, "completed", True, "already serving this version", 1.0, prev)
            self._done_jobs[cmd.job_id] = "completed"
            return
        jobs.report(cmd.job_id, cmd.version, "received", True, f"{cmd.delivery} delivery, {cmd.size} bytes", 0.0, prev)
        dest = self.downloads / f"{validate_name(cmd.job_id)}.elb"  # never a path, whoever built the command
        try:
            self.updates.installer.check_disk(cmd.size * 3, self.downloads)  # the file, the slot, a margin
            if not cmd.shadow and self._reuse_shadowed(cmd, dest):
                jobs.report(cmd.job_id, cmd.version, "downloading", True, "the bundle this device shadowed: no transfer",
                            1.0, prev)
            elif cmd.delivery == "http":
                self._download_http(cmd, dest, prev)
            else:
                self._download_mqtt(cmd, dest, prev)
            if cmd.shadow:  # install without switching and run it beside the serving model
                self.updates.install_shadow(dest, job_id=cmd.job_id, every=cmd.shadow_every or DEFAULT_EVERY)
                self._keep_shadowed(cmd, dest)
            else:
                self.updates.install(dest, job_id=cmd.job_id)  # verifying ... completed, or failed (+ rolled_back)
            self._done_jobs[cmd.job_id] = "completed"
        except EdgeloopError as exc:
            if jobs.last_step(cmd.job_id) not in ("failed", "rolled_back"):
                jobs.report(cmd.job_id, cmd.version, "failed", False, str(exc), None, prev)
            self._done_jobs[cmd.job_id] = "failed"
        finally:
            self._bundle = None
            dest.unlink(missing_ok=True)
            dest.with_name(dest.name + ".part").unlink(missing_ok=True)
            while len(self._done_jobs) > 256:  # bounded memory on a long-lived device
                self._done_jobs.pop(next(iter(self._done_jobs)))

    # The canary serves the very bundle it shadowed: keep that file (one, by hash) so the deploy that follows
    # the shadow stage needs no second transfer (on a loaded machine the MQTT transfer took 200 s of a 300 s
    # job timeout).  It is checked against the command's hash and verified by the install like any download.
    def _shadow_copy(self, cmd: DeployCommand) -> Path:
        return self.downloads / f"shadowed-{validate_name(cmd.sha256, 'bundle sha256')}.elb"

    def _drop_shadowed(self) -> None:
        for old in self.downloads.glob("shadowed-*.elb"):
            old.unlink(missing_ok=True)

    def _keep_shadowed(self, cmd: DeployCommand, dest: Path) -> None:
        self._drop_shadowed()
        try:
            dest.replace(self._shadow_copy(cmd))
        except (OSError, EdgeloopError) as exc:  # only a shortcut: the deploy downloads it again
            log.warning("could not keep the shadowed bundle: %s", exc)

    def _reuse_shadowed(self, cmd: DeployCommand, dest: Path) -> bool:
        try:
            copy = self._shadow_copy(cmd)
        except EdgeloopError:
            copy = None
        if copy is None or not copy.is_file():
            self._drop_shadowed()  # another bundle: the shadowed one is not coming
            return False
        with copy.open("rb") as f:
            same = hashlib.file_digest(f, "sha256").hexdigest() == cmd.sha256.lower()
        if not same:
            copy.unlink(missing_ok=True)
            return False
        copy.replace(dest)
        return True

    def _download_http(self, cmd: DeployCommand, dest: Path, prev: str | None) -> None:
        step = [0.0]

        def progress(have: int, total: int) -> None:
            frac = have / total
            if frac - step[0] >= 0.25:  # a few reports, not one per block
                step[0] = frac
                self.jobs.report(cmd.job_id, cmd.version, "downloading", True, f"{have}/{total} bytes",
                                 round(frac, 3), prev)

        self.jobs.report(cmd.job_id, cmd.version, "downloading", True, str(cmd.url), 0.0, prev)
        last: EdgeloopError | None = None
        for attempt in range(1, self.retries + 1):
            try:
                download_http(str(cmd.url), dest, size=cmd.size, sha256=cmd.sha256,
                              timeout=self.config.update.download_timeout_s, progress=progress)
                return
            except UpdateError as exc:
                last = exc
                if "received" not in exc.context or self._stop.is_set():
                    raise  # not a transient interruption: wrong hash, HTTP 404, full disk
                log.warning("download attempt %d/%d: %s", attempt, self.retries, exc)
                self._stop.wait(self.retry_wait_s * attempt)
        assert last is not None
        raise last

    def _download_mqtt(self, cmd: DeployCommand, dest: Path, prev: str | None) -> None:
        retries = self.config.update.mqtt_corrupt_retries
        attempt = 0
        while True:
            bundle = self._receive_mqtt(cmd, prev)
            if not bundle.error and bundle.data is not None:
                break
            if not bundle.corrupt or attempt >= retries or self._stop.is_set():
                raise UpdateError(bundle.error or "bundle transfer failed", version=cmd.version)
            attempt += 1
            log.warning("job %s: %s; requesting the bundle again (%d/%d)", cmd.job_id, bundle.error, attempt, retries)
            self.jobs.report(cmd.job_id, cmd.version, "downloading", True,
                             f"transfer corrupt, requesting again ({attempt}/{retries})", None, prev)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(bundle.data)
        except OSError as exc:
            dest.unlink(missing_ok=True)
            raise disk_error(exc, "store the bundle", dest) from exc

    def _receive_mqtt(self, cmd: DeployCommand, prev: str | None) -> _MqttBundle:
        """One transfer from chunk 0: request, re-request from the first missing chunk while
        chunks stop coming, until it is whole or has failed (``bundle.error``)."""
        bundle = self._bundle = _MqttBundle(cmd)  # a fresh reassembler: nothing kept from a corrupt try
        waited = 0.0
        step = max(5.0, self.mqtt_timeout_s / 10)
        while not bundle.done.is_set():
            start = bundle.first_missing()
            self.jobs.report(cmd.job_id, cmd.version, "downloading", True, f"requesting chunks from {start} over MQTT",
                             None, prev)
            self.send(BundleRequest(device_id=self.device_id, job_id=cmd.job_id, version=cmd.version, start=start))
            if bundle.done.wait(step):
                break
            waited += step
            if waited >= self.mqtt_timeout_s or self._stop.is_set():
                raise UpdateError(f"bundle {cmd.version} did not arrive over MQTT within {self.mqtt_timeout_s:g} s",
                                  hint="check the fleet manager answers bundle requests", version=cmd.version)
        return bundle
