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

``--pipeline``: a 320x240 video (written with OpenCV) through :class:`~edge_agent.pipeline.
StreamPipeline` on the agent vs the bare runtime's items/s, same model and threads.

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


def _timed(fn: Callable[..., Any], *args: Any) -> float:
    t = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t) * 1000.0


def measure_variant(bundle: Path, variant: str, *, runs: int = 2000, warmup: int = 200, threads: int = 1) -> dict[str, Any]:
    """Interleaved agent vs bare timings of one variant and the agent's per-stage split."""
    from core.preprocess import preprocess

    with tempfile.TemporaryDirectory(prefix="edgeloop-overhead-") as tmp:
        agent = _agent(bundle, Path(tmp) / "state", variant, threads)
        try:
            model = agent.model
            spec = model.spec
            imgs = _images(tuple(spec.size), spec.channels, n=64)
            run, prepare = _bare(model.slot_dir / model.variant.file, model.variant.format, threads)
            xs = [prepare(preprocess([im], spec)) for im in imgs]
            for i in range(warmup):
                agent.predict(imgs[i % len(imgs)])
                run(xs[i % len(xs)])
            a_ms, b_ms = [], []
            for i in range(runs):
                im, x = imgs[i % len(imgs)], xs[i % len(xs)]
                if i % 2:
                    a_ms.append(_timed(agent.predict, im))
                    b_ms.append(_timed(run, x))
                else:
                    b_ms.append(_timed(run, x))
                    a_ms.append(_timed(agent.predict, im))
            a, b = summarize(a_ms), summarize(b_ms)
            parts = _stages(model, imgs, runs=min(runs, 1000))
            # what the stages leave unexplained: checks, result objects, counters, sampler, hooks
            parts["bookkeeping"] = round((a.p50_ms - b.p50_ms) * 1000.0 - sum(
                v for k, v in parts.items() if k != "runtime_backend") - (parts["runtime_backend"] - b.p50_ms * 1000.0), 2)
            added_us = (a.mean_ms - b.mean_ms) * 1000.0
            return {"bundle": bundle.name, "model": f"{model.manifest.name} {model.version}", "variant": variant,
                    "input": [spec.channels, *spec.size], "threads": threads, "runs": runs,
                    "agent_ms": a.__dict__, "bare_ms": b.__dict__,
                    "ratio_mean": a.mean_ms / b.mean_ms, "ratio_p50": a.p50_ms / b.p50_ms,
                    "added_us_mean": added_us, "added_us_p50": (a.p50_ms - b.p50_ms) * 1000.0,
                    "goal_met": a.mean_ms / b.mean_ms <= GOAL_RATIO or added_us <= GOAL_ADDED_US,
                    "stages_us": parts, "drift_window": model.monitor.window if model.monitor is not None else None,
                    "load_avg": [round(v, 2) for v in os.getloadavg()]}
        finally:
            agent.close()


def _stages(model: Any, imgs: list[np.ndarray], *, runs: int) -> dict[str, float]:
    """Median microseconds of each stage of the agent's path, each timed on its own."""
    from core.drift import DriftMonitor
    from core.preprocess import preprocess
    from edge_agent.inference import softmax

    spec = model.spec
    monitor = DriftMonitor(model.baseline, window=model.monitor.window) if model.monitor is not None else None
    t: dict[str, list[float]] = {k: [] for k in ("preprocess", "runtime_backend", "softmax", "drift_update")}
    for i in range(runs):
        im = imgs[i % len(imgs)]
        s = time.perf_counter()
        x = preprocess([im], spec)
        t["preprocess"].append(time.perf_counter() - s)
        s = time.perf_counter()
        out = model.backend.run(x)
        t["runtime_backend"].append(time.perf_counter() - s)
        s = time.perf_counter()
        probs = softmax(out.logits)
        t["softmax"].append(time.perf_counter() - s)
        if monitor is not None and out.embedding is not None:
            s = time.perf_counter()
            monitor.update(x, probs, out.embedding)
            t["drift_update"].append(time.perf_counter() - s)
    return {k: round(float(np.median(v)) * 1e6, 2) for k, v in t.items() if v}


# ----------------------------------------------------------------------------- pipeline throughput

