"""Mosquitto password and ACL files: each device may publish only as itself and read only its commands.

The one ACL renderer of edgeloop (``fleet provision`` writes its output; the tests load it
into a real Mosquitto).

Password hashes use Mosquitto 2's own format, ``$7$<iterations>$<salt b64>$<hash b64>``
(PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte hash), computed here with :mod:`hashlib`
so no ``mosquitto_passwd`` binary is needed.  The ACL gives the fleet user everything
under the prefix and each device exactly::

    topic write {prefix}/devices/{id}/{state,telemetry,drift,samples,jobs,feedback,bundle-req}
    topic read  {prefix}/devices/{id}/cmd/#

Mosquitto silently drops a publish the ACL denies (MQTT 3.1.1 has no way to say no),
which is why ``tests/test_fleet_acl.py`` proves the denial by watching as the fleet.

Mosquitto's ``acl_file`` does not check SUBSCRIBE at all (2.0: only deliveries are
checked), so a device *can* subscribe to ``$share/<group>/...``: it then takes its turn
in that share group and every message dealt to it is dropped by the read check.  What
keeps devices out of the fleet's share group is that its name is a secret
(``[broker].shared_group``, random per ``fleet init``) and that one ingest process uses
no shared subscription at all (docs/fleet.md, "Broker settings").

Every fleet process connects as its own broker user — ``<user>`` (``fleet serve``),
``<user>.ingest<N>`` (extra ingest processes), ``<user>.tool`` (CLI commands) — all with the
fleet's password, because the generated broker config binds client ids to user names
(``use_username_as_clientid``): no device can take another's client id, and two fleet
connections sharing a user would take each other's.
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
           "write_private", "MOSQUITTO_ITERATIONS", "fleet_username", "fleet_usernames", "FLEET_ROLES"]

MOSQUITTO_ITERATIONS = 101  # mosquitto_passwd's default for $7$
_SALT_BYTES = 12
# The broker users of the fleet's own processes besides ``<user>`` itself (ingest.workers <= 64).
FLEET_ROLES = ("tool", *(f"ingest{i}" for i in range(1, 64)))


def fleet_username(base: str, role: str) -> str:
    """The broker user of one fleet process: ``<base>.<role>`` (see the module docstring)."""
    return f"{base}.{role}"


def fleet_usernames(base: str) -> list[str]:
    """Every broker user the fleet's processes may connect as."""
    return [base, *(fleet_username(base, r) for r in FLEET_ROLES)]


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
    """Write ``text`` atomically with mode 0600 from creation (password files hold hashes, still secret).

    The temporary file is created 0600 by ``os.open`` (never world-readable, even for a
    moment, whatever the umask) and renamed over ``path``; a stale temporary file from a
    crash is replaced, not reused with its old mode.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
