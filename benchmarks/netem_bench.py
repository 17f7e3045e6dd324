"""Rollouts over bad networks: the real fleet in one network namespace, devices in others,
every device link lossy and slow, a third of the devices cut off in the middle of a wave.

    sudo .venv/bin/python -m benchmarks.netem_bench --out benchmarks/results/netem.json

Per scenario, in a fresh child process (a clean lab, fleet and broker each time):

* the lab (:mod:`benchmarks.netns_lab`): the fleet's namespace and one per device, each
  link with ``--loss`` (10 %) and ``--delay`` ± ``--jitter`` (300 ± 200 ms) both ways;
* the fleet: a real Mosquitto (persistence on) and :class:`fleet.app.FleetApp` (ingest
  with receipts, the HTTP API serving the signed bundle, the rollout driver with its
  re-sends and canary analysis), ticked as its worker would;
* devices (:mod:`benchmarks.netem_device`): the agent's link, outbox and HTTP download
  around a simulated model, in groups tagged ``group``; the last device of each group
  stays on the old version (a standing control group);
* a staged rollout (canary: one device per group, then the rest); once the
  ``partition_wave`` is deploying and one of its cut-off devices has answered, the
  links of the last group -- a third of the devices -- drop everything for
  ``--partition`` seconds (netem's ``loss 100%``), then recover.

Scenarios: ``good`` (the new model is as good: the rollout must complete, cut off in
wave 1) and ``slower`` (3x slower: the canary must fail on latency and roll back, cut
off during the canary).  Measured: the outcome and its timeline, every verdict with its
evidence, messages lost (telemetry and drift reports each device generated vs unique ones
in the registry, once every outbox is drained: 0 expected, thanks to receipts), devices
bricked (serving a bundle other than the announced one, unverified, stuck in a job, or
dead: 0 expected), and whether any verdict blamed the model for the network.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .netem_device import DeviceSpec, Profile
from .netns_lab import SERVICE_IP, Impairment, Lab, available, die_with_parent, enter_netns, remove_stale

__all__ = ["NetemConfig", "SCENARIOS", "run_bench", "run_scenario", "markdown", "main"]

ROOT = Path(__file__).resolve().parents[1]
MODEL = "netem-model"
GOOD = Profile()
SCENARIOS: dict[str, tuple[Profile, int, str]] = {  # new version's profile, wave cut off, expected end
    "good": (GOOD, 1, "completed"),
    "slower": (Profile(latency_ms=3 * GOOD.latency_ms), 0, "rolled_back"),
}


@dataclass(frozen=True)
class NetemConfig:
    scenarios: tuple[str, ...] = ("good", "slower")
    groups: int = 3
    per_group: int = 4  # the last of each group is the standing control
    loss: float = 0.10
    delay_ms: float = 300.0
    jitter_ms: float = 200.0
    partition_s: float = 60.0
    partition_wave: int = -1  # the wave in which the cut happens (-1: the scenario's, see SCENARIOS)
    soak_s: float = 20.0
    period_s: float = 1.0  # device telemetry period
    bundle_kb: int = 100
    warmup_reports: int = 5  # telemetry per device before the rollout starts
    scenario_timeout_s: float = 900.0
    drain_timeout_s: float = 300.0
    receipt_grace_s: float = 10.0  # the devices' outbox receipts (the agent's defaults)
    receipt_timeout_s: float = 60.0
    seed: int = 0

    @property
    def devices(self) -> int:
        return self.groups * self.per_group


def _ids(cfg: NetemConfig) -> list[str]:
    return [f"cam-{chr(97 + g)}{i}" for g in range(cfg.groups) for i in range(cfg.per_group)]


def _targets(cfg: NetemConfig) -> list[str]:
    """Wave order: the first device of each group (the canary), then the rest but the controls."""
    return [f"cam-{chr(97 + g)}{i}" for i in range(cfg.per_group - 1) for g in range(cfg.groups)]


def _wait(cond: Callable[[], Any], timeout: float, stop: threading.Event | None = None) -> bool:
    deadline = time.monotonic() + timeout
    ev = stop or threading.Event()
    while time.monotonic() < deadline:
        if cond():
            return True
        ev.wait(0.25)
    return bool(cond())


# --------------------------------------------------------------------------- one scenario (in the lab)
class _Fleet:
    """Mosquitto and FleetApp in the fleet's namespace, the rollout driver ticked as the worker does."""

    def __init__(self, workdir: Path) -> None:
        from core.protocol import JobStatus
        from fleet.app import FleetApp
        from fleet.config import ApiConfig, BrokerConfig, FleetConfig
        from fleet.mosquitto import MosquittoBroker, free_port

        self.broker = MosquittoBroker(workdir / "broker", persistence=True,
                                      extra_conf=("autosave_interval 0", "persistent_client_expiration 1h"))
        self.broker.host = SERVICE_IP  # listen where the devices' links lead (inside the fleet's namespace)
        self.broker.start()
        api_port = free_port()
        cfg = FleetConfig(data_dir=workdir / "fleet",
                          broker=BrokerConfig(host=SERVICE_IP, port=self.broker.port, protocol="5",
                                              client_id="netem-fleet"),
                          api=ApiConfig(host=SERVICE_IP, port=api_port, token="netem-bench-token",
                                        public_url=f"http://{SERVICE_IP}:{api_port}"))
        self.app = FleetApp.from_config(cfg, workers=False)
        self.registry = self.app.registry
        self._wake, self._stop = threading.Event(), threading.Event()
        self.tick_errors = 0
        self.app.ingest.add_hook(lambda msgs: self._wake.set() if any(isinstance(m, JobStatus) for m in msgs)
                                 else None)
        self.app.start()
        self.driver = self.app.driver
        self._ticker = threading.Thread(target=self._tick_loop, name="netem-rollout-ticker", daemon=True)
        self._ticker.start()

    def _tick_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.driver.tick()
            except Exception:  # noqa: BLE001 - what FleetWorker does: log, count, tick again
                self.tick_errors += 1
            self._wake.wait(0.5)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._ticker.join(10)
        try:
            self.app.stop()
        finally:
            self.broker.stop()


