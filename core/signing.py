"""Ed25519 keys and signatures for model bundles.

The cryptography is OpenSSL's, through the ``cryptography`` package (constant-time,
maintained); edgeloop carries no hand-written implementation.  ``cryptography`` is part of
the ``[agent]`` extra (wheels exist for the devices' platform, manylinux_2_28 aarch64);
without it, signing or verifying raises :class:`SignatureError` naming the fix.  Key
handling (files, ids) needs only the standard library.

Key files are two short text files: a header line that says what the file is (and the
key id), then the base64 of the 32-byte seed (private, mode 0600) or of the 32-byte
public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SignatureError

__all__ = [
    "PrivateKey",
    "PublicKey",
    "KeyPaths",
    "generate_keypair",
    "save_keypair",
    "load_private_key",
    "load_public_key",
    "key_id",
    "sign",
    "verify",
]

_PRIVATE_HEADER = "edgeloop ed25519 private key"
_PUBLIC_HEADER = "edgeloop ed25519 public key"
_KEY_HINT = "create a key pair with `edgeloop keys new`"


# --------------------------------------------------------------------------- cryptography
_MISSING_HINT = "install the agent's dependencies: pip install 'edgeloop[agent]' (it brings `cryptography`)"


def _ed25519() -> Any:
    """The ``cryptography`` Ed25519 module; SignatureError when the package is missing."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise SignatureError("Ed25519 needs the `cryptography` package, which is not installed",
                             hint=_MISSING_HINT) from exc
    return ed25519


def _public_of(seed: bytes) -> bytes:
    return bytes(_ed25519().Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw())


def _sign(seed: bytes, data: bytes) -> bytes:
    return bytes(_ed25519().Ed25519PrivateKey.from_private_bytes(seed).sign(data))


