"""Every update and rollback decision of the agent, in this one module.

Where does the agent decide to roll back?  Here, in four places, all in :class:`Updates`:

1. :meth:`Updates.boot` -- the **boot counter**.  A start that follows an *unclean* exit
   (a crash, ``kill -9``, an OOM kill, a watchdog restart, a start that died loading the
   model: any exit that did not leave the clean-shutdown marker) while the current model
   is still on probation counts.  After ``[update].max_boots`` counted starts within
   ``boot_window_min`` of the switch, the model is rolled back.  Clean stops
   (:meth:`Updates.mark_clean_shutdown`, called by ``Agent.close`` on SIGTERM or at the
   end of a script) never count, so restarting a healthy agent keeps its model.
2. :meth:`Updates.load_serving` -- the serving slot does not load at start: fall back to
   the previous slot.
3. :meth:`Updates.install` -- a new model that fails its health check
   (:class:`~core.errors.HealthCheckError`) is never switched to: the old one keeps
   serving (reported as ``failed`` + ``rolled_back``); one that passes but then does not
   load is switched back at once.
4. :meth:`Updates.rollback` -- asked for by the fleet (``RollbackCommand``, run by
   :mod:`edge_agent.deploy`) or the operator (``edgeloop agent rollback``).

:meth:`Updates.install_shadow` installs a candidate without switching to it and shadows
it (:mod:`edge_agent.shadow`, the fleet's shadow stage); the next switch or rollback, or
:meth:`Updates.stop_shadow`, ends the shadow.

:meth:`Updates.maybe_confirm` ends the probation after a healthy boot window, and
:meth:`Updates.follow_pointer` serves a slot another process switched to.  The mechanics
live elsewhere: verifying, unpacking and health-checking a bundle in
:mod:`edge_agent.updater`, the atomic pointer, slots and boot-counter files in
:mod:`edge_agent.slots`.  Every step is reported through a
:class:`~edge_agent.jobs.JobReporter`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from core.agent_config import AgentConfig
from core.errors import EdgeloopError, HealthCheckError, UpdateError
from core.manifest import Manifest

from .inference import LoadedModel
from .jobs import JobReporter
from .shadow import DEFAULT_EVERY, ShadowRunner
from .slots import Pointer, SlotStore
from .updater import Installer, InstallResult, read_slot_manifest

__all__ = ["Updates"]

log = logging.getLogger(__name__)


class Updates:
    """The agent's model lifecycle: boot counter, serving slot, install, rollback, confirm.

    ``serve(model)`` puts a loaded model into service (and closes the one it replaces);
    ``serving()`` returns the model in service; ``changed()`` is called after every switch
    (the agent publishes its new state).  Thread-safe: one update at a time.
    """

    def __init__(self, config: AgentConfig, slots: SlotStore, installer: Installer, jobs: JobReporter, *,
                 serve: Callable[[LoadedModel], None], serving: Callable[[], LoadedModel | None],
                 changed: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.time,
                 on_shadow: Callable[[ShadowRunner | None], None] = lambda runner: None) -> None:
        self.config = config
        self.slots = slots
        self.installer = installer
        self.jobs = jobs
        self._serve = serve
        self._serving = serving
        self._changed = changed
        self._clock = clock
        self._lock = threading.Lock()
        self.started_at = clock()
        self.boot_rollback: str | None = None  # the slot the boot counter rolled back from
        self._counting = False  # this process took part in the boot counter (the daemon)
        self._on_shadow = on_shadow  # the agent hands the runner to its inference pipeline
        self.shadow: ShadowRunner | None = None

    # ------------------------------------------------------------------ start / stop
    def boot(self) -> None:
        """Apply the boot counter, then serve the current slot (decision 1, then 2)."""
        self._counting = True
        clean = self.slots.take_clean_shutdown()  # persisted before the model loads: a crash now counts
        self.slots.remove_temporaries()  # what a crash in the middle of an install left behind
        if not clean:
            boots = self.slots.record_boot(self.config.update.boot_window_min * 60.0)
            ptr = self.slots.pointer()
            if ptr is not None and ptr.previous and boots >= self.config.update.max_boots:
                reason = (f"{boots} starts after unclean exits within {self.config.update.boot_window_min:g} min "
                          f"of the switch")
                log.warning("boot counter: rolling back from %s (%s)", ptr.slot, reason)
                bad = read_slot_manifest(self.slots, ptr.slot)
                self.slots.rollback(reason)
                self.boot_rollback = ptr.slot
                self.jobs.report(f"boot-{uuid.uuid4().hex[:8]}", bad.version if bad else ptr.slot, "rolled_back",
                                 False, reason)
        try:
            self.load_serving()
        except BaseException:
            self._counting = False  # a start that cannot serve is not a clean run: the next start counts
            raise

    def mark_clean_shutdown(self) -> None:
        """The agent stops cleanly: its next start is not counted by the boot counter."""
        if self._counting:
            self.slots.mark_clean_shutdown()
            self._counting = False

    def load_serving(self) -> None:
        """Serve the current slot; if it will not load and a previous one exists, roll back to that."""
        self.started_at = self._clock()
        name = self.slots.serving_slot()
        if name is None:
            log.warning("no model installed yet; install one with `edgeloop agent install BUNDLE`")
            return
        try:
            self.swap_in(name)
        except EdgeloopError as exc:
            ptr = self.slots.pointer()
            if ptr is None or not ptr.previous or ptr.previous == name:
                raise
            log.error("slot %s does not load (%s); rolling back to %s", name, exc, ptr.previous)
            self.slots.rollback(f"current slot does not load: {exc}")
            self.swap_in(self.slots.pointer().slot)  # type: ignore[union-attr]

    def swap_in(self, name: str) -> LoadedModel:
        """Load slot ``name`` and put it into service."""
        info = self.slots.read_info(name)
        manifest = read_slot_manifest(self.slots, name)
        if manifest is None:
            raise UpdateError(f"slot {name} has no readable manifest", path=str(self.slots.slot_path(name)))
        variant = info.get("variant") or manifest.variants[0].id
        m = self.config.model
        accelerator = (info.get("choice") or {}).get("accelerator", "cpu")  # edge_agent.accel, chosen at install
        model = LoadedModel(self.slots.slot_path(name), variant, threads=m.threads, accelerator=accelerator,
                            drift=self.config.drift.enabled, drift_window=self.config.drift.window,
                            drift_budgets=self.config.drift.budgets)
        self._serve(model)
        log.info("serving %s %s (%s) from slot %s", manifest.name, manifest.version, variant, name)
        return model

    # ------------------------------------------------------------------ updates
    def current_manifest(self) -> Manifest | None:
        model = self._serving()
        return model.manifest if model is not None else None

    def serving_version(self) -> str | None:
        model = self._serving()
        return model.version if model is not None else None

    def install(self, bundle_path: str | Path, *, job_id: str | None = None, force: bool = False) -> InstallResult:
        """Verify, unpack, choose variant, health check, switch, serve (decision 3).

        Every step goes out as a job step; on any failure the old model keeps serving and
        :class:`UpdateError` (:class:`HealthCheckError` for a failed check) or
        :class:`BundleError` is raised.
        """
        job = job_id or f"local-{uuid.uuid4().hex[:8]}"
        path = Path(bundle_path)
        with self._lock:
            current = self.current_manifest()
            prev = current.version if current else None
            version = _announced_version(path)

            def report(step: str, ok: bool, detail: str, progress: float | None) -> None:
                self.jobs.report(job, version, step, ok, detail, progress, prev)

            try:
                result = self.installer.install(path, current=current, force=force, report=report)
            except HealthCheckError as exc:  # never switched to: the old model is still serving
                self.jobs.report(job, version, "failed", False, str(exc), None, prev)
                self.jobs.report(job, version, "rolled_back", True, f"still serving {prev}", None, prev)
                raise
            except EdgeloopError as exc:
                self.jobs.report(job, version, "failed", False, str(exc), None, prev)
                raise
            version = result.version
            self.stop_shadow()  # serving the candidate (or anything else) ends its shadow
            # the first model has nothing to roll back to: no probation for it
            self.slots.switch(result.slot, confirmed=current is None)
            try:
                self.swap_in(result.slot)
            except EdgeloopError as exc:  # loaded in the health check, so this is rare: go back
                if current is not None:
                    self.slots.rollback(f"new slot does not load: {exc}")
                    self.swap_in(self.slots.pointer().slot)  # type: ignore[union-attr]
                self.jobs.report(job, version, "rolled_back", False, str(exc), None, prev)
                raise UpdateError(f"model {version} installed but does not serve: {exc}", version=version) from exc
            self.jobs.report(job, version, "switched", True, f"serving {result.choice.variant} from slot {result.slot}",
                             None, prev)
            removed = self.slots.gc(self.config.update.keep_slots)
            self.jobs.report(job, version, "completed", True, result.health.detail, 1.0, prev)
            self._changed()
            return InstallResult(result.version, result.slot, result.choice, result.health, prev, tuple(removed))

    def rollback(self, reason: str = "requested", *, job_id: str | None = None) -> Pointer:
        """Switch back to the previous slot now (decision 4)."""
        job = job_id or f"rollback-{uuid.uuid4().hex[:8]}"
        with self._lock:
            self.stop_shadow()
            current = self.current_manifest()
            ptr = self.slots.rollback(reason)
            self.swap_in(ptr.slot)
            now = self.current_manifest()
            self.jobs.report(job, now.version if now else ptr.slot, "rolled_back", True,
                             f"{reason}; was {current.version if current else ptr.rolled_back_from}", None,
                             current.version if current else None)
            self._changed()
            return ptr

    def install_shadow(self, bundle_path: str | Path, *, job_id: str | None = None,
                       every: int = DEFAULT_EVERY) -> ShadowRunner:
        """Verify, unpack and health-check a candidate like :meth:`install`, but do not switch:
        run it beside the serving model on every ``every``-th input (:mod:`edge_agent.shadow`).

        Its outputs are never served; the job ends ``completed`` (detail: shadowing).  A
        shadow already running is replaced.
        """
        job = job_id or f"shadow-{uuid.uuid4().hex[:8]}"
        path = Path(bundle_path)
        with self._lock:
            current = self.current_manifest()
            prev = current.version if current else None
            version = _announced_version(path)

            def report(step: str, ok: bool, detail: str, progress: float | None) -> None:
                self.jobs.report(job, version, step, ok, detail, progress, prev)

            try:
                result = self.installer.install(path, current=current, report=report)
                model = LoadedModel(self.slots.slot_path(result.slot), result.choice.variant,
                                    threads=self.config.model.threads, accelerator=result.choice.accelerator,
                                    drift=False)
            except EdgeloopError as exc:
                self.jobs.report(job, version, "failed", False, str(exc), None, prev)
                raise
            self.stop_shadow()
            self.shadow = ShadowRunner(model, every=every)
            self._on_shadow(self.shadow)
            self.jobs.report(job, result.version, "completed", True,
                             f"shadowing {result.version} on every {every}th input, not serving it (slot {result.slot})",
                             1.0, prev)
            return self.shadow

    def stop_shadow(self) -> None:
        """End the shadow, if any (the candidate's slot stays installed)."""
        runner, self.shadow = self.shadow, None
        if runner is not None:
            self._on_shadow(None)
            runner.close()

    def maybe_confirm(self) -> bool:
        """Mark the current slot good once the agent has run ``boot_window_min`` since starting."""
        ptr = self.slots.pointer()
        if ptr is None or ptr.confirmed:
            return False
        if self._clock() - max(self.started_at, ptr.switched_at) >= self.config.update.boot_window_min * 60.0:
            self.slots.confirm()
            log.info("slot %s confirmed after a healthy boot window", ptr.slot)
            return True
        return False

    def follow_pointer(self) -> bool:
        """Serve the slot ``current`` names if another process (``edgeloop agent install``) switched it."""
        name = self.slots.serving_slot()
        model = self._serving()
        if name is None or (model is not None and model.slot_dir.name == name):
            return False
        if not self._lock.acquire(blocking=False):
            return False  # an update of our own is switching right now
        try:
            self.swap_in(name)
            self._changed()
            return True
        except EdgeloopError as exc:
            log.error("cannot serve slot %s: %s", name, exc)
            return False
        finally:
            self._lock.release()


def _announced_version(path: Path) -> str:
    """The version a bundle's (not yet verified) manifest names, for the job reports only."""
    from core.bundle import read_manifest_unverified

    try:
        return read_manifest_unverified(path).version
    except EdgeloopError:
        return path.name
