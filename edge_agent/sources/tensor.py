"""Tensor streams for non-image models (sensor windows, audio features): ``stdin`` and ``npy:PATH``.

* ``stdin``: a stream of ``.npy`` arrays, one after another, on standard input (what
  ``numpy.save(sys.stdout.buffer, x)`` writes in a loop); one array = one model input;
* ``npy:PATH``: a ``.npy`` file whose first axis is the stream, ``(N, ...)`` -> N inputs.

Both wait for the model (never drop) and end with their input.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import BinaryIO

import numpy as np

from core.errors import SourceError

from .base import Source

__all__ = ["StdinSource", "NpySource"]


class StdinSource(Source):
    """Consecutive ``.npy`` arrays read from a binary stream (standard input by default)."""

    live = False

    def __init__(self, uri: str = "stdin", stream: BinaryIO | None = None) -> None:
        self.uri = uri
        self._stream = stream

    def open(self) -> None:
        if self._stream is None:
            self._stream = sys.stdin.buffer

    def read(self, stop: threading.Event) -> np.ndarray | None:
        f = self._stream
        assert f is not None, "open() first"
        # np.load seeks back after the magic string, which a pipe cannot: parse the header here
        head = _read_exactly(f, 8)
        if not head:
            return None
        if len(head) < 8 or not head.startswith(b"\x93NUMPY") or head[6] not in (1, 2, 3):
            raise SourceError(f"{self.uri}: not a stream of .npy arrays",
                              hint="write each input with numpy.save(sys.stdout.buffer, x)")
        fmt = np.lib.format
        try:
            shape, fortran, dtype = (fmt.read_array_header_1_0(f) if head[6] == 1 else fmt.read_array_header_2_0(f))
        except ValueError as exc:
            raise SourceError(f"{self.uri}: bad .npy header ({exc})") from None
        if dtype.hasobject:
            raise SourceError(f"{self.uri}: object arrays are not accepted", hint="send numeric arrays")
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        body = _read_exactly(f, n)
        if len(body) < n:
            return None  # the writer stopped mid-array: the stream has ended
        return np.frombuffer(body, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class NpySource(Source):
    """The rows of one ``.npy`` file, memory-mapped (a long recording is not loaded whole)."""

    live = False

    def __init__(self, uri: str, path: Path) -> None:
        self.uri = uri
        self.path = Path(path)
        self._data: np.ndarray | None = None
        self._i = 0

    def open(self) -> None:
        try:
            data = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot open source {self.uri}: {exc}", hint="give a .npy file of shape (N, ...)") from None
        if data.ndim < 2:
            raise SourceError(f"source {self.uri} has shape {data.shape}; expected (N, ...) with one input per row",
                              hint="stack the inputs along the first axis")
        self._data, self._i = data, 0

    def read(self, stop: threading.Event) -> np.ndarray | None:
        if self._data is None or self._i >= len(self._data):
            return None
        row = np.asarray(self._data[self._i])
        self._i += 1
        return row

    @property
    def ref(self) -> str:
        return f"{self.path.name}[{self._i - 1}]"

    def close(self) -> None:
        self._data = None
