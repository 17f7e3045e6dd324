"""``edgeloop bench``: the model matrix of a bundle or run, and ``--compare A.json B.json``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.cliutil import add_json_flag, emit
from core.errors import BenchmarkError
from core.progress import progress

__all__ = ["register"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="latency, throughput, memory, size and accuracy of every variant",
                       description="Benchmark every variant of a bundle (and PyTorch eager for a run) across "
                                   "runtimes, thread counts and batch sizes, each cell in a fresh process.")
    p.add_argument("target", nargs="?", type=Path,
                   help="a bundle (.elb), a bare model file (.onnx / .tflite) or a training run directory")
    p.add_argument("--input-shape", type=_ints, default=(), metavar="D,D,...",
                   help="bare model file: per-sample input shape for dynamic dims (default: dynamic dims = 64)")
    p.add_argument("--bundle", type=Path, help="with a run directory: the bundle exported from it")
    p.add_argument("--threads", type=_ints, default=(1, 2, 4), help="thread counts (default 1,2,4)")
    p.add_argument("--batch", type=_ints, default=(1, 8), help="batch sizes (default 1,8)")
    p.add_argument("--runs", type=int, default=200, help="timed runs per cell (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up runs per cell (default 20)")
    p.add_argument("--time-budget", type=float, default=10.0, help="seconds per cell before stopping early (default 10)")
    p.add_argument("--variants", type=lambda s: tuple(v for v in s.split(",") if v), default=(),
                   help="only these variant ids (comma-separated)")
    p.add_argument("--key", type=Path, help="verify the bundle's signature with this public key")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory (default bench-results/)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"), help="print B/A ratios cell by cell")
    p.add_argument("--zoo", nargs="?", const="mobilenet_v3_small,mobilenet_v2,resnet18", default=None, metavar="MODELS",
                   help="torchvision models at 224x224 (random weights): FP32 vs naive INT8 vs the INT8 speed plan")
    p.add_argument("--agent-overhead", nargs=argparse.REMAINDER, default=None, metavar="ARGS",
                   help="the agent's full path vs the bare runtime, every variant (no bundles: builds digits and "
                        "MobileNetV2); the rest of the line goes to python -m benchmarks.agent_overhead "
                        "(e.g. --pipeline, --runs N, --work DIR)")
    p.add_argument("--fleet", nargs=argparse.REMAINDER, default=None, metavar="ARGS",
                   help="fleet scale/fault benchmark; the rest of the line goes to python -m benchmarks.fleet_bench")
    add_json_flag(p)
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from .report import compare, compare_table, load_result

    if args.compare:
        ratios = compare(load_result(args.compare[0]), load_result(args.compare[1]))
        if not ratios:
            raise BenchmarkError("the two results have no cell in common", hint="compare results of the same bundle")
        emit(args, ratios, lambda: print(compare_table(ratios)))
        return 0
    if args.fleet is not None:
        from .fleet_bench import main as fleet_main

        return int(fleet_main(list(args.fleet) + (["--json"] if args.json else [])) or 0)
    if args.agent_overhead is not None:
        from .agent_overhead import main as overhead_main

        argv = ["--out", str(args.out), *args.agent_overhead] + (["--json"] if args.json else [])
        return int(overhead_main(argv) or 0)
    if args.zoo is not None:
        from .zoo import run_zoo, summary_table

        _warn_threads(args.threads[:1])

        with progress("bench zoo") as bar:  # stderr, also with --json; -q silences it
            result = run_zoo([m for m in args.zoo.split(",") if m], args.out, threads=args.threads[0],
                             runs=args.runs, say=bar.step)
        emit(args, result, lambda: print(summary_table(result["ab"])))
        return 0
    if args.target is None:
        raise BenchmarkError("nothing to benchmark", hint="give a bundle (.elb) or a run directory, or --compare A B")
    return _run_bench(args)


def _warn_threads(threads: tuple[int, ...]) -> tuple[int, str | None]:
    """Warn on stderr (at once, before minutes of measuring) when threads exceed the cores."""
    from .model_bench import oversubscription, usable_cores

    cores = usable_cores()
    warning = oversubscription(threads, cores)
    if warning:
        print(f"edgeloop bench: warning: {warning}", file=sys.stderr)
    return cores, warning


def _run_bench(args: argparse.Namespace) -> int:
    from .model_bench import BenchConfig, entries_from_bundle, entry_from_run, run_matrix, workdir
    from .report import markdown_table, write_report
    from .sysinfo import system_info

    config = BenchConfig(threads=args.threads, batches=args.batch, runs=args.runs, warmup=args.warmup,
                         time_budget_s=args.time_budget, variants=args.variants)
    target: Path = args.target
    if not target.exists():
        raise BenchmarkError(f"{target} does not exist", hint="give a bundle (.elb) or a training run directory")
    entries = []
    bundle = args.bundle
    if target.is_file() and target.suffix.lower() in (".onnx", ".tflite"):
        from .model_bench import entry_from_model

        entries.append(entry_from_model(target, input_shape=args.input_shape))
        bundle = None
    elif target.is_dir():
        if not (target / "checkpoint.pt").exists():
            raise BenchmarkError(f"{target} is not a training run (no checkpoint.pt)")
        entries.append(entry_from_run(target))
        if bundle is None:
            found = sorted(target.glob("*.elb")) + sorted(target.glob("export/*.elb"))
            bundle = found[-1] if found else None
    else:
        bundle = target
    key = None
    if args.key is not None:
        from core.signing import load_public_key

        key = load_public_key(args.key)
    cores, warning = _warn_threads(config.threads)
    with workdir() as tmp:
        if bundle is not None:
            entries.extend(entries_from_bundle(bundle, Path(tmp), trusted_key=key, only=config.variants))
        if not entries:
            raise BenchmarkError(f"nothing to benchmark in {target}", hint="export the run first: edgeloop export RUN")
        with progress("bench cells", total=len(entries) * len(config.threads)) as bar:  # stderr, also with --json
            cells = run_matrix(entries, config, progress=bar.step)
        result = {"system": system_info(), "config": {k: getattr(config, k) for k in ("threads", "batches", "runs", "warmup", "time_budget_s")},
                  "target": str(target), "cells": [c.to_dict() for c in cells], "cores_usable": cores,
                  "warnings": [warning] if warning else []}
    paths = write_report(result, args.out)
    from .model_bench import failed_cells

    failed = failed_cells(cells)
    emit(args, {**result, "files": {k: str(v) for k, v in paths.items()}, "failed_cells": len(failed)},
         lambda: print(markdown_table(result) + f"\nwrote {', '.join(str(p) for p in paths.values())}"))
    for c in failed:
        print(f"edgeloop bench: cell {c.entry.id} ({c.entry.runtime}, {c.threads} threads) failed: "
              f"{c.result['error']}", file=sys.stderr)
    return 1 if failed else 0
