"""What a bundle looks like, shared by the writer (:mod:`core.bundle_write`) and the reader
(:mod:`core.bundle`): member names, refusal reasons, the member-name rule and the canonical
``manifest.json`` bytes.  Everything here is re-exported by :mod:`core.bundle`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import BundleError
from .manifest import Manifest

__all__ = ["MANIFEST_MEMBER", "SIGNATURE_MEMBER", "LABELS_MEMBER", "REASONS", "manifest_bytes"]

MANIFEST_MEMBER = "manifest.json"
SIGNATURE_MEMBER = "manifest.sig"
LABELS_MEMBER = "labels.txt"
_RESERVED = (MANIFEST_MEMBER, SIGNATURE_MEMBER)
_CHUNK = 1 << 20
_REBUILD = "rebuild it with `edgeloop export` or `edgeloop bundle create`"

REASONS = (
    "not-found", "not-a-zip", "too-large", "duplicate-member", "unsafe-path", "encrypted",
    "missing-manifest", "invalid-manifest", "missing-member", "extra-member", "hash-mismatch",
    "missing-signature", "invalid-signature", "wrong-key", "no-trusted-key",
)


def _fail(message: str, reason: str, *, member: str | None = None, path: Path | None = None,
          hint: str | None = _REBUILD, cls: type[BundleError] = BundleError) -> BundleError:
    return cls(message, hint=hint, reason=reason, member=member, path=str(path) if path else None)


def _check_member_name(name: str, path: Path | None) -> None:
    # Zip names are '/'-separated and relative; anything else could write outside the
    # extraction directory on some OS (Windows treats '\\' and 'C:' as path syntax).
    parts = name.split("/")
    bad = (not name or name.startswith("/") or "\\" in name or "\x00" in name or ":" in parts[0]
           or any(p in ("", ".", "..") for p in parts))
    if bad:
        raise _fail(f"member {name} has an unsafe path (escapes the bundle)", "unsafe-path",
                    member=name, path=path)


def manifest_bytes(manifest: Manifest) -> bytes:
    """The canonical ``manifest.json`` bytes (sorted keys, indent 2, UTF-8, trailing newline)."""
    return (json.dumps(manifest.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


def _fsync_dir(d: Path) -> None:
    try:
        dfd = os.open(d, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

