"""The drift baseline: per-sample features, window statistics and export-time calibration.

``calibrate`` runs on the cloud side (numpy only) and produces a ``Baseline`` that ships
in the bundle as ``baseline.npz``; ``core.drift.DriftMonitor`` consumes it.  The feature
and window-statistic functions here are used by both sides, so calibration and
monitoring compute exactly the same numbers.  See ``core.drift`` for the design.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from . import drift_stats as st
from .drift_features import input_blocks, tangent_directions
from .drift_stats import Hysteresis
from .errors import BundleError, InputError

__all__ = ["BASELINE_SCHEMA_VERSION", "TEST_NAMES", "RISK_TESTS", "INPUT_TESTS", "CLASS_TESTS", "tests_for",
           "min_calibration", "Baseline", "combine"]

BASELINE_SCHEMA_VERSION = 2
INPUT_TESTS = ("pixel_ks", "pixel_z", "pixel_psi", "image_ks", "image_z", "image_rotation", "image_shift")
RISK_TESTS = ("embedding_mmd", "embedding_knn", "confidence_ks", "output_ks", "output_z")
CLASS_TESTS = ("class_chi2",)
TEST_NAMES = INPUT_TESTS + RISK_TESTS + CLASS_TESTS
_HINT = "recompute it with core.drift.calibrate (`edgeloop export` and `bundle create --baseline-dir` do)"


def tests_for(kinds: Sequence[str], *, tangent: bool = True) -> tuple[str, ...]:
    """The tests a baseline runs for the feature kinds it was calibrated with (``DriftFeatures.kinds``).

    ``tangent``: whether the baseline has class templates for ``image_rotation`` / ``image_shift`` (images only;
    baselines written before it existed do not, and run the other tests).
    """
    k = set(kinds)
    want = set(INPUT_TESTS) if "inputs" in k else set()
    if not tangent:
        want -= {"image_rotation", "image_shift"}
    if k & {"embedding", "probs"}:
        want |= {"embedding_mmd", "embedding_knn"}
    if "probs" in k:
        want |= {"confidence_ks", "class_chi2"}
    if "outputs" in k:
        want |= {"output_ks", "output_z"}
    return tuple(t for t in TEST_NAMES if t in want)


def min_calibration(window: int) -> tuple[int, int]:
    """(reference, calibration) images a window size needs: W each side, and 2 W to bootstrap from."""
    return max(10, window), max(10, 2 * window)


# ------------------------------------------------------------------------ baseline

_OPTIONAL = ("grid_ref", "grid_mean", "grid_sd", "stats_ref", "stats_mean", "stats_sd", "hist_range", "hist_fraction", "emb_ref",
             "tangent_mean", "tangent_sd", "tangent_slot", "tangent_nuisance", "ref_class", "class_kernel", "knn_scale", "knn_ref", "conf_ref", "class_prior", "class_groups", "out_ref",
             "out_mean", "out_sd")


@dataclass(frozen=True, eq=False)
class Baseline:
    """Everything the device needs to judge a window; saved as ``baseline.npz`` in the bundle.

    Per calibrated window size ``windows[i]``: ``null[i]`` (n_boot, T) the bootstrap null of
    every test in ``tests``, sorted per column (empirical p-values come from it), and
    ``combined[i]`` (2, n_boot) the sorted null of the Cauchy-combined input and risk
    scores from an independent bootstrap (the thresholds for any budget come from it).
    ``skipped`` lists (window, calibration images needed) for sizes the held-out set was
    too small for.  Arrays of absent feature kinds are None.
    """

    kinds: tuple[str, ...]
    windows: tuple[int, ...]
    default_window: int
    null: np.ndarray
    combined: np.ndarray
    input_shape: tuple[int, ...]
    n_ref: int
    n_cal: int
    input_budget: float
    alarm_rate: float
    hysteresis: Hysteresis
    gamma: float
    knn_k: int
    sample_scale: float
    sample_score_q99: float
    grid: int
    skipped: np.ndarray  # (n, 2) int: window, calibration images it needs
    grid_ref: np.ndarray | None = None  # (m, G) sorted
    grid_mean: np.ndarray | None = None
    grid_sd: np.ndarray | None = None
    stats_ref: np.ndarray | None = None  # (m, S) sorted
    stats_mean: np.ndarray | None = None
    stats_sd: np.ndarray | None = None
    hist_range: np.ndarray | None = None  # (C, 2)
    hist_fraction: np.ndarray | None = None  # (C, bins)
    tangent_mean: np.ndarray | None = None  # (T, C h w) class template thumbnails (the last: all classes)
    tangent_sd: np.ndarray | None = None  # (T, 3) sd of the reference's tangent projections per template
    tangent_slot: np.ndarray | None = None  # (K,) template of each predicted class
    tangent_nuisance: np.ndarray | None = None  # (k, C h w) main directions of the reference's residuals
    emb_ref: np.ndarray | None = None  # (R, D)
    ref_class: np.ndarray | None = None  # (R,) predicted class of each reference sample (0 without probs)
    class_kernel: np.ndarray | None = None  # (K, K) mean kernel between reference classes
    knn_scale: np.ndarray | None = None  # (K,) median k-NN distance per predicted class (calibration)
    knn_ref: np.ndarray | None = None  # (R,) leave-one-out k-NN distance of each reference sample
    conf_ref: np.ndarray | None = None  # (R,) max-probability of each reference sample
    class_prior: np.ndarray | None = None  # (K,)
    class_groups: np.ndarray | None = None  # (n_windows, K) chi-square group of each class
    out_ref: np.ndarray | None = None  # (m, O) sorted
    out_mean: np.ndarray | None = None
    out_sd: np.ndarray | None = None
    schema_version: int = BASELINE_SCHEMA_VERSION

    def __post_init__(self) -> None:
        def bad(what: str) -> BundleError:
            return BundleError(f"invalid drift baseline: {what}", hint=_HINT, member="baseline.npz")

        if self.schema_version != BASELINE_SCHEMA_VERSION:
            raise bad(f"schema_version {self.schema_version} (this agent reads {BASELINE_SCHEMA_VERSION})")
        for name in ("kinds", "windows", "input_shape"):
            object.__setattr__(self, name, tuple(self.__getattribute__(name)))
        nw, t = len(self.windows), len(self.tests)
        if nw == 0 or any(int(w) < 2 for w in self.windows) or self.default_window not in self.windows:
            raise bad(f"windows {self.windows} (default {self.default_window})")
        if self.null.ndim != 3 or self.null.shape[0] != nw or self.null.shape[2] != t:
            raise bad(f"null shape {self.null.shape} for {nw} windows and {t} tests")
        if self.combined.shape[:2] != (nw, 2):
            raise bad(f"combined null shape {self.combined.shape}")
        if not 0.0 < self.alarm_rate < 0.5 or not 0.0 < self.input_budget < 0.5:
            raise bad("alarm_rate / input_budget out of range")
        # Derived lookup structures, rebuilt on load rather than stored.
        d = self.__dict__
        if self.grid_ref is not None:
            d["grid_index"], d["stats_index"] = st.EcdfIndex(self.grid_ref), st.EcdfIndex(self.stats_ref)
        if self.tangent_mean is not None:
            # <residual, direction> is the motion estimate in units of the reference's spread
            d["tangent_dirs"] = unit_tangents(self.tangent_mean, self.input_shape, self.tangent_nuisance) \
                / self.tangent_sd[:, :, None]
        if self.out_ref is not None:
            d["out_index"] = st.EcdfIndex(self.out_ref)
        if self.emb_ref is not None:
            d["emb_ref_sq"] = np.einsum("ij,ij->i", self.emb_ref, self.emb_ref).astype(np.float64)
            k = int(self.ref_class.max()) + 1 if self.class_prior is None else len(self.class_prior)
            onehot = np.zeros((len(self.ref_class), k))
            onehot[np.arange(len(self.ref_class)), self.ref_class] = 1.0
            d["class_avg"] = onehot / np.maximum(onehot.sum(axis=0), 1.0)
        if self.knn_ref is not None:
            # class-banded sorted k-NN distances, as for the confidences: a new sample's distance is ranked
            # among its predicted class's reference distances (uniform under no drift, whatever the class mix)
            band = 2.0 * float(self.knn_ref.max()) + 1.0
            d["knn_band"] = band
            d["knn_banded"] = np.sort(self.knn_ref + band * self.ref_class)
            d["knn_count"] = np.bincount(self.ref_class, minlength=len(d["class_avg"][0])).astype(np.float64)
            d["knn_start"] = np.r_[0.0, np.cumsum(d["knn_count"])[:-1]]
        if self.conf_ref is not None:
            # class-banded sorted confidences: value + 2 * class, so one searchsorted serves all classes
            d["conf_banded"] = np.sort(self.conf_ref + 2.0 * self.ref_class)
            d["conf_count"] = np.bincount(self.ref_class, minlength=len(self.class_prior)).astype(np.float64)
            d["conf_start"] = np.r_[0.0, np.cumsum(d["conf_count"])[:-1]]

    @property
    def tests(self) -> tuple[str, ...]:
        return tests_for(self.kinds, tangent=self.tangent_mean is not None)

    @property
    def window(self) -> int:
        """The default window size (what ``[drift].window = 0`` uses)."""
        return self.default_window

    def window_index(self, window: int) -> int:
        """Position of ``window`` in ``windows``; ``InputError`` naming what to do when it was not calibrated."""
        if window in self.windows:
            return self.windows.index(window)
        why = ""
        for w, need in self.skipped.reshape(-1, 2):
            if int(w) == window:
                why = (f": the calibration split had {self.n_cal} images and W = {window} needs {int(need)} "
                       f"(about {2 * int(need)} held-out images in all)")
        raise InputError(f"drift window {window} was not calibrated in this bundle{why}; calibrated: "
                         f"{list(self.windows)}",
                         hint=f"set [drift].window to one of {list(self.windows)} (0 = {self.default_window}) "
                              "or re-export with --drift-windows including it (and enough held-out data)")

    # --- persistence: npz, numpy only, never pickle.
    def to_bytes(self) -> bytes:
        """Serialise to npz bytes (what goes into the bundle as ``baseline.npz``)."""
        arrays: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, Hysteresis):
                v = np.array([v.on_k, v.on_m, v.off_j], dtype=np.int64)
            arrays[f.name] = np.asarray(v)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, source: str | Path | bytes) -> Baseline:
        """Read a baseline from a path or from npz bytes (``Bundle.read('baseline.npz')``)."""
        try:
            fh: Any = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
        except OSError as e:
            raise BundleError(f"cannot read drift baseline: {e}", hint=_HINT, path=source) from e
        try:
            with fh, np.load(fh, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as e:
            raise BundleError(f"corrupt drift baseline: {e}", hint=_HINT, member="baseline.npz") from e
        version = int(data.get("schema_version", 0))
        if version != BASELINE_SCHEMA_VERSION:
            raise BundleError(f"drift baseline schema {version}; this agent reads {BASELINE_SCHEMA_VERSION}",
                              hint=_HINT, member="baseline.npz")
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                if f.name in _OPTIONAL:
                    continue
                raise BundleError(f"drift baseline lacks {f.name}", hint=_HINT, member="baseline.npz")
            v = data[f.name]
            if f.name == "hysteresis":
                v = Hysteresis(*(int(i) for i in v))
            elif f.name == "kinds":
                v = tuple(str(i) for i in v)
            elif f.name in ("windows", "input_shape"):
                v = tuple(int(i) for i in v)
            elif f.name in ("knn_k", "grid", "schema_version", "default_window", "n_ref", "n_cal"):
                v = int(v)
            elif v.ndim == 0:
                v = float(v)
            kw[f.name] = v
        return cls(**kw)


# ------------------------------------------------------------------- per-sample features


@dataclass(frozen=True, eq=False)
class _Samples:
    """Per-sample quantities every window statistic is built from (shared by both sides)."""

    n: int
    grid_code: np.ndarray | None = None  # (n, G) ECDF codes of the pooled cells
    grid_z: np.ndarray | None = None  # (n, G) standardised pooled cells
    stats_code: np.ndarray | None = None  # (n, S) ECDF codes of the image summary features
    stats_z: np.ndarray | None = None  # (n, S) standardised summary features
    tangent_z: np.ndarray | None = None  # (n, 3) class-template tangent projections, in reference sd
    tangent_w: np.ndarray | None = None  # (n, 3) their weights: 1 / the template's spread in motion units
    hist: np.ndarray | None = None  # (n, C, B) intensity histogram counts
    emb: np.ndarray | None = None  # (n, D)
    pred: np.ndarray | None = None  # (n,) predicted class (0 without probs)
    knn: np.ndarray | None = None  # (n,) k-NN distance / its calibration median for the predicted class
    knn_pit: np.ndarray | None = None  # (n,) rank of the k-NN distance within the predicted class's reference
    kr: np.ndarray | None = None  # (n, K) mean kernel to each reference class
    pit: np.ndarray | None = None  # (n,) rank of the confidence within the predicted class's reference
    out_code: np.ndarray | None = None
    out_z: np.ndarray | None = None


def _thumb_chw(input_shape: Sequence[int]) -> tuple[int, int, int]:
    from .drift_features import thumb_shape

    c, h, w = thumb_shape(tuple(input_shape))
    return c, h, w


def unit_tangents(mean: np.ndarray, input_shape: Sequence[int], nuisance: np.ndarray | None) -> np.ndarray:
    """(T, 3, P) directions whose inner product with an image's residual from template ``mean[t]``
    estimates its rotation / shifts (in radians / pixels).

    Each tangent is first made orthogonal to the ``nuisance`` directions (the main directions
    in which the reference's images differ from their class template: stroke width, size,
    style), so that variation which is not a camera motion no longer leaks into the
    estimate: on held-out digits this cut the per-image spread of the angle estimate from
    ~3.6 to ~2 degrees.  Dividing by ``<T, T_perp>`` keeps the estimate unbiased for a motion.
    """
    c, h, w = _thumb_chw(input_shape)
    dirs = tangent_directions(np.asarray(mean, dtype=np.float64).reshape(-1, c, h, w))
    perp = dirs
    if nuisance is not None and len(nuisance):
        v = np.asarray(nuisance, dtype=np.float64)
        perp = dirs - np.einsum("tdk,kp->tdp", dirs @ v.T, v)
    norm = np.einsum("tdp,tdp->td", dirs, perp)
    return perp / np.where(np.abs(norm) > 1e-12, norm, 1e-12)[:, :, None]


def tangent_projections(thumbs: np.ndarray, slots: np.ndarray, mean: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """(n, 3) projections of each thumbnail's residual from its template ``mean[slots]`` on ``dirs[slots]``."""
    r = np.asarray(thumbs, dtype=np.float64).reshape(len(thumbs), -1) - mean[slots]
    if len(mean) * 4 < len(r):  # few templates: one matrix product against all of them beats gathering
        every = (r @ dirs.reshape(-1, dirs.shape[-1]).T).reshape(len(r), len(mean), -1)
        return every[np.arange(len(r)), slots]
    return np.einsum("np,ndp->nd", r, dirs[slots])


