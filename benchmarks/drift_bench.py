"""Drift detector benchmark on digits with a real small CNN: false alarms, power, delay, cost.

    python -m benchmarks.drift_bench [--quick] [--splits 3] [--windows 25,50,100] [--out FILE.json]

Prints issue 14's table (false alarms of "input changed" and of the alarm on undrifted
windows; per shift -- strong ones, the two mild ones, and a change of class mix only --
the power of "input changed" and of the risk flag, the alarm's delay in windows, which
test caught it; ms per window the agent's way) for every window size, and writes JSON.

Protocol (no image is used for two roles):

1. Digits at 32x32 (``train.data.load_dataset``), one permutation per ``--seed``: ~55%
   train a TinyCNN (``train.models``), the rest is held out and, per split ``s``, reshuffled
   into *reference* (270), *calibration* (270) and *evaluation* (the remaining ~270).
2. ``compute_baseline`` sees only reference + calibration.
3. Undrifted false alarms: ``--null-windows`` windows per size, each W distinct images drawn
   at random from the *evaluation* images (270 images cannot give 600 disjoint windows);
   reported as the fraction of windows with the alarm on, the risk flag on, etc.
4. Shifts are applied to the raw uint8 evaluation images (``demo.shifts``) before
   preprocessing, as a camera would produce them; delay = windows until the alarm is on
   (1 = the first window), over ``--trials`` fresh monitors; ``power`` = fraction of single
   shifted windows whose risk flag is on.
5. Cost, the agent's way: one ``DriftMonitor.update`` per inference (batch 1) for a whole
   window, BLAS at one thread (a Pi core): ms per window (all updates plus the window's
   statistics) and us per ordinary update; memory: the monitor's buffers before and after
   300k inferences.

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

from core.drift import Baseline, DriftMonitor, Hysteresis, compute_baseline
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
    Shift("class mix 0-4 only"),
    Shift("darker x0.95 (mild)", gain=0.95),
    Shift("rotate 5 (mild)", rotate=5.0),
    Shift("darker x0.9 (benign)", gain=0.9),
    Shift("noise sd=2 (benign)", noise=2.0),
    Shift("darker x0.6", gain=0.6),
    Shift("blur sigma=1", blur=1.0),
    Shift("rotate 5", rotate=5.0),
    Shift("rotate 10", rotate=10.0),
    Shift("rotate 15", rotate=15.0),
    Shift("rotate 20", rotate=20.0),
    Shift("combined x0.7+blur0.8+rot10", gain=0.7, blur=0.8, rotate=10.0),
    Shift("class mix 0-4 + darker x0.6", gain=0.6),
)
STRONG = ("darker x0.6", "blur sigma=1", "rotate 20", "noise sd=2 (benign)")


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


def _windows(mon: DriftMonitor, data: tuple[np.ndarray, ...], n_windows: int, rng: np.random.Generator, *,
             iid: bool = False) -> list:
    # each window holds distinct images (a camera does not see the same frame twice in a window;
    # bootstrap duplicates would inflate the embedding statistics' spread); iid: drawn with replacement,
    # as a stream draws from the population (270 evaluation images drawn without replacement vary less
    # than a stream by the finite-population factor (270 - W) / 269: 0.91 / 0.82 / 0.63 at W = 25/50/100)
    w, n = mon.window, len(data[0])
    if iid or w > n:
        idx = rng.integers(0, n, n_windows * w)
    else:
        idx = np.argsort(rng.random((n_windows, n)), axis=1)[:, :w].ravel()
    return mon.update(*(a[idx] for a in data))


def _alarm_stats(bl: Baseline, w: int, hy: Hysteresis, data: tuple[np.ndarray, ...], n_windows: int,
                 rng: np.random.Generator, *, iid: bool = False) -> dict[str, Any]:
    reps = _windows(DriftMonitor(bl, window=w, hysteresis=hy), data, n_windows, rng, iid=iid)
    out: dict[str, Any] = {k: float(np.mean([getattr(r, k) for r in reps]))
                           for k in ("alarm", "risk_flag", "input_shift", "class_shift")}
    out["n_windows"] = len(reps)
    out["flags"] = {t.name: float(np.mean([r.test(t.name).flag for r in reps])) for t in reps[0].tests}
    return out


def _delay(bl: Baseline, w: int, hy: Hysteresis, data: tuple[np.ndarray, ...], trials: int, max_windows: int,
           rng: np.random.Generator) -> dict[str, Any]:
    delays = []
    for _ in range(trials):
        mon = DriftMonitor(bl, window=w, hysteresis=hy)
        d = None
        for k in range(1, max_windows + 1):
            if _windows(mon, data, 1, rng)[0].alarm:
                d = k
                break
        delays.append(d)
    hit = [d for d in delays if d is not None]
    return {"detected": len(hit) / trials, "median_delay": float(np.median(hit)) if hit else None}


def _cost(bl: Baseline, w: int, data: tuple[np.ndarray, ...], reps: int) -> dict[str, float]:
    """The agent's way: batch-1 updates; ms per window and us per ordinary (non-closing) update."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        threadpool_limits = None
    mon = DriftMonitor(bl, window=w)
    rows = [tuple(a[i:i + 1] for a in data) for i in range(w)]
    per_window, per_update = [], []
    ctx = threadpool_limits(1) if threadpool_limits else None
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            for r in rows[:-1]:
                mon.update(*r)
            t1 = time.perf_counter()
            mon.update(*rows[-1])
            t2 = time.perf_counter()
            per_window.append((t2 - t0) * 1e3)
            per_update.append((t1 - t0) / (w - 1) * 1e6)
    finally:
        if ctx is not None:
            ctx.unregister()
    return {"ms_per_window": float(np.median(per_window)), "us_per_update": float(np.median(per_update))}


