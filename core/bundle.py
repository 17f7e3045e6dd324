"""Signed model bundles: one zip file a device can trust or refuse, member by member.

Layout and verification order are documented in ``docs/bundle.md``.  In short:
``manifest.json`` lists the SHA-256 of every other member, ``manifest.sig`` is an
Ed25519 signature over the exact bytes of ``manifest.json``; so one signature check
plus one hash per member proves the whole bundle.

Every refusal is a :class:`BundleError` (a :class:`SignatureError` for the signature
steps) whose ``context`` carries ``reason`` (one of :data:`REASONS`, stable, for
machines such as an update report) and ``member`` where one member is at fault.
No torch, no onnx: the agent imports this.

This module reads and verifies; writing is :mod:`core.bundle_write` and the shared layout
(member names, reasons) :mod:`core.bundle_format`, both re-exported here.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import json
import os
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bundle_format import (
    _CHUNK,
    _RESERVED,
    LABELS_MEMBER,
    MANIFEST_MEMBER,
    REASONS,
    SIGNATURE_MEMBER,
    _check_member_name,
    _fail,
    _fsync_dir,
    manifest_bytes,
)
from .bundle_write import _signature_bytes, _zipinfo, write_bundle  # noqa: F401  (re-exported; fleet.setup re-signs)
from .errors import BundleError, SignatureError
from .manifest import Manifest
from .signing import PublicKey, load_public_key, verify

__all__ = [
    "MANIFEST_MEMBER",
    "SIGNATURE_MEMBER",
    "LABELS_MEMBER",
    "REASONS",
    "BundleLimits",
    "SignatureInfo",
    "Bundle",
    "manifest_bytes",
    "write_bundle",
    "open_bundle",
    "verify_bundle",
    "read_manifest_unverified",
    "read_signature_unverified",
]


@dataclass(frozen=True)
class BundleLimits:
    """Ceilings checked against the zip's declared sizes before anything is inflated (zip bombs)."""

    max_members: int = 256
    max_member_bytes: int = 1 << 31  # 2 GiB for one model
    max_total_bytes: int = 1 << 32
    max_manifest_bytes: int = 8 << 20
    max_ratio: float = 200.0  # inflated / compressed, for members over 1 MiB

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"BundleLimits.{f.name} must be positive")


@dataclass(frozen=True)
class SignatureInfo:
    """``manifest.sig``: who signed, and whether that was checked against a trusted key."""

    algorithm: str
    key_id: str
    signature: bytes
    verified: bool = False


# --------------------------------------------------------------------------- reading
def _open_zip(path: Path, limits: BundleLimits) -> zipfile.ZipFile:
    """Open the zip and check its central directory before inflating anything."""
    if not path.is_file():
        raise _fail(f"bundle {path} not found", "not-found", path=path, hint="check the path")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _fail(f"{path} is not a bundle (not a zip file, or truncated): {exc}", "not-a-zip", path=path) from exc
    try:
        _check_directory(zf, path, limits)
    except BaseException:
        zf.close()
        raise
    return zf


def _check_directory(zf: zipfile.ZipFile, path: Path, limits: BundleLimits) -> None:
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise _fail(f"bundle has {len(infos)} members (limit {limits.max_members})", "too-large", path=path)
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename
        if name in seen:
            raise _fail(f"member {name} appears twice in the zip", "duplicate-member", member=name, path=path)
        seen.add(name)
        _check_member_name(name, path)
        if info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16):
            raise _fail(f"member {name} is a symbolic link", "unsafe-path", member=name, path=path)
        if info.flag_bits & 0x1:
            raise _fail(f"member {name} is encrypted", "encrypted", member=name, path=path)
        total += info.file_size
        too_dense = info.file_size > (1 << 20) and info.file_size > limits.max_ratio * max(info.compress_size, 1)
        if info.file_size > limits.max_member_bytes or total > limits.max_total_bytes or too_dense:
            raise _fail(f"member {name} declares {info.file_size} bytes, over the bundle limits (zip bomb?)",
                        "too-large", member=name, path=path)


def _missing(name: str, path: Path) -> BundleError:
    return _fail(f"member {name} is listed in the manifest but missing from the bundle", "missing-member",
                 member=name, path=path)


