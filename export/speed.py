"""The INT8 *speed* plan: what to quantize so that INT8 is faster than FP32 on this CPU.

Quantizing everything ORT can quantize is not always a win.  At batch 1 on an AVX2 CPU
without VNNI we measured (see ``benchmarks/zoo_results.md``): ResNet-18 and MobileNetV2
gain, but MobileNetV3-small becomes several times *slower*, because its hard-swish and
squeeze-excite blocks are float islands: every island costs a DequantizeLinear, a float
op and a QuantizeLinear (plus QLinearMul for ``x * hardsigmoid(x)``), which together
cost more than the int8 convolutions save.  Meanwhile FP32 ORT fuses Conv+HardSwish.

So the plan is chosen among a few candidates (:func:`candidate_plans`): the naive
"quantize all" in QDQ and QOperator form, convolutions and matrix products only, and
"skip float islands" (convolutions next to a hard-swish / sigmoid / squeeze-excite
op stay float; matrix products are always quantized because at batch 1 they are
bound by reading the weights, which INT8 makes 4x smaller).  :func:`plan_int8`
quantizes each candidate, times it against FP32 *interleaved* in one process (so a
busy machine slows both sides alike), and keeps the fastest one the optional
accuracy check accepts.  :func:`apply_plan` re-applies a plan (e.g. inside the export
engineer's quantizer with its real calibration data).

``reduce_range`` defaults to True on x86 CPUs without VNNI: their u8s8 kernels
saturate and accuracy collapses otherwise (``../shared/DEPENDENCIES.md``).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from core.errors import ConfigError, QuantizationError

__all__ = [
    "QUANT_FORMATS",
    "PER_CHANNEL_MODES",
    "ISLAND_OPS",
    "MATMUL_OPS",
    "Int8Plan",
    "cpu_needs_reduce_range",
    "island_adjacent_convs",
    "depthwise_weights",
    "float_stem",
    "candidate_plans",
    "apply_plan",
    "interleaved_latency_ms",
    "plan_int8",
]

QUANT_FORMATS = ("qdq", "qoperator")
#: Weight granularity: per output channel everywhere, only for depthwise (grouped) convs, or per tensor.
PER_CHANNEL_MODES = ("all", "depthwise", "none")
#: Ops ORT runs in float between Q/DQ pairs (no int8 kernel): each one is an island.
ISLAND_OPS = frozenset({"HardSigmoid", "HardSwish", "Sigmoid", "Mul", "Div", "ReduceMean", "Softmax", "Tanh"})
#: Weight-bound at batch 1: always worth INT8 (4x fewer weight bytes to read).
MATMUL_OPS = ("Gemm", "MatMul")
_CONV_OPS = ("Conv",)
_TYPES = ("uint8", "int8")

CalibrationReaderFactory = Callable[[], Any]  # returns a fresh onnxruntime CalibrationDataReader


@dataclass(frozen=True)
class Int8Plan:
    """One way to quantize a model statically, plus what was measured for it.

    ``op_types`` empty means "every op type ORT can quantize".  Latencies are medians
    in ms at ``threads`` threads, batch 1, measured interleaved with FP32 in the same
    process; ``candidates`` holds ``(plan name, int8 ms / fp32 ms)`` for every plan tried.
    """

    name: str
    quant_format: str = "qdq"
    op_types: tuple[str, ...] = ()
    nodes_to_exclude: tuple[str, ...] = ()
    per_channel: str = "all"
    reduce_range: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    threads: int = 1
    fp32_ms: float | None = None
    int8_ms: float | None = None
    candidates: tuple[tuple[str, float], ...] = ()
    schema_version: int = 1

    def __post_init__(self) -> None:
        if self.quant_format not in QUANT_FORMATS:
            raise ConfigError(f"quant_format must be one of {QUANT_FORMATS}, got {self.quant_format!r}",
                              hint="use 'qdq' or 'qoperator'", key="quant_format")
        if self.per_channel not in PER_CHANNEL_MODES:
            raise ConfigError(f"per_channel must be one of {PER_CHANNEL_MODES}, got {self.per_channel!r}",
                              key="per_channel")
        for key in ("activation_type", "weight_type"):
            if getattr(self, key) not in _TYPES:
                raise ConfigError(f"{key} must be one of {_TYPES}, got {getattr(self, key)!r}", key=key)
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}", key="threads")

    @property
    def ratio(self) -> float | None:
        """INT8 / FP32 latency (below 1 means INT8 is faster), when measured."""
        if self.int8_ms is None or not self.fp32_ms:
            return None
        return self.int8_ms / self.fp32_ms

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Int8Plan:
        fields = {k: v for k, v in d.items() if k != "ratio"}
        for k in ("op_types", "nodes_to_exclude"):
            fields[k] = tuple(fields.get(k, ()))
        fields["candidates"] = tuple((str(n), float(r)) for n, r in fields.get("candidates", ()))
        return cls(**fields)


def cpu_needs_reduce_range(cpuinfo: str | None = None) -> bool:
    """True on x86 CPUs without VNNI (AVX2-only), whose u8s8 int8 kernels saturate.

    ``cpuinfo`` is the text of /proc/cpuinfo (read when None); on other platforms
    (ARM, or no /proc) full range is kept.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    if not flags & {"sse4_1", "avx2"}:
        return False  # not x86
    return not flags & {"avx512_vnni", "avx_vnni", "avx512vnni", "amx_int8"}


