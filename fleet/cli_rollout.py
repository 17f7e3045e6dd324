"""``edgeloop fleet rollout ...``: start, pause, resume, abort and roll back staged rollouts.

``fleet/cli.py`` calls :func:`register_rollout` with its sub-parsers.  The commands
write to the registry and publish commands on the broker; a running ``fleet serve``
drives the rollout from there on (its worker ticks every active rollout), and so does
``rollout --wait`` in this process when no fleet is serving.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from datetime import datetime
from typing import Any

from core.cliutil import add_json_flag, emit
from core.errors import ConfigError
from fleet.cliargs import add_config, fleet_config

__all__ = ["register_rollout", "parse_share", "parse_duration", "parse_start_time"]

_AT_FORMAT = "ISO 8601 with a timezone, e.g. 2026-12-03T02:00:00+00:00, or from now: +2h, +30m"


def parse_share(text: str) -> float:
    """``10%`` / ``10`` / ``0.1`` -> 0.1 (numbers above 1 are percentages)."""
    t = text.strip()
    try:
        v = float(t.rstrip("%"))
    except ValueError:
        raise ConfigError(f"{text!r} is not a share", hint="e.g. 10% or 0.1") from None
    v = v / 100.0 if t.endswith("%") or v > 1.0 else v
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"{text!r} is not a share in 0..100%")
    return v


def parse_duration(text: str) -> float:
    """``60s`` / ``2m`` / ``1h`` / ``90`` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise ConfigError(f"{text!r} is not a duration", hint="e.g. 60s, 5m, 1h")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def parse_start_time(text: str, now: float) -> float:
    """``--at``: ``2026-12-03T02:00:00+00:00`` / ``...Z`` / ``+2h`` / ``+30m`` -> epoch seconds, after ``now``."""
    t = text.strip()
    relative = re.fullmatch(r"\+\s*(\d+(?:\.\d+)?\s*(?:s|m|h)?)", t)
    if relative:
        at = now + parse_duration(relative.group(1))
    else:
        try:
            when = datetime.fromisoformat(t)
        except ValueError:
            raise ConfigError(f"--at {text!r} is not a start time", hint=_AT_FORMAT) from None
        if when.tzinfo is None:
            raise ConfigError(f"--at {text!r} has no timezone", hint=_AT_FORMAT)
        at = when.timestamp()
    if at <= now:
        raise ConfigError(f"--at {text!r} is not in the future", hint=_AT_FORMAT)
    return at