def _read_member(zf: zipfile.ZipFile, name: str, path: Path, limit: int | None = None) -> bytes:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise _missing(name, path) from None
    if limit is not None and info.file_size > limit:
        raise _fail(f"member {name} is {info.file_size} bytes (limit {limit})", "too-large", member=name, path=path)
    buf = io.BytesIO()
    for chunk in _iter_member(zf, name, path):
        buf.write(chunk)
    return buf.getvalue()


def _iter_member(zf: zipfile.ZipFile, name: str, path: Path) -> Iterator[bytes]:
    # zipfile stops at the declared size and checks the CRC at the end; a CRC or
    # inflate failure means the member's bytes were changed in place.
    try:
        with zf.open(name) as fh:
            while chunk := fh.read(_CHUNK):
                yield chunk
    except KeyError:
        raise _missing(name, path) from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise _fail(f"member {name} is corrupt or was modified ({exc})", "hash-mismatch",
                    member=name, path=path) from exc


def _parse_manifest(data: bytes, path: Path) -> Manifest:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"manifest.json is not valid JSON: {exc}", "invalid-manifest",
                    member=MANIFEST_MEMBER, path=path) from exc
    if not isinstance(doc, dict):
        raise _fail("manifest.json is not a JSON object", "invalid-manifest", member=MANIFEST_MEMBER, path=path)
    try:
        return Manifest.from_dict(doc)
    except BundleError as exc:
        raise _fail(f"manifest.json: {exc.message}", "invalid-manifest", member=MANIFEST_MEMBER, path=path) from exc


def _parse_signature(data: bytes, path: Path) -> SignatureInfo:
    try:
        doc = json.loads(data.decode("utf-8"))
        info = SignatureInfo(algorithm=str(doc["algorithm"]), key_id=str(doc["key_id"]),
                             signature=base64.b64decode(doc["signature"], validate=True))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, binascii.Error) as exc:
        raise _fail(f"manifest.sig is malformed: {exc}", "invalid-signature", member=SIGNATURE_MEMBER,
                    path=path, cls=SignatureError) from exc
    if info.algorithm != "ed25519":
        raise _fail(f"manifest.sig uses {info.algorithm!r}; only ed25519 is supported", "invalid-signature",
                    member=SIGNATURE_MEMBER, path=path, cls=SignatureError)
    return info


TrustedKeys = PublicKey | str | os.PathLike[str] | Iterable[PublicKey | str | os.PathLike[str]]


def _trusted(keys: TrustedKeys | None) -> list[PublicKey]:
    if keys is None:
        return []
    if isinstance(keys, (PublicKey, str, os.PathLike)):
        return [load_public_key(keys)]
    return [load_public_key(k) for k in keys]


def _check_signature(zf: zipfile.ZipFile, mbytes: bytes, path: Path, trusted: list[PublicKey],
                     require: bool) -> SignatureInfo | None:
    if SIGNATURE_MEMBER not in zf.namelist():
        if require:
            raise _fail("bundle is not signed (manifest.sig missing)", "missing-signature", member=SIGNATURE_MEMBER,
                        path=path, cls=SignatureError, hint="sign it with `edgeloop export --sign KEY`")
        return None
    info = _parse_signature(_read_member(zf, SIGNATURE_MEMBER, path, 64 << 10), path)
    if not trusted:
        if require:
            raise _fail(f"manifest.sig: bundle is signed by key {info.key_id} but no trusted public key was given",
                        "no-trusted-key", member=SIGNATURE_MEMBER, path=path, cls=SignatureError,
                        hint="pass the signer's public key, e.g. --key edgeloop.pub")
        return info
    key = next((k for k in trusted if k.key_id == info.key_id), None)
    if key is None:
        raise _fail(f"manifest.sig: bundle is signed by key {info.key_id}, which is not trusted "
                    f"(trusted: {', '.join(k.key_id for k in trusted)})", "wrong-key", member=SIGNATURE_MEMBER,
                    path=path, cls=SignatureError, hint="verify with the public key of the key that signed it")
    if not verify(key, mbytes, info.signature):
        raise _fail("manifest.json does not match its signature (manifest tampered with, or forged signature)",
                    "invalid-signature", member=MANIFEST_MEMBER, path=path, cls=SignatureError, hint=None)
    return dataclasses.replace(info, verified=True)


