"""Mosquitto password and ACL files: each device may publish only as itself and read only its commands.

Password hashes use Mosquitto 2's own format, ``$7$<iterations>$<salt b64>$<hash b64>``
(PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte hash), computed here with :mod:`hashlib`
so no ``mosquitto_passwd`` binary is needed.  The ACL gives the fleet user everything
under the prefix and each device exactly::

    topic write {prefix}/devices/{id}/{state,telemetry,drift,samples,jobs,feedback,bundle-req}
    topic read  {prefix}/devices/{id}/cmd/#

Mosquitto silently drops a publish the ACL denies (MQTT 3.1.1 has no way to say no),
which is why ``tests/test_fleet_acl.py`` proves the denial by watching as the fleet.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from core.errors import FleetError
from core.protocol import DEVICE_KINDS, validate_device_id

__all__ = ["hash_password", "check_password", "new_password", "render_password_file", "render_acl",
           "write_private", "MOSQUITTO_ITERATIONS"]

MOSQUITTO_ITERATIONS = 101  # mosquitto_passwd's default for $7$
_SALT_BYTES = 12


def new_password() -> str:
    """A random password (24 URL-safe characters, ~143 bits)."""
    return secrets.token_urlsafe(18)


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = MOSQUITTO_ITERATIONS) -> str:
    """The ``$7$`` PBKDF2-SHA512 hash Mosquitto 2.x reads from its password file."""
    salt = salt if salt is not None else os.urandom(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, hashed: str) -> bool:
    """True when ``password`` matches a ``$7$`` hash."""
    try:
        _, kind, iterations, salt_b64, digest_b64 = hashed.split("$")
        if kind != "7":
            return False
        salt, digest = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(iterations))
    return hmac.compare_digest(got, digest)


def _check_user(name: str) -> str:
    if not name or any(c in name for c in ":\n\r# ") or len(name) > 64:
        raise FleetError(f"invalid MQTT user name {name!r}", hint="use letters, digits, '_', '.', '-'")
    return name


def render_password_file(users: Mapping[str, str]) -> str:
    """``user:hash`` lines for ``users`` (name -> ``$7$`` hash), sorted for stable diffs."""
    return "".join(f"{_check_user(u)}:{h}\n" for u, h in sorted(users.items()))


def render_acl(prefix: str, *, fleet_users: list[str], devices: Mapping[str, str]) -> str:
    """The ACL text: ``fleet_users`` may do anything under ``prefix``; ``devices`` maps user -> device id.

    There is no ``pattern`` line: every grant names its user, so a device whose user
    name is not its device id still gets exactly its own topics.
    """
    lines = ["# written by `edgeloop fleet provision`; regenerated from the fleet database",
             "# fleet users: everything under the prefix", ""]
    for user in sorted(fleet_users):
        lines += [f"user {_check_user(user)}", f"topic readwrite {prefix}/#", ""]
    for user, device_id in sorted(devices.items()):
        validate_device_id(device_id)
        base = f"{prefix}/devices/{device_id}"
        lines.append(f"user {_check_user(user)}")
        lines += [f"topic write {base}/{kind}" for kind in DEVICE_KINDS]
        lines += [f"topic read {base}/cmd/#", ""]
    return "\n".join(lines)


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` atomically with mode 0600 (password files hold hashes, still secret)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path
