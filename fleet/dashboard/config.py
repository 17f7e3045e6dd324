"""``[dashboard]`` in fleet.toml: who may log in, and how the session cookie is made.

    [dashboard]
    operator_token = "…"          # log in with this token -> operator (may act)
    viewer_token = "…"            # log in with this token -> read-only
    allow_remote = false          # only loopback clients may open the dashboard
    session_ttl_s = 43200
    refresh_s = 2.0               # live refresh period of the pages
    page_size = 50

    [[dashboard.users]]           # user/password logins (hash: `python -m fleet.dashboard.auth hash`)
    name = "alice"
    role = "operator"
    password_hash = "pbkdf2_sha256$200000$…$…"

Tokens and the session secret are secrets: keep fleet.toml readable by the fleet only.
Without any token or user the dashboard shows its login page and explains what to set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.errors import ConfigError

__all__ = ["ROLES", "DashboardUser", "DashboardConfig", "dashboard_config_from"]

ROLES = ("viewer", "operator")


def _bad(key: str, why: str) -> ConfigError:
    return ConfigError(f"fleet config: dashboard.{key} is invalid: {why}", hint=f"fix `{key}` in [dashboard]",
                       key=f"dashboard.{key}")


@dataclass(frozen=True)
class DashboardUser:
    """A user/password login; the password is stored as a PBKDF2 hash only."""

    name: str
    password_hash: str
    role: str = "viewer"

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise _bad("users.name", f"{self.name!r} must be letters, digits, '-', '_' or '.'")
        if self.role not in ROLES:
            raise _bad("users.role", f"{self.role!r} is not one of {', '.join(ROLES)}")
        if not self.password_hash.startswith("pbkdf2_sha256$") or self.password_hash.count("$") != 3:
            raise _bad("users.password_hash", "expected pbkdf2_sha256$ITER$SALT$HASH "
                                              "(make one with `python -m fleet.dashboard.auth hash`)")


@dataclass(frozen=True)
class DashboardConfig:
    """The dashboard's settings (``[dashboard]``); every field has a safe default."""

    enabled: bool = True
    operator_token: str | None = None
    viewer_token: str | None = None
    users: tuple[DashboardUser, ...] = ()
    session_secret: str | None = None  # None: a random secret per process (logins end at restart)
    session_ttl_s: float = 12 * 3600.0
    cookie_secure: bool = False  # set when the fleet is served over HTTPS
    allow_remote: bool = False  # False: refuse non-loopback clients even if the API listens on 0.0.0.0
    refresh_s: float = 2.0
    page_size: int = 50

    def __post_init__(self) -> None:
        users = tuple(u if isinstance(u, DashboardUser) else DashboardUser(**dict(u)) for u in self.users)
        object.__setattr__(self, "users", users)
        for key in ("operator_token", "viewer_token", "session_secret"):
            value = getattr(self, key)
            if value is not None and len(value) < 16:
                raise _bad(key, "use at least 16 characters (e.g. `openssl rand -hex 16`)")
        if self.operator_token and self.operator_token == self.viewer_token:
            raise _bad("viewer_token", "must differ from operator_token")
        if len({u.name for u in users}) != len(users):
            raise _bad("users", "user names must be unique")
        if self.session_ttl_s < 60:
            raise _bad("session_ttl_s", "at least 60 seconds")
        if not 0.2 <= self.refresh_s <= 3600:
            raise _bad("refresh_s", "between 0.2 and 3600 seconds")
        if not 5 <= self.page_size <= 1000:
            raise _bad("page_size", "between 5 and 1000")

    @property
    def has_logins(self) -> bool:
        return bool(self.operator_token or self.viewer_token or self.users)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DashboardConfig:
        """Build from a parsed ``[dashboard]`` table; unknown keys are refused (typos must not pass)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"fleet config: unknown key dashboard.{unknown[0]}",
                              hint=f"known keys in [dashboard]: {', '.join(sorted(names))}",
                              key=f"dashboard.{unknown[0]}")
        d = dict(data)
        if "users" in d:
            try:
                d["users"] = tuple(DashboardUser(**dict(u)) for u in d["users"])
            except TypeError as exc:
                raise _bad("users", f"each user needs name, password_hash and role ({exc})") from exc
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"fleet config: bad value in [dashboard]: {exc}", key="dashboard") from exc


def dashboard_config_from(config: Any) -> DashboardConfig:
    """The dashboard settings from a DashboardConfig, a FleetConfig (its ``dashboard``), a dict or None."""
    if isinstance(config, DashboardConfig):
        return config
    if config is None:
        return DashboardConfig()
    if isinstance(config, Mapping):
        return DashboardConfig.from_dict(config)
    found = getattr(config, "dashboard", None)
    if found is None:
        return DashboardConfig()
    return dashboard_config_from(found)
