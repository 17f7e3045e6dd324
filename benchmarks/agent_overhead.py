"""The agent's full path against the bare runtime, for every variant, in one run; and the pipeline's throughput.

    edgeloop bench --agent-overhead                       # builds digits (train + export) and MobileNetV2
    edgeloop bench --agent-overhead BUNDLE.elb [...]      # or measure these bundles
    python -m benchmarks.agent_overhead [BUNDLE ...] [--runs 2000] [--pipeline] [--work DIR] [--json]

For each variant of each bundle (ONNX and TFLite), both paths run in this process on the
same images, interleaved call by call (the order alternates every iteration, so frequency
scaling and a neighbour's load hit both alike):

* **agent**: :meth:`edge_agent.agent.Agent.predict` on a started agent serving that variant
  (no broker, no HTTP): input checks, preprocess, the runtime backend, post-processing,
  the drift monitor, the sampler hook and the counters;
* **bare**: the runtime alone on the already-preprocessed tensor: ``InferenceSession.run``
  (ONNX) or ``set_tensor / invoke / get_tensor`` (LiteRT; int8 inputs quantized beforehand),
  with the agent's thread count.

The goal (issue 12): agent <= 1.05x bare, or <= 30 us added per inference where 5 % of
the model is less than that.  Then the agent's time is split into stages, each timed on
its own (a separate drift monitor, so the agent's windows are untouched).

Three clocks, because a shared machine makes wall time noisy: **wall** (``perf_counter``,
what a caller waits), **thread CPU** (``thread_time`` of the calling thread, interleaved
call by call like wall: what the serving thread spends, blind to neighbours' load but
also to waiting) and **process CPU** (``process_time`` over alternating blocks of agent
and bare calls, each agent block ending with the drift monitor's flush: everything the
agent costs, its drift-window thread included).  And **best block**: the fastest of many
short alternating blocks of agent-only and bare-only calls (``timeit``'s rule: the minimum
is the run the neighbours did not disturb), the uncontended per-call cost on this machine.
BLAS is held to one thread during the
run (``threadpoolctl``, when installed), as the systemd unit's ``OMP_NUM_THREADS=1`` does
on a device.

``--pipeline`` (``--pipeline-only``: nothing else): a 320x240 video (written with OpenCV)
through :class:`~edge_agent.pipeline.StreamPipeline` on the agent vs the hand-written
``VideoCapture.read`` -> resize -> runtime loop (and, for reference, the runtime alone on
pre-decoded tensors), same model and threads: :mod:`benchmarks.pipeline_bench`.

The models: the digits tiny-cnn (trained here in a minute, exported to ONNX FP32/INT8 and
TFLite FP32/INT8) and a 224x224 MobileNetV2 (torchvision, ``weights=None``: random
weights, no download) exported to ONNX with its pooled features as the embedding.
Built once into ``--work`` and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .pipeline_bench import measure_pipeline, pipeline_markdown
from .stats import summarize

__all__ = ["measure_variant", "measure_pipeline", "build_digits", "build_mobilenet", "main", "GOAL_RATIO", "GOAL_ADDED_US"]

GOAL_RATIO = 1.05
GOAL_ADDED_US = 30.0


# ----------------------------------------------------------------------------- models

def build_digits(work: Path) -> Path:
    """The digits tiny-cnn (32x32, 8 epochs, seed 0) exported to ONNX + TFLite, FP32 + INT8 (unsigned)."""
    out = work / "digits-1.0.0.elb"
    if out.is_file():
        return out
    from export.pipeline import export_run
    from train.api import TrainConfig, train_run

    run = train_run(TrainConfig(dataset="digits", model="tiny-cnn", image_size=32, epochs=8, seed=0, threads=1,
                                patience=8, out_dir=str(work / "runs"), run_name="digits-tiny-cnn"))
    export_run(run, out=out, version="1.0.0", workdir=work / "digits-export")
    return out


def build_mobilenet(work: Path) -> Path:
    """MobileNetV2 at 224x224, random weights, ONNX with ``logits`` and the 1280-d pooled ``embedding``."""
    out = work / "mobilenet_v2-1.0.0.elb"
    if out.is_file():
        return out
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(weights=None).eval()

    class WithEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            emb = torch.nn.functional.adaptive_avg_pool2d(self.net.features(x), 1).flatten(1)
            return self.net.classifier(emb), emb

    onnx_path = work / "mobilenet_v2.onnx"
    torch.onnx.export(WithEmbedding().eval(), (torch.randn(1, 3, 224, 224),), str(onnx_path), dynamo=True,
                      external_data=False, input_names=["input"], output_names=["logits", "embedding"], verbose=False)
    samples = work / "mobilenet-samples"
    samples.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(_images((224, 224), 3, n=160)):  # a baseline needs >= 75 held-out images
        np.save(samples / f"{i:03d}.npy", im)
    labels = work / "imagenet-labels.txt"
    labels.write_text("".join(f"class_{i}\n" for i in range(1000)))
    from edgeloop.cli import main as edgeloop_main

    argv = ["--quiet", "bundle", "create", "--model", str(onnx_path), "--labels", str(labels), "--name", "mobilenet_v2",
            "--version", "1.0.0", "--baseline-dir", str(samples), "--out", str(out), "--task", "classification",
            "--output", "logits", "--output-kind", "logits", "--size", "224", "224", "--channels", "3",
            "--range", "unit", "--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225", "--json"]
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        if edgeloop_main(argv) != 0:
            raise RuntimeError(f"edgeloop {' '.join(argv)} failed")
    return out


def _tensors(spec: Any, n: int = 64, seed: int = 0) -> list[np.ndarray]:
    """``n`` real-valued samples of a tensor model's input (no batch axis; dynamic dims 1), inside
    the range a quantized input can hold."""
    rng = np.random.default_rng(seed)
    shape = tuple(d if d > 0 else 1 for d in spec.shape[1:])
    dt = np.dtype(spec.dtype)
    if dt.kind in "iu" and spec.scale:
        info = np.iinfo(dt)
        lo, hi = sorted(((info.min - (spec.zero_point or 0)) * spec.scale, (info.max - (spec.zero_point or 0)) * spec.scale))
        return [rng.uniform(lo, hi, shape).astype(np.float32) for _ in range(n)]
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def _images(size: tuple[int, int], channels: int, n: int = 256) -> list[np.ndarray]:
    """Real digits, upsampled (nearest) to ``size`` as a camera at that size would give them."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.clip(d.images * 16.0, 0, 255).astype(np.uint8)[:n]
    h, w = size
    out = []
    for im in imgs:
        big = im[np.arange(h) * 8 // h][:, np.arange(w) * 8 // w]
        out.append(big if channels == 1 else np.ascontiguousarray(np.repeat(big[:, :, None], channels, axis=2)))
    return out


# ----------------------------------------------------------------------------- the two paths

def _agent(bundle: Path, state: Path, variant: str, threads: int) -> Any:
    from core.agent_config import parse_config
    from edge_agent.agent import Agent

    cfg = {"agent": {"device_id": "bench-overhead", "state_dir": str(state), "allow_unsigned": True},
           "broker": {"enabled": False}, "http": {"enabled": False},
           "model": {"benchmark_runs": 3, "threads": threads, "variant": variant},
           "update": {"min_free_mb": 0.0}}
    agent = Agent(parse_config(cfg, source="<agent_overhead>")).start(connect=False, serve_http=False)
    agent.install(bundle, force=True)
    return agent


def _bare(path: Path, fmt: str, threads: int) -> tuple[Callable[[np.ndarray], Any], Callable[[np.ndarray], np.ndarray]]:
    """(run, prepare): the runtime call alone, and what turns the float tensor into that runtime's input."""
    if fmt == "onnx":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return (lambda x: sess.run(None, {name: x})), (lambda x: x)
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    outs = [d["index"] for d in it.get_output_details()]

    def prepare(x: np.ndarray) -> np.ndarray:
        if inp["dtype"] == np.float32:
            return x
        scale, zero = inp["quantization"]
        info = np.iinfo(inp["dtype"])
        return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(inp["dtype"])

    def run(x: np.ndarray) -> list[np.ndarray]:
        it.set_tensor(inp["index"], x)
        it.invoke()
        return [it.get_tensor(i) for i in outs]

    return run, prepare


def _clocked(fn: Callable[..., Any], arg: Any, wall: list[float], cpu: list[float]) -> None:
    """Call ``fn(arg)``; append its wall time and its thread's CPU time, in ms."""
    c, t = time.thread_time_ns(), time.perf_counter_ns()
    fn(arg)
    wall.append((time.perf_counter_ns() - t) / 1e6)
    cpu.append((time.thread_time_ns() - c) / 1e6)


def _process_cpu(agent: Any, run: Callable[[np.ndarray], Any], imgs: list[np.ndarray], xs: list[np.ndarray],
                 runs: int, block: int = 50) -> tuple[float, float]:
    """Process CPU ms per call (all threads) of the agent and of bare, in alternating blocks."""
    monitor = agent.model.monitor
    a = b = 0.0
    n = 0
    for start in range(0, runs, block):
        k = min(block, runs - start)
        c = time.process_time()
        for i in range(start, start + k):
            agent.predict(imgs[i % len(imgs)])
        if monitor is not None:
            monitor.flush()  # the windows this block filled are this block's cost
        a += time.process_time() - c
        c = time.process_time()
        for i in range(start, start + k):
            run(xs[i % len(xs)])
        b += time.process_time() - c
        n += k
    return a * 1000.0 / n, b * 1000.0 / n


def _best_blocks(agent: Any, run: Callable[[np.ndarray], Any], imgs: list[np.ndarray], xs: list[np.ndarray],
                 runs: int, block: int = 10) -> tuple[float, float]:
    """Per-call wall ms of the fastest block of ``block`` agent calls and of ``block`` bare calls (alternating)."""
    best_a = best_b = float("inf")
    for start in range(0, runs - block + 1, block):
        t = time.perf_counter()
        for i in range(start, start + block):
            agent.predict(imgs[i % len(imgs)])
        best_a = min(best_a, time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(start, start + block):
            run(xs[i % len(xs)])
        best_b = min(best_b, time.perf_counter() - t)
    return best_a * 1000.0 / block, best_b * 1000.0 / block


def _blas_one_thread() -> Any:
    """A context holding BLAS to one thread (threadpoolctl), or a no-op without it."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


def measure_variant(bundle: Path, variant: str, *, runs: int = 2000, warmup: int = 200, threads: int = 1) -> dict[str, Any]:
    """Interleaved agent vs bare timings of one variant (wall, thread CPU, process CPU) and the stages."""
    from core.preprocess import preprocess

    with tempfile.TemporaryDirectory(prefix="edgeloop-overhead-") as tmp, _blas_one_thread():
        agent = _agent(bundle, Path(tmp) / "state", variant, threads)
        try:
            model = agent.model
            spec = model.spec
            run, prepare = _bare(model.slot_dir / model.variant.file, model.variant.format, threads)
            if spec is None:  # a tensor model (no preprocessing): arrays fed as the task feeds them
                from core.tasks.base import tensor_feed

                imgs = _tensors(model.task.input, n=64)
                xs = [tensor_feed(a, model.task.input)[0] for a in imgs]
            else:
                imgs = _images(tuple(spec.size), spec.channels, n=64)
                xs = [prepare(preprocess([im], spec)) for im in imgs]
            for i in range(warmup):
                agent.predict(imgs[i % len(imgs)])
                run(xs[i % len(xs)])
            a_ms, b_ms, a_cpu, b_cpu = [], [], [], []
            for i in range(runs):
                im, x = imgs[i % len(imgs)], xs[i % len(xs)]
                if i % 2:
                    _clocked(agent.predict, im, a_ms, a_cpu)
                    _clocked(run, x, b_ms, b_cpu)
                else:
                    _clocked(run, x, b_ms, b_cpu)
                    _clocked(agent.predict, im, a_ms, a_cpu)
            a, b = summarize(a_ms), summarize(b_ms)
            ac, bc = summarize(a_cpu), summarize(b_cpu)
            pa, pb = _process_cpu(agent, run, imgs, xs, min(runs, 1000))
            ba, bb = _best_blocks(agent, run, imgs, xs, runs)
            # the serving path's stages are an image model's; a tensor model has only the runtime to name
            parts = _stages(model, imgs, runs=min(runs, 1000)) if spec is not None else {"runtime": bc.p50_ms * 1000.0}
            # what the stages leave unexplained: the lock, checks, result objects, counters, sampler, hooks
            parts["bookkeeping"] = round((ac.p50_ms - bc.p50_ms) * 1000.0 - sum(
                v for k, v in parts.items() if k not in ("runtime", "window_close")) - (parts["runtime"] - bc.p50_ms * 1000.0), 2)
            added_us = (a.mean_ms - b.mean_ms) * 1000.0
            cpu_added = (ac.mean_ms - bc.mean_ms) * 1000.0
            return {"bundle": bundle.name, "model": f"{model.manifest.name} {model.version}", "variant": variant,
                    "input": [spec.channels, *spec.size] if spec is not None else list(model.manifest.input.shape[1:]),
                    "threads": threads, "runs": runs,
                    "agent_ms": a.__dict__, "bare_ms": b.__dict__,
                    "ratio_mean": a.mean_ms / b.mean_ms, "ratio_p50": a.p50_ms / b.p50_ms,
                    "added_us_mean": added_us, "added_us_p50": (a.p50_ms - b.p50_ms) * 1000.0,
                    "goal_met": a.mean_ms / b.mean_ms <= GOAL_RATIO or added_us <= GOAL_ADDED_US,
                    "agent_thread_cpu_ms": ac.__dict__, "bare_thread_cpu_ms": bc.__dict__,
                    "cpu_ratio_mean": ac.mean_ms / bc.mean_ms, "cpu_added_us_mean": cpu_added,
                    "cpu_goal_met": ac.mean_ms / bc.mean_ms <= GOAL_RATIO or cpu_added <= GOAL_ADDED_US,
                    "process_cpu_ms_per_call": {"agent": pa, "bare": pb, "ratio": pa / pb if pb else None,
                                                "added_us": (pa - pb) * 1000.0},
                    "best_block_ms_per_call": {"agent": ba, "bare": bb, "ratio": ba / bb, "added_us": (ba - bb) * 1000.0,
                                               "goal_met": ba / bb <= GOAL_RATIO or (ba - bb) * 1000.0 <= GOAL_ADDED_US},
                    "stages_us": parts, "drift_window": model.monitor.window if model.monitor is not None else None,
                    "load_avg": [round(v, 2) for v in os.getloadavg()]}
        finally:
            agent.close()


def _stages(model: Any, imgs: list[np.ndarray], *, runs: int) -> dict[str, float]:
    """Median microseconds (thread CPU) of each stage of the agent's serving path, each timed on its own.

    ``window_close``: a drift window's statistics (on the monitor's thread in the agent)
    per inference, i.e. the median close / the window size.
    """
    from core.drift import DriftMonitor

    task = model.task
    monitor = DriftMonitor(model.baseline, window=model.monitor.window, scores_to_probs=model.task.scores_to_probs) \
        if model.monitor is not None else None
    names = ("preprocess", "runtime", "decode", "drift_append", "sample_score", "window_close")
    t: dict[str, list[float]] = {k: [] for k in names}
    clock = time.thread_time_ns
    for i in range(runs):
        im = imgs[i % len(imgs)]
        s = clock()
        p = task.prepare_serving(im)
        t["preprocess"].append(clock() - s)
        staged = 0
        if monitor is not None:  # as the agent: the input's thumbnail before the runtime runs
            s = clock()
            monitor.stage_inputs(task.drift_input(p))
            staged = clock() - s
        s = clock()
        out = task.run(p)
        t["runtime"].append(clock() - s)
        s = clock()
        res = task.decode(out, p)
        t["decode"].append(clock() - s)
        if monitor is not None:
            inputs, probs, emb, outs = task.drift_arrays(p, out, res)
            if emb is None and "embedding" in monitor.kinds:  # old baselines, as InferencePipeline._drift
                emb = probs if task.scores_to_probs is None else task.scores_to_probs(probs)
            s = clock()
            closed = monitor.append(inputs, probs, emb, outs)
            (t["window_close"] if closed else t["drift_append"]).append(clock() - s + staged)
            s = clock()
            monitor.sample_score(probs, emb)
            t["sample_score"].append(clock() - s)
    got = {k: round(float(np.median(v)) / 1e3, 2) for k, v in t.items() if v}
    if "window_close" in got and monitor is not None:
        got["window_close"] = round(got["window_close"] / monitor.window, 2)
    return got


# ----------------------------------------------------------------------------- report

def markdown(results: list[dict[str, Any]], pipeline: list[dict[str, Any]]) -> str:
    if not results:
        return "\n".join(pipeline_markdown(pipeline)).lstrip("\n") + "\n"
    lines = ["Wall clock, interleaved call by call:", "",
             "| model | variant | input | agent mean ms | bare mean ms | ratio mean | ratio p50 | added µs (mean) "
             "| added µs (p50) | goal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['variant']} | {'x'.join(map(str, r['input']))} "
                     f"| {r['agent_ms']['mean_ms']:.4f} | {r['bare_ms']['mean_ms']:.4f} | {r['ratio_mean']:.3f}x "
                     f"| {r['ratio_p50']:.3f}x | {r['added_us_mean']:.1f} | {r['added_us_p50']:.1f} "
                     f"| {'met' if r['goal_met'] else 'NOT met'} |")
    lines += ["", "CPU time: the serving thread's (interleaved, per call) and the whole process's (drift-window "
              "thread included; alternating blocks):", "",
              "| model | variant | agent thread µs (mean) | bare thread µs (mean) | ratio | added µs | goal "
              "| agent process µs/call | bare process µs/call | ratio | added µs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        pc = r["process_cpu_ms_per_call"]
        lines.append(f"| {r['model']} | {r['variant']} | {r['agent_thread_cpu_ms']['mean_ms'] * 1e3:.1f} "
                     f"| {r['bare_thread_cpu_ms']['mean_ms'] * 1e3:.1f} | {r['cpu_ratio_mean']:.3f}x "
                     f"| {r['cpu_added_us_mean']:.1f} | {'met' if r['cpu_goal_met'] else 'NOT met'} "
                     f"| {pc['agent'] * 1e3:.1f} | {pc['bare'] * 1e3:.1f} | {pc['ratio']:.3f}x | {pc['added_us']:.1f} |")
    lines += ["", "Best block (the fastest of many alternating 10-call blocks: the uncontended cost):", "",
              "| model | variant | agent µs/call | bare µs/call | ratio | added µs | goal |", "|---|---|---|---|---|---|---|"]
    for r in results:
        bb = r["best_block_ms_per_call"]
        lines.append(f"| {r['model']} | {r['variant']} | {bb['agent'] * 1e3:.1f} | {bb['bare'] * 1e3:.1f} "
                     f"| {bb['ratio']:.3f}x | {bb['added_us']:.1f} | {'met' if bb['goal_met'] else 'NOT met'} |")
    lines += ["", "Stages of the agent's path (median thread-CPU µs, each timed alone; window_close = one window's "
              "statistics / its size, on the drift thread in the agent; bookkeeping = agent p50 - bare p50 - the "
              "serving-thread stages - the runtime wrapper's excess over bare):", "",
              "| model | variant | " + " | ".join(results[0]["stages_us"]) + " |" if results else "",
              "|---|---|" + "---|" * (len(results[0]["stages_us"]) if results else 0)]
    for r in results:
        lines.append(f"| {r['model']} | {r['variant']} | " + " | ".join(f"{v:.1f}" for v in r["stages_us"].values()) + " |")
    if results:
        lines += ["", "Load average (1, 5, 15 min) at the end of each measurement: "
                  + "; ".join(f"{r['variant']} {r['load_avg']}" for r in results)]
    lines += pipeline_markdown(pipeline)
    return "\n".join(lines) + "\n"


def _variants(bundle: Path) -> list[str]:
    from core.bundle import read_manifest_unverified

    return [v.id for v in read_manifest_unverified(bundle).variants]


def main(argv: list[str] | None = None) -> int:
    from .report import RESULT_SCHEMA_VERSION
    from .sysinfo import system_info

    p = argparse.ArgumentParser(prog="python -m benchmarks.agent_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="*", type=Path, help="bundles (.elb); default: build digits and MobileNetV2")
    p.add_argument("--runs", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default="", help="only these variant ids (comma-separated)")
    p.add_argument("--pipeline", action="store_true", help="also the pipeline's throughput on a video file")
    p.add_argument("--pipeline-only", action="store_true", help="only the pipeline's throughput (implies --pipeline)")
    p.add_argument("--pipeline-variants", default="onnx-fp32,tflite-fp32",
                   help="variants the pipeline runs (comma-separated; each bundle's first ONNX one when none match)")
    p.add_argument("--frames", type=int, default=600, help="frames of the pipeline's video")
    p.add_argument("--rounds", type=int, default=3, help="alternating bare / pipeline rounds (median reported)")
    p.add_argument("--work", type=Path, default=Path("bench-results/agent-overhead/work"),
                   help="where built models are kept and reused")
    p.add_argument("--out", type=Path, default=Path("bench-results/agent-overhead"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    bundles = args.bundles or [build_digits(args.work), build_mobilenet(args.work)]
    only = {v for v in args.variants.split(",") if v}
    results, pipeline = [], []
    piped = [v for v in args.pipeline_variants.split(",") if v]
    for b in bundles:
        for v in [] if args.pipeline_only else _variants(b):
            if only and v not in only:
                continue
            print(f"  measuring {b.name} {v}", file=sys.stderr, flush=True)
            results.append(measure_variant(b, v, runs=args.runs, warmup=args.warmup, threads=args.threads))
        if args.pipeline or args.pipeline_only:
            have = _variants(b)
            for v in [v for v in piped if v in have] or [next(v for v in have if v.startswith("onnx"))]:
                print(f"  pipeline {b.name} {v}", file=sys.stderr, flush=True)
                pipeline.append(measure_pipeline(b, v, args.work, frames=args.frames, threads=args.threads,
                                                 rounds=args.rounds))
    doc = {"schema_version": RESULT_SCHEMA_VERSION, "kind": "agent_overhead",
           "system": system_info(["python", "-m", "benchmarks.agent_overhead", *(argv if argv is not None else sys.argv[1:])]),
           "goal": {"ratio": GOAL_RATIO, "added_us": GOAL_ADDED_US}, "results": results, "pipeline": pipeline}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "agent_overhead.json").write_text(json.dumps(doc, indent=2))
    md = markdown(results, pipeline)
    (args.out / "agent_overhead.md").write_text(md)
    print(json.dumps(doc, indent=2) if args.json else md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
