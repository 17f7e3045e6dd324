"""The stream pipeline's throughput on a video file against the loop a user would write by hand.

``python -m benchmarks.agent_overhead BUNDLE --pipeline-only`` (or ``--pipeline`` with the
overhead table) runs, for one variant of each bundle, alternately (``rounds`` times, so a
neighbour's load hits both alike):

* **bare (video)**, the honest baseline: ``cv2.VideoCapture(file).read()`` -> the
  preprocessing the model needs (the resize its manifest names, done by the library call
  that computes it on 8-bit pixels, then ``(x * scale - mean) / std`` and the layout in
  numpy) -> ``InferenceSession.run`` / LiteRT ``invoke``, same model and thread count, one
  thread;
* **pipeline**: :class:`~edge_agent.pipeline.StreamPipeline` on a started agent, wired as
  ``edgeloop agent run --source FILE`` wires it (capture thread with the model's frame
  shaper -> queue -> ``Agent.predict``), no sinks (the bare loop has none either);

and once, for reference, **bare (tensors)**: the runtime alone on tensors decoded and
preprocessed beforehand (what the pipeline cannot reach on a video: it has to decode).
The per-stage figures are each stage alone over the whole video (median µs per frame).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["measure_pipeline", "pipeline_markdown", "write_video"]


def write_video(work: Path, frames: int, images: Callable[..., list[np.ndarray]]) -> Path:
    """A 320x240 MJPG video of ``frames`` digits (written once, reused)."""
    import cv2

    video = work / f"bench-{frames}.avi"
    if not video.is_file():
        w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (320, 240))
        for im in images((240, 320), 3, n=frames):
            w.write(im)
        w.release()
    return video


def _normaliser(spec: Any, prepare: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A model-sized 8-bit RGB / gray image -> the runtime's input, in numpy as a careful user writes it: the
    constants folded (``x * (scale / std) - mean / std``), one cast into a buffer in the model's layout, in place."""
    c = spec.channels
    mul = (np.float32(spec.scale) / np.asarray(spec.std, np.float32)).astype(np.float32)
    sub = (np.asarray(spec.mean, np.float32) / np.asarray(spec.std, np.float32)).astype(np.float32)
    h, w = spec.size
    if spec.layout == "NCHW":
        shape, per = (1, c, h, w), (c, 1, 1)
    elif spec.layout == "NHWC":
        shape, per = (1, h, w, c), (c,)
    else:
        shape, per = (1, h, w), (1,)

    def norm(img: np.ndarray) -> np.ndarray:
        if img.ndim == 2:
            img = img[:, :, None]
        if spec.channel_order == "BGR":
            img = img[:, :, ::-1]
        view = img.transpose(2, 0, 1) if spec.layout == "NCHW" else (img[:, :, 0] if spec.layout == "NHW" else img)
        x = np.empty(shape, np.float32)
        np.multiply(view, mul.reshape(per) if spec.layout != "NHW" else mul[0], out=x[0])  # gray replicates here
        np.subtract(x[0], sub.reshape(per) if spec.layout != "NHW" else sub[0], out=x[0])
        return prepare(x)

    return norm


def _bare_video(video: Path, shape: Callable[[np.ndarray], np.ndarray], norm: Callable[[np.ndarray], np.ndarray],
                run: Callable[[np.ndarray], Any]) -> tuple[float, float]:
    """(items/s, process CPU µs per item) of read -> BGR->RGB -> resize -> normalise -> run, in one thread."""
    import cv2

    cap = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG)
    n = 0
    c = time.process_time()
    t = time.perf_counter()
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        run(norm(shape(frame[:, :, ::-1])))
        n += 1
    took = time.perf_counter() - t
    cpu = time.process_time() - c
    cap.release()
    return n / took, cpu * 1e6 / n