def _input_samples(b: Any, thumbs: np.ndarray, bins: int, pred: np.ndarray) -> dict[str, np.ndarray]:
    cells, stats, values = input_blocks(thumbs, b.grid)
    hist = np.stack([st.histogram_counts(values[:, c], *b.hist_range[c], bins) for c in range(values.shape[1])],
                    axis=1)
    out = {"grid_code": b.grid_index.codes(cells), "grid_z": (cells - b.grid_mean) / b.grid_sd,
           "stats_code": b.stats_index.codes(stats),
           "stats_z": (stats - b.stats_mean) / b.stats_sd, "hist": hist}
    if getattr(b, "tangent_mean", None) is not None:
        slots = b.tangent_slot[pred]
        out["tangent_z"] = tangent_projections(thumbs, slots, b.tangent_mean, b.tangent_dirs)
        out["tangent_w"] = 1.0 / b.tangent_sd[slots]
    return out


def _samples(b: Any, thumbs: np.ndarray | None, probs: np.ndarray | None, emb: np.ndarray | None,
             outputs: np.ndarray | None, n: int) -> _Samples:
    kw: dict[str, Any] = {}
    pred = np.zeros(n, np.int64)
    if probs is not None:
        probs = np.asarray(probs, dtype=np.float32).astype(np.float64)  # as the device computes them
        pred = probs.argmax(axis=1)
        conf = probs[np.arange(n), pred]
        kw["pit"] = _banded_rank(conf, pred, 2.0, b.conf_banded, b.conf_start, b.conf_count)
    kw["pred"] = pred
    if thumbs is not None:
        kw.update(_input_samples(b, thumbs, b.hist_fraction.shape[1], pred))
    e = emb if emb is not None else probs_embedding(probs)
    if e is not None and b.emb_ref is not None:
        e = np.asarray(e, dtype=np.float32).astype(np.float64)
        d2 = st.sq_distances(e, b.emb_ref, b_sq=b.emb_ref_sq)
        kw["emb"] = e
        knn = st.knn_distance(d2, b.knn_k)
        kw["knn"] = knn / b.knn_scale[pred]
        if getattr(b, "knn_ref", None) is not None:
            kw["knn_pit"] = _banded_rank(np.minimum(knn, b.knn_band * 0.5), pred, b.knn_band, b.knn_banded,
                                         b.knn_start, b.knn_count)
        kw["kr"] = np.exp(-b.gamma * d2) @ b.class_avg
    if outputs is not None:
        o = np.asarray(outputs, dtype=np.float32).astype(np.float64)
        kw["out_code"], kw["out_z"] = b.out_index.codes(o), (o - b.out_mean) / b.out_sd
    return _Samples(n=n, **kw)


