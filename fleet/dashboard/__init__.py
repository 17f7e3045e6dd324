"""The fleet dashboard: server-rendered pages on the fleet's FastAPI app, with a JSON twin for each.

    from fleet.dashboard import mount_dashboard
    mount_dashboard(app, ctx, fleet_config)      # adds /dashboard/... and /dashboard/api/...

See ``docs/dashboard.md``.  FastAPI and Jinja2 are imported here, so import this
package only where the fleet's HTTP server runs.
"""

from __future__ import annotations

from .auth import Authenticator, hash_password, verify_password
from .config import DashboardConfig, DashboardUser, dashboard_config_from
from .data import DashContext
from .routes import build_context, create_router, mount_dashboard

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
