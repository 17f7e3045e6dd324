"""The canary judge's error rates on simulated fleets: how often it rolls a good model back, and
how often a slower one gets through, under bursty load.

    python -m benchmarks.canary_power [--trials 300] [--seed 1] [--out FILE.json] [--json]

Each trial is one canary soak as :mod:`fleet.rollout` runs it: the canary devices (2) and
the control group (1) report one telemetry interval a second -- 100 inferences, log-normal
around the model's median times that second's load factor, as a histogram and a median
(what the agents send) -- and the real :func:`fleet.canary.judge` looks at the soak's
intervals, first after ``--soak`` seconds, then once per extension second, until it decides
or ``--max-looks`` are spent (``inconclusive``).  The control's window is off by one second
at one end in two trials of three (reports that straddle the soak's start or the look's
"now"); with a ``late`` scenario each group's newest reports also reach the database up to
3 s late, drawn anew at each look (a backlog at the broker or the ingest), so the two
groups' windows cover different seconds.

Scenarios: ``bursts`` -- every device on one machine shares each second's factor, drawn
from x{1, 1, 1, 2, 4} on top of x3 (the test suite's ``busy_after_the_first_deploy``);
``bursts+late`` -- the same with late reports; ``independent`` -- the same bursts drawn per
device (devices of a real fleet); ``steady`` -- a few per cent of noise per interval.

Models: the canary's median x1 (the same model), x1.3 (within the x1.5 tolerance), x2
and x3 (beyond it).  For each, the share of trials that passed, failed and stayed
inconclusive, and the looks (seconds of soak and extensions) to a decision.  Beside the
judge, the latency rule it replaced (before commit 8fe314f): Mann-Whitney on the pooled
inferences, fail when p < alpha and the pooled median ratio > x1.5, pass otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fleet import canary_stats as st
from fleet.canary import CanaryPolicy, GroupData, judge

__all__ = ["simulate", "run", "main", "LOADS", "SLOWDOWNS"]

LOADS = ("bursts", "bursts+late", "independent", "steady")
LATE_S = 3  # the most seconds a group's newest reports lag in the late scenarios
SLOWDOWNS = (1.0, 1.3, 2.0, 3.0)
BURSTS = (1.0, 1.0, 1.0, 2.0, 4.0)
BASE_MS = 2.0
PER_INTERVAL = 100


def _loads(rng: np.random.Generator, kind: str, seconds: int, devices: int) -> np.ndarray:
    """(seconds, devices) load factors."""
    if kind in ("bursts", "bursts+late"):
        return np.repeat(3.0 * rng.choice(BURSTS, size=(seconds, 1)), devices, axis=1)
    if kind == "independent":
        return 3.0 * rng.choice(BURSTS, size=(seconds, devices))
    if kind == "steady":
        return rng.lognormal(0.0, 0.05, size=(seconds, devices))
    raise ValueError(f"unknown load {kind!r}; use one of {', '.join(LOADS)}")


def _interval(rng: np.random.Generator, median_ms: float) -> tuple[np.ndarray, float]:
    lat = rng.lognormal(math.log(median_ms), 0.25, PER_INTERVAL)
    return st.samples_hist(lat), float(np.median(lat))


def _group(intervals: list[tuple[np.ndarray, float]]) -> GroupData:
    hist = np.sum([h for h, _ in intervals], axis=0) if intervals else np.zeros(1, np.int64)
    return GroupData(devices=("d",), latency_hist={str(k): int(v) for k, v in enumerate(hist) if v},
                     latency_p50s=tuple(m for _, m in intervals), attempts=PER_INTERVAL * len(intervals))


def _pooled_rule(c: GroupData, k: GroupData, pol: CanaryPolicy) -> str | None:
    """The replaced rule: inference-level Mann-Whitney and pooled median ratio; None while too few data."""
    a, b = st.hist_array(c.latency_hist), st.hist_array(k.latency_hist)
    if min(a.sum(), b.sum()) < pol.min_latency_samples or min(len(c.latency_p50s), len(k.latency_p50s)) < \
            pol.min_latency_intervals:
        return None
    m1, m2 = st.hist_median_ms(a), st.hist_median_ms(b)
    bad = st.mann_whitney(a, b).p_value < pol.alpha and bool(m1 and m2 and m1 / m2 > pol.max_latency_ratio)
    return "fail" if bad else "pass"


def simulate(rng: np.random.Generator, *, slowdown: float, load: str, policy: CanaryPolicy, canary: int = 2,
             control: int = 1, soak: int = 5, max_looks: int = 60) -> dict[str, Any]:
    """One soak: ``{"judge": (decision, looks), "pooled": (decision, looks)}``."""
    seconds = soak + max_looks + 3
    loads = _loads(rng, load, seconds, canary + control)
    series = [[_interval(rng, BASE_MS * (slowdown if d < canary else 1.0) * loads[s, d]) for d in range(canary + control)]
              for s in range(seconds)]
    offset = int(rng.integers(0, 3))  # 0: control has one second more at the start; 1: at the end; 2: aligned
    late = LATE_S if load.endswith("+late") else 0
    out: dict[str, Any] = {}
    for look in range(max_looks):
        now = soak + look  # canary seconds 1..now
        lag_c, lag_k = (int(v) for v in rng.integers(0, late + 1, size=2))
        rows = range(1, now + 1 - lag_c)
        ctl_rows = range(0 if offset == 0 else 1, now + 1 + (offset == 1) - lag_k)
        c = _group([series[s][d] for s in rows for d in range(canary)])
        k = _group([series[s][d] for s in ctl_rows for d in range(canary, canary + control)])
        if "judge" not in out:
            lat = judge(c, k, policy).metrics[0]
            if lat.decision in ("pass", "fail"):
                out["judge"] = (lat.decision, look + 1)
        if "pooled" not in out:
            old = _pooled_rule(c, k, policy)
            if old is not None:
                out["pooled"] = (old, look + 1)
        if len(out) == 2:
            break
    out.setdefault("judge", ("inconclusive", max_looks))
    out.setdefault("pooled", ("inconclusive", max_looks))
    return out


def run(*, trials: int = 300, seed: int = 1, loads: tuple[str, ...] = LOADS,
        slowdowns: tuple[float, ...] = SLOWDOWNS, policy: CanaryPolicy | None = None, soak: int = 5,
        max_looks: int = 60) -> list[dict[str, Any]]:
    """Every load x slowdown, ``trials`` soaks each: decision shares and looks to a decision, per rule."""
    pol = policy or replace(CanaryPolicy(), required=("latency",))
    rows = []
    for load in loads:
        for slow in slowdowns:
            rng = np.random.default_rng([seed, LOADS.index(load), int(slow * 100)])
            sims = [simulate(rng, slowdown=slow, load=load, policy=pol, soak=soak, max_looks=max_looks)
                    for _ in range(trials)]
            row: dict[str, Any] = {"load": load, "slowdown": slow, "trials": trials}
            for rule in ("judge", "pooled"):
                got = [s[rule] for s in sims]
                looks = [n for d, n in got if d != "inconclusive"]
                row[rule] = {d: sum(1 for g, _ in got if g == d) for d in ("pass", "fail", "inconclusive")}
                row[rule]["looks_mean"] = round(float(np.mean(looks)), 2) if looks else None
                row[rule]["looks_p90"] = float(np.percentile(looks, 90)) if looks else None
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| load | canary median | judge: pass / fail / inconclusive | looks to decide (mean, p90) "
             "| pooled rule (replaced): pass / fail | looks |", "|---|---|---|---|---|---|"]
    for r in rows:
        j, p = r["judge"], r["pooled"]
        lines.append(f"| {r['load']} | x{r['slowdown']:g} | {j['pass']} / {j['fail']} / {j['inconclusive']} "
                     f"| {j['looks_mean']}, {j['looks_p90']} | {p['pass']} / {p['fail']} | {p['looks_mean']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.canary_power", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=300, help="soaks per load and slowdown (default 300)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--soak", type=int, default=5, help="seconds before the first look (default 5)")
    p.add_argument("--max-looks", type=int, default=60, help="looks before a soak is inconclusive (default 60)")
    p.add_argument("--loads", default=",".join(LOADS), help=f"comma-separated, of {', '.join(LOADS)}")
    p.add_argument("--out", type=Path, default=Path("bench-results/canary_power.json"))
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    args = p.parse_args(argv)
    loads = tuple(x for x in args.loads.split(",") if x)
    unknown = [x for x in loads if x not in LOADS]
    if unknown or min(args.trials, args.soak, args.max_looks) < 1:
        p.error(f"--loads: unknown {', '.join(unknown)}" if unknown else "--trials, --soak and --max-looks must be >= 1")
    rows = run(trials=args.trials, seed=args.seed, loads=loads, soak=args.soak, max_looks=args.max_looks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "trials": args.trials, "seed": args.seed, "soak": args.soak,
                                    "max_looks": args.max_looks}, indent=1))
    print(json.dumps(rows, indent=1) if args.json else markdown(rows))
    print(f"written: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
