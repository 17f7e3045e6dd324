"""Dashboard logins: tokens or user/password, a signed session cookie, CSRF tokens.

* A login (``POST /dashboard/login``) checks an operator/viewer token or a user's
  PBKDF2 password hash, then sets ``edgeloop_session``: ``base64(json) . HMAC-SHA256``
  over it with the session secret.  The cookie is ``HttpOnly`` and ``SameSite=Strict``;
  nothing in it is secret, it is only unforgeable, and it expires (``exp``).
* Every POST that changes the fleet carries a CSRF token, ``HMAC(secret, "csrf:" + sid)``,
  in the ``csrf_token`` form field or the ``X-CSRF-Token`` header: a page from another
  site can make the browser send the cookie, but cannot read the token.
* Scripts (the CLI, curl) may send ``Authorization: Bearer <token>`` instead; no cookie
  is involved then, so no CSRF token is needed.
* Logout revokes the session (:meth:`Authenticator.revoke`): its id is refused until the
  cookie would have expired anyway.
* Logins are throttled: after ``_MAX_FAILURES`` failures for one user name (or one client
  address, when the route passes it) further attempts are refused for a doubling lock-out,
  right or wrong.  Every user/password attempt costs one PBKDF2 whether or not the user
  exists, so the time taken does not tell which user names exist.

Make a password hash with ``python -m fleet.dashboard.auth hash`` (reads the password
from stdin or asks for it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import sys
import threading
import time
from dataclasses import dataclass

from .config import DashboardConfig

__all__ = ["SESSION_COOKIE", "Session", "Authenticator", "hash_password", "verify_password", "is_loopback"]

SESSION_COOKIE = "edgeloop_session"
PRELOGIN_COOKIE = "edgeloop_prelogin"
_ITERATIONS = 200_000
_MAX_FAILURES = 5  # failed logins per user name / client before a lock-out
_LOCKOUT_S = 30.0  # the first lock-out; doubles with every further failure, up to _MAX_LOCKOUT_S
_MAX_LOCKOUT_S = 900.0
_MAX_TRACKED = 10_000  # throttle keys and revoked sessions kept (oldest forgotten first)


def hash_password(password: str, *, iterations: int = _ITERATIONS, salt: bytes | None = None) -> str:
    """A ``pbkdf2_sha256$ITER$SALT$HASH`` string for ``[[dashboard.users]] password_hash``."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return "$".join(["pbkdf2_sha256", str(iterations), base64.b64encode(salt).decode(),
                     base64.b64encode(digest).decode()])


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of ``password`` against a :func:`hash_password` string."""
    try:
        algo, iters, salt_b64, hash_b64 = encoded.split("$")
        if algo != "pbkdf2_sha256":
            return False
        digest = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt_b64), int(iters))
    except ValueError:
        return False
    return hmac.compare_digest(digest, base64.b64decode(hash_b64))


def _iterations(encoded: str) -> int:
    try:
        return int(encoded.split("$")[1])
    except (IndexError, ValueError):
        return _ITERATIONS


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8 and ::1 peers (what "bound to localhost" admits)."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class Session:
    """Who is logged in: ``role`` is ``viewer`` or ``operator``; ``sid`` ties the CSRF token."""

    user: str
    role: str
    sid: str
    exp: float

    @property
    def can_act(self) -> bool:
        return self.role == "operator"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Authenticator:
    """Checks credentials and signs/verifies sessions and CSRF tokens for one dashboard."""

    def __init__(self, config: DashboardConfig, *, clock: object = time.time) -> None:
        self.config = config
        # A per-process secret when none is configured: sessions end with the process, never leak.
        secret = config.session_secret or secrets.token_hex(32)
        self._key = hashlib.sha256(b"edgeloop-dashboard-session\0" + secret.encode()).digest()
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, tuple[int, float]] = {}  # throttle key -> (failures, locked until)
        self._revoked: dict[str, float] = {}  # session id -> its expiry
        # Checked when the user name is unknown, so every attempt costs one PBKDF2.
        iters = max([_ITERATIONS, *(_iterations(u.password_hash) for u in config.users)])
        self._dummy_hash = hash_password(secrets.token_hex(16), iterations=iters)

    def _now(self) -> float:
        return float(self._clock())  # type: ignore[operator]

    # ------------------------------------------------------------------ credentials
    def role_for_token(self, token: str | None) -> str | None:
        """``operator`` / ``viewer`` for a configured token, else None (constant time per token)."""
        if not token:
            return None
        for role, expected in (("operator", self.config.operator_token), ("viewer", self.config.viewer_token)):
            if expected and hmac.compare_digest(token.encode(), expected.encode()):
                return role
        return None

    def login(self, *, token: str | None = None, user: str | None = None,
              password: str | None = None, client: str | None = None) -> Session | None:
        """A new session for valid credentials, else None (also while the user name or
        ``client`` — the peer's address, when the caller knows it — is locked out)."""
        # Tokens are 128-bit secrets: throttled per client only (a global lock-out would let anyone lock them out).
        keys = [*([f"user:{user}"] if user and not token else []), *([f"client:{client}"] if client else [])]
        if self.locked_out(*keys):
            if user and password is not None and not token:
                verify_password(password, self._dummy_hash)  # a lock-out takes as long as a try
            return None
        role, name = None, None
        if token:
            role = self.role_for_token(token)
            name = f"{role}-token" if role else None
        elif user and password is not None:
            match = None
            for u in self.config.users:  # every name compared: no early exit
                if hmac.compare_digest(u.name.encode(), user.encode()):
                    match = u
            ok = verify_password(password, match.password_hash if match is not None else self._dummy_hash)
            if ok and match is not None:
                role, name = match.role, match.name
        if role is None or name is None:
            self._failed(keys)
            return None
        self._succeeded(keys)
        return Session(user=name, role=role, sid=secrets.token_hex(16), exp=self._now() + self.config.session_ttl_s)

    # ------------------------------------------------------------------ throttling
    def locked_out(self, *keys: str) -> bool:
        """Whether any of ``keys`` (``user:<name>``, ``client:<address>``) is locked out now."""
        now = self._now()
        with self._lock:
            return any(self._failures.get(k, (0, 0.0))[1] > now for k in keys)

    def _failed(self, keys: list[str]) -> None:
        now = self._now()
        with self._lock:
            for k in keys:
                n, _until = self._failures.pop(k, (0, 0.0))
                n += 1
                until = now + min(_MAX_LOCKOUT_S, _LOCKOUT_S * 2 ** (n - _MAX_FAILURES)) if n >= _MAX_FAILURES else 0.0
                self._failures[k] = (n, until)
            while len(self._failures) > _MAX_TRACKED:
                self._failures.pop(next(iter(self._failures)))

    def _succeeded(self, keys: list[str]) -> None:
        with self._lock:
            for k in keys:
                if not k.startswith("client:"):  # one good login does not clear a client's record
                    self._failures.pop(k, None)

    # ------------------------------------------------------------------ revocation
    def revoke(self, session: Session | None) -> None:
        """Log ``session`` out for good: its cookie is refused from now on (until it expires)."""
        if session is None:
            return
        now = self._now()
        with self._lock:
            self._revoked[session.sid] = session.exp
            if len(self._revoked) > _MAX_TRACKED:
                self._revoked = {s: e for s, e in self._revoked.items() if e >= now}
                while len(self._revoked) > _MAX_TRACKED:
                    self._revoked.pop(next(iter(self._revoked)))

    # ------------------------------------------------------------------ cookie
    def _sign(self, payload: bytes) -> str:
        return _b64(hmac.new(self._key, payload, hashlib.sha256).digest())

    def encode(self, session: Session) -> str:
        """The cookie value for ``session``."""
        payload = json.dumps({"u": session.user, "r": session.role, "s": session.sid, "e": session.exp},
                             separators=(",", ":")).encode()
        return f"{_b64(payload)}.{self._sign(payload)}"

    def decode(self, cookie: str | None) -> Session | None:
        """The session in a cookie, or None when missing, forged or expired."""
        if not cookie or cookie.count(".") != 1:
            return None
        body, sig = cookie.split(".")
        try:
            payload = _unb64(body)
        except (ValueError, TypeError):
            return None
        if not hmac.compare_digest(sig, self._sign(payload)):
            return None
        try:
            d = json.loads(payload)
            session = Session(user=str(d["u"]), role=str(d["r"]), sid=str(d["s"]), exp=float(d["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        if session.exp < self._now() or session.role not in ("viewer", "operator"):
            return None
        with self._lock:
            if session.sid in self._revoked:
                return None
        return session

    # ------------------------------------------------------------------ CSRF
    def csrf_token(self, sid: str) -> str:
        """The CSRF token bound to one session id (or one pre-login nonce)."""
        return self._sign(b"csrf:" + sid.encode())

    def check_csrf(self, sid: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), self.csrf_token(sid))


def main(argv: list[str] | None = None) -> int:
    """``python -m fleet.dashboard.auth hash``: print a password hash for fleet.toml."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["hash"]:
        print("usage: python -m fleet.dashboard.auth hash  (password on stdin or prompted)", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        print("error: use a password of at least 8 characters", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
