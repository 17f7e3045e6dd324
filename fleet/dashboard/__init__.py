"""The fleet dashboard: server-rendered pages on the fleet's FastAPI app, with a JSON twin for each.

    from fleet.dashboard import mount_dashboard
    mount_dashboard(app, ctx, fleet_config)      # adds /dashboard/... and /dashboard/api/...

See ``docs/dashboard.md``.  Importing the package is light (``fleet.config`` may import
``DashboardConfig`` from here); FastAPI, Jinja2 and SQLAlchemy load on first use of the
router.
"""

from __future__ import annotations

import importlib
from typing import Any

from .auth import Authenticator, hash_password, verify_password
from .config import DashboardConfig, DashboardUser, dashboard_config_from

_LAZY = {"DashContext": ".data", "build_context": ".routes", "create_router": ".routes",
         "mount_dashboard": ".routes"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DashboardConfig",
    "DashboardUser",
    "dashboard_config_from",
    "DashContext",
    "Authenticator",
    "hash_password",
    "verify_password",
    "build_context",
    "create_router",
    "mount_dashboard",
]