def _check_members(zf: zipfile.ZipFile, manifest: Manifest, path: Path) -> None:
    listed = manifest.members
    for name in listed:
        _check_member_name(name, path)
    for v in manifest.variants:
        if listed.get(v.file) != v.sha256:
            raise _fail(f"manifest.json: variant {v.id}: {v.file} is not listed in manifest.members with the same sha256",
                        "invalid-manifest", member=MANIFEST_MEMBER, path=path)
    for name in (manifest.baseline, manifest.health, *manifest.drift_domains.values()):
        if name is not None and name not in listed:
            raise _fail(f"manifest.json names {name} but does not list it in members", "invalid-manifest",
                        member=MANIFEST_MEMBER, path=path)
    present = set(zf.namelist())
    for name in sorted(present - set(listed) - set(_RESERVED)):
        raise _fail(f"member {name} is in the bundle but not in the manifest (extra member)", "extra-member",
                    member=name, path=path)
    for name in sorted(set(listed) - present):
        raise _missing(name, path)
    sizes = {v.file: v.size for v in manifest.variants}
    for name in sorted(listed):
        _hash_member(zf, name, listed[name], sizes.get(name), path)


def _hash_member(zf: zipfile.ZipFile, name: str, expected: str, size: int | None, path: Path,
                 sink: Any = None) -> None:
    h, n = hashlib.sha256(), 0
    for chunk in _iter_member(zf, name, path):
        h.update(chunk)
        n += len(chunk)
        if sink is not None:
            sink.write(chunk)
    if h.hexdigest() != expected or (size is not None and n != size):
        raise _fail(f"member {name} does not match its sha256 in the manifest (tampered or corrupt)",
                    "hash-mismatch", member=name, path=path)


def _verified(path: Path, trusted_key: TrustedKeys | None, require_signature: bool,
              limits: BundleLimits) -> tuple[Manifest, SignatureInfo | None, str]:
    trusted = _trusted(trusted_key)
    with _open_zip(path, limits) as zf:
        if MANIFEST_MEMBER not in zf.namelist():
            raise _fail("bundle has no manifest.json", "missing-manifest", member=MANIFEST_MEMBER, path=path)
        mbytes = _read_member(zf, MANIFEST_MEMBER, path, limits.max_manifest_bytes)
        # The signature is checked on the raw bytes before they are parsed: nothing an
        # attacker wrote is interpreted until we know who wrote it.
        sig = _check_signature(zf, mbytes, path, trusted, require_signature)
        manifest = _parse_manifest(mbytes, path)
        _check_members(zf, manifest, path)
        labels = _read_member(zf, LABELS_MEMBER, path).decode("utf-8", "replace").splitlines() \
            if LABELS_MEMBER in manifest.members else list(manifest.labels)
        if tuple(labels) != manifest.labels:
            raise _fail("labels.txt does not match manifest.labels", "invalid-manifest", member=LABELS_MEMBER, path=path)
    return manifest, sig, hashlib.sha256(mbytes).hexdigest()