def _banded_rank(values: np.ndarray, cls: np.ndarray, band: float, banded: np.ndarray, start: np.ndarray,
                 count: np.ndarray) -> np.ndarray:
    """Mid-rank of each value among its class's reference values (class-banded sorted array) in [0, 1]."""
    v = values + band * cls
    lo = np.searchsorted(banded, v, side="left") - start[cls]
    hi = np.searchsorted(banded, v, side="right") - start[cls]
    cnt = count[cls]
    return np.where(cnt > 0, (lo + hi) / (2.0 * np.maximum(cnt, 1.0)), 0.5)


def probs_embedding(probs: np.ndarray | None) -> np.ndarray | None:
    """What stands in for the embedding of a model without one: log-probabilities (floored at 1e-6),
    which keep the spread that near-one-hot probabilities lose to rounding."""
    if probs is None:
        return None
    return np.log(np.maximum(np.asarray(probs, dtype=np.float32).astype(np.float64), 1e-6))


def _window_stats(b: Any, f: _Samples, idx: np.ndarray, tests: Sequence[str], group_of: np.ndarray | None, *,
                  pair_mask: np.ndarray | None = None, kernel: np.ndarray | None = None) -> np.ndarray:
    """All test statistics for B windows given as index arrays ``idx`` (B, W) into ``f`` -> (B, T).

    ``kernel``: the RBF kernel among all of ``f``'s samples, when precomputed (calibration
    gathers from it instead of recomputing every bootstrap window's W x W block).
    """
    nb, w = idx.shape
    out = np.empty((nb, len(tests)))
    col = {t: i for i, t in enumerate(tests)}
    if "pixel_ks" in col:
        out[:, col["pixel_ks"]] = st.ks_from_codes(f.grid_code[idx], b.grid_ref.shape[0]).max(axis=1)
        # mean squared z of the cells' window means: many cells moving a little (a small rotation) add up
        out[:, col["pixel_z"]] = np.square(f.grid_z[idx].mean(axis=1)).mean(axis=1) * w
        out[:, col["pixel_psi"]] = st.psi(f.hist[idx].sum(axis=1), b.hist_fraction[None]).max(axis=1)
        out[:, col["image_ks"]] = st.ks_from_codes(f.stats_code[idx], b.stats_ref.shape[0]).max(axis=1)
        out[:, col["image_z"]] = np.abs(f.stats_z[idx].mean(axis=1)).max(axis=1) * np.sqrt(w)
    if "image_rotation" in col:
        # z-tests of the class-template tangent projections (rotation; the larger shift), each image weighted
        # by how precisely its class's template pins the motion down (a stroke's angle better than a loop's):
        # sum(w z) / sqrt(sum(w^2)) is N(0, 1) under no drift whatever the class mix, and estimates a common
        # angle with the least variance
        tw = f.tangent_w[idx]
        tz = np.abs((f.tangent_z[idx] * tw).sum(axis=1)) / np.sqrt(np.square(tw).sum(axis=1))
        out[:, col["image_rotation"]] = tz[:, 0]
        out[:, col["image_shift"]] = tz[:, 1:].max(axis=1)
    if "embedding_mmd" in col:
        if kernel is None:
            e = f.emb[idx]
            sq = np.einsum("bwd,bwd->bw", e, e)
            d2 = np.maximum(sq[:, :, None] + sq[:, None, :] - 2.0 * (e @ e.transpose(0, 2, 1)), 0.0)
            k_ww = np.exp(-b.gamma * d2)
        else:
            k_ww = kernel[idx[:, :, None], idx[:, None, :]]
        pred = f.pred[idx]
        mask = (pred[:, :, None] == pred[:, None, :]) & ~np.eye(w, dtype=bool)[None]
        mask = mask if pair_mask is None else mask & pair_mask
        k = b.class_kernel.shape[0]
        counts = np.zeros((nb, k))
        np.add.at(counts, (np.repeat(np.arange(nb), w), pred.ravel()), 1.0)
        own = np.take_along_axis(f.kr[idx], pred[:, :, None], axis=2)[:, :, 0].mean(axis=1)
        class_pairs = None
        if pair_mask is not None:  # calibration: duplicate pairs left out, so count the pairs per class that stay
            onehot = np.zeros((nb, w, k))
            onehot[np.arange(nb)[:, None], np.arange(w)[None, :], pred] = 1.0
            class_pairs = np.einsum("bik,bij,bjk->bk", onehot, mask.astype(np.float64), onehot, optimize=True)
        out[:, col["embedding_mmd"]] = st.within_class_mmd2((k_ww * mask).sum(axis=(1, 2)), mask.sum(axis=(1, 2)),
                                                            own, counts, np.diag(b.class_kernel), class_pairs)
        out[:, col["embedding_knn"]] = (f.knn if f.knn_pit is None else f.knn_pit)[idx].mean(axis=1)
    if "confidence_ks" in col:
        out[:, col["confidence_ks"]] = st.ks_uniform(f.pit[idx])
    if "output_ks" in col:
        out[:, col["output_ks"]] = st.ks_from_codes(f.out_code[idx], b.out_ref.shape[0]).max(axis=1)
        out[:, col["output_z"]] = np.abs(f.out_z[idx].mean(axis=1)).max(axis=1) * np.sqrt(w)
    if "class_chi2" in col:
        n_groups = int(group_of.max()) + 1
        expected = np.bincount(group_of, weights=b.class_prior, minlength=n_groups) * w
        g = group_of[f.pred[idx]] + (np.arange(nb) * n_groups)[:, None]
        observed = np.bincount(g.ravel(), minlength=nb * n_groups).reshape(nb, n_groups)
        out[:, col["class_chi2"]] = np.sum((observed - expected) ** 2 / expected, axis=1)
    return out


def combine(null: np.ndarray, stats: np.ndarray, tests: Sequence[str], *, p: np.ndarray | None = None) -> np.ndarray:
    """(B, T) window statistics -> (B, 2) Cauchy-combined input and risk scores (``-log10 p``; 0 when absent).

    ``p``: the statistics' ``empirical_pvalues`` against ``null``, when the caller has them already."""
    if p is None:
        p = st.empirical_pvalues(stats, null)
    out = np.zeros((len(stats), 2))
    for g, group in enumerate((INPUT_TESTS, RISK_TESTS)):
        cols = [i for i, t in enumerate(tests) if t in group]
        if cols:
            out[:, g] = st.cauchy_combine(p[:, cols])
    return out

