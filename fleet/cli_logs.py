"""``edgeloop fleet logs DEVICE [--lines N] [--level LEVEL] [--follow]``: a device's recent log lines.

Asks the device over the broker (:class:`fleet.remote_logs.LogClient`, the fleet's tool
user), stores what it answers in the fleet database (the latest 1000 lines per device)
and prints the newest ``--lines`` at ``--level`` or above.  A device that does not answer
(offline, or an agent from before remote logs) leaves the stored lines, if any, to print;
with none: "no log lines (agent too old or offline)".  ``--follow`` asks again every
``--interval`` seconds and prints what is new, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from core.cliutil import add_json_flag, emit
from core.messages import LOG_LEVELS
from fleet.cliargs import add_config, fleet_config

if TYPE_CHECKING:
    from fleet.remote_logs import LogAnswer, LogClient
    from fleet.repos.logs import LogLineRecord

__all__ = ["register_logs", "format_line", "follow"]


def register_logs(fleet_subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``logs`` to ``edgeloop fleet``."""
    p = fleet_subparsers.add_parser("logs", help="a device's recent log lines (asked over the broker, no SSH)")
    p.add_argument("device", help="device id")
    add_config(p)
    p.add_argument("-n", "--lines", type=int, default=50, help="how many of the newest lines (default 50)")
    p.add_argument("--level", type=str.upper, choices=LOG_LEVELS, default="DEBUG",
                   help="only lines at this level or above (default: all the agent logged)")
    p.add_argument("-f", "--follow", action="store_true", help="keep asking and print new lines until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between requests with --follow (default 2)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the device's answer (default 5)")
    add_json_flag(p)
    p.set_defaults(func=_cmd_logs)


def format_line(r: LogLineRecord) -> str:
    """``2026-12-02 09:45:40 INFO     edge_agent.agent: message`` (device clock, local time)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.ts))
    return f"{when} {r.level:<8} {r.logger}: {r.msg}"


def _status_note(answer: LogAnswer, timeout_s: float, stored: int, known: Any) -> str | None:
    """The stderr line after the lines (``known``: the device's registry record, or None)."""
    if not answer.answered:
        seen = ("the fleet has never seen it (`edgeloop fleet devices` lists the ids)" if known is None
                else "it is offline" if not known.online else "its agent may predate remote logs")
        return (f"{answer.device_id} did not answer within {timeout_s:g} s: {seen}; "
                f"{stored} stored lines shown")
    if answer.dropped:
        return f"{answer.dropped} older lines were no longer on {answer.device_id}"
    return None


def _cmd_logs(args: argparse.Namespace) -> int:
    from core.protocol import validate_device_id
    from fleet.registry import Registry
    from fleet.remote_logs import NO_LINES, LogClient

    device = validate_device_id(args.device)
    if args.lines < 1:
        from core.errors import ConfigError

        raise ConfigError(f"--lines {args.lines} must be at least 1")
    cfg = fleet_config(args)
    reg = Registry.open(cfg.database_url, busy_timeout_ms=cfg.database.busy_timeout_ms)
    try:
        with LogClient(cfg, reg) as client:
            if args.follow:
                stop = threading.Event()
                try:
                    follow(client, device, stop, lines=args.lines, level=args.level, interval_s=args.interval,
                           timeout_s=args.timeout, out=sys.stdout)
                except KeyboardInterrupt:
                    pass
                return 0
            answer = client.ask(device, timeout_s=args.timeout)
            rows = client.repo.find(device, lines=args.lines, min_level=args.level)
            _report_refusals(client, device)
            note = _status_note(answer, args.timeout, len(rows), reg.devices.get(device))
            data = {"device_id": device, "answered": answer.answered, "dropped": answer.dropped,
                    "lines": [r.to_dict() for r in rows]}

            def human() -> None:
                if not rows:
                    print(NO_LINES if not answer.answered else f"no log lines from {device} at {args.level} or above")
                for r in rows:
                    print(format_line(r))
                if note:
                    print(note, file=sys.stderr)

            emit(args, data, human)
    finally:
        reg.close()
    return 0


def _report_refusals(client: LogClient, device: str) -> None:
    refused = client.counters.devices().get(device, {})
    if refused or client.malformed:
        parts = [f"{n} {rule}" for rule, n in sorted(refused.items())]
        if client.malformed:
            parts.append(f"{client.malformed} malformed")
        print(f"refused log messages: {', '.join(parts)} ({client.last_error})", file=sys.stderr)


def follow(client: LogClient, device: str, stop: threading.Event, *, lines: int = 50, level: str = "DEBUG",
           interval_s: float = 2.0, timeout_s: float = 5.0, out: TextIO = sys.stdout,
           on_round: Callable[[int], Any] | None = None) -> None:
    """Print the newest ``lines`` lines, then every ``interval_s`` the lines new since, until ``stop``.

    ``on_round(n)`` is called after each round with the number of lines printed (tests wait on it).
    """
    last: tuple[str, int] | None = None
    while not stop.is_set():
        client.ask(device, timeout_s=timeout_s)
        rows = client.repo.find(device, lines=client.repo.keep, min_level=level)
        keys = [(r.boot, r.seq) for r in rows]
        new = rows[keys.index(last) + 1:] if last in keys else rows[-lines:]  # first round, or pruned past it
        for r in new:
            print(format_line(r), file=out, flush=True)
        if rows:
            last = keys[-1]
        if on_round is not None:
            on_round(len(new))
        stop.wait(interval_s)
