"""core.drift / drift_stats: statistics against scipy, calibration, monitor behaviour (no torch)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import special, stats

from core import drift_stats as st
from core.drift import TEST_NAMES, Baseline, DriftMonitor, Hysteresis, compute_baseline
from core.errors import BundleError, ConfigError, DataError, InputError

# ---------------------------------------------------------------- statistics vs scipy


@pytest.mark.parametrize("n,m,shift", [(25, 200, 0.0), (50, 270, 0.5), (200, 100, 0.2), (7, 9, 1.0)])
def test_ks_statistic_matches_scipy(n: int, m: int, shift: float) -> None:
    rng = np.random.default_rng(n + m)
    a, b = rng.normal(shift, 1, n), rng.normal(0, 1, m)
    ref = stats.ks_2samp(a, b)
    assert st.ks_statistic(a, np.sort(b)) == pytest.approx(ref.statistic, abs=1e-12)


def test_ks_statistic_with_ties_and_columns_matches_scipy() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, size=(30, 6)).astype(float)  # heavy ties, like saturated pixels
    b = rng.integers(0, 6, size=(80, 6)).astype(float)
    got = st.ks_statistic_columns(a, np.sort(b, axis=0))
    want = [stats.ks_2samp(a[:, j], b[:, j]).statistic for j in range(6)]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_ks_codes_batch_equals_per_window() -> None:
    rng = np.random.default_rng(2)
    ref = np.sort(rng.normal(size=(50, 3)), axis=0)
    windows = rng.normal(size=(4, 20, 3))
    codes = st.EcdfIndex(ref).codes(windows.reshape(80, 3)).reshape(4, 20, 3)
    batch = st.ks_from_codes(codes, 50)
    for i in range(4):
        np.testing.assert_allclose(batch[i], st.ks_statistic_columns(windows[i], ref))


def test_kolmogorov_sf_matches_scipy() -> None:
    z = np.array([0.2, 0.5, 0.8, 0.99, 1.0, 1.2, 1.36, 2.0, 3.0])
    np.testing.assert_allclose(st.kolmogorov_sf(z), stats.kstwobign.sf(z), atol=1e-12)


@pytest.mark.parametrize("n,m", [(25, 270), (50, 270), (100, 100), (200, 300)])
def test_ks_pvalue_close_to_scipy(n: int, m: int) -> None:
    rng = np.random.default_rng(n)
    for shift in (0.0, 0.3, 0.6):
        a, b = rng.normal(shift, 1, n), rng.normal(0, 1, m)
        d = stats.ks_2samp(a, b).statistic
        want = stats.ks_2samp(a, b, method="exact").pvalue
        assert st.ks_pvalue(d, n, m) == pytest.approx(want, abs=0.03)


@pytest.mark.parametrize("dof", [1, 2, 3, 4, 9, 30])
def test_chi2_sf_matches_scipy(dof: int) -> None:
    for x in (0.01, 0.5, 1.0, dof - 0.5, float(dof), dof + 3.0, 3.0 * dof + 10, 100.0):
        assert st.chi2_sf(x, dof) == pytest.approx(stats.chi2.sf(x, dof), rel=1e-9, abs=1e-300)


def test_chi2_statistic_matches_scipy_chisquare() -> None:
    obs = np.array([3, 7, 2, 9, 4])
    exp = np.array([5.0, 5.0, 5.0, 5.0, 5.0])
    want = stats.chisquare(obs, exp)
    got = st.chi2_statistic(obs, exp)
    assert got == pytest.approx(want.statistic)
    assert st.chi2_sf(got, 4) == pytest.approx(want.pvalue, rel=1e-9)


def test_merge_small_classes_keeps_expected_counts_above_five() -> None:
    prior = np.array([0.3, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.03, 0.02])
    for w in (10, 25, 50, 200):
        g = st.merge_small_classes(prior * w)
        sums = np.bincount(g, weights=prior * w)
        assert g.max() >= 1  # at least two groups
        if w >= 25:
            assert sums.min() >= 5.0
    assert st.merge_small_classes(prior * 1000).max() == 9  # nothing merged when counts are large


def test_psi_equals_symmetric_kl_and_histograms_match_numpy() -> None:
    rng = np.random.default_rng(3)
    vals = rng.uniform(0, 1, size=(2, 500))
    counts = st.histogram_counts(vals, 0.0, 1.0, 8)
    np.testing.assert_array_equal(counts[0], np.histogram(vals[0], bins=8, range=(0.0, 1.0))[0])
    q = np.full(8, 1 / 8)
    p = counts[1] / counts[1].sum()
    want = np.sum(special.rel_entr(p, q) + special.rel_entr(q, p))
    assert st.psi(counts[1], q) == pytest.approx(want, rel=1e-9)
    assert st.psi(np.array([50, 50]), np.array([0.5, 0.5])) == 0.0
    # Out-of-range values land in the outer bins rather than disappearing.
    assert st.histogram_counts(np.array([[-5.0, 5.0, 1.0]]), 0.0, 1.0, 8).tolist() == [[1, 0, 0, 0, 0, 0, 0, 2]]


def test_pool_grid_averages_cells() -> None:
    x = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    got = st.pool_grid(x, 2)
    want = x.reshape(2, 1, 2, 2, 2, 2).mean(axis=(3, 5)).reshape(2, 4)
    np.testing.assert_allclose(got, want)
    assert st.pool_grid(np.zeros((1, 3, 5, 7), np.float32), 8).shape == (1, 3 * 5 * 7)


def _brute_mmd2(a: np.ndarray, r: np.ndarray, gamma: float) -> float:
    def k(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.exp(-gamma * ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1))

    return float(k(a, a).mean() + k(r, r).mean() - 2 * k(a, r).mean())


def test_mmd_matches_brute_force_and_behaves() -> None:
    rng = np.random.default_rng(4)
    r = rng.normal(size=(60, 5))
    gamma = st.median_heuristic_gamma(r)

    def mmd(a: np.ndarray) -> float:
        kww = np.exp(-gamma * st.sq_distances(a, a))[None]
        kwr = np.exp(-gamma * st.sq_distances(a, r))[None]
        krr = float(np.exp(-gamma * st.sq_distances(r, r)).mean())
        return float(st.mmd2_with_reference(kww, kwr, krr)[0])

    a = rng.normal(size=(20, 5))
    assert mmd(a) == pytest.approx(_brute_mmd2(a, r, gamma), abs=1e-12)
    assert mmd(r) == pytest.approx(0.0, abs=1e-12)
    same = [mmd(rng.normal(size=(20, 5))) for _ in range(20)]
    shifted = [mmd(rng.normal(size=(20, 5)) + 1.0) for _ in range(20)]
    assert min(same) >= 0.0 and min(shifted) > max(same)
    # Masking out duplicate pairs removes the inflation a bootstrap duplicate would cause.
    dup = np.concatenate([a[:10], a[:10]])
    idx = np.r_[np.arange(10), np.arange(10)]
    mask = (idx[:, None] != idx[None, :])[None]
    kww = np.exp(-gamma * st.sq_distances(dup, dup))[None]
    kwr = np.exp(-gamma * st.sq_distances(dup, r))[None]
    krr = float(np.exp(-gamma * st.sq_distances(r, r)).mean())
    assert st.mmd2_with_reference(kww, kwr, krr, pair_mask=mask)[0] < st.mmd2_with_reference(kww, kwr, krr)[0]


# --------------------------------------------------------------------- hysteresis


def test_hysteresis_k_of_m_on_and_j_clean_off() -> None:
    h = st.HysteresisState(Hysteresis(on_k=2, on_m=3, off_j=2))
    seq = [True, False, False, True, False, True, False, True, False, False, False]
    states = [h.step(f) for f in seq]
    # 1-0-0 (1 of 3), 0-0-1, 0-1-0, 1-0-1 -> on; clean count resets on a flag; two clean -> off.
    assert states == [False, False, False, False, False, True, True, True, True, False, False]
    with pytest.raises(ConfigError):
        Hysteresis(on_k=3, on_m=2)


@pytest.mark.parametrize("hy", [Hysteresis(), Hysteresis(2, 3, 3), Hysteresis(1, 1, 1)])
def test_alarm_on_fraction_matches_simulation(hy: Hysteresis) -> None:
    p = 0.2
    rng = np.random.default_rng(5)
    s = st.HysteresisState(hy)
    on = np.mean([s.step(bool(f)) for f in rng.random(20000) < p])
    assert st.alarm_on_fraction(p, hy) == pytest.approx(on, abs=0.015)
    q = st.flag_rate_for_alarm_rate(0.01, hy)
    assert st.alarm_on_fraction(q, hy) == pytest.approx(0.01, abs=1e-6)


# -------------------------------------------------------------- baseline + monitor

D, K, WINDOW = 8, 5, 25


def _synthetic(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, ...]:
    emb = rng.normal(size=(n, D)) + shift
    logits = 2.0 * emb[:, :K]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    x = (rng.normal(size=(n, 1, 8, 8)) + shift).astype(np.float32)
    return x, probs, emb


@pytest.fixture(scope="module")
def baseline() -> Baseline:
    rng = np.random.default_rng(10)
    return compute_baseline(*_synthetic(rng, 250), *_synthetic(rng, 250), window=(WINDOW, 50), n_boot=600,
                            default_window=WINDOW)


def test_baseline_roundtrip_npz(baseline: Baseline, tmp_path) -> None:
    p = baseline.save(tmp_path / "baseline.npz")
    b2 = Baseline.load(p)
    assert b2.windows == (WINDOW, 50) and b2.hysteresis == baseline.hysteresis
    assert b2.tests == baseline.tests and b2.kinds == ("inputs", "probs", "embedding")
    np.testing.assert_array_equal(b2.null, baseline.null)
    np.testing.assert_array_equal(b2.combined, baseline.combined)
    np.testing.assert_array_equal(b2.emb_ref, baseline.emb_ref)
    assert Baseline.load(p.read_bytes()).gamma == baseline.gamma
    with np.load(p, allow_pickle=False) as z:
        assert int(z["schema_version"]) == 2
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(BundleError):
        Baseline.load(tmp_path / "bad.npz")


def test_baseline_rejects_bad_inputs() -> None:
    rng = np.random.default_rng(0)
    x, p, e = _synthetic(rng, 20)
    with pytest.raises(DataError):
        compute_baseline(x, p, e[:10], x, p, e)
    with pytest.raises(DataError):
        compute_baseline(x[:5], p[:5], e[:5], x, p, e)


def test_thresholds_depend_on_window_size(baseline: Baseline) -> None:
    # Larger windows have tighter nulls: every distance-like threshold shrinks.
    thr = np.quantile(baseline.null, 0.99, axis=1)
    for name in ("embedding_mmd", "confidence_ks", "pixel_psi", "pixel_ks", "image_ks"):
        i = baseline.tests.index(name)
        assert thr[1, i] < thr[0, i]


def test_false_alarm_rate_on_undrifted_data(baseline: Baseline) -> None:
    rng = np.random.default_rng(11)
    mon = DriftMonitor(baseline)
    reports = mon.update(*_synthetic(rng, 400 * WINDOW))
    assert len(reports) == 400
    assert np.mean([r.alarm for r in reports]) <= 0.02
    assert np.mean([r.risk_flag for r in reports]) <= 0.02
    assert np.mean([r.input_shift for r in reports]) <= 0.03


def test_detects_shift_quickly(baseline: Baseline) -> None:
    rng = np.random.default_rng(12)
    mon = DriftMonitor(baseline)
    clean = mon.update(*_synthetic(rng, 2 * WINDOW))
    assert not any(r.alarm for r in clean)
    drifted = mon.update(*_synthetic(rng, 3 * WINDOW, shift=0.6))
    assert drifted[0].alarm and drifted[0].alarm_changed and drifted[0].input_shift
    assert drifted[0].test("embedding_mmd").flag
    assert drifted[0].risk > drifted[0].risk_threshold
    # Back to normal: the alarm clears after off_j clean windows.
    back = mon.update(*_synthetic(rng, 4 * WINDOW))
    assert not back[-1].alarm
    d = drifted[0].to_dict()
    assert set(d["tests"]) == set(baseline.tests) <= set(TEST_NAMES) and d["schema_version"] == 2


def test_memory_is_bounded_over_10k_updates(baseline: Baseline) -> None:
    rng = np.random.default_rng(13)
    mon = DriftMonitor(baseline)
    x, p, e = _synthetic(rng, 64)
    nbytes = mon.buffer_nbytes()
    windows = 0
    for i in range(10_000):
        j = i % 60
        windows += len(mon.update(x[j:j + 3], p[j:j + 3], e[j:j + 3]))
        assert mon.buffered < WINDOW
    assert windows == 30_000 // WINDOW
    assert mon.buffer_nbytes() == nbytes
    assert mon._buf["embedding"].shape == (WINDOW, D)
    assert mon._state.history < (1 << mon.hysteresis.on_m)


def test_batches_spanning_windows_and_window_choice(baseline: Baseline) -> None:
    rng = np.random.default_rng(14)
    data = _synthetic(rng, 120)
    one = DriftMonitor(baseline, window=50).update(*data)
    mon = DriftMonitor(baseline, window=50)
    split = mon.update(*(a[:33] for a in data)) + mon.update(*(a[33:] for a in data))
    assert [r.risk for r in one] == pytest.approx([r.risk for r in split])
    assert mon.buffered == 20 and [r.window_index for r in split] == [0, 1]
    with pytest.raises(InputError):
        DriftMonitor(baseline, window=30)
    with pytest.raises(InputError):
        mon.update(data[0][:, :, :4], data[1], data[2])


def test_stricter_hysteresis_uses_looser_flag_threshold(baseline: Baseline) -> None:
    loose = DriftMonitor(baseline, hysteresis=Hysteresis(on_k=2, on_m=3, off_j=3))
    assert loose.risk_threshold < DriftMonitor(baseline, hysteresis=Hysteresis(1, 1, 1)).risk_threshold


def test_sample_scores_rank_outliers(baseline: Baseline) -> None:
    rng = np.random.default_rng(15)
    mon = DriftMonitor(baseline)
    normal = mon.score_samples(_synthetic(rng, 200)[2])
    far_data = _synthetic(rng, 50, shift=3.0)
    far = mon.score_samples(far_data[2])
    mon.update(*far_data)
    assert mon.last_sample_scores is None  # not computed per inference: the update stays cheap
    assert 0.7 < np.median(normal) < 1.3
    assert np.mean(normal > baseline.sample_score_q99) < 0.05
    assert np.all(far > baseline.sample_score_q99)


def test_drift_modules_import_neither_torch_nor_scipy() -> None:
    code = ("import sys, core.drift, core.sampling; "
            "bad = [m for m in ('torch', 'scipy') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_calibration_kernel_shortcut_matches_direct_computation(baseline: Baseline) -> None:
    from core import drift_baseline as dbm
    from core.drift_features import thumbnail

    rng = np.random.default_rng(16)
    x, p, e = _synthetic(rng, 40)
    f = dbm._samples(baseline, thumbnail(x), p, e, None, 40)
    idx = rng.integers(0, 40, size=(6, WINDOW))
    kernel = np.exp(-baseline.gamma * st.sq_distances(f.emb, f.emb))
    groups = baseline.class_groups[0]
    np.testing.assert_allclose(dbm._window_stats(baseline, f, idx, baseline.tests, groups, kernel=kernel),
                               dbm._window_stats(baseline, f, idx, baseline.tests, groups), rtol=1e-9, atol=1e-12)


def test_append_keeps_output_rows_and_softmaxes_a_window_at_once(baseline: Baseline) -> None:
    """The agent's path -- ``append`` with raw logits kept by reference, ``scores_to_probs`` once per
    window, on the worker thread -- gives the reports of ``update`` with per-sample probabilities."""
    from core.tasks import softmax

    rng = np.random.default_rng(11)
    x, _, emb = _synthetic(rng, 2 * WINDOW + 5, shift=0.3)
    emb = emb.astype(np.float32)
    logits = (2.0 * emb[:, :K]).astype(np.float32)
    probs = np.concatenate([softmax(logits[i:i + 1]) for i in range(len(logits))])  # as the agent's decode did
    sync = DriftMonitor(baseline)
    want = [r for i in range(len(x)) for r in sync.update(x[i:i + 1], probs[i:i + 1], emb[i:i + 1])]
    got: list = []
    bg = DriftMonitor(baseline, background=True, on_report=got.append, scores_to_probs=softmax)
    try:
        for i in range(len(x)):
            assert bg.append(x[i:i + 1], logits[i:i + 1].copy(), emb[i:i + 1].copy()) == []
        assert bg.flush(timeout=60)
    finally:
        bg.close()
    assert len(want) == 2 and [r.to_dict() for r in got] == [r.to_dict() for r in want]
    assert bg.buffered == 5
    # a row given by update (copied) and rows kept by append mix in one window
    mixed = DriftMonitor(baseline, scores_to_probs=softmax)
    reps = mixed.update(x[:3], logits[:3], emb[:3])
    for i in range(3, WINDOW):
        reps += mixed.append(x[i:i + 1], logits[i:i + 1], emb[i:i + 1])
    assert [r.to_dict() for r in reps] == [want[0].to_dict()]
    # the sample score of a baseline without an embedding reads probabilities: converted from the scores
    assert mixed.sample_score(logits[:1], emb[:1]) == pytest.approx(sync.sample_score(probs[:1], emb[:1]))


def test_large_inputs_are_thumbnailed_on_the_stager_thread_with_the_same_reports(baseline: Baseline, monkeypatch) -> None:
    """``stage_inputs`` of a background monitor hands an input of STAGE_ASYNC_MIN values or more to
    its stager thread; ``append`` waits for it: the reports are the synchronous monitor's."""
    import threading

    from core import drift

    monkeypatch.setattr(drift, "STAGE_ASYNC_MIN", 1)  # this baseline's 8 x 8 inputs count as large
    rng = np.random.default_rng(12)
    x, probs, emb = _synthetic(rng, WINDOW + 2, shift=0.2)
    probs, emb = probs.astype(np.float32), emb.astype(np.float32)
    want = DriftMonitor(baseline).update(x, probs, emb)
    got: list = []
    bg = DriftMonitor(baseline, background=True, on_report=got.append)
    try:
        for i in range(len(x)):
            xi = x[i:i + 1].copy()
            bg.stage_inputs(xi)
            bg.append(xi, probs[i:i + 1], emb[i:i + 1])
        assert any(t.name == "drift-stage" for t in threading.enumerate())
        assert bg.flush(timeout=60)
    finally:
        bg.close()
    assert [r.to_dict() for r in got] == [r.to_dict() for r in want] and len(want) == 1
    bg.stage_inputs(x[:1])  # after close: written at once, no thread started again
    assert bg._stager is not None and bg._stager._thread is None
