"""Writing signed model bundles (``docs/bundle.md``): :func:`write_bundle`, re-exported by
:mod:`core.bundle`.  Deterministic (fixed timestamps, sorted members) and atomic.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import stat
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from .bundle_format import (
    _CHUNK,
    _RESERVED,
    LABELS_MEMBER,
    MANIFEST_MEMBER,
    SIGNATURE_MEMBER,
    _check_member_name,
    _fail,
    _fsync_dir,
    manifest_bytes,
)
from .errors import BundleError
from .manifest import Manifest
from .signing import PrivateKey, sign

__all__ = ["write_bundle"]

_STORED_SUFFIXES = (".onnx", ".tflite", ".npz", ".ort")  # already dense, and mmap-able when stored
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: same inputs, same bundle bytes


def _sha256_file(p: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with p.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _zipinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    info.create_system = 3  # unix, so the mode bits above mean what they say
    info.compress_type = zipfile.ZIP_STORED if name.endswith(_STORED_SUFFIXES) else zipfile.ZIP_DEFLATED
    return info


def _signature_bytes(key: PrivateKey, data: bytes) -> bytes:
    doc = {"algorithm": "ed25519", "key_id": key.key_id,
           "signature": base64.b64encode(sign(key, data)).decode("ascii")}
    return (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode()


def write_bundle(path: str | os.PathLike[str], manifest: Manifest, files: Mapping[str, bytes | Path], *,
                 signing_key: PrivateKey | None = None) -> Path:
    """Write a bundle zip atomically and return its path.

    ``files`` maps member names (``models/onnx-fp32.onnx``, ``baseline.npz``...) to
    their bytes or a file to copy.  Every variant's ``sha256`` / ``size`` and
    ``manifest.members`` are filled in here; ``labels.txt`` is written from the manifest
    when not given.  Model files are stored uncompressed so a device can extract or map
    them without inflating; JSON and text are deflated.
    """
    path = Path(path)
    members: dict[str, bytes | Path] = dict(files)
    if LABELS_MEMBER not in members:
        members[LABELS_MEMBER] = ("\n".join(manifest.labels) + "\n").encode()
    digests: dict[str, tuple[str, int]] = {}
    for name, content in members.items():
        _check_member_name(name, path)
        if name in _RESERVED:
            raise ValueError(f"{name} is written by write_bundle itself; do not pass it in files")
        if isinstance(content, bytes):
            digests[name] = (hashlib.sha256(content).hexdigest(), len(content))
        else:
            digests[name] = _sha256_file(Path(content))
    for name in (v.file for v in manifest.variants):
        if name not in members:
            raise _fail(f"variant file {name} is not among the bundle files", "missing-member", member=name, path=path)
    for name in (manifest.baseline, manifest.health, *manifest.drift_domains.values()):
        if name is not None and name not in members:
            raise _fail(f"manifest names {name} but it is not among the bundle files", "missing-member",
                        member=name, path=path, hint="add the file, or set that manifest field to None")
    variants = tuple(dataclasses.replace(v, sha256=digests[v.file][0], size=digests[v.file][1])
                     for v in manifest.variants)
    manifest = dataclasses.replace(manifest, variants=variants,
                                   members={n: digests[n][0] for n in sorted(members)})
    mbytes = manifest_bytes(manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", allowZip64=True) as zf:
                zf.writestr(_zipinfo(MANIFEST_MEMBER), mbytes)
                if signing_key is not None:
                    zf.writestr(_zipinfo(SIGNATURE_MEMBER), _signature_bytes(signing_key, mbytes))
                for name in sorted(members):
                    _write_member(zf, name, members[name], digests[name])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _write_member(zf: zipfile.ZipFile, name: str, content: bytes | Path, digest: tuple[str, int]) -> None:
    info = _zipinfo(name)
    if isinstance(content, bytes):
        zf.writestr(info, content)
        return
    # Declaring the size up front gives the same header writestr would (zip64 only when
    # needed), so a bundle's bytes do not depend on how its files were passed in.
    info.file_size = digest[1]
    h = hashlib.sha256()
    with Path(content).open("rb") as src, zf.open(info, "w") as dst:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            dst.write(chunk)
    if h.hexdigest() != digest[0]:  # the source changed between hashing and copying
        raise BundleError(f"{content} changed while the bundle was being written", member=name,
                          reason="hash-mismatch", hint="write the bundle again")