def _verify(public: bytes, data: bytes, sig: bytes) -> bool:
    ed25519 = _ed25519()
    from cryptography.exceptions import InvalidSignature

    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public).verify(sig, data)
    except (InvalidSignature, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class PublicKey:
    """A 32-byte Ed25519 public key."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != 32:
            raise SignatureError("an Ed25519 public key is 32 bytes", hint=_KEY_HINT)

    @property
    def key_id(self) -> str:
        """Short hex fingerprint (first 16 hex digits of the SHA-256 of the key)."""
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def to_base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")


@dataclass(frozen=True)
class PrivateKey:
    """A 32-byte Ed25519 seed (RFC 8032 "private key"); never printed in its repr."""

    seed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.seed, bytes) or len(self.seed) != 32:
            raise SignatureError("an Ed25519 private key (seed) is 32 bytes", hint=_KEY_HINT)

    def public_key(self) -> PublicKey:
        """The matching public key."""
        return PublicKey(_public_of(self.seed))

    @property
    def key_id(self) -> str:
        return self.public_key().key_id


@dataclass(frozen=True)
class KeyPaths:
    """Where :func:`save_keypair` wrote the two key files."""

    private: Path
    public: Path
    key_id: str


def key_id(pub: PublicKey | PrivateKey | bytes) -> str:
    """Short hex id of a public key (16 hex digits of its SHA-256)."""
    if isinstance(pub, PrivateKey):
        return pub.key_id
    return (pub if isinstance(pub, PublicKey) else PublicKey(pub)).key_id


def generate_keypair() -> tuple[PrivateKey, PublicKey]:
    """A fresh key pair from the operating system's CSPRNG."""
    private = PrivateKey(secrets.token_bytes(32))
    return private, private.public_key()


def sign(priv: PrivateKey, data: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``data``."""
    return _sign(priv.seed, data)


def verify(pub: PublicKey, data: bytes, sig: bytes) -> bool:
    """True when ``sig`` is a valid signature of ``data`` by ``pub``; never raises on bad input
    (only :class:`SignatureError` when ``cryptography`` is missing)."""
    if not isinstance(sig, bytes) or len(sig) != 64:
        return False
    return _verify(pub.raw, data, sig)


# --------------------------------------------------------------------------- key files
def _key_file_text(header: str, raw: bytes, kid: str) -> str:
    return f"# {header} (key id {kid})\n{base64.b64encode(raw).decode('ascii')}\n"


def _decode_b64_key(text: str, what: str, source: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise SignatureError(f"{source} is not an edgeloop {what} key", hint=_KEY_HINT, path=source)
    return raw


def _parse_key_file(path: Path, header: str, what: str) -> bytes:
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError as exc:
        raise SignatureError(f"key file {path} not found", hint=_KEY_HINT, path=str(path)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SignatureError(f"cannot read key file {path}: {exc}", hint=_KEY_HINT, path=str(path)) from exc
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith(f"# {header}"):
        raise SignatureError(f"{path} is not an edgeloop {what} key file (expected the header '# {header}')",
                             hint=_KEY_HINT, path=str(path))
    body = [ln for ln in lines[1:] if not ln.startswith("#")]
    if len(body) != 1:
        raise SignatureError(f"{path}: expected one base64 line after the header", hint=_KEY_HINT, path=str(path))
    return _decode_b64_key(body[0], what, str(path))


def _resolve_key_paths(dest: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = Path(dest)
    if p.is_dir() or str(dest).endswith(("/", os.sep)):
        return p / "edgeloop.key", p / "edgeloop.pub"
    return p.with_name(p.name + ".key"), p.with_name(p.name + ".pub")


def save_keypair(dest: str | os.PathLike[str], private: PrivateKey | None = None, *,
                 overwrite: bool = False) -> KeyPaths:
    """Write ``private`` (a fresh key when None) and its public key.

    ``dest`` is a directory (files ``edgeloop.key`` / ``edgeloop.pub`` in it) or a
    prefix (``keys/prod`` -> ``keys/prod.key`` / ``keys/prod.pub``).  The private key
    file is created with mode 0600 and never replaced unless ``overwrite``.
    """
    if private is None:
        private, _ = generate_keypair()
    public = private.public_key()
    priv_path, pub_path = _resolve_key_paths(dest)
    if not overwrite:
        for p in (priv_path, pub_path):
            if p.exists():
                raise SignatureError(f"key file {p} already exists",
                                     hint="choose another --out, or delete the old key first", path=str(p))
    priv_path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if overwrite else os.O_EXCL)
    # Created 0600 from the start: a chmod after writing would leave a window where the
    # seed is world-readable.
    fd = os.open(priv_path, flags, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(_key_file_text(_PRIVATE_HEADER, private.seed, public.key_id))
    os.chmod(priv_path, 0o600)  # O_TRUNC on an existing file keeps its old mode
    pub_path.write_text(_key_file_text(_PUBLIC_HEADER, public.raw, public.key_id), encoding="ascii")
    return KeyPaths(private=priv_path, public=pub_path, key_id=public.key_id)


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """Read a private key file written by :func:`save_keypair`."""
    return PrivateKey(_parse_key_file(Path(path), _PRIVATE_HEADER, "private"))


def load_public_key(source: str | os.PathLike[str] | PublicKey | bytes) -> PublicKey:
    """A public key from a ``.pub`` file, a ``.key`` file (its public half), the base64 string, or raw bytes."""
    if isinstance(source, PublicKey):
        return source
    if isinstance(source, bytes):
        return PublicKey(source)
    path = Path(source)
    if isinstance(source, str) and not path.exists():
        try:  # the base64 line itself, as printed by `edgeloop keys new` and found in the .pub file
            raw = base64.b64decode(source.strip(), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == 32:
            return PublicKey(raw)
    try:
        first = path.read_text(encoding="ascii").lstrip().split("\n", 1)[0]
    except (OSError, UnicodeDecodeError):
        first = ""
    if first.startswith(f"# {_PRIVATE_HEADER}"):
        return load_private_key(path).public_key()
    return PublicKey(_parse_key_file(path, _PUBLIC_HEADER, "public"))
