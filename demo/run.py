"""``edgeloop demo``: the whole loop on one machine, with real components.

broker → fleet (SQLite, ingestion, worker) → digits model trained and exported as a signed
bundle → N cameras running the real agent over real MQTT → a camera shift on some of
them → drift alarms and samples → labels on the feedback topic → retraining trigger →
fine-tune → gates → canary → waves → accuracy back.  Prints a timeline, writes a report.

Phases (what the accuracy table reports): ``baseline`` (clean images, v1), ``drifted``
(shifted cameras see darker, blurred, tilted images; v1), ``rollout`` (the new version
goes out), ``recovered`` (every camera on the new version).  The cameras draw their
images from the training run's *validation* split, never from the test split the gate
measures the original accuracy on.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import FleetError
from core.progress import Progress

from .report import (
    RECOVERY_MARGIN_PP,
    DemoResult,
    DriftPoint,
    Event,
    Observation,
    recovery_gap_ci_pp,
    write_report,
)
from .shifts import DEMO_SHIFT, NO_SHIFT, CameraShift

if TYPE_CHECKING:
    from fleet.registry import Registry

__all__ = ["DemoConfig", "run_demo"]

log = logging.getLogger(__name__)
MODEL_NAME = "digits"
# The story's phases, announced on stderr as each begins (core.progress: also with --json, not with -q).
PHASES = ("train", "export", "fleet", "baseline", "shift", "trigger", "retrain", "rollout", "recovered")


@dataclass(frozen=True)
class DemoConfig:
    """Knobs of the demo; ``quick`` picks smaller, faster settings (CI)."""

    out: Path
    quick: bool = False
    devices: int = 6
    shifted: int | None = None  # default: half the cameras
    broker: str = "auto"  # "auto" | "mosquitto" | "amqtt"
    seed: int = 0
    fps: float = 25.0  # images per second per camera
    label_fraction: float = 0.8
    shift: CameraShift = DEMO_SHIFT
    timeout_s: float = 1800.0  # shift -> recovered; a busy 2-core machine retrained for 650 s in one run
    threads: int = 2  # torch threads for training

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.devices < 2:
            raise FleetError("the demo needs at least 2 devices (some shifted, some clean)", hint="--devices 6")
        n = self.n_shifted
        if not 1 <= n < self.devices:
            raise FleetError(f"{n} shifted of {self.devices} devices: need at least one of each")

    @property
    def n_shifted(self) -> int:
        return self.shifted if self.shifted is not None else self.devices // 2

    @property
    def settings(self) -> dict[str, Any]:
        q = self.quick
        return {
            "image_size": 32, "epochs": 6 if q else 15, "fine_tune_epochs": 8 if q else 10, "fine_tune_lr": 2e-3,
            "onnx_precisions": ("fp32",) if q else ("fp32", "int8-static"),
            "drift_window": 50, "telemetry_s": 1.0, "soak_s": 4.0 if q else 10.0,
            "min_labels": 600 if q else 1000, "check_interval_s": 1.0,
        }


class _Timeline:
    def __init__(self, say: Callable[[str], None]) -> None:
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.events: list[Event] = []
        self.say = say
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, kind: str, text: str, *, at: float | None = None) -> None:
        """Record and print an event; ``at``: its wall-clock time when it happened elsewhere (the rollout)."""
        with self._lock:
            e = Event(round(self.now() if at is None else at - self.wall0, 2), kind, text)
            self.events.append(e)
        self.say(f"[{e.t:6.1f}s] {text}")


class _RolloutWatch:
    """Prints the rollout's own events (wave started, soak, verdict, promotion or rollback) as they
    happen, into the timeline as ``rollout.<kind>``."""

    def __init__(self, tl: _Timeline, load: Callable[[], Any]) -> None:
        self.tl, self.load, self.seen = tl, load, 0

    # where a verdict's per-metric evidence starts (the report's canary section shows it as a table)
    _EVIDENCE = re.compile(r"\): (?=latency|errors|accuracy|drift|confidence|agreement|not voting)")

    def __call__(self) -> Any:
        state = self.load()
        for e in state.events[self.seen:]:
            if e.kind != "created":
                detail = self._EVIDENCE.split(e.detail, maxsplit=1)
                text = detail[0] + (") — evidence in the report" if len(detail) > 1 else "")
                self.tl(f"rollout.{e.kind}", f"  rollout: {e.kind.replace('_', ' ')} — {text}".rstrip(" —"), at=e.ts)
        self.seen = len(state.events)
        return state


@dataclass
class _Flags:
    trigger: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    rollout: threading.Event = field(default_factory=threading.Event)
    data: dict[str, Any] = field(default_factory=dict)


def _wait(pred: Callable[[], bool], timeout: float, what: str, stop: threading.Event, step: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise FleetError(f"demo: timed out waiting for {what}")
        if stop.wait(step):
            raise FleetError("demo interrupted")


RECOVERED_WINDOWS_WAIT_S = 300.0  # how long the recovered pass's drift windows may take to reach the fleet (a loaded
# 2-core machine once delivered reports 114-187 s after they were sent; the wait ends when they are in)


def _await_windows(registry: Any, devices: Sequence[str], version: str, *, since: float, want: int,
                   stop: threading.Event) -> None:
    """Wait (bounded) until each of ``devices`` has ``want`` drift windows of ``version`` since ``since`` in the
    registry: they close on the agents' drift threads after the pass and then travel, and the report's
    recovered alarm rate is measured on them (a loaded machine once left it 0 windows)."""
    def arrived() -> bool:
        per = Counter(r.device_id for r in registry.drift.find(device_ids=list(devices), since=since)
                      if r.model_version == version)
        return all(per[d] >= want for d in devices)
    try:
        _wait(arrived, RECOVERED_WINDOWS_WAIT_S, "the recovered pass's drift windows", stop)
    except FleetError:
        if stop.is_set():
            raise
        log.warning("demo: the recovered pass's drift windows did not all arrive in %.0f s; the report "
                    "measures those that did", RECOVERED_WINDOWS_WAIT_S)


def run_demo(cfg: DemoConfig, *, say: Callable[[str], None] = print) -> DemoResult:
    """Run the demo end to end and write its report into ``cfg.out``; never raises for a loop that
    did not close (``DemoResult.closed`` says so), only for set-up failures."""
    from core.protocol import TopicScheme
    from core.signing import load_public_key, save_keypair
    from edge_agent.agent import Agent
    from export.pipeline import export_run
    from fleet.app import FleetApp
    from fleet.config import ApiConfig, BrokerConfig, RolloutConfig, default_config
    from fleet.dashboard import DashboardConfig
    from fleet.ingest import connect_client
    from fleet.policy import GatePolicy, RetrainPolicyConfig
    from fleet.rollout import RolloutPlan
    from fleet.worker import settings_from_config
    from train.api import TrainConfig, load_run, train_run

    from .broker import start_broker
    from .devices import Camera, Labeller, Truth, agent_config

    s = cfg.settings
    out = cfg.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tl = _Timeline(say)
    announce = Progress("demo", total=len(PHASES), bar=False).step  # lines: the training bar draws inside it
    stop = threading.Event()
    observations: list[Observation] = []
    obs_lock = threading.Lock()

    def record(o: Observation) -> None:
        with obs_lock:
            observations.append(o)

    cleanup: list[Callable[[], None]] = []
    dashboard_url: str | None = None
    try:
        broker = start_broker(cfg.broker, out / "broker")
        cleanup.append(broker.stop)
        tl("broker", f"broker: {broker.kind} on {broker.host}:{broker.port} (MQTT {broker.protocol})")
        token = secrets.token_urlsafe(12)
        fcfg = default_config(out / "fleet", model_name=MODEL_NAME,
                              broker=BrokerConfig(host=broker.host, port=broker.port, protocol=broker.protocol),
                              api=ApiConfig(port=0), rollout=RolloutConfig(delivery="mqtt"),
                              dashboard=DashboardConfig(operator_token=token, refresh_s=2.0))
        keys = save_keypair(fcfg.keys_dir / "fleet", overwrite=True)
        pub = load_public_key(keys.public)

        runs_dir = fcfg.data_dir / "runs"
        announce(f"train: tiny-cnn on digits, {s['epochs']} epochs")
        run_dir = train_run(TrainConfig(dataset="digits", model="tiny-cnn", image_size=s["image_size"],
                                        epochs=s["epochs"], out_dir=str(runs_dir), seed=cfg.seed,
                                        threads=cfg.threads), progress=True)  # as `edgeloop train`: stderr
        run = load_run(run_dir)
        tl("trained", f"trained tiny-cnn on digits: test accuracy {run.metrics['test']['accuracy']:.3f} ({run.run_id})")
        fcfg.bundles_dir.mkdir(parents=True, exist_ok=True)
        announce(f"export: signed bundle 1.0.0 ({', '.join(s['onnx_precisions'])})")
        report = export_run(run_dir, out=fcfg.bundles_dir, formats=("onnx",), onnx_precisions=s["onnx_precisions"],
                            sign_key=keys.private, version="1.0.0", name=MODEL_NAME, max_drop=1.0,
                            progress=Progress("export", None, bar=False).step)
        tl("exported", f"exported signed bundle {report.bundle.name}: variants {[v.id for v in report.kept]}")

        topics = TopicScheme(fcfg.prefix)
        policy = RetrainPolicyConfig(
            check_interval_s=s["check_interval_s"], alarm_devices=max(1, cfg.n_shifted - 1), alarm_reports=2,
            alarm_persist_s=0.0, min_labels_for_drift=s["min_labels"],
            # the label-count trigger stays out of the story: baseline samples are labelled too
            min_labelled_samples=1_000_000,
            cooldown_s=3600.0, fine_tune_epochs=s["fine_tune_epochs"], fine_tune_lr=s["fine_tune_lr"],
            gate=GatePolicy(holdout_fraction=0.3, min_improvement=0.05, max_original_drop=0.01, min_holdout=20))
        # the shadow stage first, as fleet serve does for retrained models: the canary runs 1.1.0 on every 2nd
        # input beside 1.0.0 for one soak, then serves it
        plan = RolloutPlan(canary=1 / cfg.devices, waves=(0.5, 1.0), soak_s=s["soak_s"], max_failures=0.05,
                           shadow_s=s["soak_s"], shadow_every=2,
                           job_timeout_s=300.0)  # a 1 MB transfer over MQTT on a loaded 2-core machine took 80 s
        flags = _Flags()

        def on_event(kind: str, data: dict[str, Any]) -> None:
            if kind == "trigger" and not flags.trigger.is_set():
                flags.data["trigger"] = data
                tl("trigger", f"retraining triggered: {data['reason']}")
                flags.trigger.set()
            elif kind == "retrain_done":
                o = data["outcome"]
                flags.data["outcome"] = o
                tl("candidate", f"candidate {o.version}: {o.status} — {o.reason}")
                if not o.accepted:
                    flags.done.set()
            elif kind == "rollout_started":
                flags.data["rollout_id"] = data["rollout_id"]
                tl("rollout_started", f"rollout {data['rollout_id']} of {data['version']} started "
                                      f"(canary, then waves {list(plan.waves)})")
                flags.rollout.set()
            elif kind in ("retrain_failed", "rollout_failed"):
                flags.data["error"] = data["error"]
                tl(kind, f"{kind.replace('_', ' ')}: {data['error']}")
                flags.done.set()

        # The whole fleet, as `edgeloop fleet serve` runs it, with the demo's policy and plan.
        announce(f"fleet: broker, ingestion, worker, dashboard, then {cfg.devices} cameras running the agent")
        app = FleetApp.from_config(fcfg, retrain=settings_from_config(fcfg, policy, threads=cfg.threads), plan=plan,
                                   tick_s=0.5, on_event=on_event)
        cleanup.append(app.stop)
        registry = app.registry
        registry.models.register(report.bundle, trusted_key=pub, status="accepted")
        app.start()
        driver = app.driver
        client, _proto = connect_client(fcfg.broker, client_id="edgeloop-demo-operator")  # the labeller's
        cleanup.append(lambda: (client.disconnect(), client.loop_stop()))
        dashboard_url = f"{app.api_url}/dashboard/"
        tl("dashboard", f"fleet dashboard: {dashboard_url} (operator token {token})")

        # ---------------------------------------------------------------- the cameras
        truth = Truth()
        pool = run.images("val")
        names = [f"cam-{i:02d}" for i in range(cfg.devices)]
        shifted = set(names[:: max(1, cfg.devices // cfg.n_shifted)][: cfg.n_shifted])
        groups = {n: ("shifted" if n in shifted else "clean") for n in names}
        cameras = []
        for i, name in enumerate(names):
            acfg = agent_config(name, out / "devices" / name, host=broker.host, port=broker.port,
                                protocol=broker.protocol, trusted_key=keys.public, prefix=fcfg.prefix,
                                drift_window=s["drift_window"], telemetry_s=s["telemetry_s"])
            registry.devices.upsert(name, tags={"group": groups[name]})  # the drift page groups by it
            agent = Agent(acfg)
            agent.install(report.bundle)  # provisioned with v1 at the factory
            agent.start(connect=True, serve_http=False)
            cam = Camera(name, groups[name], agent, pool, fps=cfg.fps, seed=cfg.seed * 1000 + i, truth=truth,
                         record=record, clock=tl.now)
            cameras.append(cam)
            cleanup.append(cam.stop)
        _wait(lambda: len(registry.devices(online=True, model_version="1.0.0")) == cfg.devices, 60,
              "every camera online", stop)
        tl("online", f"{cfg.devices} cameras online on 1.0.0 ({', '.join(sorted(shifted))} will drift)")
        labeller = Labeller(registry, fcfg.samples_dir, client, topics, truth, run.labels,
                            fraction=cfg.label_fraction)
        labeller.start()
        cleanup.append(labeller.stop)
        for c in cameras:
            c.start()

        def passes(phase: str, n: int) -> Callable[[], bool]:
            return lambda: all(c.shown.get(phase, 0) >= n for c in cameras)

        # ---------------------------------------------------------------- the story
        announce(f"baseline: every camera shows its {len(pool[0])} clean images on 1.0.0")
        _wait(passes("baseline", len(pool[0])), cfg.timeout_s, "the baseline pass", stop)
        announce(f"shift: {len(shifted)} cameras see darker, blurred, rotated images")
        for c in cameras:
            c.set_phase("drifted", cfg.shift if c.device_id in shifted else NO_SHIFT)
        tl("shift", f"camera shift on {len(shifted)} devices: darker, blurred, rotated")
        deadline = time.monotonic() + cfg.timeout_s
        announce("trigger: waiting for drift alarms and labels to trigger retraining")
        _wait(lambda: flags.trigger.is_set() or flags.done.is_set(), max(1.0, deadline - time.monotonic()),
              "the retraining trigger", stop)
        announce("retrain: fine-tune on the labelled samples, gate the candidate")
        _wait(lambda: flags.rollout.is_set() or flags.done.is_set(), max(1.0, deadline - time.monotonic()),
              "the retraining job", stop)
        rollout_state = None
        if flags.rollout.is_set():
            for c in cameras:
                c.set_phase("rollout")
            rid = flags.data["rollout_id"]
            announce(f"rollout: {rid}, canary then waves {list(plan.waves)}")
            watch = _RolloutWatch(tl, lambda: driver.load(rid))
            _wait(lambda: watch().terminal, max(1.0, deadline - time.monotonic()), "the rollout", stop)
            rollout_state = watch()
            tl("rollout_done", f"rollout {rid}: {rollout_state.status} {rollout_state.reason}".strip())
            done_wall = time.time()
            if rollout_state.status == "completed":
                for c in cameras:
                    c.set_phase("recovered")
                announce("recovered: every camera shows its images again on the new version")
                _wait(passes("recovered", len(pool[0])), max(1.0, deadline - time.monotonic()),
                      "the recovered pass", stop)
                _await_windows(registry, sorted(shifted), flags.data["outcome"].version, since=done_wall,
                               want=max(1, len(pool[0]) // s["drift_window"] - 1), stop=stop)
        for c in cameras:
            c.set_phase("end")
        tl("end", "measurements done")
        return _finish(cfg, out, tl, broker.kind, registry, groups, cameras, observations, obs_lock, flags,
                       rollout_state, labeller.sent, dashboard_url)
    finally:
        stop.set()
        for fn in reversed(cleanup):
            try:
                fn()
            except Exception:  # noqa: BLE001 - tearing down; report the first real error only
                log.debug("demo cleanup step failed", exc_info=True)


def _accuracy(observations: list[Observation]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    acc: dict[str, dict[str, float]] = {}
    cnt: dict[str, dict[str, int]] = {}
    for phase in ("baseline", "drifted", "rollout", "recovered"):
        for group in ("clean", "shifted"):
            xs = [o.correct for o in observations if o.phase == phase and o.group == group]
            if xs:
                acc.setdefault(phase, {})[group] = float(np.mean(xs))
                cnt.setdefault(phase, {})[group] = len(xs)
    return acc, cnt


def _finish(cfg: DemoConfig, out: Path, tl: _Timeline, broker: str, registry: Registry, groups: dict[str, str],
            cameras: list[Any], observations: list[Observation], obs_lock: threading.Lock, flags: _Flags,
            rollout_state: Any, labels_sent: int, dashboard_url: str | None) -> DemoResult:
    with obs_lock:
        obs = list(observations)
    acc, cnt = _accuracy(obs)
    drift = [DriftPoint(round(r.received - tl.wall0, 3), r.device_id, groups.get(r.device_id, "clean"), r.risk,
                        r.alarm, r.model_version, (r.thresholds or {}).get("risk")) for r in registry.drift.find()]
    versions = {c.device_id: (c.agent.model.version if c.agent.model else None) for c in cameras}
    outcome = flags.data.get("outcome")
    retrain: dict[str, Any] = {}
    if outcome is not None:
        retrain = {k: getattr(outcome, k) for k in ("status", "reason", "version", "parent_version", "n_labelled",
                                                     "n_train", "n_holdout", "holdout_current", "holdout_candidate",
                                                     "test_current", "test_candidate", "seconds", "timings",
                                                     "adapted_domain")}
        retrain["trigger"] = flags.data.get("trigger", {}).get("trigger")
        retrain["trigger_reason"] = flags.data.get("trigger", {}).get("reason")
    rollout: dict[str, Any] = {}
    if rollout_state is not None:
        rollout = {"rollout_id": rollout_state.rollout_id, "status": rollout_state.status,
                   "reason": rollout_state.reason, "waves": rollout_state.n_waves,
                   "events": [(round(e.ts - tl.wall0, 2), e.kind, e.detail) for e in rollout_state.events],
                   "devices": [{"device_id": d.device_id, "wave": d.wave, "status": d.status,
                                "previous_version": d.previous_version} for d in rollout_state.devices],
                   # the canary analysis of every wave: metric, canary vs control, statistic, p-value, decision
                   "verdicts": [{**v, "t": round(v["ts"] - tl.wall0, 2)} for v in rollout_state.verdicts]}
    base = acc.get("baseline", {}).get("shifted")
    rec = acc.get("recovered", {}).get("shifted")
    gap_ci = recovery_gap_ci_pp(acc, cnt)
    problems = []
    if outcome is None or not outcome.accepted:
        problems.append(f"no accepted candidate ({flags.data.get('error') or (outcome.reason if outcome else 'no job')})")
    if rollout_state is None or rollout_state.status != "completed":
        problems.append(f"rollout {rollout_state.status if rollout_state else 'never started'}")
    if base is None or rec is None:
        problems.append("accuracy was not measured before and after")
    elif gap_ci is not None and gap_ci[0] > RECOVERY_MARGIN_PP:
        lo, hi = gap_ci
        problems.append(f"shifted accuracy {100 * rec:.1f} % is more than {RECOVERY_MARGIN_PP:g} point below its "
                        f"pre-drift {100 * base:.1f} % (95 % interval of the gap {lo:.2f} to {hi:.2f} points)")
    new_version = outcome.version if outcome is not None else None
    if new_version and any(v != new_version for v in versions.values()):
        problems.append(f"not every camera runs {new_version}: {versions}")
    closed = not problems
    reason = (f"shifted cameras {100 * (base or 0):.1f} % before the drift, "
              f"{100 * acc.get('drifted', {}).get('shifted', 0):.1f} % after it, {100 * (rec or 0):.1f} % recovered "
              f"on {new_version}" if closed else "; ".join(problems))
    tl("closed" if closed else "not_closed", f"loop {'closed' if closed else 'NOT closed'}: {reason}")
    result = DemoResult(closed=closed, reason=reason, devices=groups, broker=broker, seconds=tl.now(), accuracy=acc,
                        counts=cnt, versions=versions, events=sorted(tl.events, key=lambda e: e.t), observations=obs, drift=drift,
                        retrain=retrain, rollout=rollout, dashboard_url=dashboard_url,
                        settings={**cfg.settings, "devices": cfg.devices, "shifted": cfg.n_shifted, "fps": cfg.fps,
                                  "label_fraction": cfg.label_fraction, "labels_sent": labels_sent,
                                  "shift": cfg.shift, "quick": cfg.quick, "seed": cfg.seed})
    k = result.key_figures
    canary = k["canary"] or {}
    tl("figures", f"key figures: trigger delay {k['trigger_delay_s']} s, canary {canary.get('decision', '-')} "
                  f"(score {canary.get('score', '-')}), recovered alarm rate "
                  f"{k['recovered_alarm_windows'][0]}/{k['recovered_alarm_windows'][1]} windows")
    result.events = sorted(tl.events, key=lambda e: e.t)
    path = write_report(result, out)
    tl("report", f"report: {path}")
    result.events = sorted(tl.events, key=lambda e: e.t)
    return result
