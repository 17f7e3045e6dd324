"""Realistic-latency model zoo: torchvision CNNs at 224x224, FP32 vs naive INT8 vs the INT8 speed plan.

``python -m benchmarks.zoo [--models mobilenet_v3_small,mobilenet_v2,resnet18] [--threads 1] [--out DIR]``

Weights are random (``weights=None``; nothing is downloaded): latency does not depend
on the weights' values, accuracy does, so accuracy is measured elsewhere on digits.
Per model this exports ONNX FP32, quantizes the naive static INT8 (QDQ, everything,
per-channel, reduce_range on AVX2 without VNNI) and the plan :func:`export.speed.plan_int8`
picks, then measures each variant twice:

* the matrix (:func:`benchmarks.model_bench.run_matrix`): a fresh process per cell, load
  time, peak RSS, p50/p90/p99 - the numbers ``edgeloop bench`` reports;
* interleaved A/B in one process (:func:`export.speed.interleaved_latency_ms`): FP32 and
  the INT8 variants alternate round by round, so on a shared, noisy machine the
  *ratios* hold even when absolute times drift.  The goals are stated as ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import BenchmarkError

__all__ = ["ZOO_MODELS", "INPUT_SHAPE", "GOALS", "ZooModel", "export_fp32", "build_variants", "run_zoo",
           "summary_table", "main"]

ZOO_MODELS = ("mobilenet_v3_small", "mobilenet_v2", "resnet18")
INPUT_SHAPE = (3, 224, 224)
#: Issue 5's goals: INT8 p50 / FP32 p50 at batch 1, one thread.
GOALS = {"resnet18": 0.5, "mobilenet_v2": 0.6, "mobilenet_v3_small": 1.0}


@dataclass(frozen=True)
class ZooModel:
    """One model's files and the plan chosen for it."""

    name: str
    fp32: Path
    naive: Path
    planned: Path
    plan: Any  # export.speed.Int8Plan


def export_fp32(name: str, out: Path) -> Path:
    """torchvision ``name`` with random weights, exported to ONNX (opset 18, batch 1, input ``input``)."""
    import torch
    import torchvision

    if name not in ZOO_MODELS:
        raise BenchmarkError(f"unknown zoo model {name!r}", hint=f"choose from {', '.join(ZOO_MODELS)}")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, *INPUT_SHAPE)
    torch.onnx.export(model, (x,), str(out), dynamo=True, external_data=False, input_names=["input"],
                      output_names=["logits"], verbose=False)
    return out


def _calibration_factory(samples: int, seed: int = 0) -> Callable[[], Any]:
    import numpy as np

    from export.calibration import ImageCalibrationReader

    images = np.random.default_rng(seed).standard_normal((samples, *INPUT_SHAPE)).astype(np.float32)
    return lambda: ImageCalibrationReader(images, "input")


def build_variants(name: str, workdir: Path, *, threads: int = 1, calib_samples: int = 8, rounds: int = 20,
                   say: Callable[[str], None] = lambda _m: None) -> ZooModel:
    """Export FP32, quantize the naive INT8 and choose + apply the INT8 speed plan."""
    from export.quantize import preprocess_for_quantization
    from export.speed import apply_plan, candidate_plans, plan_int8

    workdir.mkdir(parents=True, exist_ok=True)
    say(f"{name}: export ONNX FP32")
    fp32 = export_fp32(name, workdir / f"{name}-fp32.onnx")
    pre = preprocess_for_quantization(fp32, workdir / f"{name}-pre.onnx")
    factory = _calibration_factory(calib_samples)
    plans = candidate_plans(pre, threads=threads)
    naive = apply_plan(plans[0], pre, workdir / f"{name}-int8-naive.onnx", factory())
    say(f"{name}: choose the INT8 plan among {', '.join(p.name for p in plans)}")
    plan = plan_int8(pre, factory, threads=threads, candidates=plans, rounds=rounds, workdir=workdir,
                     progress=lambda m: say(f"{name}: {m}"))
    planned = apply_plan(plan, pre, workdir / f"{name}-int8-plan.onnx", factory())
    return ZooModel(name=name, fp32=fp32, naive=naive, planned=planned, plan=plan)


def _entries(m: ZooModel) -> list[Any]:
    from .model_bench import ModelEntry

    def entry(kind: str, precision: str, path: Path) -> ModelEntry:
        return ModelEntry(id=f"{m.name}-{kind}", runtime="onnxruntime", precision=precision, path=str(path),
                          size_bytes=path.stat().st_size, input_shape=INPUT_SHAPE, model=m.name)

    return [entry("fp32", "fp32", m.fp32), entry("int8-naive", "int8-static", m.naive),
            entry(f"int8-plan:{m.plan.name}", "int8-static", m.planned)]