def register_rollout(fleet_subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``rollout``, ``pause``, ``resume``, ``abort`` and ``rollback`` to ``edgeloop fleet``."""
    p = fleet_subparsers.add_parser("rollout", help="roll a signed bundle out in stages (canary, then waves)")
    p.add_argument("bundle", help="bundle file (.elb) to register and roll out, or NAME:VERSION already registered")
    add_config(p)
    p.add_argument("--canary", default=None, help="share of devices in the canary, e.g. 10%%")
    p.add_argument("--waves", default=None, help="cumulative shares after the canary, e.g. 25,50,100")
    p.add_argument("--soak", default=None, help="soak time per wave, e.g. 60s")
    p.add_argument("--max-failures", default=None, help="share of a wave that may fail, e.g. 5%%")
    p.add_argument("--shadow", default=None, help="first shadow the candidate on the canary devices this long, "
                   "never serving it, e.g. 60s (docs/fleet.md)")
    p.add_argument("--timeout", default="5m", help="per-device job timeout (default 5m)")
    p.add_argument("--devices", default=None, help="comma-separated device ids (default: every online device)")
    p.add_argument("--target", default=None, metavar="SELECTOR",
                   help="devices by tag: group=cams-north (several: group=a,site=b; default: all)")
    p.add_argument("--at", default=None, metavar="TIME",
                   help="schedule the start: ISO 8601 with a timezone (2026-12-03T02:00:00+00:00) or +2h / +30m; "
                   "stored as scheduled at once, `edgeloop fleet abort ID` cancels it")
    p.add_argument("--window", default=None, metavar="HH:MM-HH:MM",
                   help="maintenance window (UTC) in which the rollout and each wave may start, e.g. 01:00-05:00; "
                   "a wave due outside it waits")
    p.add_argument("--delivery", choices=("auto", "http", "mqtt"), default=None)
    p.add_argument("--wait", action="store_true", help="drive the rollout from this process until it ends")
    add_json_flag(p)
    p.set_defaults(func=_cmd_rollout)
    for verb, text in (("pause", "stop sending new waves"), ("resume", "carry on a paused rollout"),
                       ("abort", "stop a rollout for good (updated devices keep the new version)"),
                       ("rollback", "roll every updated device back to its previous version")):
        q = fleet_subparsers.add_parser(verb, help=f"{text}")
        q.add_argument("rollout_id")
        add_config(q)
        add_json_flag(q)
        q.set_defaults(func=_cmd_verb, verb=verb)


def _open(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from fleet.ingest import connect_client
    from fleet.registry import Registry
    from fleet.rollout_driver import RolloutDriver

    cfg = fleet_config(args)
    registry = Registry.open(cfg.database_url)
    client, _ = connect_client(cfg.broker, client_id=f"edgeloop-cli-{__import__('os').getpid()}")
    driver = RolloutDriver.from_config(cfg, registry, client, delivery=getattr(args, "delivery", None))
    return cfg, driver, client


def _summary(state: Any) -> dict[str, Any]:
    from fleet.rollout_state import iso_utc

    return {"rollout_id": state.rollout_id, "name": state.name, "version": state.version, "status": state.status,
            "phase": state.phase, "wave": state.wave, "waves": state.n_waves, "reason": state.reason,
            "target": state.target, "devices": state.counts(),
            "start_at": None if state.start_at is None else iso_utc(state.start_at)}


def _cmd_rollout(args: argparse.Namespace) -> int:
    from pathlib import Path

    from core.signing import load_public_key
    from fleet.rollout_driver import plan_from_config
    from fleet.rollout_state import parse_target, parse_window

    target = parse_target(args.target)  # a bad selector fails before anything is registered or sent
    start_at = parse_start_time(args.at, time.time()) if args.at else None  # so does a bad --at
    if args.window:
        parse_window(args.window)  # and a bad --window
    cfg, driver, client = _open(args)
    try:
        if ":" in args.bundle and not Path(args.bundle).exists():
            name, version = args.bundle.split(":", 1)
        else:
            rec = driver.registry.register_model(args.bundle, trusted_key=load_public_key(cfg.public_key_path),
                                                 status="accepted")
            name, version = rec.name, rec.version
        base = plan_from_config(cfg.rollout, job_timeout_s=parse_duration(args.timeout), shadow=False)
        plan = dataclasses.replace(  # the flags override; the rest (canary analysis) stays as [rollout] says
            base,
            canary=parse_share(args.canary) if args.canary else base.canary,
            waves=tuple(parse_share(w) for w in args.waves.split(",")) if args.waves else base.waves,
            soak_s=parse_duration(args.soak) if args.soak else base.soak_s,
            max_failures=parse_share(args.max_failures) if args.max_failures else base.max_failures,
            shadow_s=parse_duration(args.shadow) if args.shadow else 0.0, shadow_every=cfg.rollout.shadow_every,
            window=args.window or "")
        devices = [d.strip() for d in args.devices.split(",")] if args.devices else None
        state = driver.start(name, version, plan, devices=devices, target=target, start_at=start_at)
        if args.wait:
            state = driver.run_until_done(state.rollout_id, interval_s=0.5)
        data = _summary(state)
        when = f" for {data['start_at']}" if state.status == "scheduled" else ""
        emit(args, data, human=lambda: print(f"rollout {state.rollout_id}: {name} {version} {state.status}{when} "
                                             f"(wave {state.wave + 1}/{state.n_waves}, target {state.target}) "
                                             f"{state.counts()}"))
        return 0 if state.status not in ("rolled_back", "aborted") else 1
    finally:
        client.disconnect()
        client.loop_stop()


def _cmd_verb(args: argparse.Namespace) -> int:
    _cfg, driver, client = _open(args)
    try:
        state = getattr(driver, args.verb)(args.rollout_id)
        emit(args, _summary(state), human=lambda: print(f"rollout {state.rollout_id}: {state.status} "
                                                        f"{state.reason}".rstrip()))
        return 0
    finally:
        client.disconnect()
        client.loop_stop()
