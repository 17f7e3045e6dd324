"""The agent's full path against a bare ``onnxruntime.InferenceSession.run``, in one run.

    python -m benchmarks.agent_overhead BUNDLE.elb [--runs 2000] [--key PUB] [--out DIR] [--json]

Both paths run in this process on the same images, interleaved call by call (the order
alternates every iteration, so frequency scaling and a neighbour's load hit both alike):

* **agent**: :meth:`edge_agent.agent.Agent.predict` on a real started agent (no broker, no
  HTTP): input checks, preprocess, the runtime backend, softmax, the drift monitor update
  and per-sample score, the sampler hook, the drift report hook (outbox) and counters;
* **bare**: ``InferenceSession.run`` of the bundle's ONNX variant (one intra-op thread,
  like the agent's default) on the already-preprocessed tensor.

Then the agent's per-call time is split into its parts (each part timed on its own, on a
separate drift monitor so the agent's windows are untouched) and a ``cProfile`` of the
full path names the functions the overhead is spent in.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .stats import summarize

__all__ = ["measure_overhead", "main"]


def _images(spec_size: tuple[int, int], channels: int, n: int = 256, seed: int = 0) -> list[np.ndarray]:
    """Real digits, upsampled (nearest) to the model's input size as a camera at that size would give them."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.clip(d.images * 16.0, 0, 255).astype(np.uint8)[:n]
    h, w = spec_size
    out = []
    for im in imgs:
        big = im[np.arange(h) * 8 // h][:, np.arange(w) * 8 // w]
        out.append(big if channels == 1 else np.repeat(big[:, :, None], channels, axis=2))
    return out


def _agent(bundle: Path, state: Path, key: Path | None, threads: int) -> Any:
    from edge_agent.agent import Agent
    from core.agent_config import parse_config

    cfg = {"agent": {"device_id": "bench-overhead", "state_dir": str(state)},
           "broker": {"enabled": False}, "http": {"enabled": False},
           "model": {"benchmark_runs": 5, "threads": threads, "variant": "onnx-fp32"},
           "update": {"min_free_mb": 0.0}}
    if key is not None:
        cfg["agent"]["trusted_key"] = str(key)
    else:  # signature not checked: the benchmark measures inference, not trust
        cfg["agent"]["allow_unsigned"] = True
    agent = Agent(parse_config(cfg, source="<agent_overhead>")).start()
    agent.install(bundle, force=True)
    return agent


def _timed(fn: Any, *args: Any) -> float:
    t = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t) * 1000.0


def measure_overhead(bundle: Path, *, runs: int = 2000, warmup: int = 200, key: Path | None = None,
                     threads: int = 1, profile: bool = True) -> dict[str, Any]:
    """Interleaved agent vs bare ORT timings, a per-part split and the top profile entries."""
    import onnxruntime as ort

    from core.drift import DriftMonitor
    from core.preprocess import preprocess
    from edge_agent.inference import softmax

    with tempfile.TemporaryDirectory(prefix="edgeloop-overhead-") as tmp:
        agent = _agent(bundle, Path(tmp) / "state", key, threads)
        try:
            model = agent.model
            spec = model.spec
            imgs = _images(tuple(spec.size), spec.channels)
            xs = [preprocess([im], spec) for im in imgs]
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            sess = ort.InferenceSession(str(model.slot_dir / model.variant.file), so, providers=["CPUExecutionProvider"])
            in_name = sess.get_inputs()[0].name
            for i in range(warmup):
                agent.predict(imgs[i % len(imgs)])
                sess.run(None, {in_name: xs[i % len(xs)]})
            a_ms, b_ms = [], []
            for i in range(runs):
                im, x = imgs[i % len(imgs)], xs[i % len(xs)]
                if i % 2:
                    a_ms.append(_timed(agent.predict, im))
                    b_ms.append(_timed(sess.run, None, {in_name: x}))
                else:
                    b_ms.append(_timed(sess.run, None, {in_name: x}))
                    a_ms.append(_timed(agent.predict, im))
            a, b = summarize(a_ms), summarize(b_ms)
            parts = _parts(model, imgs, xs, runs=min(runs, 1000), monitor_cls=DriftMonitor, softmax=softmax)
            prof = _profile(agent, imgs, min(runs, 1000)) if profile else None
            return {"bundle": str(bundle), "model": f"{model.manifest.name} {model.version}", "variant": model.variant.id,
                    "input": [spec.channels, *spec.size], "threads": threads, "runs": runs,
                    "agent_ms": a.__dict__, "bare_ms": b.__dict__,
                    "ratio_p50": a.p50_ms / b.p50_ms, "ratio_mean": a.mean_ms / b.mean_ms,
                    "overhead_p50_ms": a.p50_ms - b.p50_ms, "parts_p50_ms": parts, "profile": prof,
                    "drift_window": model.monitor.window if model.monitor is not None else None,
                    "load_avg": [round(v, 2) for v in os.getloadavg()]}
        finally:
            agent.close()


