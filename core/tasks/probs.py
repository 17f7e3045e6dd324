"""A classifier's class probabilities, kept as the float32 row the model's output gave.

:class:`Probs` is the ``probs`` of a :class:`~core.tasks.base.TaskResult` and of the agent's
``Prediction``: a read-only sequence of Python floats that turns its row into floats only
when somebody reads them.  The serving path never does (the answer is the top class and its
confidence; the drift monitor copies the row itself), so a 1000-class model does not pay
~50-150 µs per inference building a tuple nobody looks at; ``agent predict --json``, HTTP
``/predict`` and tests read it as they read the tuple it replaces.

It compares equal to any sequence of the same floats (a tuple, a list, another ``Probs``)
and hashes as the tuple of them, so results stay comparable and usable as keys.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np

__all__ = ["Probs"]


class Probs(Sequence[float]):
    """Class probabilities as floats, made from a 1-d float32 row on first read."""

    __slots__ = ("_row", "_divisor", "_values")

    def __init__(self, row: np.ndarray | Sequence[float], *, divisor: Any = None) -> None:
        """``row``: a 1-d array (kept, not copied: the caller hands over a row it no longer writes)
        or any sequence of floats; ``divisor``: the probabilities are ``row / divisor`` (a softmax's
        sum, divided when read: the same float32 division as dividing at once)."""
        self._divisor = divisor
        if isinstance(row, np.ndarray):
            self._row: np.ndarray | None = row.reshape(-1)
            self._values: tuple[float, ...] | None = None
        else:
            self._row = None
            self._values = tuple(float(v) for v in row)

    @property
    def values(self) -> tuple[float, ...]:
        """The probabilities as a tuple of floats (made once)."""
        v = self._values
        if v is None:
            v = self._values = tuple(self._array().tolist())  # tolist: the same floats as float() per class, 5x faster
        return v

    def _array(self) -> np.ndarray:
        assert self._row is not None
        if self._divisor is not None:
            self._row, self._divisor = self._row / self._divisor, None
        return self._row

    def tolist(self) -> list[float]:
        return list(self.values)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self._array() if self._row is not None else np.asarray(self.values, np.float32)
        return np.array(a, dtype=dtype, copy=True)

    def __len__(self) -> int:
        return self._row.shape[0] if self._row is not None else len(self.values)

    @overload
    def __getitem__(self, i: int) -> float: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[float, ...]: ...

    def __getitem__(self, i: int | slice) -> float | tuple[float, ...]:
        return self.values[i]

    def __iter__(self) -> Iterator[float]:
        return iter(self.values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Probs):
            return self.values == other.values
        if isinstance(other, (tuple, list)):
            return self.values == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.values)

    def __repr__(self) -> str:
        return f"Probs({self.values!r})"