def _memory(bl: Baseline, data: tuple[np.ndarray, ...], n: int) -> dict[str, Any]:
    import tracemalloc

    mon = DriftMonitor(bl)
    before = mon.buffer_nbytes()
    tracemalloc.start()
    row = tuple(a[:1] for a in data)
    for i in range(n):
        mon.update(*row)
        if i == 1000:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"inferences": n, "buffer_bytes_before": before, "buffer_bytes_after": mon.buffer_nbytes(),
            "traced_growth_bytes": int(cur - base), "traced_peak_above_start": int(peak - base)}


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
    hy = Hysteresis(*args.hysteresis)
    result: dict[str, Any] = {"splits": [], "n_train": len(train_idx), "n_ref": N_REF, "n_cal": N_CAL,
                              "n_eval": n_held - N_REF - N_CAL, "windows": list(windows),
                              "hysteresis": list(args.hysteresis), "alarm_rate": args.alarm_rate,
                              "input_budget": args.input_budget, "train_seconds": round(train_s, 1)}
    for s in range(args.splits):
        rng = np.random.default_rng(1000 + s)
        p = rng.permutation(held)
        ref, cal, ev = p[:N_REF], p[N_REF:N_REF + N_CAL], p[N_REF + N_CAL:]
        r_data, c_data, e_data = (_infer(model, images[i], spec) for i in (ref, cal, ev))
        acc = float(np.mean(e_data[1].argmax(1) == labels[ev]))
        t0 = time.perf_counter()
        prior = np.bincount(labels[train_idx], minlength=10) / len(train_idx)
        bl = compute_baseline(*r_data, *c_data, window=windows, class_prior=prior, n_boot=args.n_boot, seed=s,
                              alarm_rate=args.alarm_rate, input_budget=args.input_budget, hysteresis=hy)
        base_s = time.perf_counter() - t0
        from core.drift import calibration_summary

        split: dict[str, Any] = {"split": s, "eval_accuracy": acc, "baseline_seconds": round(base_s, 2),
                                 "baseline_bytes": len(bl.to_bytes()), "calibration": calibration_summary(bl),
                                 "null": {}, "shifts": {}, "cost": {}}
        for w in windows:
            split["cost"][str(w)] = _cost(bl, w, e_data, args.cost_reps)
            split["null"][str(w)] = _alarm_stats(bl, w, hy, e_data, args.null_windows, rng)
            # "input changed" on i.i.d. windows (the risk tests' embedding kernels see duplicates, so only this row)
            split["null"][str(w)]["input_shift_iid"] = _alarm_stats(bl, w, hy, e_data, args.null_windows, rng,
                                                                    iid=True)["input_shift"]
        if s == 0:  # shifts on the first split only: they are slow to generate, and the null is what varies
            split["memory"] = _memory(bl, e_data, args.memory_inferences)
            low = labels[ev] < 5
            for sh in SHIFTS:
                sel = low if sh.name.startswith("class mix") else np.ones(len(ev), bool)
                d = _infer(model, sh.apply(images[ev][sel], rng), spec)
                entry: dict[str, Any] = {"accuracy": float(np.mean(d[1].argmax(1) == labels[ev][sel]))}
                # class mix only is a false-alarm row (goal <= 1 %): as many windows as the null
                n_win = args.null_windows if sh.name == "class mix 0-4 only" else args.power_windows
                for w in windows:
                    st = _alarm_stats(bl, w, hy, d, n_win, rng)
                    entry[str(w)] = {"power": st["risk_flag"], "input_shift": st["input_shift"],
                                     "class_shift": st["class_shift"], "alarm": st["alarm"], "flags": st["flags"],
                                     "n_windows": st["n_windows"], **_delay(bl, w, hy, d, args.trials, 20, rng)}
                split["shifts"][sh.name] = entry
        result["splits"].append(split)
        print(f"split {s}: eval acc {acc:.3f}, baseline {base_s:.1f}s", file=sys.stderr)
        if args.out:  # partial results survive an interrupted run
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".partial.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _ci(k: float, n: int) -> str:
    """A rate with its 95 % Wilson interval."""
    z = 1.96
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{p:.3f} [{max(0.0, c - h):.3f}, {min(1.0, c + h):.3f}]"


