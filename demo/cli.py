"""``edgeloop demo``: the README's main command (registered at the top level)."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from core.cliutil import add_json_flag, emit

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "demo", help="run the whole loop locally: drift, retraining, gated rollout, accuracy back",
        description="Start a broker, a fleet and N simulated cameras running the real agent; shift some "
                    "cameras, and watch the fleet detect it, retrain, gate and roll out the fix. "
                    "Writes report.md with plots; exits non-zero if the loop did not close.")
    p.add_argument("--quick", action="store_true", help="smaller, faster settings (what CI runs)")
    p.add_argument("--devices", type=int, default=6, help="simulated cameras (default 6)")
    p.add_argument("--shifted", type=int, default=None, help="how many of them drift (default half)")
    p.add_argument("--out", type=Path, default=None, help="report and data folder (default: a temp folder)")
    p.add_argument("--broker", choices=("auto", "mosquitto", "amqtt"), default="auto",
                   help="auto: Mosquitto when installed, else the embedded amqtt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=25.0, help="images per second per camera")
    add_json_flag(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from demo.run import DemoConfig, run_demo

    out = args.out or Path(tempfile.mkdtemp(prefix="edgeloop-demo-"))
    cfg = DemoConfig(out=out, quick=args.quick, devices=args.devices, shifted=args.shifted, broker=args.broker,
                     seed=args.seed, fps=args.fps)
    # The timeline goes to stderr with --json so stdout stays machine-readable.
    stream = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=stream, flush=True)

    # amqtt logs every connection at INFO/WARNING, and six agents each warn on every drift
    # alarm change: the timeline already tells that story.  -v brings them back.
    if getattr(args, "verbose", 0) == 0:
        for name in ("amqtt", "transitions", "edge_agent"):
            logging.getLogger(name).setLevel(logging.ERROR)
    result = run_demo(cfg, say=say)
    emit(args, result.summary(), human=lambda: print(f"report: {out / 'report.md'}"))
    return 0 if result.closed else 1