class _Devices:
    """The device processes, each in its namespace, and their status / control files."""

    def __init__(self, lab: Lab, cfg: NetemConfig, workdir: Path, port: int, profiles: dict[str, Profile],
                 trusted_key: Path) -> None:
        self.ids = _ids(cfg)
        self.dirs = {d: workdir / "devices" / d for d in self.ids}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for i, dev in enumerate(self.ids):
            self.dirs[dev].mkdir(parents=True, exist_ok=True)
            spec = DeviceSpec(dev, SERVICE_IP, port, str(self.dirs[dev]), profiles, model_name=MODEL,
                              period_s=cfg.period_s, trusted_key=str(trusted_key), seed=cfg.seed * 1000 + i,
                              receipt_grace_s=cfg.receipt_grace_s, receipt_timeout_s=cfg.receipt_timeout_s)
            path = self.dirs[dev] / "spec.json"
            path.write_text(spec.to_json())
            log = (self.dirs[dev] / "device.log").open("wb")
            self.procs[dev] = subprocess.Popen(lab.exec_argv(i, [sys.executable, "-m", "benchmarks.netem_device",
                                                                 str(path)]),
                                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               preexec_fn=die_with_parent)
            log.close()

    def status(self, dev: str) -> dict[str, Any]:
        try:
            return dict(json.loads((self.dirs[dev] / "status.json").read_text()))
        except (OSError, ValueError):
            return {}

    def control(self, **ctl: Any) -> None:
        for d in self.ids:
            tmp = self.dirs[d] / "control.json.tmp"
            tmp.write_text(json.dumps(ctl))
            os.replace(tmp, self.dirs[d] / "control.json")

    def log_tail(self, dev: str, chars: int = 600) -> str:
        try:
            return (self.dirs[dev] / "device.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def dead(self) -> list[str]:
        return [d for d, p in self.procs.items() if p.poll() is not None]

    def stop(self) -> None:
        self.control(report=False, stop=True)
        deadline = time.monotonic() + 15
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def _make_bundle(workdir: Path, kb: int) -> tuple[Path, Path]:
    from core.signing import generate_keypair, load_private_key, save_keypair

    from .fleet_sim import make_sized_bundle

    (workdir / "keys").mkdir(parents=True, exist_ok=True)
    keys = save_keypair(workdir / "keys" / "netem", generate_keypair()[0])
    bundle = make_sized_bundle(workdir / f"{MODEL}-2.elb", name=MODEL, version="2", size_bytes=kb * 1000,
                               signing_key=load_private_key(keys.private))
    return bundle, keys.public


def run_scenario(name: str, cfg: NetemConfig, lab: Lab, workdir: Path, *, say: Callable[[str], None] = print
                 ) -> dict[str, Any]:
    """One scenario in ``lab``; the caller has entered ``lab.fleet_ns``."""
    import hashlib

    from core.signing import load_public_key
    from fleet.canary import CanaryPolicy
    from fleet.rollout import RolloutPlan

    new_profile, cut_wave, expected = SCENARIOS[name]
    cut_wave = cut_wave if cfg.partition_wave < 0 else cfg.partition_wave
    ids, targets = _ids(cfg), _targets(cfg)
    victims = [d for d in ids if d.startswith(f"cam-{chr(97 + cfg.groups - 1)}")]  # the last group: a third
    bundle, pub = _make_bundle(workdir, cfg.bundle_kb)
    sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    flaky = Impairment(cfg.loss, cfg.delay_ms, cfg.jitter_ms)
    lab.impair(range(len(ids)), flaky)
    fleet = _Fleet(workdir)
    devices: _Devices | None = None
    t0 = time.time()
    out: dict[str, Any] = {"scenario": name, "expected": expected, "new_version_profile": asdict(new_profile),
                           "devices": len(ids), "targets": targets, "cut_off": victims, "cut_off_wave": cut_wave,
                           "faults": []}
    try:
        reg = fleet.registry
        reg.register_model(bundle, trusted_key=load_public_key(pub), status="accepted")
        devices = _Devices(lab, cfg, workdir, fleet.broker.port, {"1": GOOD, "2": new_profile}, pub)
        _wait(lambda: len(reg.devices(online=True)) == len(ids) or devices.dead(), 180)
        if len(reg.devices(online=True)) != len(ids):
            dead = devices.dead()
            raise RuntimeError(f"only {len(reg.devices(online=True))}/{len(ids)} devices came online; dead: "
                               + "; ".join(f"{d}: {devices.log_tail(d)}" for d in dead[:2]))
        out["online_after_s"] = round(time.time() - t0, 1)
        for d in ids:
            reg.upsert_device(d, tags={"group": d[4]})
        _wait(lambda: all(len(reg.telemetry.find(device_ids=[d])) >= cfg.warmup_reports for d in ids), 180)
        say(f"  {name}: {len(ids)} devices online and reporting after {time.time() - t0:.0f} s")
        plan = RolloutPlan(canary=1 / (cfg.per_group - 1), waves=(1.0,), soak_s=cfg.soak_s,
                           analysis=CanaryPolicy(max_extension_s=4 * cfg.soak_s))
        r0 = time.time()
        state = fleet.driver.start(MODEL, "2", plan, devices=targets, rollout_id=f"netem-{name}")
        cut_at = healed_at = None
        while not state.terminal and time.time() - r0 < cfg.scenario_timeout_s:
            time.sleep(0.25)
            state = fleet.driver.load(state.rollout_id)
            if state.status == "paused" and state.held:
                out["faults"].append({"t": round(time.time() - r0, 1), "event": "held: " + state.reason})
                break
            in_wave = [d.device_id for d in state.devices if d.wave == cut_wave and d.device_id in victims]
            if cut_at is None and state.wave == cut_wave and state.phase == "deploying":
                steps = reg.latest_job_steps([d.job_id for d in state.devices if d.device_id in in_wave and d.job_id])
                if steps or time.time() - (state.phase_started_at or r0) > 3:
                    lab.impair([ids.index(d) for d in victims], Impairment(loss=1.0))
                    cut_at = time.time()
                    out["faults"].append({"t": round(cut_at - r0, 1), "event": f"partition of {len(victims)} "
                                          f"devices ({', '.join(victims)}) for {cfg.partition_s:g} s",
                                          "wave_devices_answered": sorted(v[1] for v in steps)})
            if cut_at is not None and healed_at is None and time.time() - cut_at >= cfg.partition_s:
                lab.impair([ids.index(d) for d in victims], flaky)
                healed_at = time.time()
                out["faults"].append({"t": round(healed_at - r0, 1), "event": "partition healed"})
        if cut_at is not None and healed_at is None:  # the rollout ended first: heal, then drain
            _wait(lambda: time.time() - cut_at >= cfg.partition_s, cfg.partition_s + 1)
            lab.impair([ids.index(d) for d in victims], flaky)
            out["faults"].append({"t": round(time.time() - r0, 1), "event": "partition healed (after the end)"})
        out["rollout_s"] = round(time.time() - r0, 1)
        out.update(_outcome(state, targets, expected))
        say(f"  {name}: {state.status} after {out['rollout_s']:.0f} s ({out['reason'] or 'no reason'})")
        # Drain: devices stop reporting; every outbox must empty (sent, PUBACKed and receipted).
        devices.control(report=False)
        t_drain = time.time()
        drained = _wait(lambda: all((s := devices.status(d)) and s.get("connected") and not s.get("busy")
                                    and s.get("outbox_depth") == 0 for d in ids), cfg.drain_timeout_s)
        fleet.app.ingest.wait_idle(30)
        out["drain"] = {"drained": drained, "seconds": round(time.time() - t_drain, 1)}
        statuses = {d: devices.status(d) for d in ids}
        out["messages"] = _losses(reg, statuses)
        out["devices_final"] = _devices_final(statuses, devices.dead(), targets, sha, state)
        out["links"] = _link_totals(lab.link_stats())
        out["fleet_tick_errors"] = fleet.tick_errors
        out["checks"] = _checks(out, expected)
        return out
    finally:
        if devices is not None:
            devices.stop()
        fleet.stop()


def _outcome(state: Any, targets: list[str], expected: str) -> dict[str, Any]:
    t0 = state.created_at
    verdicts = [{"wave": v.get("wave"), "t": round(v.get("ts", t0) - t0, 1), "decision": v["decision"],
                 "mode": v["mode"], "score": v["score"], "canary": v["canary"], "control": v["control"],
                 "notes": v["notes"],
                 "metrics": {m["metric"]: {k: m[k] for k in ("decision", "canary", "control", "p_value", "effect")}
                             for m in v["metrics"]}} for v in state.verdicts]
    return {"status": state.status, "reason": state.reason, "counts": state.counts(),
            "resent_commands": sum(int(e.detail.split()[0]) for e in state.events if e.kind == "resent"),
            "soak_extensions": sum(1 for e in state.events if e.kind == "soak_extended"),
            "timeline": [{"t": round(e.ts - t0, 1), "kind": e.kind, "detail": e.detail[:400]} for e in state.events],
            "verdicts": verdicts,
            "devices": {d.device_id: {"wave": d.wave, "status": d.status, "detail": d.detail[:200],
                                      "resends": d.resends} for d in state.devices}}


def _losses(reg: Any, statuses: dict[str, dict[str, Any]]) -> dict[str, Any]:
    drift = reg.drift.identities()
    generated = lost_tel = lost_drift = rows = 0
    for dev, st in statuses.items():
        n = int(st.get("generated", 0))
        generated += n
        tel = reg.telemetry.find(device_ids=[dev])
        rows += len(tel)
        seqs = {t.seq for t in tel}
        lost_tel += sum(1 for s in range(1, n + 1) if s not in seqs)
        lost_drift += sum(1 for s in range(1, n + 1) if (dev, s) not in drift)
    return {"telemetry_generated": generated, "telemetry_lost": lost_tel, "telemetry_duplicate_rows": rows - generated
            + lost_tel, "drift_generated": generated, "drift_lost": lost_drift,
            "job_statuses_sent": sum(int(s.get("jobs_sent", 0)) for s in statuses.values()),
            "outbox_resent": sum(int(s.get("outbox_resent", 0)) for s in statuses.values()),
            "outbox_dropped": sum(int(s.get("dropped_messages", 0)) for s in statuses.values()),
            "left_in_outboxes": sum(int(s.get("outbox_depth", 0)) for s in statuses.values())}


def _devices_final(statuses: dict[str, dict[str, Any]], dead: list[str], targets: list[str], sha: str,
                   state: Any) -> dict[str, Any]:
    bricked = {}
    for dev, st in statuses.items():
        why = ("no status" if not st else "process died" if dev in dead else "stuck in a job" if st.get("busy")
               else f"serves unknown version {st.get('version')}" if st.get("version") not in ("1", "2")
               else "serves a bundle other than the announced one" if st.get("version") == "2" and st.get("sha256") != sha
               else "unverified bundle" if not st.get("verified") else "")
        if why:
            bricked[dev] = why
    want_new = set(targets) if state.status == "completed" else set()
    wrong = {d: st.get("version") for d, st in statuses.items() if st.get("version") != ("2" if d in want_new else "1")}
    return {"bricked": len(bricked), "bricked_why": bricked, "versions": {d: st.get("version") for d, st in statuses.items()},
            "on_new_version": sum(1 for st in statuses.values() if st.get("version") == "2"),
            "not_where_expected": wrong, "download_attempts": sum(int(st.get("download_attempts", 0))
                                                                  for st in statuses.values()),
            "downloads_failed": sum(int(st.get("downloads_failed", 0)) for st in statuses.values()),
            "redelivered_commands_ignored": sum(int(st.get("redeliveries", 0)) for st in statuses.values())}


def _link_totals(stats: list[dict[str, int]]) -> dict[str, Any]:
    tot = {k: sum(s[k] for s in stats) for k in stats[0]} if stats else {}
    sent = tot.get("down_forwarded", 0) + tot.get("up_forwarded", 0)
    dropped = tot.get("down_dropped", 0) + tot.get("up_dropped", 0)
    return {**tot, "dropped_share": round(dropped / max(1, sent + dropped), 4)}


def _checks(out: dict[str, Any], expected: str) -> dict[str, bool]:
    """What the scenario must show; ``ok`` when all hold."""
    failed_metrics = {m for v in out["verdicts"] for m, r in v["metrics"].items() if r["decision"] == "fail"}
    if expected == "completed":
        blamed = bool(failed_metrics) or any(d["status"] in ("failed", "timed_out", "unhealthy")
                                             for d in out["devices"].values())
    else:
        blamed = bool(failed_metrics - {"latency"})
    c = {"outcome_as_expected": out["status"] == expected,
         "verdicts_do_not_blame_the_network": not blamed,
         "no_message_lost": out["messages"]["telemetry_lost"] == 0 and out["messages"]["drift_lost"] == 0,
         "drained": out["drain"]["drained"],
         "no_device_bricked": out["devices_final"]["bricked"] == 0,
         "every_device_where_expected": not out["devices_final"]["not_where_expected"]}
    c["ok"] = all(c.values())
    return c


# --------------------------------------------------------------------------- processes
def _scenario_child(name: str, cfg: NetemConfig, out_path: Path) -> int:
    """Entry point of a scenario's own process: build the lab, run, clean up whatever happens."""
    def _term(*_: Any) -> None:
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, _term)
    remove_stale()
    with tempfile.TemporaryDirectory(prefix=f"netem-{name}-") as tmp, Lab(cfg.devices, seed=cfg.seed) as lab:
        enter_netns(lab.fleet_ns)  # this thread, and every thread and process it starts from here on
        result = run_scenario(name, cfg, lab, Path(tmp), say=lambda m: print(m, flush=True))
        out_path.write_text(json.dumps(result, indent=1, default=str))
    return 0