class _ThreadClock:
    """A thread's CPU time from its first to its last tick (``time.thread_time``, read on that thread)."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last = 0.0
        self.n = 0

    def tick(self) -> None:
        t = time.thread_time()
        if self.first is None:
            self.first = t
        self.last = t
        self.n += 1

    def us_per_item(self) -> float:
        return (self.last - (self.first or 0.0)) * 1e6 / max(self.n - 1, 1)


def _pipeline(agent: Any, video: Path) -> tuple[float, float, Any, dict[str, float]]:
    """(items/s, process CPU µs per item, stats, each thread's CPU µs per item) of the pipeline as
    ``agent run --source FILE`` builds it.  The per-thread figures are load-proof: the slowest thread is
    the pipeline's pace on a device with a core per thread."""
    from core.agent_config import SourceSection
    from edge_agent.pipeline import ModelShaper, StreamPipeline
    from edge_agent.sources import make_source

    spec = SourceSection(uri=str(video))
    shaper, capture, infer = ModelShaper(agent), _ThreadClock(), _ThreadClock()

    def shaper_for() -> Any:  # called once per frame on the capture thread
        capture.tick()
        return shaper()

    def predict(x: np.ndarray) -> Any:
        pred = agent.predict(x)
        infer.tick()
        return pred

    pipe = StreamPipeline(predict, [(make_source(spec.uri), spec)], shaper=shaper_for)
    c = time.process_time()
    t = time.perf_counter()
    pipe.start()
    pipe.wait()
    took = time.perf_counter() - t
    cpu = time.process_time() - c
    pipe.stop()
    st = pipe.stats()
    per_item = cpu * 1e6 / max(st.inferences, 1)
    threads = {"capture": capture.us_per_item(), "inference": infer.us_per_item()}
    threads["other"] = max(0.0, per_item - threads["capture"] - threads["inference"])  # drift window, GC
    return st.inferences / took, per_item, st, threads


def _stages(video: Path, agent: Any, shape: Callable[[np.ndarray], np.ndarray],
            norm: Callable[[np.ndarray], np.ndarray], run: Callable[[np.ndarray], Any]) -> dict[str, float]:
    """Median µs per frame of each stage alone, over the whole video."""
    import cv2

    cap = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG)
    frames, t_read = [], []
    while True:
        s = time.perf_counter_ns()
        ok, frame = cap.read()
        if not ok:
            break
        t_read.append(time.perf_counter_ns() - s)
        frames.append(frame)
    cap.release()
    rgb = [f[:, :, ::-1] for f in frames]

    def each(fn: Callable[[Any], Any], items: list[Any]) -> tuple[float, list[Any]]:
        ts, out = [], []
        for it in items:
            s = time.perf_counter_ns()
            out.append(fn(it))
            ts.append(time.perf_counter_ns() - s)
        return statistics.median(ts) / 1e3, out

    shape_us, small = each(shape, rgb)
    norm_us, xs = each(norm, small)
    run_us, _ = each(run, xs)
    predict_us, _ = each(agent.predict, small)
    whole_us, _ = each(agent.predict, rgb[:100])  # the agent resizing the whole frame itself (before shaping)
    return {"decode": statistics.median(t_read) / 1e3, "shape (resize to input, 8-bit)": shape_us,
            "normalise (bare)": norm_us, "runtime (bare)": run_us, "agent.predict (shaped frame)": predict_us,
            "agent.predict (whole frame)": whole_us}


def measure_pipeline(bundle: Path, variant: str, work: Path, *, frames: int = 600, threads: int = 1,
                     rounds: int = 3) -> dict[str, Any]:
    """Items/s of the pipeline on a 320x240 video vs the hand-written video loop and the tensor-only runtime."""
    import os

    from core.preprocess import preprocess
    from edge_agent.sources.shape import frame_shaper

    from .agent_overhead import _agent, _bare, _blas_one_thread, _images

    video = write_video(work, frames, _images)
    with tempfile.TemporaryDirectory(prefix="edgeloop-pipeline-") as tmp, _blas_one_thread():
        agent = _agent(bundle, Path(tmp) / "state", variant, threads)
        try:
            model = agent.model
            spec = model.spec
            run, prepare = _bare(model.slot_dir / model.variant.file, model.variant.format, threads)
            shape = frame_shaper(spec, model.task.kind)
            if shape is None:
                raise ValueError(f"{bundle.name}: no 8-bit frame shaper for this model's preprocessing")
            norm = _normaliser(spec, prepare)
            xs = [prepare(preprocess([im], spec)) for im in _images(tuple(spec.size), spec.channels, 32)]
            for x in xs:
                run(x)
            t = time.perf_counter()
            for i in range(frames):
                run(xs[i % len(xs)])
            tensor = frames / (time.perf_counter() - t)
            _bare_video(video, shape, norm, run)  # warm the decoder and caches
            bare, piped, bare_cpu, piped_cpu, loop, loop_cpu, stats = [], [], [], [], [], [], None
            threads: list[dict[str, float]] = []
            for r in range(rounds):  # alternate, first one then the other
                for which in ((0, 1, 2) if r % 2 == 0 else (2, 1, 0)):
                    if which == 0:
                        ips, cpu = _bare_video(video, shape, norm, run)
                        bare.append(ips)
                        bare_cpu.append(cpu)
                    elif which == 1:
                        ips, cpu, stats, per_thread = _pipeline(agent, video)
                        threads.append(per_thread)
                        piped.append(ips)
                        piped_cpu.append(cpu)
                    else:  # the agent in the same one-thread loop: what the agent costs, without the pipeline
                        ips, cpu = _bare_video(video, shape, lambda im: im, agent.predict)
                        loop.append(ips)
                        loop_cpu.append(cpu)
            stages = _stages(video, agent, shape, norm, run)
            b, p = statistics.median(bare), statistics.median(piped)
            return {"bundle": bundle.name, "variant": variant, "frames": frames, "video": "320x240 MJPG",
                    "input": [spec.channels, *spec.size], "resize": spec.resize, "threads": threads, "rounds": rounds,
                    "bare_video_items_per_s": b, "bare_video_runs": bare, "pipeline_items_per_s": p,
                    "pipeline_runs": piped, "ratio": p / b, "best_ratio": max(piped) / max(bare),
                    "agent_loop_items_per_s": statistics.median(loop),
                    "thread_cpu_us_per_item": (th := {k: statistics.median(t[k] for t in threads) for k in threads[0]}),
                    # a core per thread: the slowest thread sets the pace; bare is one thread doing it all
                    "idle_cores_ratio": statistics.median(bare_cpu) / max(th.values()),
                    "cpu_us_per_item": {"bare_video": statistics.median(bare_cpu),
                                        "pipeline": statistics.median(piped_cpu),
                                        "agent_loop": statistics.median(loop_cpu)},
                    "bare_tensor_items_per_s": tensor,
                    "ratio_vs_tensor": p / tensor, "predicted": stats.inferences if stats else 0,
                    "dropped": stats.dropped_frames if stats else 0, "stages_us": stages,
                    "load_avg": [round(v, 2) for v in os.getloadavg()]}
        finally:
            agent.close()


