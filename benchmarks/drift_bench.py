"""Drift detector benchmark on digits with a real small CNN: false alarms, detection delay, cost.

    python -m benchmarks.drift_bench [--splits 3] [--windows 25,50,100] [--out FILE.json]

Protocol (no image is used for two roles):

1. Digits at 32x32 (``train.data.load_dataset``), one permutation per ``--seed``: ~55%
   train a TinyCNN (``train.models``), the rest is held out and, per split ``s``, reshuffled
   into *reference* (270), *calibration* (270) and *evaluation* (the remaining ~270).
2. ``compute_baseline`` sees only reference + calibration.
3. Undrifted false alarms: ``--null-windows`` windows per size, each drawn with replacement
   from the *evaluation* images (bootstrap: 270 images cannot give 600 disjoint windows);
   reported as the fraction of windows with the alarm on, the risk flag on, etc.
4. Shifts are applied to the raw uint8 evaluation images (``demo.shifts``) before
   preprocessing, as a camera would produce them; delay = windows until the alarm is on
   (1 = the first window), over ``--trials`` fresh monitors; ``power`` = fraction of single
   shifted windows whose risk flag is on.
5. Cost: ``DriftMonitor.update`` on one window-sized batch, BLAS at one thread (a Pi core).

Torch is used only here, to train and run the model; the detector itself is numpy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.drift import TEST_NAMES, Baseline, DriftMonitor, Hysteresis, compute_baseline
from core.manifest import Preprocessing
from core.preprocess import preprocess

SIZE = 32
N_REF = N_CAL = 270


@dataclass(frozen=True)
class Shift:
    name: str
    gain: float = 1.0
    blur: float = 0.0
    rotate: float = 0.0
    noise: float = 0.0

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from demo.shifts import darken, gaussian_blur, rotate

        x = images
        if self.rotate:
            x = rotate(x, self.rotate)
        if self.blur:
            x = gaussian_blur(x, self.blur)
        if self.gain != 1.0:
            x = darken(x, self.gain)
        if self.noise:
            x = np.clip(x + rng.normal(0, self.noise, x.shape), 0, 255).astype(np.uint8)
        return x


SHIFTS = (
    Shift("darker x0.9 (benign)", gain=0.9),
    Shift("noise sd=2 (benign)", noise=2.0),
    Shift("darker x0.6", gain=0.6),
    Shift("blur sigma=1", blur=1.0),
    Shift("rotate 5", rotate=5.0),
    Shift("rotate 10", rotate=10.0),
    Shift("rotate 15", rotate=15.0),
    Shift("rotate 20", rotate=20.0),
    Shift("combined x0.7+blur0.8+rot10", gain=0.7, blur=0.8, rotate=10.0),
)


def _train_model(images: np.ndarray, labels: np.ndarray, spec: Preprocessing, seed: int) -> Any:
    import torch

    from train.models import ModelArgs, build_model

    torch.manual_seed(seed)
    model = build_model(ModelArgs("tiny-cnn", num_classes=10, dropout=0.1))
    x = torch.from_numpy(preprocess(images, spec))
    y = torch.from_numpy(labels)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    epochs, bs = 12, 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(x) + bs - 1) // bs))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(bs):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def _infer(model: Any, images: np.ndarray, spec: Preprocessing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch

    x = preprocess(images, spec)
    with torch.inference_mode():
        logits, emb = model.forward_with_embedding(torch.from_numpy(x))
        probs = torch.softmax(logits, dim=1).numpy().astype(np.float64)
    return x, probs, emb.numpy().astype(np.float64)


def _alarm_stats(bl: Baseline, w: int, hy: Hysteresis, data: tuple[np.ndarray, ...], n_windows: int,
                 rng: np.random.Generator) -> dict[str, float]:
    mon = DriftMonitor(bl, window=w, hysteresis=hy)
    reps = []
    for _ in range(n_windows):
        idx = rng.integers(0, len(data[0]), w)
        reps += mon.update(*(a[idx] for a in data))
    out = {k: float(np.mean([getattr(r, k) for r in reps]))
           for k in ("alarm", "risk_flag", "input_shift", "class_shift")}
    for name in TEST_NAMES:
        out[f"flag_{name}"] = float(np.mean([r.test(name).flag for r in reps]))
    return out


def _delay(bl: Baseline, w: int, hy: Hysteresis, data: tuple[np.ndarray, ...], trials: int, max_windows: int,
           rng: np.random.Generator) -> dict[str, Any]:
    delays = []
    for _ in range(trials):
        mon = DriftMonitor(bl, window=w, hysteresis=hy)
        d = None
        for k in range(1, max_windows + 1):
            idx = rng.integers(0, len(data[0]), w)
            if mon.update(*(a[idx] for a in data))[0].alarm:
                d = k
                break
        delays.append(d)
    hit = [d for d in delays if d is not None]
    return {"detected": len(hit) / trials, "median_delay": float(np.median(hit)) if hit else None,
            "mean_delay": float(np.mean(hit)) if hit else None}


def _cost_ms(bl: Baseline, w: int, data: tuple[np.ndarray, ...], reps: int) -> float:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        threadpool_limits = None
    mon = DriftMonitor(bl, window=w)
    batch = tuple(a[:w] for a in data)
    times = []
    ctx = threadpool_limits(1) if threadpool_limits else None
    try:
        for _ in range(reps):
            t = time.perf_counter()
            mon.update(*batch)
            times.append((time.perf_counter() - t) * 1e3)
    finally:
        if ctx is not None:
            ctx.unregister()
    return float(np.median(times))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from train.data import load_dataset

    torch.set_num_threads(2)
    ds = load_dataset("digits", SIZE)
    images, labels = ds.images, ds.labels
    spec = Preprocessing(size=(SIZE, SIZE), channels=1, mean=(0.1,), std=(0.25,))
    perm = np.random.default_rng(args.seed).permutation(len(images))
    n_held = N_REF + N_CAL + 270
    train_idx, held = perm[:-n_held], perm[-n_held:]
    t0 = time.perf_counter()
    cache = args.model_cache / f"drift_bench_tinycnn_seed{args.seed}.pt" if args.model_cache else None
    if cache is not None and cache.exists():
        from train.models import ModelArgs, build_model

        model = build_model(ModelArgs("tiny-cnn", num_classes=10, dropout=0.1))
        model.load_state_dict(torch.load(cache, weights_only=True))
        model.eval()
    else:
        model = _train_model(images[train_idx], labels[train_idx], spec, args.seed)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), cache)
    train_s = time.perf_counter() - t0
    windows = args.windows
    hys = {f"{k}of{m},off{j}": Hysteresis(k, m, j) for k, m, j in args.hysteresis}
    result: dict[str, Any] = {"splits": [], "n_train": len(train_idx), "n_ref": N_REF, "n_cal": N_CAL,
                              "n_eval": n_held - N_REF - N_CAL, "windows": list(windows),
                              "train_seconds": round(train_s, 1)}
    for s in range(args.splits):
        rng = np.random.default_rng(1000 + s)
        p = rng.permutation(held)
        ref, cal, ev = p[:N_REF], p[N_REF:N_REF + N_CAL], p[N_REF + N_CAL:]
        r_data, c_data, e_data = (_infer(model, images[i], spec) for i in (ref, cal, ev))
        acc = float(np.mean(e_data[1].argmax(1) == labels[ev]))
        t0 = time.perf_counter()
        prior = np.bincount(labels[train_idx], minlength=10) / len(train_idx)
        bl = compute_baseline(*r_data, *c_data, window=windows, class_prior=prior, n_boot=args.n_boot, seed=s,
                              alarm_rate=args.alarm_rate)
        base_s = time.perf_counter() - t0
        split: dict[str, Any] = {"split": s, "eval_accuracy": acc, "baseline_seconds": round(base_s, 2),
                                 "baseline_bytes": len(bl.to_bytes()), "null": {}, "shifts": {}, "cost_ms": {}}
        for w in windows:
            split["cost_ms"][str(w)] = _cost_ms(bl, w, e_data, args.cost_reps)
            for hname, hy in hys.items():
                split["null"][f"W={w} {hname}"] = _alarm_stats(bl, w, hy, e_data, args.null_windows, rng)
        if s == 0:  # shifts on the first split only: they are slow to generate, and the null is what varies
            for sh in SHIFTS:
                raw = sh.apply(images[ev], rng)
                d = _infer(model, raw, spec)
                entry: dict[str, Any] = {"accuracy": float(np.mean(d[1].argmax(1) == labels[ev]))}
                for w in windows:
                    for hname, hy in hys.items():
                        st = _alarm_stats(bl, w, hy, d, args.power_windows, rng)
                        entry[f"W={w} {hname}"] = {
                            "power": st["risk_flag"], "input_shift": st["input_shift"],
                            **{k: v for k, v in st.items() if k.startswith("flag_")},
                            **_delay(bl, w, hy, d, args.trials, 20, rng)}
                split["shifts"][sh.name] = entry
        result["splits"].append(split)
        print(f"split {s}: eval acc {acc:.3f}, baseline {base_s:.1f}s", file=sys.stderr)
        if args.out:  # partial results survive an interrupted run
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".partial.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _table(res: dict[str, Any]) -> str:
    lines = ["Undrifted evaluation windows (bootstrap from held-out eval images), per split:",
             f"{'cell':<22}" + "".join(f"{'alarm s' + str(s['split']):>10}" for s in res["splits"])
             + f"{'risk flag':>10}{'input':>8}{'class':>8}"]
    for cell in res["splits"][0]["null"]:
        vals = [s["null"][cell] for s in res["splits"]]
        lines.append(f"{cell:<22}" + "".join(f"{v['alarm']:>10.3f}" for v in vals)
                     + f"{np.mean([v['risk_flag'] for v in vals]):>10.3f}"
                     + f"{np.mean([v['input_shift'] for v in vals]):>8.3f}"
                     + f"{np.mean([v['class_shift'] for v in vals]):>8.3f}")
    s0 = res["splits"][0]
    lines += ["", f"Shifts (split 0; clean eval accuracy {s0['eval_accuracy']:.3f}): "
              "power = P(risk flag | one window), delay = median windows to alarm, det = detected within 20"]
    cells = [c for c in next(iter(s0["shifts"].values())) if c != "accuracy"]
    lines.append(f"{'shift':<30}{'acc':>6}" + "".join(f"{c:>24}" for c in cells))
    lines.append(f"{'':<36}" + "".join(f"{'power/input/delay/det':>24}" for _ in cells))
    for name, e in s0["shifts"].items():
        row = f"{name:<30}{e['accuracy']:>6.3f}"
        for c in cells:
            v = e[c]
            dl = "-" if v["median_delay"] is None else f"{v['median_delay']:.0f}"
            row += f"{v['power']:>8.2f}/{v['input_shift']:.2f}/{dl:>2}/{v['detected']:.2f}"
        lines.append(row)
    lines += ["", "Per-window cost (DriftMonitor.update on one window, BLAS 1 thread, median ms): "
              + ", ".join(f"W={w}: {np.mean([s['cost_ms'][w] for s in res['splits']]):.2f}"
                          for w in s0["cost_ms"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", type=int, default=3, help="reference/calibration/eval reshuffles (default 3)")
    ap.add_argument("--windows", type=lambda t: tuple(int(v) for v in t.split(",")), default=(25, 50, 100))
    ap.add_argument("--null-windows", type=int, default=600, help="undrifted windows per cell (default 600)")
    ap.add_argument("--power-windows", type=int, default=100, help="shifted windows per cell (default 100)")
    ap.add_argument("--trials", type=int, default=30, help="delay trials per cell (default 30)")
    ap.add_argument("--n-boot", type=int, default=2000, help="bootstrap windows for calibration (default 2000)")
    ap.add_argument("--cost-reps", type=int, default=200)
    ap.add_argument("--alarm-rate", type=float, default=0.005, help="compute_baseline's target alarm rate")
    ap.add_argument("--hysteresis", type=lambda t: tuple(tuple(int(v) for v in h.split(",")) for h in t.split(";")),
                    default=((1, 1, 2),), help="on_k,on_m,off_j[;...] variants to compare (default 1,1,2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-cache", type=Path, default=Path.home() / ".cache" / "edgeloop",
                    help="reuse the trained model from this folder (same seed = same split and weights)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/drift_bench.json"))
    args = ap.parse_args(argv)
    from benchmarks.sysinfo import system_info

    res = run(args)
    res["system"] = system_info(sys.argv if argv is None else ["python", "-m", "benchmarks.drift_bench", *argv])
    table = _table(res)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=str))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
