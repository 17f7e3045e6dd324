"""``edgeloop agent ...``: init, run, predict, install, status, rollback.

Imports nothing heavy at module level: the agent runs on a device with only the
``[agent]`` extra, and ``edgeloop --help`` must stay instant everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from core.cliutil import add_json_flag, emit, to_jsonable

__all__ = ["register"]

_DEFAULT_CONFIG = os.environ.get("EDGELOOP_AGENT_CONFIG", "agent.toml")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=_DEFAULT_CONFIG,
                   help=f"agent TOML file (default: $EDGELOOP_AGENT_CONFIG or agent.toml; now {_DEFAULT_CONFIG})")


def register(subparsers: Any) -> None:
    """Add ``agent`` and its sub-commands to the ``edgeloop`` parser."""
    agent = subparsers.add_parser("agent", help="run the edge agent on a device",
                                  description="The edge agent: predictions, drift watch, model updates.")
    sub = agent.add_subparsers(dest="agent_command", metavar="COMMAND")
    agent.set_defaults(func=lambda a: (agent.print_help(), 1)[1])

    p = sub.add_parser("init", help="write a commented agent.toml")
    p.add_argument("out", nargs="?", default="agent.toml", help="where to write it (default agent.toml)")
    p.add_argument("--device-id", default=None, help="device id (default: this host's name)")
    p.add_argument("--state-dir", default="./edgeloop-state", help="slots, outbox, boot counter")
    p.add_argument("--key", default="fleet.pub", metavar="PUB",
                   help="the fleet's public key file, relative to the config (default fleet.pub)")
    p.add_argument("--trusted-key", dest="key", help=argparse.SUPPRESS)  # old spelling
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    add_json_flag(p)
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("run", help="run the agent in the foreground (SIGTERM/SIGINT stop it cleanly)")
    _add_config(p)
    p.add_argument("--source", action="append", default=[], metavar="URI",
                   help="predict continuously from camera:0, /dev/video0, picamera, rtsp://..., http://...mjpg, "
                        "a video file, dir:PATH, npy:PATH or stdin (repeatable; adds to [[sources]])")
    p.add_argument("--exit-when-done", action="store_true",
                   help="stop once every source has ended (video files, npy, stdin) and its results are out")
    p.add_argument("--no-mqtt", action="store_true", help="do not connect to the broker even if configured")
    p.add_argument("--no-http", action="store_true", help="do not serve the local HTTP endpoint")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("predict", help="predict an image file, or every image of a folder (JSONL)")
    _add_config(p)
    p.add_argument("path", type=Path, help="an image file (.npy, .pgm, .png...) or a folder of them")
    add_json_flag(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("install", help="verify and install a bundle file (health check, then switch)")
    _add_config(p)
    p.add_argument("bundle", type=Path, help="a .elb bundle")
    p.add_argument("--force", action="store_true", help="allow a downgrade")
    add_json_flag(p)
    p.set_defaults(func=_cmd_install)

    p = sub.add_parser("status", help="the serving model, variant choice, previous slot, queue")
    _add_config(p)
    add_json_flag(p)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("rollback", help="switch back to the previous model")
    _add_config(p)
    p.add_argument("--reason", default="operator rollback", help="recorded in the job status")
    add_json_flag(p)
    p.set_defaults(func=_cmd_rollback)


def _agent(args: argparse.Namespace) -> Any:
    from core.agent_config import load_config

    from .agent import Agent

    return Agent(load_config(args.config))


def _cmd_init(args: argparse.Namespace) -> int:
    import socket

    from core.agent_config import write_template
    from core.protocol import validate_device_id

    device_id = args.device_id
    if device_id is None:
        host = "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname())[:64] or "edge-device"
        device_id = host if host[0].isalnum() else f"d{host}"[:64]
    validate_device_id(device_id)
    path = write_template(args.out, device_id=device_id, state_dir=args.state_dir, trusted_key=args.key,
                          force=args.force)
    emit(args, {"config": str(path), "device_id": device_id},
         f"wrote {path} (device {device_id}); edit [broker] and [agent].trusted_key, then `edgeloop agent run -c {path}`")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from core.progress import is_quiet

    root = logging.getLogger()
    if (root.level > logging.INFO or root.level == logging.NOTSET) and not is_quiet():
        root.setLevel(logging.INFO)  # a service logs what it does to stderr (journald keeps it); -q: warnings only
    stop = threading.Event()
    from edge_agent.pipeline import return_freed_frames

    return_freed_frames()  # before the model loads: the start-up's freed blocks never pin the heap (~10 MB)
    agent = _agent(args)

    def _stop(signum: int, _frame: Any) -> None:
        logging.getLogger("edge_agent").info("signal %d: stopping", signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    try:
        agent.start(connect=not args.no_mqtt, serve_http=False if args.no_http else None)
        if agent.http is not None:
            print(f"edgeloop agent {agent.device_id}: serving {agent.http.url}/predict", file=sys.stderr, flush=True)
        from .pipeline import start_stream

        stream = start_stream(agent, args.source)
        if stream is not None and args.exit_when_done:
            threading.Thread(target=lambda: (stream.wait(), stop.set()), daemon=True).start()
        agent.run(stop)
    except BaseException:
        agent.close(clean=False)  # the boot counter counts the next start, as after a crash
        raise
    agent.close()  # a clean stop (SIGTERM / SIGINT): the next start does not count
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from core.errors import EdgeloopError, InputError
    from core.imageio import IMAGE_SUFFIXES
    from core.imageio import load_input as load_image  # .npy as stored: tensor models take any dtype

    if not args.path.exists():
        raise InputError(f"{args.path}: no such file or folder", path=str(args.path))
    agent = _agent(args).start(service=False)
    try:
        if agent.model is None:
            raise EdgeloopError("no model is installed", hint="install a bundle with `edgeloop agent install BUNDLE`")
        if args.path.is_file():
            pred = agent.predict(load_image(args.path))
            emit(args, pred.to_dict() | {"file": str(args.path)},
                 f"{args.path.name}: {pred.label} ({pred.confidence:.3f}, {pred.latency_ms:.2f} ms, "
                 f"model {pred.model_version}/{pred.variant})")
            return 0
        files = sorted(p for p in args.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        failed = 0
        for p in files:  # one JSON object per line: streams, and `jq` reads it
            try:
                row: dict[str, Any] = agent.predict(load_image(p)).to_dict() | {"file": str(p)}
            except InputError as exc:
                failed += 1
                row = {"file": str(p), "error": str(exc)}
            if args.json:
                print(json.dumps(to_jsonable(row)), flush=True)
            elif "error" in row:
                print(f"{p.name}: error: {row['error']}")
            else:
                print(f"{p.name}: {row['label']} ({row['confidence']:.3f})")
        return 1 if failed else 0
    finally:
        agent.close()


def _cmd_install(args: argparse.Namespace) -> int:
    import logging

    agent = _agent(args)
    agent.start(connect=False, serve_http=False, count_boot=False)
    try:
        log = logging.getLogger("edge_agent.install")
        log.info("installing %s", args.bundle)
        result = agent.install(args.bundle, force=args.force)
        c = result.choice
        lat = ", ".join(f"{k} {v:.3f} ms" for k, v in c.latency_ms.items()) or "-"
        emit(args, result, f"installed {result.version} in slot {result.slot}: variant {c.variant} ({c.mode}: "
                           f"{c.reason}); measured {lat}; health: {result.health.detail}; "
                           f"previous {result.previous_version or '-'}")
        return 0
    finally:
        agent.close()


def _cmd_status(args: argparse.Namespace) -> int:
    agent = _agent(args)
    agent.start(connect=False, serve_http=False, service=False)
    try:
        st = agent.status()

        def human() -> None:
            print(f"device      {st.device_id}  (state {st.state_dir})")
            print(f"model       {st.model_name or '-'} {st.model_version or '(none installed)'}  slot {st.slot or '-'}"
                  f"{'' if st.confirmed else f'  (on probation, {st.boot_count} starts)'}")
            if st.choice is not None:
                lat = ", ".join(f"{k} {v:.3f} ms" for k, v in st.choice.latency_ms.items()) or "-"
                print(f"variant     {st.variant} ({st.choice.mode}: {st.choice.reason})")
                print(f"measured    {lat}")
                from .accel import available

                print(f"accelerator {st.choice.accelerator} (this device offers: "
                      f"{', '.join(f'{a.format} {a.id}' for a in available())})")
                for k, why in st.choice.skipped.items():
                    print(f"skipped     {k}: {why}")
            print(f"previous    {st.previous_version or '-'}")
            if st.rolled_back_from:
                print(f"rolled back from slot {st.rolled_back_from}")

        emit(args, st, human)
        return 0
    finally:
        agent.close()


def _cmd_rollback(args: argparse.Namespace) -> int:
    agent = _agent(args)
    agent.start(connect=False, serve_http=False, count_boot=False)
    try:
        ptr = agent.rollback(args.reason)
        model = agent.model
        emit(args, {"slot": ptr.slot, "version": model.version if model else None, "rolled_back_from":
                    ptr.rolled_back_from}, f"serving {model.version if model else ptr.slot} again "
                                           f"(rolled back from slot {ptr.rolled_back_from})")
        return 0
    finally:
        agent.close()
