"""``dir:PATH`` (or a plain folder path): every image that appears in a folder, once each.

The demo's "camera" and a common integration on devices whose camera software writes
files.  :class:`FolderSource` is the watcher (moved here from ``edge_agent.inference``);
:class:`DirSource` is the same behind the :class:`~edge_agent.sources.base.Source` interface.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from pathlib import Path

import numpy as np

from core.errors import EdgeloopError, SourceError

from .base import Source

__all__ = ["FolderSource", "DirSource"]

log = logging.getLogger(__name__)


class FolderSource:
    """Images appearing in a folder, each yielded once (``agent run --source DIR``; the demo's camera)."""

    def __init__(self, folder: Path, *, max_seen: int = 100_000) -> None:
        self.folder = Path(folder)
        self._seen: dict[str, float] = {}
        self._max_seen = max_seen  # bounded: forget the oldest names on a long-running device

    def new_images(self) -> list[tuple[Path, np.ndarray]]:
        """Images not yielded before (by name and mtime), oldest first; unreadable files are logged and skipped."""
        from core.preprocess import IMAGE_SUFFIXES, load_image

        out = []
        try:
            entries = sorted((p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                             key=lambda p: (p.stat().st_mtime, p.name))
        except OSError as exc:
            log.warning("cannot list %s: %s", self.folder, exc)
            return []
        for p in entries:
            try:
                mtime = p.stat().st_mtime
            except OSError:
                continue
            if self._seen.get(p.name) == mtime:
                continue
            self._seen[p.name] = mtime
            try:
                out.append((p, load_image(p)))
            except EdgeloopError as exc:
                log.warning("skipping %s: %s", p.name, exc)
        while len(self._seen) > self._max_seen:
            self._seen.pop(next(iter(self._seen)))
        return out


class DirSource(Source):
    """A watched folder as a source: never ends, polls every ``poll_s`` while it has nothing new."""

    live = False  # files wait for the model: every image is predicted

    def __init__(self, uri: str, folder: Path, *, poll_s: float = 0.5) -> None:
        self.uri = uri
        self.folder = Path(folder)
        self.poll_s = poll_s
        self._watch = FolderSource(self.folder)
        self._pending: deque[tuple[Path, np.ndarray]] = deque()
        self._ref = ""

    def open(self) -> None:
        if not self.folder.is_dir():
            raise SourceError(f"cannot open source {self.uri}: {self.folder} is not a folder",
                              hint="create it or fix the path")

    def read(self, stop: threading.Event) -> np.ndarray | None:
        while not self._pending:
            self._pending.extend(self._watch.new_images())
            if self._pending or stop.wait(self.poll_s):
                break
        if not self._pending:
            return None  # stopping
        path, image = self._pending.popleft()
        self._ref = path.name
        return image

    @property
    def ref(self) -> str:
        return self._ref
