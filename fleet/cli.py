"""``edgeloop fleet ...`` commands.  Nothing heavy is imported at module level.

    edgeloop fleet init [--dir D]              fleet.toml, signing key, broker files, dashboard login
    edgeloop fleet serve [-c fleet.toml]       ingestion + HTTP API (+ retraining / rollout workers)
    edgeloop fleet status|devices|drift|models|rollouts [--json]
    edgeloop fleet provision DEVICE [--out DIR] [--owner USER]
    edgeloop fleet keys trust PUB | list; edgeloop fleet model add BUNDLE   (fleet.cli_setup)
    edgeloop fleet label import CSV | export CSV | teacher BUNDLE --threshold 0.9
    edgeloop fleet logs DEVICE [--lines N] [--level LEVEL] [--follow]   (fleet.cli_logs)

Reporting commands read the database directly (SQLite in WAL mode lets them read
while ``serve`` writes).  ``rollout``/``pause``/``resume``/``abort`` come from
``fleet.cli_rollout``; ``edgeloop demo`` from ``demo.cli``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.cliutil import add_json_flag, emit
from core.errors import ConfigError
from core.progress import is_quiet
from fleet.cli_logs import register_logs
from fleet.cli_rollout import register_rollout
from fleet.cli_setup import register_setup
from fleet.cliargs import add_config, fleet_config

if TYPE_CHECKING:
    from fleet.config import FleetConfig
    from fleet.registry import Registry

__all__ = ["register"]


_add_config = add_config  # -c/--config; a missing fleet.toml is an error naming the fix (fleet.cliargs)


def _config(args: argparse.Namespace) -> FleetConfig:
    return fleet_config(args)


def _registry(cfg: FleetConfig) -> Registry:
    from fleet.registry import Registry

    return Registry.open(cfg.database_url, busy_timeout_ms=cfg.database.busy_timeout_ms)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``edgeloop fleet`` and its sub-commands."""
    fleet = subparsers.add_parser("fleet", help="fleet manager: registry, ingestion, API, rollouts")
    sub = fleet.add_subparsers(dest="fleet_command", metavar="FLEET_COMMAND")
    fleet.set_defaults(func=lambda _a: (fleet.print_help(), 1)[1])

    register_setup(sub)  # init, keys trust|list, model add

    p = sub.add_parser("serve", help="run ingestion, the HTTP API and the fleet workers")
    _add_config(p)
    p.add_argument("--no-workers", action="store_true", help="do not start retraining / rollout workers")
    p.set_defaults(func=_cmd_serve)

    for name, helptext in (("status", "fleet summary"), ("devices", "devices and their state"),
                           ("drift", "recent drift reports"), ("models", "model versions and lineage"),
                           ("rollouts", "rollouts and their targets")):
        p = sub.add_parser(name, help=helptext)
        _add_config(p)
        add_json_flag(p)
        if name == "drift":
            p.add_argument("--device", help="only this device")
            p.add_argument("--limit", type=int, default=20, help="how many reports (default 20)")
        p.set_defaults(func=_cmd_report, report=name)

    p = sub.add_parser("provision", help="create a device's credentials and a ready agent.toml")
    p.add_argument("device", help="device id")
    _add_config(p)
    p.add_argument("--out", type=Path, help="kit directory (default <data_dir>/devices/DEVICE)")
    p.add_argument("--broker-host", help="broker host as the device sees it (default [broker].host)")
    p.add_argument("--broker-port", type=int, help="broker port as the device sees it")
    p.add_argument("--owner", metavar="USER[:GROUP]", help="hand the kit's files to the agent's user (chown)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="a tag rollouts can target (--target group=cams-north); repeatable")
    add_json_flag(p)
    p.set_defaults(func=_cmd_provision)

    label = sub.add_parser("label", help="import / export labels, teacher pseudo-labels")
    lsub = label.add_subparsers(dest="label_command", metavar="LABEL_COMMAND")
    label.set_defaults(func=lambda _a: (label.print_help(), 1)[1])
    p = lsub.add_parser("import", help="read sample_id,label rows from a CSV")
    p.add_argument("csv", type=Path)
    _add_config(p)
    add_json_flag(p)
    p.set_defaults(func=_cmd_label_import)
    p = lsub.add_parser("export", help="write every sample (with its payload path) to a CSV")
    p.add_argument("csv", type=Path)
    _add_config(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--labelled", dest="labelled", action="store_const", const=True, help="only labelled samples")
    g.add_argument("--unlabelled", dest="labelled", action="store_const", const=False,
                   help="only unlabelled samples")
    add_json_flag(p)
    p.set_defaults(func=_cmd_label_export)
    p = lsub.add_parser("teacher", help="pseudo-label unlabelled samples with a larger model")
    p.add_argument("--teacher", required=True, type=Path, metavar="BUNDLE", help="the teacher's signed bundle")
    p.add_argument("--threshold", type=float, default=0.9, help="minimum teacher confidence (default 0.9)")
    p.add_argument("--key", type=Path, metavar="PUB", help="public key to verify the teacher (default: the fleet's)")
    p.add_argument("--trusted-key", dest="key", type=Path, help=argparse.SUPPRESS)  # old spelling
    _add_config(p)
    add_json_flag(p)
    p.set_defaults(func=_cmd_label_teacher)

    register_rollout(sub)
    register_logs(sub)  # logs DEVICE [--lines N] [--level L] [--follow]


# --------------------------------------------------------------------------- handlers
def _cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from fleet.app import FleetApp

    cfg = _config(args)
    if cfg.api.enabled and cfg.api.token is None:  # never an API without a token (issue 16)
        import secrets
        import sys

        cfg = dataclasses.replace(cfg, api=dataclasses.replace(cfg.api, token=secrets.token_hex(16)))
        print(f"no [api].token configured: this run's API token is {cfg.api.token} "
              "(`edgeloop fleet init` writes a permanent one)", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    import logging

    from fleet.events import EventLog

    for name in ("fleet", "core"):  # a service logs what happens (journald keeps it); -q: warnings only
        if logging.getLogger(name).getEffectiveLevel() > logging.INFO and not is_quiet():
            logging.getLogger(name).setLevel(logging.INFO)
    app = FleetApp.from_config(cfg, workers=not args.no_workers)
    app.ingest.add_hook(EventLog())  # device joins, drift alarms, failed updates
    with app:
        print(f"fleet serving: {app.describe()}", flush=True)
        while not stop.wait(1.0):
            pass
    return 0


def _ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    s = max(0.0, time.time() - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:  # ids in full: pause/abort/rollback need them
        t.add_column(c, no_wrap=c == "id", min_width=max([len(str(r[0])) for r in rows] + [2]) if c == "id" else None)
    for r in rows:
        t.add_row(*("-" if v is None else str(v) for v in r))
    Console().print(t)


def _cmd_report(args: argparse.Namespace) -> int:
    cfg = _config(args)
    reg = _registry(cfg)
    try:
        kind = args.report
        if kind == "status":
            st = reg.status()
            emit(args, st, lambda: _table("fleet status", ["field", "value"],
                                          [[k, v] for k, v in dataclasses.asdict(st).items() if k != "ts"]))
        elif kind == "devices":
            devs = reg.devices.find()
            emit(args, devs, lambda: _table(f"{len(devs)} devices", [
                "device", "online", "last seen", "model", "variant", "drift", "risk"], [
                [d.id, "yes" if d.online else "no", _ago(d.last_seen), d.model_version, d.variant,
                 "ALARM" if d.drift_alarm else "ok", None if d.drift_risk is None else f"{d.drift_risk:.2f}"]
                for d in devs]))
        elif kind == "drift":
            reps = reg.drift.find(device_id=args.device, limit=args.limit)
            emit(args, reps, lambda: _table("drift reports", ["device", "when", "model", "risk", "alarm", "n"], [
                [r.device_id, _ago(r.ts), r.model_version, f"{r.risk:.3f}", "ALARM" if r.alarm else "", r.n]
                for r in reps]))
        elif kind == "models":
            ms = reg.models.find()
            emit(args, ms, lambda: _table("model versions", ["name", "version", "parent", "status", "reason",
                                                             "size", "signed by"], [
                [m.name, m.version, m.parent_version, m.status, m.reason, m.size, m.signed_by] for m in ms]))
        else:
            rs = reg.rollouts.find()
            data = [{**dataclasses.asdict(r), "targets": reg.rollouts.target_counts(r.id)} for r in rs]
            from fleet.canary import verdict_line  # the latest canary analysis; the JSON has them all

            emit(args, data, lambda: _table("rollouts", ["id", "model", "version", "status", "targets", "verdict",
                                                         "reason"], [
                [d["id"], d["model_name"], d["version"], d["status"],
                 ", ".join(f"{k} {v}" for k, v in d["targets"].items()),
                 verdict_line((d["state"] or {}).get("verdicts", ())), d["reason"]] for d in data]))
    finally:
        reg.close()
    return 0


def _cmd_provision(args: argparse.Namespace) -> int:
    from fleet.provision import provision_device
    from fleet.rollout_state import parse_target

    tags: dict[str, str] = {}
    for t in args.tag:
        try:
            tags.update(parse_target(t).pairs)
        except ConfigError:
            raise ConfigError(f"bad --tag {t!r}", hint="KEY=VALUE, e.g. --tag group=cams-north") from None
    cfg = _config(args)
    reg = _registry(cfg)
    try:
        res = provision_device(cfg, reg, args.device, out_dir=args.out, broker_host=args.broker_host,
                               broker_port=args.broker_port, owner=args.owner, tags=tags or None)
    finally:
        reg.close()
    emit(args, res, f"provisioned {res.device_id}: kit in {res.kit_dir} (agent.toml, mqtt.password, fleet.pub)\n"
                    f"broker files: {res.broker.password_file}, {res.broker.acl_file} "
                    f"(send SIGHUP to mosquitto to reload them)")
    return 0


def _cmd_label_import(args: argparse.Namespace) -> int:
    from fleet.labels import import_labels_csv

    cfg = _config(args)
    reg = _registry(cfg)
    try:
        res = import_labels_csv(reg, args.csv)
    finally:
        reg.close()
    emit(args, res, f"{res.rows} rows: {res.labelled} samples labelled, {res.pending} waiting for their sample")
    return 0


def _cmd_label_export(args: argparse.Namespace) -> int:
    from fleet.labels import export_labels_csv
    from fleet.samples import SampleStore

    cfg = _config(args)
    reg = _registry(cfg)
    try:
        n = export_labels_csv(reg, SampleStore(cfg.samples_dir), args.csv, labelled=args.labelled)
    finally:
        reg.close()
    emit(args, {"rows": n, "path": str(args.csv)}, f"wrote {n} samples to {args.csv}")
    return 0


def _cmd_label_teacher(args: argparse.Namespace) -> int:
    from fleet.labels import pseudo_label
    from fleet.samples import SampleStore

    cfg = _config(args)
    reg = _registry(cfg)
    try:
        res = pseudo_label(reg, SampleStore(cfg.samples_dir), args.teacher,
                           trusted_key=args.key or cfg.public_key_path, threshold=args.threshold)
    finally:
        reg.close()
    emit(args, res, f"teacher: {res.labelled} of {res.considered} unlabelled samples labelled "
                    f"({res.below_threshold} below {args.threshold}, {res.unreadable} unreadable)")
    return 0