def pipeline_markdown(pipeline: list[dict[str, Any]]) -> list[str]:
    """The pipeline table and its per-stage breakdown."""
    if not pipeline:
        return []
    lines = ["", "Pipeline on a video file (median of alternating rounds; bare (video) = the hand-written "
             "read -> resize -> normalise -> runtime loop, one thread; bare (tensors) = the runtime alone on "
             "pre-decoded, pre-processed tensors, for reference; agent loop = read -> resize -> Agent.predict in the same "
             "one-thread loop, i.e. the agent's cost without the pipeline's; CPU = process CPU, all threads):", "",
             "| pipeline | variant | input | frames | bare (video) items/s | pipeline items/s | ratio | best/best "
             "| CPU µs/item bare (video) | CPU µs/item pipeline | agent loop items/s | CPU µs/item agent loop "
             "| bare (tensors) items/s | ratio vs tensors | dropped | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in pipeline:
        cpu = p["cpu_us_per_item"]
        lines.append(f"| {p['bundle']} ({p['video']}) | {p['variant']} | {'x'.join(map(str, p['input']))} {p['resize']} "
                     f"| {p['frames']} | {p['bare_video_items_per_s']:.1f} | {p['pipeline_items_per_s']:.1f} "
                     f"| {p['ratio']:.3f}x | {p['best_ratio']:.3f}x | {cpu['bare_video']:.0f} | {cpu['pipeline']:.0f} "
                     f"| {p['agent_loop_items_per_s']:.1f} | {cpu['agent_loop']:.0f} "
                     f"| {p['bare_tensor_items_per_s']:.1f} | {p['ratio_vs_tensor']:.3f}x | {p['dropped']} "
                     f"| {p['load_avg'][0]} |")
    lines += ["", "The pipeline's threads (CPU µs per item, median; little moved by the neighbours' load), and the "
              "ratio projected for a device with a free core per thread (bare CPU per item / the slowest thread's; an "
              "upper bound: time a thread waits for the GIL is not CPU time):", "",
              "| pipeline | variant | capture thread | inference thread | other (drift window, GC) | bare (video) one "
              "thread | projected ratio, a core per thread |", "|---|---|---|---|---|---|---|"]
    for p in pipeline:
        th = p["thread_cpu_us_per_item"]
        lines.append(f"| {p['bundle']} | {p['variant']} | {th['capture']:.0f} | {th['inference']:.0f} | {th['other']:.0f} "
                     f"| {p['cpu_us_per_item']['bare_video']:.0f} | {p['idle_cores_ratio']:.2f}x |")
    names = list(pipeline[0]["stages_us"])
    lines += ["", "Stages, each alone over the video (median µs per frame):", "",
              "| pipeline | variant | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for p in pipeline:
        lines.append(f"| {p['bundle']} | {p['variant']} | " + " | ".join(f"{p['stages_us'][k]:.1f}" for k in names) + " |")
    return lines