def _consumers(graph: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def island_adjacent_convs(model: Any) -> tuple[str, ...]:
    """Names of Conv nodes that read from or write into a float island (see :data:`ISLAND_OPS`).

    Quantizing such a Conv buys an int8 kernel but pays a Q/DQ pair at the island
    boundary; on small convolutions (depthwise, squeeze-excite 1x1 on a 1x1 map) the
    pair costs more than the kernel saves.  A Relu between the Conv and the island
    counts as part of the path (ORT fuses it into the Conv).
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    initializers = {i.name for i in graph.initializer}

    def through_relu_up(name: str) -> Any:
        node = producer.get(name)
        while node is not None and node.op_type == "Relu":
            node = producer.get(node.input[0])
        return node

    def downstream(node: Any) -> list[Any]:
        found, todo = [], list(node.output)
        while todo:
            for c in consumers.get(todo.pop(), []):
                if c.op_type == "Relu":
                    todo.extend(c.output)
                else:
                    found.append(c)
        return found

    names = []
    for node in graph.node:
        if node.op_type not in _CONV_OPS:
            continue
        up = through_relu_up(node.input[0]) if node.input[0] not in initializers else None
        if (up is not None and up.op_type in ISLAND_OPS) or any(c.op_type in ISLAND_OPS for c in downstream(node)):
            names.append(node.name)
    return tuple(names)


def depthwise_weights(model: Any) -> tuple[str, ...]:
    """Weight initializer names of grouped (depthwise) Conv nodes."""
    inits = {i.name for i in model.graph.initializer}
    return tuple(n.input[1] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits
                 and any(a.name == "group" and a.i > 1 for a in n.attribute))


def float_stem(model: Any) -> tuple[str, ...]:
    """The Conv nodes reading the graph input, plus a MaxPool right after them (through Relu).

    With 3 input channels int8 im2col wastes most of each SIMD register: ResNet-18's
    7x7 stem is ~4x slower per MAC in int8 than its other convs.  The MaxPool must
    stay float with it, or ORT runs a uint8 MaxPool in NCHW and breaks its NHWC chain.
    """
    graph = model.graph
    inputs = {i.name for i in graph.input}
    consumers = _consumers(graph)
    names = []
    for node in graph.node:
        if node.op_type not in _CONV_OPS or node.input[0] not in inputs:
            continue
        names.append(node.name)
        todo = list(node.output)
        while todo:
            for c in consumers.get(todo.pop(), []):
                if c.op_type == "Relu":
                    todo.extend(c.output)
                elif c.op_type == "MaxPool":
                    names.append(c.name)
    return tuple(names)


def candidate_plans(model_path: Path, *, reduce_range: bool | None = None, threads: int = 1) -> list[Int8Plan]:
    """The plans worth timing for this model, naive first; only those that differ for this graph.

    ``qdq-per-tensor-pointwise`` keeps per-channel weights only on depthwise convs: faster
    requantization, but per-tensor weights can cost accuracy, so choose it only behind an
    accuracy check on real data (``plan_int8(accept=...)``).
    """
    import onnx

    rr = cpu_needs_reduce_range() if reduce_range is None else reduce_range
    model = onnx.load(str(model_path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    matmuls = tuple(o for o in MATMUL_OPS if o in ops)
    integer_ops = (*_CONV_OPS, *matmuls, "Add", "Relu", "Clip", "MaxPool")
    islands = island_adjacent_convs(model)
    stem = float_stem(model)
    base = Int8Plan(name="", reduce_range=rr, threads=threads)
    plans = [
        replace(base, name="qdq-all"),
        replace(base, name="qoperator-all", quant_format="qoperator"),
        replace(base, name="qdq-per-tensor-pointwise", per_channel="depthwise"),
    ]
    if ops & ISLAND_OPS:
        plans.append(replace(base, name="qdq-integer-ops", op_types=integer_ops))
    if islands:
        plans.append(replace(base, name="qdq-skip-float-islands", op_types=integer_ops, nodes_to_exclude=islands))
    if stem and not any(n.op_type == "MaxPool" and n.name in stem for n in model.graph.node):
        # A MaxPool after a float stem would run in uint8 NCHW and break ORT's NHWC chain.
        plans.append(replace(base, name="qdq-float-stem", nodes_to_exclude=stem))
    if matmuls and _CONV_OPS[0] in ops:
        plans.append(replace(base, name="qdq-matmul-only", op_types=matmuls))
    return plans


def apply_plan(plan: Int8Plan, model_path: Path, out_path: Path, calibration_reader: Any, *,
               calibration_cache: Path | None = None) -> Path:
    """Quantize ``model_path`` (FP32, after ``quant_pre_process``) into ``out_path`` following ``plan``.

    ``calibration_cache`` (a JSON file) lets several plans share one calibration pass;
    it must belong to this model.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    qt = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    fmt = QuantFormat.QDQ if plan.quant_format == "qdq" else QuantFormat.QOperator
    extra: dict[str, Any] = {}
    if plan.per_channel == "depthwise":
        import onnx

        # Per-tensor weights everywhere but depthwise convs: their folded-BN weights differ
        # most between channels (per-tensor collapses MobileNet accuracy), while per-tensor
        # pointwise convs requantize with one scale, which is faster.
        model = onnx.load(str(model_path), load_external_data=False)
        extra["TensorQuantOverrides"] = {w: [{"axis": 0}] for w in depthwise_weights(model)}
    try:
        quantize_static(str(model_path), str(out_path), calibration_reader, quant_format=fmt,
                        op_types_to_quantize=list(plan.op_types) or None, per_channel=plan.per_channel == "all",
                        reduce_range=plan.reduce_range, activation_type=qt[plan.activation_type],
                        weight_type=qt[plan.weight_type], nodes_to_exclude=list(plan.nodes_to_exclude) or None,
                        extra_options=extra or None,
                        calibration_cache_path=None if calibration_cache is None else str(calibration_cache))
    except Exception as exc:  # ORT raises bare Exceptions from deep inside its tools
        raise QuantizationError(f"INT8 plan {plan.name!r} failed: {exc}", path=str(model_path)) from exc
    return out_path


def interleaved_latency_ms(paths: Sequence[Path], *, threads: int = 1, rounds: int = 20, runs_per_round: int = 10,
                           warmup: int = 5, seed: int = 0) -> list[float]:
    """Median batch-1 latency of each model, measured interleaved in this process.

    All sessions are loaded first, then each round runs every model ``runs_per_round``
    times, alternating the order between rounds: on a shared, noisy machine the load
    then falls on all models alike and the *ratios* stay meaningful.  Sessions are
    opened the way the device opens them (:func:`core.runtime.open_model`).
    """
    import numpy as np

    from core.runtime import open_model

    if rounds < 1 or runs_per_round < 1:
        raise ConfigError("rounds and runs_per_round must be >= 1")
    backends = [open_model(Path(p), threads=threads) for p in paths]
    try:
        rng = np.random.default_rng(seed)
        xs = [rng.standard_normal((1, *[d if d > 0 else 1 for d in b.input_shape[1:]])).astype(np.float32)
              for b in backends]
        for b, x in zip(backends, xs, strict=True):
            for _ in range(warmup):
                b.run(x)
        samples: list[list[float]] = [[] for _ in backends]
        order = list(range(len(backends)))
        for r in range(rounds):
            for i in (order if r % 2 == 0 else order[::-1]):
                for _ in range(runs_per_round):
                    t0 = time.perf_counter()
                    backends[i].run(xs[i])
                    samples[i].append((time.perf_counter() - t0) * 1000.0)
    finally:
        for b in backends:
            b.close()
    return [float(np.median(s)) for s in samples]


def _default_plan(candidates: Iterable[Int8Plan]) -> Int8Plan:
    """Without measuring: skip float islands when the graph has them, else quantize everything."""
    plans = list(candidates)
    by_name = {p.name: p for p in plans}
    return by_name.get("qdq-skip-float-islands", plans[0])


def plan_int8(model_path: Path, calibration_reader_factory: CalibrationReaderFactory, *, measure: bool = True,
              threads: int = 1, reduce_range: bool | None = None, candidates: Sequence[Int8Plan] | None = None,
              accept: Callable[[Path], bool] | None = None, rounds: int = 20, runs_per_round: int = 10,
              workdir: Path | None = None, progress: Callable[[str], None] | None = None) -> Int8Plan:
    """Choose the INT8 plan that is fastest on this CPU among ``candidates`` (default :func:`candidate_plans`).

    ``model_path`` is the FP32 model after ``quant_pre_process`` (the one the quantizer
    will quantize, so node names match).  With ``measure=False`` no model is quantized:
    the structural default is returned.  Otherwise every candidate is quantized
    (one calibration pass shared through a cache), checked with ``accept`` (e.g. the
    accuracy gate; rejected plans are skipped) and timed interleaved against FP32.
    The returned plan carries the FP32 and INT8 medians and every candidate's ratio.
    """
    plans = list(candidates) if candidates is not None else candidate_plans(model_path, reduce_range=reduce_range,
                                                                           threads=threads)
    if not plans:
        raise ConfigError("no INT8 candidate plans to choose from")
    if not measure:
        return _default_plan(plans)
    # One calibration pass serves every plan only if the first plan calibrates every
    # tensor (empty op_types); otherwise each plan calibrates for itself.
    plans.sort(key=lambda p: bool(p.op_types))
    with tempfile.TemporaryDirectory(prefix="edgeloop-int8plan-", dir=workdir) as tmp:
        cache = Path(tmp) / "calibration.json" if not plans[0].op_types else None
        files: list[tuple[Int8Plan, Path]] = []
        for plan in plans:
            out = Path(tmp) / f"{plan.name}.onnx"
            if progress:
                progress(f"quantize {plan.name}")
            apply_plan(plan, model_path, out, calibration_reader_factory(), calibration_cache=cache)
            if accept is not None and not accept(out):
                if progress:
                    progress(f"{plan.name}: rejected by the accuracy check")
                continue
            files.append((plan, out))
        if not files:
            raise QuantizationError("every INT8 plan was rejected by the accuracy check", path=str(model_path),
                                    hint="ship FP32, or relax the accuracy budget")
        if progress:
            progress(f"time FP32 vs {len(files)} INT8 plans, interleaved ({rounds} rounds)")
        ms = interleaved_latency_ms([Path(model_path)] + [p for _, p in files], threads=threads, rounds=rounds,
                                    runs_per_round=runs_per_round)
    fp32_ms, int8 = ms[0], ms[1:]
    measured = tuple((plan.name, round(t / fp32_ms, 4)) for (plan, _), t in zip(files, int8, strict=True))
    best = min(range(len(files)), key=lambda i: int8[i])
    return replace(files[best][0], fp32_ms=round(fp32_ms, 4), int8_ms=round(int8[best], 4), candidates=measured)
