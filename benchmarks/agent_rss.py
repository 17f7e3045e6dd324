"""The agent's resident memory over a long run: MobileNetV2 bundle, one camera-like source.

    python -m benchmarks.agent_rss [--bundle B.elb] [--duration 3600] [--interval 10] [--out DIR]

Installs the bundle (default: the 224x224 MobileNetV2 of ``benchmarks.agent_overhead``,
built into ``--work``) into a fresh state directory, then runs the real agent process,
``edgeloop agent run --source VIDEO``, where the video is a 640x480 MJPG clip looped at
its own frame rate (``realtime``: the pipeline sees it as a 30 fps camera and drops the
oldest frames when the model is slower), with the HTTP endpoint and the JSONL sink on.
``VmRSS`` of that process is sampled every ``--interval`` seconds from ``/proc``, with its
anonymous / file-backed split (``RssAnon`` / ``RssFile``: the shared libraries' pages are
file-backed).  The agent runs with the ``Environment=`` of the systemd unit it ships with
(``edge_agent/systemd/edgeloop-agent.service``: one BLAS thread, two malloc arenas), as on a
device; ``--no-unit-env`` runs it with this shell's environment only.

Reports the first sample, the level after the warm-up (first 5 % of the run, at least one
minute), the maximum, the last, and the growth after warm-up as a least-squares slope in
MB per hour; ``--max-mb`` (150) and ``--max-growth-mb-h`` (2) are the pass marks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["rss_mb", "measure_rss", "main"]


UNIT = Path(__file__).resolve().parent.parent / "edge_agent" / "systemd" / "edgeloop-agent.service"


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    """Resident set size of ``pid`` in MiB (``VmRSS``, or ``RssAnon`` / ``RssFile``), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def unit_environment(unit: Path = UNIT) -> dict[str, str]:
    """The ``Environment=NAME=VALUE`` lines of the agent's systemd unit."""
    env: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            name, _, value = line[len("Environment="):].strip().strip('"').partition("=")
            env[name] = value
    return env


def _video(path: Path, frames: int = 300) -> Path:
    import cv2

    from .agent_overhead import _images

    if not path.is_file():
        w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (640, 480))
        for im in _images((480, 640), 3, n=frames):
            w.write(im)
        w.release()
    return path


def measure_rss(bundle: Path, work: Path, *, duration_s: float, interval_s: float, threads: int = 1,
                env: dict[str, str] | None = None) -> dict[str, Any]:
    video = _video(work / "camera-640x480.avi")
    state = Path(tempfile.mkdtemp(prefix="edgeloop-rss-"))
    toml = state / "agent.toml"
    toml.write_text(f"""
[agent]
device_id = "rss-probe"
state_dir = "state"
allow_unsigned = true
[broker]
enabled = false
[http]
port = 0
[model]
threads = {threads}
benchmark_runs = 3
[update]
min_free_mb = 0.0
[results]
jsonl = "results.jsonl"
jsonl_max_bytes = 8388608
[[sources]]
uri = "{video}"
loop = true
realtime = true
""")
    cli = [sys.executable, "-m", "edgeloop", "agent"]
    subprocess.run([*cli, "install", "-c", str(toml), str(bundle)], check=True, capture_output=True, text=True)
    proc = subprocess.Popen([*cli, "run", "-c", str(toml)], stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                            stderr=open(state / "agent.log", "w"))  # noqa: SIM115 - lives as long as the run
    samples: list[tuple[float, float]] = []
    split: dict[str, float | None] = {}
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < duration_s and proc.poll() is None:
            time.sleep(interval_s)
            mb = rss_mb(proc.pid)
            if mb is not None:
                split = {"anon_mb": rss_mb(proc.pid, "RssAnon"), "file_mb": rss_mb(proc.pid, "RssFile")}
                samples.append((round(time.monotonic() - t0, 1), round(mb, 2)))
                print(f"  {samples[-1][0]:8.0f} s  {mb:7.1f} MB", file=sys.stderr, flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    lines = sum(1 for _ in open(state / "results.jsonl")) if (state / "results.jsonl").exists() else 0
    return summarize_rss(samples, duration_s) | {"bundle": str(bundle), "source": f"{video.name} looped at 30 fps",
                                                 "results_in_jsonl": lines, "exit_code": proc.returncode,
                                                 "state": str(state), "last_split": split, "environment": env or {}}


def summarize_rss(samples: list[tuple[float, float]], duration_s: float) -> dict[str, Any]:
    """First / warm / max / last RSS and the post-warm-up slope (MB per hour)."""
    if not samples:
        return {"samples": []}
    t = np.array([s[0] for s in samples])
    mb = np.array([s[1] for s in samples])
    warm = max(60.0, 0.05 * duration_s)
    after = t >= warm
    slope = float(np.polyfit(t[after], mb[after], 1)[0] * 3600.0) if after.sum() >= 3 else None
    return {"samples": samples, "first_mb": float(mb[0]), "warm_mb": float(mb[after][0]) if after.any() else None,
            "max_mb": float(mb.max()), "last_mb": float(mb[-1]), "growth_mb_per_h": slope,
            "duration_s": float(t[-1])}


def main(argv: list[str] | None = None) -> int:
    from .sysinfo import system_info

    p = argparse.ArgumentParser(prog="python -m benchmarks.agent_rss", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="default: MobileNetV2 224x224 built into --work")
    p.add_argument("--duration", type=float, default=3600.0)
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-mb", type=float, default=150.0)
    p.add_argument("--max-growth-mb-h", type=float, default=2.0)
    p.add_argument("--no-unit-env", action="store_true", help="without the systemd unit's Environment= lines")
    p.add_argument("--work", type=Path, default=Path("bench-results/agent-overhead/work"))
    p.add_argument("--out", type=Path, default=Path("bench-results/agent-rss"))
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.bundle is None:
        from .agent_overhead import build_mobilenet

        args.bundle = build_mobilenet(args.work)
    res = measure_rss(args.bundle, args.work, duration_s=args.duration, interval_s=args.interval, threads=args.threads,
                      env=None if args.no_unit_env else unit_environment())
    res["pass"] = bool(res.get("max_mb") is not None and res["max_mb"] < args.max_mb and
                       (res.get("growth_mb_per_h") is None or res["growth_mb_per_h"] < args.max_growth_mb_h))
    res["system"] = system_info(["python", "-m", "benchmarks.agent_rss", *(argv if argv is not None else sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "agent_rss.json").write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k not in ("samples", "system")}, indent=2))
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
