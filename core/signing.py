"""Ed25519 keys and signatures for model bundles.

Two interchangeable implementations sit behind one API:

* ``"cryptography"`` (OpenSSL) when the package is importable: fast and constant-time;
* ``"pure"``, a straight RFC 8032 implementation in Python integers, so an agent on a
  device without ``cryptography`` (a bare Raspberry Pi install) can still verify.

Verifying a bundle costs one signature check, so the pure path's few milliseconds do
not matter; signing happens on the build machine, where ``cryptography`` is installed.
The pure path is *not* constant-time: use it to verify, and sign with it only where
timing side channels are not a concern.

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
from typing import Literal

from .errors import SignatureError

__all__ = [
    "PrivateKey",
    "PublicKey",
    "KeyPaths",
    "Backend",
    "available_backends",
    "generate_keypair",
    "save_keypair",
    "load_private_key",
    "load_public_key",
    "key_id",
    "sign",
    "verify",
]

Backend = Literal["auto", "cryptography", "pure"]
_PRIVATE_HEADER = "edgeloop ed25519 private key"
_PUBLIC_HEADER = "edgeloop ed25519 public key"
_KEY_HINT = "create a key pair with `edgeloop keys new`"


# --------------------------------------------------------------------------- pure RFC 8032
# Edwards25519 in extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, x*y = T/Z, as in
# RFC 8032 section 6.  Python integers make this short and obviously correct.
_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_Point = tuple[int, int, int, int]


def _add(p: _Point, q: _Point) -> _Point:
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _mul(s: int, p: _Point) -> _Point:
    q: _Point = (0, 1, 1, 0)  # the neutral element
    while s > 0:
        if s & 1:
            q = _add(q, p)
        p = _add(p, p)
        s >>= 1
    return q


def _equal(p: _Point, q: _Point) -> bool:
    return (p[0] * q[2] - q[0] * p[2]) % _P == 0 and (p[1] * q[2] - q[1] * p[2]) % _P == 0


def _recover_x(y: int, sign: int) -> int | None:
    if y >= _P:  # non-canonical encoding: reject, as RFC 8032 5.1.3 requires
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P != 0:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


_GY = 4 * pow(5, _P - 2, _P) % _P
_GX = _recover_x(_GY, 0)
assert _GX is not None  # a constant of the curve, not input validation
_G: _Point = (_GX, _GY, 1, _GX * _GY % _P)


def _compress(p: _Point) -> bytes:
    zinv = pow(p[2], _P - 2, _P)
    x, y = p[0] * zinv % _P, p[1] * zinv % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _decompress(s: bytes) -> _Point | None:
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


def _expand(seed: bytes) -> tuple[int, bytes]:
    h = hashlib.sha512(seed).digest()
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    return a, h[32:]


def _hash_mod_l(data: bytes) -> int:
    return int.from_bytes(hashlib.sha512(data).digest(), "little") % _L


def _pure_public(seed: bytes) -> bytes:
    return _compress(_mul(_expand(seed)[0], _G))


def _pure_sign(seed: bytes, data: bytes) -> bytes:
    a, prefix = _expand(seed)
    public = _compress(_mul(a, _G))
    r = _hash_mod_l(prefix + data)
    r_enc = _compress(_mul(r, _G))
    s = (r + _hash_mod_l(r_enc + public + data) * a) % _L
    return r_enc + s.to_bytes(32, "little")


def _pure_verify(public: bytes, data: bytes, sig: bytes) -> bool:
    a_point = _decompress(public)
    r_point = _decompress(sig[:32])
    if a_point is None or r_point is None:
        return False
    s = int.from_bytes(sig[32:], "little")
    if s >= _L:  # malleability check of RFC 8032 5.1.7
        return False
    h = _hash_mod_l(sig[:32] + public + data)
    return _equal(_mul(s, _G), _add(r_point, _mul(h, a_point)))


# --------------------------------------------------------------------------- cryptography
def _have_cryptography() -> bool:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends() -> tuple[str, ...]:
    """The implementations usable here, fastest first (``"pure"`` always is)."""
    return ("cryptography", "pure") if _have_cryptography() else ("pure",)


def _resolve(backend: Backend) -> str:
    if backend == "auto":
        return available_backends()[0]
    if backend not in ("cryptography", "pure"):
        raise ValueError(f"unknown Ed25519 backend {backend!r}")
    if backend == "cryptography" and not _have_cryptography():
        raise ValueError("the 'cryptography' backend was asked for but the package is not installed")
    return backend


def _crypto_public(seed: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()


def _crypto_sign(seed: bytes, data: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(seed).sign(data)


def _crypto_verify(public: bytes, data: bytes, sig: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public).verify(sig, data)
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

    def public_key(self, *, backend: Backend = "auto") -> PublicKey:
        """The matching public key."""
        impl = _resolve(backend)
        return PublicKey(_crypto_public(self.seed) if impl == "cryptography" else _pure_public(self.seed))

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


def sign(priv: PrivateKey, data: bytes, *, backend: Backend = "auto") -> bytes:
    """The 64-byte Ed25519 signature of ``data``."""
    if _resolve(backend) == "cryptography":
        return _crypto_sign(priv.seed, data)
    return _pure_sign(priv.seed, data)


def verify(pub: PublicKey, data: bytes, sig: bytes, *, backend: Backend = "auto") -> bool:
    """True when ``sig`` is a valid signature of ``data`` by ``pub``; never raises on bad input."""
    if not isinstance(sig, bytes) or len(sig) != 64:
        return False
    if _resolve(backend) == "cryptography":
        return _crypto_verify(pub.raw, data, sig)
    return _pure_verify(pub.raw, data, sig)


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
