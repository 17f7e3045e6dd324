"""Export-time calibration of a drift ``Baseline`` from held-out data (numpy only).

``calibrate(ref, cal)`` takes two disjoint held-out samples as :class:`DriftFeatures`
(never the training set: a model is over-confident on what it was trained on): the
*reference* is what windows are compared against and ships in the bundle; the
*calibration* sample supplies bootstrapped undrifted windows, per window size, from
which every test's null distribution and the two combined scores' nulls are taken.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import drift_stats as st
from .drift_baseline import (
    Baseline,
    _samples,
    _window_stats,
    combine,
    min_calibration,
    probs_embedding,
    tests_for,
)
from .drift_features import DriftFeatures, input_blocks, thumbnail
from .drift_stats import Hysteresis, flag_rate_for_alarm_rate
from .errors import DataError

__all__ = ["calibrate", "calibrate_heldout", "DEFAULT_WINDOWS", "calibration_summary"]

DEFAULT_WINDOWS = (25, 50, 100)
_OUTER = 20  # calibration-set resamples in the second bootstrap (for the false-alarm rate's spread)


def _check(ref: DriftFeatures, cal: DriftFeatures) -> None:
    if ref.kinds != cal.kinds:
        raise DataError(f"reference has {ref.kinds}, calibration has {cal.kinds}", hint="pass the same features")
    for k, a in ref.fields().items():
        if np.shape(a)[1:] != np.shape(cal.fields()[k])[1:]:
            raise DataError(f"reference and calibration {k} shapes differ: {np.shape(a)} vs {np.shape(cal.fields()[k])}",
                            hint="pass arrays from the same model")
    if min(ref.n, cal.n) < 10:
        raise DataError(f"need at least 10 reference and 10 calibration samples, got {ref.n} and {cal.n}",
                        hint="hold out more data for the drift baseline")


def _usable_windows(windows: Sequence[int], n_ref: int, n_cal: int) -> tuple[list[int], list[tuple[int, int]]]:
    ok, skipped = [], []
    for w in windows:
        need_ref, need_cal = min_calibration(int(w))
        (ok.append(int(w)) if n_ref >= need_ref and n_cal >= need_cal else skipped.append((int(w), need_cal)))
    if not ok:
        w = min(int(v) for v in windows)
        need_ref, need_cal = min_calibration(w)
        raise DataError(f"the held-out set is too small for any drift window: W = {w} needs {need_ref} reference "
                        f"and {need_cal} calibration images, got {n_ref} and {n_cal}",
                        hint=f"hold out at least {need_ref + need_cal} images, or use smaller windows")
    return ok, skipped


def _gamma(emb: np.ndarray, cls: np.ndarray) -> float:
    """RBF gamma from the median *within-class* squared distance (between-class distances would
    make the kernel see mostly the class mix, not distortion within a class)."""
    d2 = st.sq_distances(emb, emb)
    same = (cls[:, None] == cls[None, :]) & ~np.eye(len(cls), dtype=bool)
    vals = d2[same] if same.sum() >= 10 else d2[np.triu_indices(len(cls), 1)]
    med = float(np.median(vals))
    return 1.0 / med if med > 0 else 1.0


def _class_kernel(emb: np.ndarray, cls: np.ndarray, k: int, gamma: float) -> np.ndarray:
    kern = np.exp(-gamma * st.sq_distances(emb, emb))
    np.fill_diagonal(kern, 0.0)
    onehot = np.zeros((len(cls), k))
    onehot[np.arange(len(cls)), cls] = 1.0
    sums = onehot.T @ kern @ onehot
    cnt = onehot.sum(axis=0)
    pairs = np.outer(cnt, cnt) - np.diag(cnt)
    return np.where(pairs > 0, sums / np.maximum(pairs, 1.0), 0.0)


_MAX_TEMPLATES = 32  # class templates kept for image_tangent (the most frequent classes; the rest share one)
_MIN_TEMPLATE = 5  # reference samples a class needs for its own template
_NUISANCE = 10  # residual directions the motion tangents are made orthogonal to (at most 1 per 25 reference images)


def _tangents(t: np.ndarray, pred: np.ndarray, k: int, input_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Class templates of the reference thumbnails, the residuals' main directions, and the spread of
    the reference's motion estimates per template."""
    from .drift_baseline import tangent_projections, unit_tangents

    counts = np.bincount(pred, minlength=k)
    own = [c for c in np.argsort(-counts, kind="stable")[:_MAX_TEMPLATES] if counts[c] >= _MIN_TEMPLATE]
    slot = np.full(k, len(own), np.int64)
    slot[own] = np.arange(len(own))
    flat = t.reshape(len(t), -1).astype(np.float64)
    mean = np.stack([flat[pred == c].mean(axis=0) for c in own] + [flat.mean(axis=0)])
    resid = flat - mean[slot[pred]]
    n_nuisance = min(_NUISANCE, len(t) // 25)
    nuisance = np.linalg.svd(resid, full_matrices=False)[2][:n_nuisance] if n_nuisance else np.zeros((0, flat.shape[1]))
    z = tangent_projections(t, slot[pred], mean, unit_tangents(mean, input_shape, nuisance))
    n = np.bincount(slot[pred], minlength=len(mean)).astype(np.float64)
    # per template: the reference's own spread, inflated by n/(n-1) (the template was fitted to them)
    var = np.stack([np.square(z[slot[pred] == j]).sum(axis=0) for j in range(len(mean))]) / np.maximum(n - 1, 1)[:, None]
    overall = np.square(z).mean(axis=0)
    sd = np.sqrt(np.where(n[:, None] >= _MIN_TEMPLATE, var, overall[None]))
    return {"tangent_mean": mean.astype(np.float32), "tangent_sd": np.maximum(sd, 1e-9), "tangent_slot": slot,
            "tangent_nuisance": nuisance.astype(np.float32)}


def _reference(ref: DriftFeatures, k: int, class_prior: np.ndarray | None, grid: int, bins: int,
               knn_k: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"grid": grid, "knn_k": knn_k, "gamma": 1.0}
    ref_pred = (np.zeros(ref.n, np.int64) if ref.probs is None
                else np.asarray(ref.probs, dtype=np.float32).astype(np.float64).argmax(axis=1))
    if ref.inputs is not None:
        t = thumbnail(ref.inputs)
        cells, stats, values = input_blocks(t, grid)
        lo, hi = values.min(axis=(0, 2)), values.max(axis=(0, 2))
        counts = np.stack([st.histogram_counts(values[:, c], lo[c], hi[c], bins).sum(axis=0)
                           for c in range(values.shape[1])])
        sd = stats.std(axis=0)
        kw.update(grid_ref=np.sort(cells, axis=0), grid_mean=cells.mean(axis=0),
                  grid_sd=np.maximum(cells.std(axis=0), 1e-3 * (float(np.abs(cells).mean()) + 1e-6)),
                  stats_ref=np.sort(stats, axis=0), stats_mean=stats.mean(axis=0),
                  stats_sd=np.maximum(sd, 1e-6 * (np.abs(stats.mean(axis=0)) + 1.0)),
                  hist_range=np.stack([lo, hi], axis=1).astype(np.float64),
                  hist_fraction=counts / counts.sum(axis=1, keepdims=True))
        if t.ndim == 4:
            kw.update(_tangents(t, ref_pred, k, tuple(np.shape(ref.inputs)[1:])))
    pred = np.zeros(ref.n, np.int64)
    if ref.probs is not None:
        probs = np.asarray(ref.probs, dtype=np.float32).astype(np.float64)  # as the device computes them
        pred = probs.argmax(axis=1)
        prior = np.bincount(pred, minlength=k).astype(np.float64) if class_prior is None else class_prior
        prior = np.maximum(np.asarray(prior, dtype=np.float64), 1e-6)
        kw.update(conf_ref=probs.max(axis=1), class_prior=prior / prior.sum())
    e = ref.embedding if ref.embedding is not None else probs_embedding(ref.probs)
    if e is not None:
        e = np.asarray(e, dtype=np.float32).astype(np.float64)
        gamma = _gamma(e, pred)
        d2 = st.sq_distances(e, e)
        np.fill_diagonal(d2, np.inf)  # leave-one-out: what a new sample's k-NN distance to the reference looks like
        kw.update(emb_ref=e.astype(np.float32), ref_class=pred, gamma=gamma, knn_scale=np.ones(k),
                  class_kernel=_class_kernel(e, pred, k, gamma), knn_ref=st.knn_distance(d2, knn_k))
    if ref.outputs is not None:
        o = np.asarray(ref.outputs, dtype=np.float32).astype(np.float64)
        kw.update(out_ref=np.sort(o, axis=0), out_mean=o.mean(axis=0),
                  out_sd=np.maximum(o.std(axis=0), 1e-6 * (np.abs(o.mean(axis=0)) + 1.0)))
    return kw


def calibrate(ref: DriftFeatures, cal: DriftFeatures, *, windows: int | Sequence[int] = DEFAULT_WINDOWS,
              default_window: int | None = None, class_prior: np.ndarray | None = None, n_boot: int = 2000,
              input_budget: float = 0.01, alarm_rate: float = 0.005, hysteresis: Hysteresis | None = None,
              bins: int = 16, grid: int = 8, knn_k: int = 5, seed: int = 0) -> Baseline:
    """Calibrate a drift baseline on held-out features (never the training set).

    Per window size: ``n_boot`` undrifted windows drawn by a two-level bootstrap (resample
    the calibration set, then the window from that resample, so the null also carries
    the calibration set's own sampling error) give every test's null; an independent
    ``n_boot`` give the nulls of the Cauchy-combined input and risk scores, whose
    quantiles are the thresholds: the "input changed" flag at ``input_budget`` of
    undrifted windows, the risk flag at the rate that keeps the alarm, after
    ``hysteresis``, on in ``alarm_rate`` of them.  Window sizes the held-out data is too
    small for (``min_calibration``) are skipped and recorded with the number needed;
    ``DataError`` when none fits.
    """
    _check(ref, cal)
    hysteresis = hysteresis or Hysteresis()
    wanted = (windows,) if isinstance(windows, int) else tuple(windows)
    ok, skipped = _usable_windows(wanted, ref.n, cal.n)
    default = default_window if default_window in ok else (50 if 50 in ok else ok[0])
    k = np.shape(ref.probs)[1] if ref.probs is not None else 1
    kinds, tests = ref.kinds, tests_for(ref.kinds, tangent=ref.inputs is not None and np.ndim(ref.inputs) == 4)
    shape = tuple(np.shape(ref.inputs)[1:]) if ref.inputs is not None else ()
    placeholder = dict(kinds=kinds, windows=tuple(ok), default_window=default,
                       null=np.zeros((len(ok), 2, len(tests))), combined=np.zeros((len(ok), 2, 2)),
                       input_shape=shape, n_ref=ref.n, n_cal=cal.n, input_budget=input_budget,
                       alarm_rate=alarm_rate, hysteresis=hysteresis, sample_scale=1.0, sample_score_q99=0.0,
                       skipped=np.array(skipped, dtype=np.int64).reshape(-1, 2))
    b = Baseline(**placeholder, **_reference(ref, k, class_prior, grid, bins, knn_k))
    thumbs = thumbnail(cal.inputs) if cal.inputs is not None else None
    f = _samples(b, thumbs, cal.probs, cal.embedding, cal.outputs, cal.n)
    if f.knn is not None:
        # k-NN distances normalised by their calibration median per predicted class: 1.0 = typical for
        # that class, so the window mean does not move when only the class mix does.
        overall = float(np.median(f.knn)) or 1.0
        scale = np.array([float(np.median(f.knn[f.pred == c])) if np.sum(f.pred == c) >= 5 else overall
                          for c in range(k)])
        scale = np.where(scale > 0, scale, overall)
        b = dataclasses.replace(b, knn_scale=scale, sample_scale=overall,
                                sample_score_q99=float(np.quantile(f.knn / overall, 0.99)))
        f = dataclasses.replace(f, knn=f.knn / scale[f.pred])
    kernel = np.exp(-b.gamma * st.sq_distances(f.emb, f.emb)) if f.emb is not None else None
    rng = np.random.default_rng(seed)
    nulls, combined, groups = [], [], []
    for w in ok:
        group_of = st.merge_small_classes(b.class_prior * w) if b.class_prior is not None else None
        groups.append(group_of)

        def draw(n: int, group: int, w: int = w, group_of: np.ndarray | None = group_of) -> np.ndarray:
            # n windows of w samples; each run of `group` consecutive windows first resamples the calibration
            # set (two levels: the null then also carries the calibration set's own sampling error, so the
            # realised rate is the budget on average over calibration sets, not just for this one -- a
            # one-level null put the risk flag at 2.5-3x its rate on held-out digits); group 0: one level
            out, chunk = [], max(group, (20000 // w) // max(group, 1) * max(group, 1))
            for start in range(0, n, chunk):
                nb = min(n - start, chunk)
                if group:
                    pops = rng.integers(0, cal.n, size=(-(-nb // group), cal.n))
                    idx = pops[np.arange(nb)[:, None] // group, rng.integers(0, cal.n, size=(nb, w))]
                else:
                    idx = rng.integers(0, cal.n, size=(nb, w))
                out.append(_window_stats(b, f, idx, tests, group_of, pair_mask=idx[:, :, None] != idx[:, None, :],
                                         kernel=kernel))
            return np.concatenate(out)

        null = np.sort(draw(n_boot, 1), axis=0)  # a fresh calibration resample per window
        nulls.append(null)
        per = -(-n_boot // _OUTER)
        combined.append(combine(null, draw(per * _OUTER, per), tests))  # independent, grouped by resample
    grouped = np.stack(combined)  # (nw, n_boot, 2), in runs of one calibration resample
    b = dataclasses.replace(b, null=np.stack(nulls), combined=np.sort(grouped, axis=1).transpose(0, 2, 1),
                            class_groups=None if b.class_prior is None else np.stack(groups))
    object.__setattr__(b, "_spread", _spread(b, grouped))
    return b


def calibrate_heldout(held: DriftFeatures, *, seed: int = 0, **kw: Any) -> Baseline:
    """``calibrate`` on one held-out set, split at random into a reference third and a calibration
    two thirds (``min_calibration``: a window needs W reference and 2 W calibration images).

    What the export and ``bundle create --baseline-dir`` use; ``kw`` go to ``calibrate``.
    Window sizes the parts are too small for are skipped (see ``Baseline.skipped``).
    """
    order = np.random.default_rng(seed).permutation(held.n)
    half = max(10, held.n // 3)

    def part(idx: np.ndarray) -> DriftFeatures:
        return DriftFeatures(**{k: np.asarray(v)[idx] for k, v in held.fields().items()})

    return calibrate(part(order[:half]), part(order[half:]), seed=seed, **kw)


def _spread(b: Baseline, comb: np.ndarray) -> np.ndarray:
    """(nw, 2, 2): per window size and score, the mean and the standard deviation of the realised flag
    rate across calibration-set resamples, at the calibrated thresholds (sd net of the binomial noise
    of the windows per resample)."""
    out = np.zeros((len(b.windows), 2, 2))
    p_flag = flag_rate_for_alarm_rate(b.alarm_rate, b.hysteresis)
    for i in range(len(b.windows)):
        per = comb[i].reshape(_OUTER, -1, 2)
        for g, rate in enumerate((b.input_budget, p_flag)):
            thr = np.quantile(b.combined[i, g], 1.0 - rate)
            r = (per[:, :, g] > thr).mean(axis=1)
            between = r.var() - r.mean() * (1.0 - r.mean()) / per.shape[1]
            out[i, g] = (float(r.mean()), float(np.sqrt(max(between, 0.0))))
    return out


def calibration_summary(b: Baseline) -> dict[str, Any]:
    """What the calibration achieved, per window size: budgets, thresholds and their uncertainty.

    ``*_ci95`` is the interval of the realised false-alarm rate from the finite bootstrap
    (binomial on ``n_boot``); ``*_mean_calibration`` / ``*_sd_calibration`` the mean and spread of
    the realised rate across resamples of the calibration set (what a different held-out set of
    the same size would give; only available right after ``calibrate``).
    """
    spread = getattr(b, "_spread", None)
    p_flag = flag_rate_for_alarm_rate(b.alarm_rate, b.hysteresis)
    rows = {}
    for i, w in enumerate(b.windows):
        n = b.combined.shape[2]
        row: dict[str, Any] = {"n_boot": n}
        for g, (name, rate) in enumerate((("input", b.input_budget), ("risk_flag", p_flag))):
            half = 1.96 * float(np.sqrt(rate * (1.0 - rate) / n))
            row[f"{name}_rate"] = rate
            row[f"{name}_threshold"] = float(np.quantile(b.combined[i, g], 1.0 - rate))
            row[f"{name}_ci95"] = [max(0.0, rate - half), rate + half]
            if spread is not None:
                row[f"{name}_mean_calibration"] = float(spread[i, g, 0])
                row[f"{name}_sd_calibration"] = float(spread[i, g, 1])
        rows[str(w)] = row
    return {"kinds": list(b.kinds), "tests": list(b.tests), "n_ref": b.n_ref, "n_cal": b.n_cal,
            "windows": list(b.windows), "default_window": b.default_window, "alarm_rate": b.alarm_rate,
            "input_budget": b.input_budget, "hysteresis": dataclasses.asdict(b.hysteresis),
            "skipped": {str(int(w)): {"calibration_images_needed": int(n)} for w, n in b.skipped.reshape(-1, 2)},
            "per_window": rows}