def run_zoo(models: Sequence[str], out: Path, *, threads: int = 1, runs: int = 200, rounds: int = 20,
            calib_samples: int = 8, say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Build, plan and measure every model; write ``zoo.json``/``zoo.md`` (matrix) and ``zoo_summary.md``."""
    from export.speed import interleaved_latency_ms

    from .model_bench import BenchConfig, run_matrix
    from .report import write_report
    from .sysinfo import system_info

    config = BenchConfig(threads=(threads,), batches=(1,), runs=runs)
    cells, summary = [], []
    for name in models:
        t0 = time.perf_counter()
        zm = build_variants(name, out / "models", threads=threads, calib_samples=calib_samples, rounds=rounds, say=say)
        say(f"{name}: matrix (fresh process per variant)")
        cells.extend(run_matrix(_entries(zm), config))
        say(f"{name}: final interleaved A/B, {rounds} rounds")
        fp32_ms, naive_ms, plan_ms = interleaved_latency_ms([zm.fp32, zm.naive, zm.planned], threads=threads,
                                                            rounds=rounds)
        summary.append({"model": name, "fp32_ms": fp32_ms, "naive_int8_ms": naive_ms, "plan_int8_ms": plan_ms,
                        "naive_ratio": naive_ms / fp32_ms, "plan_ratio": plan_ms / fp32_ms, "goal_ratio": GOALS[name],
                        "plan": zm.plan.to_dict(), "seconds": round(time.perf_counter() - t0, 1)})
    result = {"system": system_info(), "config": {"threads": [threads], "batches": [1], "runs": runs,
                                                  "ab_rounds": rounds, "calibration_samples": calib_samples},
              "target": "benchmarks.zoo " + ",".join(models), "cells": [c.to_dict() for c in cells],
              "ab": summary}
    paths = write_report(result, out, stem="zoo")
    (out / "zoo_summary.md").write_text(summary_table(summary))
    return {**result, "files": {k: str(v) for k, v in paths.items()} | {"summary": str(out / "zoo_summary.md")}}


def summary_table(summary: Sequence[dict[str, Any]]) -> str:
    """Markdown: model, FP32 p50, naive and planned INT8 p50, ratios vs the goal, the plan used."""
    lines = ["| model | FP32 p50 ms | naive INT8 p50 ms (ratio) | best INT8 p50 ms | ratio | goal | plan used |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        plan = s["plan"]
        met = "met" if s["plan_ratio"] <= s["goal_ratio"] else "missed"
        what = f"`{plan['name']}` ({plan['quant_format']}, per-channel {plan['per_channel']}, reduce_range {plan['reduce_range']}"
        what += f", ops {','.join(plan['op_types'])}" if plan["op_types"] else ""
        what += f", {len(plan['nodes_to_exclude'])} nodes kept float)" if plan["nodes_to_exclude"] else ")"
        lines.append(f"| {s['model']} | {s['fp32_ms']:.2f} | {s['naive_int8_ms']:.2f} ({s['naive_ratio']:.2f}x) "
                     f"| {s['plan_int8_ms']:.2f} | {s['plan_ratio']:.2f}x | <= {s['goal_ratio']:.1f}x ({met}) | {what} |")
    lines.append("")
    lines.append("Ratios are medians of interleaved A/B runs in one process (batch 1, one thread); candidates' "
                 "ratios at planning time:")
    for s in summary:
        lines.append(f"- {s['model']}: " + ", ".join(f"{n} {r:.2f}x" for n, r in s["plan"]["candidates"]))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(ZOO_MODELS), help=f"comma-separated (default {','.join(ZOO_MODELS)})")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--runs", type=int, default=200, help="timed runs per matrix cell (default 200)")
    p.add_argument("--rounds", type=int, default=20, help="interleaved A/B rounds of 10 runs each (default 20)")
    p.add_argument("--calib-samples", type=int, default=8, help="random calibration images (default 8)")
    p.add_argument("--out", type=Path, default=Path("zoo-results"), help="output directory (default zoo-results/)")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in ZOO_MODELS]
    if unknown or not models:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(ZOO_MODELS)}")
    result = run_zoo(models, args.out, threads=args.threads, runs=args.runs, rounds=args.rounds,
                     calib_samples=args.calib_samples, say=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    print(summary_table(result["ab"]))
    print("wrote " + ", ".join(result["files"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