def _caught(flags: dict[str, float]) -> str:
    top = sorted(((v, k) for k, v in flags.items() if v >= 0.5 and k != "class_chi2"), reverse=True)
    return ",".join(k.replace("embedding_", "emb_").replace("confidence", "conf") for _, k in top[:3]) or "-"


def _table(res: dict[str, Any]) -> str:
    ws = [str(w) for w in res["windows"]]
    splits = res["splits"]
    lines = [f"False alarms on undrifted held-out windows (budget: input {res['input_budget']:.3f}, alarm "
             f"{res['alarm_rate']:.3f} after hysteresis {res['hysteresis']}), pooled over {len(splits)} splits, "
             "rate [95% CI]:",
             f"{'':<24}" + "".join(f"{'W=' + w:>26}" for w in ws)]
    for key, name in (("input_shift", "input changed"), ("input_shift_iid", "input changed (iid)"),
                      ("risk_flag", "risk flag"), ("alarm", "alarm"), ("class_shift", "class-mix signal")):
        row = f"{name:<24}"
        for w in ws:
            n = sum(s["null"][w]["n_windows"] for s in splits)
            k = sum(s["null"][w][key] * s["null"][w]["n_windows"] for s in splits)
            row += f"{_ci(k, n):>26}"
        lines.append(row)
    s0 = splits[0]
    lines += ["", f"Shifts (split 0, clean eval accuracy {s0['eval_accuracy']:.3f}): input = P(input changed | one "
              "window), risk = P(risk flag | one window), delay = median windows to the alarm (- = not within 20)"]
    mix = s0["shifts"].get("class mix 0-4 only")
    if mix:
        lines.append("Class mix only (digits 0-4, untouched pixels), risk flag [95% CI] / alarm: " + ", ".join(
            f"W={w}: {_ci(mix[w]['power'] * mix[w]['n_windows'], mix[w]['n_windows'])} / {mix[w]['alarm']:.3f}"
            for w in ws))
    lines.append(f"{'shift':<30}{'acc':>6}" + "".join(f"{'W=' + w + ' input/risk/delay':>26}" for w in ws)
                 + "  caught by (W=25)")
    for name, e in s0["shifts"].items():
        row = f"{name:<30}{e['accuracy']:>6.3f}"
        for w in ws:
            v = e[w]
            dl = "-" if v["median_delay"] is None else f"{v['median_delay']:.0f}"
            row += f"{v['input_shift']:>14.2f}/{v['power']:.2f}/{dl:>3}"
        lines.append(row + "  " + _caught(e[ws[0]]["flags"]))
    lines += ["", "Cost the agent's way (batch-1 updates, BLAS 1 thread, median): "
              + ", ".join(f"W={w}: {np.mean([s['cost'][w]['ms_per_window'] for s in splits]):.2f} ms/window "
                          f"({np.mean([s['cost'][w]['us_per_update'] for s in splits]):.1f} us/update)" for w in ws)]
    m = s0.get("memory")
    if m:
        lines.append(f"Memory over {m['inferences']:,} inferences: buffers {m['buffer_bytes_before']:,} -> "
                     f"{m['buffer_bytes_after']:,} bytes; traced growth {m['traced_growth_bytes']:,} bytes")
    cal = s0["calibration"]["per_window"]
    lines.append("Calibration uncertainty (split 0): budget; mean ± sd of the realised rate across resamples of the "
                 "calibration set (what another held-out set of the same size would give): "
                 + ", ".join(f"W={w}: input {cal[w]['input_rate']:.3f}; {cal[w].get('input_mean_calibration', 0):.3f}"
                             f"±{cal[w].get('input_sd_calibration', 0):.3f}, risk flag {cal[w]['risk_flag_rate']:.4f}; "
                             f"{cal[w].get('risk_flag_mean_calibration', 0):.4f}"
                             f"±{cal[w].get('risk_flag_sd_calibration', 0):.4f}" for w in cal))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", type=int, default=3, help="reference/calibration/eval reshuffles (default 3)")
    ap.add_argument("--windows", type=lambda t: tuple(int(v) for v in t.split(",")), default=(25, 50, 100))
    ap.add_argument("--null-windows", type=int, default=600, help="undrifted windows per split and size (default 600)")
    ap.add_argument("--power-windows", type=int, default=100, help="shifted windows per cell (default 100)")
    ap.add_argument("--trials", type=int, default=30, help="delay trials per cell (default 30)")
    ap.add_argument("--n-boot", type=int, default=2000, help="bootstrap windows for calibration (default 2000)")
    ap.add_argument("--cost-reps", type=int, default=30)
    ap.add_argument("--memory-inferences", type=int, default=300_000)
    ap.add_argument("--alarm-rate", type=float, default=0.005, help="alarm budget after hysteresis (default 0.005)")
    ap.add_argument("--input-budget", type=float, default=0.01, help="'input changed' budget (default 0.01)")
    ap.add_argument("--hysteresis", type=lambda t: tuple(int(v) for v in t.split(",")), default=(1, 1, 2),
                    help="on_k,on_m,off_j (default 1,1,2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-cache", type=Path, default=Path.home() / ".cache" / "edgeloop",
                    help="reuse the trained model from this folder (same seed = same split and weights)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/drift_bench.json"))
    ap.add_argument("--quick", action="store_true",
                    help="a few minutes: 2 splits, 300 null windows, 40 power windows, 5 trials, 10 cost reps, "
                         "30k inferences for memory (overrides those options)")
    args = ap.parse_args(argv)
    if args.quick:
        args.splits, args.null_windows, args.power_windows, args.trials = 2, 300, 40, 5
        args.cost_reps, args.memory_inferences = 10, 30_000
    from benchmarks.sysinfo import system_info

    res = run(args)
    res["system"] = system_info(sys.argv if argv is None else ["python", "-m", "benchmarks.drift_bench", *argv])
    table = _table(res)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=str))
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