# --------------------------------------------------------------------------- the Bundle
@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk.  Reads re-check each member's hash (the file may change after opening)."""

    path: Path
    manifest: Manifest
    signature: SignatureInfo | None
    manifest_sha256: str
    limits: BundleLimits = BundleLimits()

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    @property
    def signed_by(self) -> str | None:
        """Key id of a *verified* signature, else None."""
        return self.signature.key_id if self.signature and self.signature.verified else None

    def read(self, member: str) -> bytes:
        """The bytes of ``member``, checked against the manifest."""
        expected = self.manifest.members.get(member)
        if expected is None:
            raise _fail(f"bundle has no member {member}", "missing-member", member=member, path=self.path,
                        hint=f"members: {', '.join(sorted(self.manifest.members))}")
        buf = io.BytesIO()
        with _open_zip(self.path, self.limits) as zf:
            _hash_member(zf, member, expected, None, self.path, sink=buf)
        return buf.getvalue()

    def variant_bytes(self, variant_id: str) -> bytes:
        """The model file of one variant."""
        return self.read(self.manifest.variant(variant_id).file)

    def extract_to(self, directory: str | os.PathLike[str]) -> Path:
        """Extract every member into ``directory`` (absent or empty), atomically.

        Members are written into a temporary sibling directory while being hashed,
        fsync'd, and the directory is renamed into place only when every hash matched;
        a failure leaves nothing behind.  ``manifest.json`` / ``manifest.sig`` are
        extracted too, so the directory stays verifiable.
        """
        target = Path(directory)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise BundleError(f"cannot extract into {target}: it exists and is not an empty directory",
                              hint="extract into a new directory", path=str(target))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            with _open_zip(self.path, self.limits) as zf:
                reserved = [n for n in _RESERVED if n in zf.namelist()]
                mbytes = _read_member(zf, MANIFEST_MEMBER, self.path)
                if hashlib.sha256(mbytes).hexdigest() != self.manifest_sha256:  # replaced since open_bundle
                    raise _fail("manifest.json changed since the bundle was opened", "hash-mismatch",
                                member=MANIFEST_MEMBER, path=self.path)
                for name in reserved + sorted(self.manifest.members):
                    dest = tmp.joinpath(*name.split("/"))
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with dest.open("wb") as fh:
                        if name in _RESERVED:
                            fh.write(mbytes if name == MANIFEST_MEMBER else _read_member(zf, name, self.path))
                        else:
                            _hash_member(zf, name, self.manifest.members[name], None, self.path, sink=fh)
                        fh.flush()
                        os.fsync(fh.fileno())
            if target.exists():
                target.rmdir()
            os.replace(tmp, target)
        except BaseException:
            _rmtree(tmp)
            raise
        _fsync_dir(target.parent)
        return target


def _rmtree(d: Path) -> None:
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def open_bundle(path: str | os.PathLike[str], *, trusted_key: TrustedKeys | None = None,
                require_signature: bool = True, limits: BundleLimits = BundleLimits()) -> Bundle:
    """Verify a bundle completely and return it.

    ``trusted_key``: a public key, key file, base64 string, or several (key rotation).
    With ``require_signature`` (the default) an unsigned bundle, or a signed one with
    no trusted key to check it against, is refused.  Without it, a present signature
    is still checked when a trusted key is given.  Raises :class:`BundleError` /
    :class:`SignatureError` with ``context['reason']`` and ``context['member']``.
    """
    p = Path(path)
    manifest, sig, digest = _verified(p, trusted_key, require_signature, limits)
    return Bundle(path=p, manifest=manifest, signature=sig, manifest_sha256=digest, limits=limits)


def verify_bundle(path: str | os.PathLike[str], *, trusted_key: TrustedKeys | None = None,
                  require_signature: bool = True, limits: BundleLimits = BundleLimits()) -> Manifest:
    """Verify a bundle completely (as :func:`open_bundle`) and return its manifest."""
    return open_bundle(path, trusted_key=trusted_key, require_signature=require_signature, limits=limits).manifest


def read_manifest_unverified(path: str | os.PathLike[str], *, limits: BundleLimits = BundleLimits()) -> Manifest:
    """The manifest, parsed but NOT verified (for ``edgeloop bundle inspect``); never trust it."""
    p = Path(path)
    with _open_zip(p, limits) as zf:
        if MANIFEST_MEMBER not in zf.namelist():
            raise _fail("bundle has no manifest.json", "missing-manifest", member=MANIFEST_MEMBER, path=p)
        return _parse_manifest(_read_member(zf, MANIFEST_MEMBER, p, limits.max_manifest_bytes), p)


def read_signature_unverified(path: str | os.PathLike[str], *,
                              limits: BundleLimits = BundleLimits()) -> SignatureInfo | None:
    """``manifest.sig`` as written (``verified=False``), or None for an unsigned bundle."""
    p = Path(path)
    with _open_zip(p, limits) as zf:
        if SIGNATURE_MEMBER not in zf.namelist():
            return None
        return _parse_signature(_read_member(zf, SIGNATURE_MEMBER, p, 64 << 10), p)
