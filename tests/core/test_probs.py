"""A classifier's probabilities: made when read, equal to the eager values, and the top class without them."""

from __future__ import annotations

import numpy as np
import pytest

from core.tasks import softmax
from core.tasks.classification import _PY_SOFTMAX_MAX, _py_softmax_top
from core.tasks.probs import Probs


def test_probs_read_as_the_tuple_they_replace() -> None:
    row = np.array([0.1, 0.2, 0.7], np.float32)
    p = Probs(row)
    want = tuple(row.tolist())
    assert p == want and p == list(want) and want == tuple(p) and hash(p) == hash(want)
    assert len(p) == 3 and p[2] == want[2] and p[:2] == want[:2] and sum(p) == pytest.approx(1.0)
    assert p == Probs(want) and p != (0.1, 0.2) and p == pytest.approx(Probs(row.copy()))
    np.testing.assert_array_equal(np.asarray(p), row)
    assert p.tolist() == list(want) and repr(p).startswith("Probs((0.1")


def test_a_divisor_gives_the_eager_softmax_bit_for_bit() -> None:
    logits = np.random.default_rng(0).normal(size=(1, 1000)).astype(np.float32) * 4
    eager = softmax(logits)[0]
    e = logits - logits.max()
    np.exp(e, out=e)
    total = e.sum()
    lazy = Probs(e[0], divisor=total)
    assert lazy == tuple(eager.tolist())
    assert float(np.float32(1.0) / total) == float(eager.max())  # the confidence decode reports


@pytest.mark.parametrize("k", [2, 10, _PY_SOFTMAX_MAX])
def test_the_python_softmax_of_a_few_classes_matches_numpy(k: int) -> None:
    rng = np.random.default_rng(k)
    for _ in range(50):
        row = (rng.normal(size=(1, k)) * rng.uniform(0.1, 30)).astype(np.float32)
        idx, conf, values = _py_softmax_top(row[0].tolist())
        want = softmax(row)[0]
        assert idx == int(row.argmax()) and conf == pytest.approx(float(want[idx]), rel=1e-6)
        np.testing.assert_allclose(values, want, rtol=1e-5, atol=1e-7)
        assert sum(values) == pytest.approx(1.0, abs=1e-12)


def test_ties_and_non_finite_scores() -> None:
    assert _py_softmax_top([1.0, 3.0, 3.0])[0] == 1  # the first of equal tops, as numpy's argmax
    assert _py_softmax_top([1.0, float("nan")]) is None  # the numpy path decides, as before
    assert _py_softmax_top([1.0, float("inf")]) is None
    assert _py_softmax_top([-float("inf"), 0.0]) is None