def run_bench(cfg: NetemConfig, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every scenario in its own process (a fresh lab each time); the results together."""
    why = available()
    if why:
        raise RuntimeError(f"the netem benchmark cannot run here: {why}")
    from .sysinfo import system_info

    result: dict[str, Any] = {"config": asdict(cfg), "system": system_info(), "scenarios": {}}
    for name in cfg.scenarios:
        with tempfile.TemporaryDirectory(prefix="netem-out-") as tmp:
            out = Path(tmp) / "result.json"
            argv = [sys.executable, "-m", "benchmarks.netem_bench", "--child", name, "--child-out", str(out),
                    "--config-json", json.dumps(asdict(cfg))]
            say(f"scenario {name} ...")
            t0 = time.time()
            proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            try:
                rc = proc.wait(cfg.scenario_timeout_s + cfg.drain_timeout_s + 300)
            except subprocess.TimeoutExpired:
                proc.terminate()  # its handler cleans its lab up
                try:
                    rc = proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
            finally:
                remove_stale()
            res = json.loads(out.read_text()) if out.exists() else {"scenario": name, "error": f"exit code {rc}"}
            res["wall_s"] = round(time.time() - t0, 1)
            result["scenarios"][name] = res
    result["ok"] = all(s.get("checks", {}).get("ok", False) for s in result["scenarios"].values())
    return result


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [f"{cfg['groups'] * cfg['per_group']} devices, each link {cfg['loss']:.0%} loss and "
             f"{cfg['delay_ms']:g} ± {cfg['jitter_ms']:g} ms both ways; a third cut off for "
             f"{cfg['partition_s']:g} s mid-wave.", "",
             "| scenario | outcome | rollout | resent cmds | verdicts | lost msgs | bricked | checks |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in result["scenarios"].items():
        if "error" in s:
            lines.append(f"| {name} | error: {s['error']} | | | | | | |")
            continue
        vs = "; ".join(f"w{v['wave']} {v['decision']}" for v in s["verdicts"])
        m = s["messages"]
        lines.append(f"| {name} | {s['status']} (expected {s['expected']}) | {s['rollout_s']:g} s | "
                     f"{s['resent_commands']} | {vs} | {m['telemetry_lost'] + m['drift_lost']} of "
                     f"{m['telemetry_generated'] + m['drift_generated']} | {s['devices_final']['bricked']} | "
                     f"{'ok' if s['checks']['ok'] else 'FAILED: ' + ', '.join(k for k, v in s['checks'].items() if not v)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.netem_bench", description=__doc__.split("\n\n")[0])
    defaults = NetemConfig()
    for f in fields(NetemConfig):
        if f.name == "scenarios":
            p.add_argument("--scenarios", default=",".join(defaults.scenarios), help="good,slower")
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                           default=getattr(defaults, f.name))
    p.add_argument("--out", type=Path, help="write the JSON result here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--config-json", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        cfg = NetemConfig(**{**json.loads(a.config_json), "scenarios": (a.child,)})
        return _scenario_child(a.child, replace(cfg, scenarios=tuple(cfg.scenarios)), a.child_out)
    cfg = NetemConfig(**{f.name: getattr(a, f.name) for f in fields(NetemConfig) if f.name != "scenarios"},
                      scenarios=tuple(s for s in a.scenarios.split(",") if s))
    unknown = set(cfg.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {sorted(SCENARIOS)}")
    result = run_bench(cfg)
    text = json.dumps(result, indent=1, default=str)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    print(markdown(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
