"""Model slots on disk, the ``current`` pointer and the boot counter.

Layout under the agent's state directory::

    slots/<version>-<sha8>/   one extracted, verified bundle + slot.json (variant choice, figures)
    current                   JSON pointer: the serving slot, the previous one, when we switched
    boot.json                 unclean starts since the last switch (the boot counter)
    clean-shutdown            written by a clean stop, removed by the next start: a start
                              without it follows a crash / kill and counts (edge_agent.updates)

A switch is one ``rename`` of a fully written and fsync'd temporary file over
``current`` followed by an fsync of the directory, so a power cut or ``kill -9`` at
any instant leaves either the old pointer or the new one, never none and never half.
The previous slot is kept so that a rollback is another pointer write, no download.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from core.errors import UpdateError

__all__ = ["Pointer", "SlotStore", "atomic_write_bytes", "fsync_dir"]

_SLOT_NAME_RE = re.compile(r"[^A-Za-z0-9_.+-]")


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename, fsync folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


@dataclass(frozen=True)
class Pointer:
    """The content of ``current``."""

    slot: str
    previous: str | None = None
    switched_at: float = 0.0
    confirmed: bool = True  # False until the new slot has run healthily for the boot window
    rolled_back_from: str | None = None
    reason: str = ""


@dataclass
class _Boots:
    boots: list[float] = field(default_factory=list)


class SlotStore:
    """Slots, the ``current`` pointer and the boot counter under one state directory."""

    def __init__(self, state_dir: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(state_dir)
        self.slots_dir = self.root / "slots"
        self.pointer_path = self.root / "current"
        self.boot_path = self.root / "boot.json"
        self.clean_path = self.root / "clean-shutdown"
        self._clock = clock
        self.slots_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ slots
    def slot_path(self, name: str) -> Path:
        return self.slots_dir / name

    def new_slot_name(self, version: str, sha256: str) -> str:
        """A fresh slot name for a bundle (re-installing the same bundle gets a new suffix)."""
        base = _SLOT_NAME_RE.sub("_", f"{version}-{sha256[:8]}")
        name, n = base, 1
        while self.slot_path(name).exists():
            n += 1
            name = f"{base}.{n}"
        return name

    def slots(self) -> list[str]:
        """Installed slots (complete directories only; temporaries start with a dot)."""
        if not self.slots_dir.is_dir():
            return []
        return sorted(p.name for p in self.slots_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def read_info(self, name: str) -> dict[str, Any]:
        """``slot.json`` of a slot ({} when absent or unreadable)."""
        try:
            data = json.loads((self.slot_path(name) / "slot.json").read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def write_info(self, name: str, info: dict[str, Any]) -> None:
        atomic_write_bytes(self.slot_path(name) / "slot.json", json.dumps(info, indent=2).encode())

    def remove(self, name: str) -> None:
        """Delete a slot that is neither current nor previous."""
        ptr = self.pointer()
        if ptr is not None and name in (ptr.slot, ptr.previous):
            raise UpdateError(f"slot {name} is in use", hint="roll back or install another version first")
        shutil.rmtree(self.slot_path(name), ignore_errors=True)

    def gc(self, keep: int = 2) -> list[str]:
        """Remove all but the current and previous slot (and at most ``keep`` in all) and stale temporaries."""
        ptr = self.pointer()
        keep_names = [n for n in ((ptr.slot, ptr.previous) if ptr else ()) if n][:max(keep, 1)]
        removed = []
        for p in list(self.slots_dir.iterdir()) if self.slots_dir.is_dir() else []:
            if p.name in keep_names:
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
        for tmp in self.root.glob(".current.*.tmp"):  # a temp pointer left by a kill mid-switch
            tmp.unlink(missing_ok=True)
        return removed

    # ------------------------------------------------------------------ pointer
    def pointer(self) -> Pointer | None:
        """The ``current`` pointer, or None before the first install (or if it is unreadable)."""
        try:
            data = json.loads(self.pointer_path.read_text())
            return Pointer(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            return None

    def serving_slot(self) -> str | None:
        """The slot to serve: the current one if its directory exists, else the previous one."""
        ptr = self.pointer()
        if ptr is None:
            return None
        for name in (ptr.slot, ptr.previous):
            if name and (self.slot_path(name) / "manifest.json").is_file():
                return name
        return None

    def _write_pointer(self, ptr: Pointer) -> Pointer:
        atomic_write_bytes(self.pointer_path, json.dumps(asdict(ptr), indent=2).encode())
        return ptr

    def switch(self, name: str, *, confirmed: bool = False) -> Pointer:
        """Make ``name`` current (atomically), keeping the old current as ``previous``; resets the boot counter."""
        if not (self.slot_path(name) / "manifest.json").is_file():
            raise UpdateError(f"slot {name} is not installed", path=str(self.slot_path(name)))
        old = self.pointer()
        prev = old.slot if old is not None and old.slot != name else (old.previous if old else None)
        self._clear_boots()
        return self._write_pointer(Pointer(slot=name, previous=prev, switched_at=self._clock(), confirmed=confirmed))

    def rollback(self, reason: str) -> Pointer:
        """Switch back to the previous slot; the bad one stays on disk until the next GC."""
        old = self.pointer()
        if old is None or not old.previous or not (self.slot_path(old.previous) / "manifest.json").is_file():
            raise UpdateError("no previous model to roll back to", hint="install a bundle with `edgeloop agent install`")
        self._clear_boots()
        return self._write_pointer(Pointer(slot=old.previous, previous=None, switched_at=self._clock(),
                                           confirmed=True, rolled_back_from=old.slot, reason=reason))

    # ------------------------------------------------------------------ boot counter
    def _read_boots(self) -> _Boots:
        try:
            data = json.loads(self.boot_path.read_text())
            return _Boots([float(t) for t in data.get("boots", [])])
        except (OSError, ValueError, TypeError, AttributeError):
            return _Boots()

    def _clear_boots(self) -> None:
        try:
            self.boot_path.unlink()
        except FileNotFoundError:
            pass
        fsync_dir(self.root)

    def mark_clean_shutdown(self) -> None:
        """Record that the agent stopped cleanly (the next start will not count)."""
        atomic_write_bytes(self.clean_path, json.dumps({"at": self._clock()}).encode())

    def take_clean_shutdown(self) -> bool:
        """Whether the previous run stopped cleanly; removes the marker (durably) either way."""
        try:
            self.clean_path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(self.root)
        return True

    def remove_temporaries(self) -> list[str]:
        """Remove what an install killed half-way leaves: temporary slot directories and
        slots without their ``slot.json`` record (written last) that are neither current
        nor previous, and temporary pointer files.  Returns the names removed."""
        ptr = self.pointer()
        keep = {n for n in ((ptr.slot, ptr.previous) if ptr else ()) if n}
        removed = []
        for p in list(self.slots_dir.iterdir()) if self.slots_dir.is_dir() else []:
            if p.name in keep or (not p.name.startswith(".") and (p / "slot.json").is_file()):
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
        for tmp in self.root.glob(".current.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
        return removed

    def record_boot(self, window_s: float) -> int:
        """Count a start after an unclean exit if the current slot is on probation; return
        the counted starts within the window.

        Each start is persisted before the model loads, so a crash during loading
        still counts: this is the firmware updaters' boot counter.
        """
        ptr = self.pointer()
        if ptr is None or ptr.confirmed:
            return 0
        now = self._clock()
        boots = [t for t in self._read_boots().boots if now - t <= window_s and t >= ptr.switched_at - 1.0]
        boots.append(now)
        atomic_write_bytes(self.boot_path, json.dumps({"slot": ptr.slot, "boots": boots}).encode())
        return len(boots)

    def boot_count(self) -> int:
        return len(self._read_boots().boots)

    def confirm(self) -> Pointer | None:
        """Mark the current slot good (it ran healthily for the boot window); clears the counter."""
        ptr = self.pointer()
        if ptr is None or ptr.confirmed:
            return ptr
        self._clear_boots()
        return self._write_pointer(replace(ptr, confirmed=True))
