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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from core.configfile import check, from_mapping, invalid, knob

__all__ = ["ROLES", "Role", "DashboardUser", "DashboardConfig", "dashboard_config_from"]

Role = Literal["viewer", "operator"]
ROLES: tuple[str, ...] = get_args(Role)


def _user_name(name: str) -> None:
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"{name!r} must be letters, digits, '-', '_' or '.'")


def _password_hash(value: str) -> None:
    if not value.startswith("pbkdf2_sha256$") or value.count("$") != 3:
        raise ValueError("expected pbkdf2_sha256$ITER$SALT$HASH (make one with `python -m fleet.dashboard.auth hash`)")


def _secret16(value: str) -> None:
    if len(value) < 16:
        raise ValueError("use at least 16 characters (e.g. `openssl rand -hex 16`)")


@dataclass(frozen=True)
class DashboardUser:
    """A user/password login; the password is stored as a PBKDF2 hash only."""

    name: str = knob(check=_user_name)
    password_hash: str = knob(check=_password_hash, secret=True)
    role: Role = "viewer"

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class DashboardConfig:
    """The dashboard's settings (``[dashboard]``); every field has a safe default."""

    enabled: bool = True
    operator_token: str | None = knob(None, secret=True, check=_secret16)
    viewer_token: str | None = knob(None, secret=True, check=_secret16)
    users: tuple[DashboardUser, ...] = ()  # [[dashboard.users]] tables
    session_secret: str | None = knob(None, secret=True, check=_secret16)  # None: random per process
    session_ttl_s: float = knob(12 * 3600.0, ge=60)
    cookie_secure: bool = False  # set when the fleet is served over HTTPS
    allow_remote: bool = False  # False: refuse non-loopback clients even if the API listens on 0.0.0.0
    refresh_s: float = knob(2.0, ge=0.2, le=3600)
    page_size: int = knob(50, ge=5, le=1000)

    def __post_init__(self) -> None:
        check(self)
        if self.operator_token and self.operator_token == self.viewer_token:
            raise invalid("viewer_token", "must differ from operator_token")
        if len({u.name for u in self.users}) != len(self.users):
            raise invalid("users", "user names must be unique")

    @property
    def has_logins(self) -> bool:
        return bool(self.operator_token or self.viewer_token or self.users)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "fleet.toml") -> DashboardConfig:
        """Build from a parsed ``[dashboard]`` table; unknown keys are refused (typos must not pass)."""
        return from_mapping(cls, data, source=source, at=("dashboard",))


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