def _parts(model: Any, imgs: list[np.ndarray], xs: list[np.ndarray], *, runs: int, monitor_cls: Any,
           softmax: Any) -> dict[str, float]:
    """Median ms of each stage on its own (same inputs; a separate monitor so the agent's state is untouched)."""
    from core.preprocess import preprocess

    spec = model.spec
    monitor = monitor_cls(model.baseline, window=model.monitor.window) if model.monitor is not None else None
    t: dict[str, list[float]] = {k: [] for k in ("preprocess", "backend_run", "softmax", "drift_update",
                                                  "drift_score_samples")}
    for i in range(runs):
        im, x = imgs[i % len(imgs)], xs[i % len(xs)]
        t["preprocess"].append(_timed(preprocess, [im], spec))
        s = time.perf_counter()
        out = model.backend.run(x)
        t["backend_run"].append((time.perf_counter() - s) * 1000.0)
        s = time.perf_counter()
        probs = softmax(out.logits)
        t["softmax"].append((time.perf_counter() - s) * 1000.0)
        if monitor is not None and out.embedding is not None:
            t["drift_update"].append(_timed(monitor.update, x, probs, out.embedding))
            if getattr(monitor, "last_sample_scores", None) is None:
                t["drift_score_samples"].append(_timed(monitor.score_samples, out.embedding))
    return {k: float(np.median(v)) for k, v in t.items() if v}


def _profile(agent: Any, imgs: list[np.ndarray], runs: int, top: int = 15) -> list[dict[str, Any]]:
    """Top functions by own time over ``runs`` predictions (cProfile inflates Python calls: attribution only)."""
    prof = cProfile.Profile()
    prof.enable()
    for i in range(runs):
        agent.predict(imgs[i % len(imgs)])
    prof.disable()
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({fn})", "calls_per_predict": nc / runs,
                     "own_us_per_predict": tt / runs * 1e6, "cum_us_per_predict": ct / runs * 1e6})
    rows.sort(key=lambda r: -r["own_us_per_predict"])
    return rows[:top]


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | input | agent p50 ms | bare ORT p50 ms | ratio p50 | ratio mean | overhead ms | load avg |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} ({r['variant']}) | {'x'.join(map(str, r['input']))} | {r['agent_ms']['p50_ms']:.3f} "
                     f"| {r['bare_ms']['p50_ms']:.3f} | {r['ratio_p50']:.2f}x | {r['ratio_mean']:.2f}x "
                     f"| {r['overhead_p50_ms']:.3f} | {r['load_avg'][0]} |")
    for r in results:
        lines.append(f"\nParts of the agent path, {r['model']} (median ms each, measured alone): "
                     + ", ".join(f"{k} {v:.3f}" for k, v in r["parts_p50_ms"].items()))
        if r.get("profile"):
            lines.append("\nTop own time per predict (cProfile, µs):\n")
            lines.append("| function | calls | own µs | cum µs |\n|---|---|---|---|")
            for p in r["profile"][:12]:
                lines.append(f"| `{p['function']}` | {p['calls_per_predict']:.1f} | {p['own_us_per_predict']:.1f} "
                             f"| {p['cum_us_per_predict']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from .report import RESULT_SCHEMA_VERSION
    from .sysinfo import system_info

    p = argparse.ArgumentParser(prog="python -m benchmarks.agent_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="+", type=Path, help="signed bundles (.elb) with an onnx-fp32 variant")
    p.add_argument("--runs", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--key", type=Path, help="the public key the bundles are signed with (else not checked)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench-results/agent-overhead"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    results = [measure_overhead(b, runs=args.runs, warmup=args.warmup, key=args.key, threads=args.threads,
                                profile=not args.no_profile) for b in args.bundles]
    doc = {"schema_version": RESULT_SCHEMA_VERSION, "kind": "agent_overhead",
           "system": system_info(["python", "-m", "benchmarks.agent_overhead", *(argv if argv is not None else sys.argv[1:])]),
           "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "agent_overhead.json").write_text(json.dumps(doc, indent=2))
    md = markdown(results)
    (args.out / "agent_overhead.md").write_text(md)
    print(json.dumps(doc, indent=2) if args.json else md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