def measure_pipeline(bundle: Path, variant: str, work: Path, *, frames: int = 600, threads: int = 1) -> dict[str, Any]:
    """Items/s of the pipeline on a 320x240 video vs the bare runtime on the same model and threads."""
    import cv2

    from core.agent_config import SourceSection
    from core.preprocess import preprocess
    from edge_agent.pipeline import StreamPipeline
    from edge_agent.sources import make_source

    video = work / f"bench-{frames}.avi"
    if not video.is_file():
        w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (320, 240))
        for im in _images((240, 320), 3, n=frames):
            w.write(im)
        w.release()
    with tempfile.TemporaryDirectory(prefix="edgeloop-pipeline-") as tmp:
        agent = _agent(bundle, Path(tmp) / "state", variant, threads)
        try:
            model = agent.model
            run, prepare = _bare(model.slot_dir / model.variant.file, model.variant.format, threads)
            xs = [prepare(preprocess([im], model.spec)) for im in _images(tuple(model.spec.size), model.spec.channels, 32)]
            for x in xs:
                run(x)
            t = time.perf_counter()
            for i in range(frames):
                run(xs[i % len(xs)])
            bare = frames / (time.perf_counter() - t)
            spec = SourceSection(uri=str(video))
            pipe = StreamPipeline(agent.predict, [(make_source(spec.uri), spec)])
            t = time.perf_counter()
            pipe.start()
            pipe.wait()
            took = time.perf_counter() - t
            pipe.stop()
            st = pipe.stats()
            return {"bundle": bundle.name, "variant": variant, "frames": frames, "video": "320x240 MJPG",
                    "threads": threads, "bare_items_per_s": bare, "pipeline_items_per_s": st.inferences / took,
                    "ratio": (st.inferences / took) / bare, "dropped": st.dropped_frames}
        finally:
            agent.close()


# ----------------------------------------------------------------------------- report

def markdown(results: list[dict[str, Any]], pipeline: list[dict[str, Any]]) -> str:
    lines = ["| model | variant | input | agent mean ms | bare mean ms | ratio mean | ratio p50 | added µs (mean) | goal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['variant']} | {'x'.join(map(str, r['input']))} "
                     f"| {r['agent_ms']['mean_ms']:.4f} | {r['bare_ms']['mean_ms']:.4f} | {r['ratio_mean']:.3f}x "
                     f"| {r['ratio_p50']:.3f}x | {r['added_us_mean']:.1f} | {'met' if r['goal_met'] else 'NOT met'} |")
    lines += ["", "Stages of the agent's path (median µs, each timed alone; bookkeeping = agent p50 - bare p50 - the "
              "other stages - the backend wrapper's excess over bare):", "",
              "| model | variant | " + " | ".join(results[0]["stages_us"]) + " |" if results else "",
              "|---|---|" + "---|" * (len(results[0]["stages_us"]) if results else 0)]
    for r in results:
        lines.append(f"| {r['model']} | {r['variant']} | " + " | ".join(f"{v:.1f}" for v in r["stages_us"].values()) + " |")
    if pipeline:
        lines += ["", "| pipeline | variant | frames | bare items/s | pipeline items/s | ratio |", "|---|---|---|---|---|---|"]
        for p in pipeline:
            lines.append(f"| {p['bundle']} ({p['video']}) | {p['variant']} | {p['frames']} | {p['bare_items_per_s']:.1f} "
                         f"| {p['pipeline_items_per_s']:.1f} | {p['ratio']:.3f} |")
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
    p.add_argument("--work", type=Path, default=Path("bench-results/agent-overhead/work"),
                   help="where built models are kept and reused")
    p.add_argument("--out", type=Path, default=Path("bench-results/agent-overhead"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    bundles = args.bundles or [build_digits(args.work), build_mobilenet(args.work)]
    only = {v for v in args.variants.split(",") if v}
    results, pipeline = [], []
    for b in bundles:
        for v in _variants(b):
            if only and v not in only:
                continue
            print(f"  measuring {b.name} {v}", file=sys.stderr, flush=True)
            results.append(measure_variant(b, v, runs=args.runs, warmup=args.warmup, threads=args.threads))
        if args.pipeline:
            first = next(v for v in _variants(b) if v.startswith("onnx"))
            pipeline.append(measure_pipeline(b, first, args.work, threads=args.threads))
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
