"""The dashboard's FastAPI router: HTML pages, their JSON twins, sample images, POST actions.

``create_router(ctx, config)`` returns an ``APIRouter`` (prefix ``/dashboard``) that the
fleet's FastAPI app includes (:func:`mount_dashboard`).  Each page ``/dashboard/X`` is
rendered from the same dict that ``/dashboard/api/X`` returns (see :mod:`.data`), and
the JSON endpoints appear in the app's OpenAPI schema under the ``dashboard`` tag.
"""

from __future__ import annotations

import math
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from core.errors import EdgeloopError, ProtocolError
from core.protocol import parse_json

from ..config import FleetConfig
from ..registry import Registry
from . import actions, data
from .auth import PRELOGIN_COOKIE, SESSION_COOKIE, Authenticator, Session, is_loopback
from .config import DashboardConfig, dashboard_config_from
from .views import Views

if TYPE_CHECKING:
    from ..app import FleetApp

__all__ = ["create_router", "mount_dashboard", "build_context"]

_STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def build_context(source: Registry | data.DashContext | FleetApp, config: Any = None, *,
                  page_size: int = 50) -> data.DashContext:
    """The pages' :class:`DashContext`: a running fleet's (:attr:`FleetApp.dashboard`, with its rollout
    driver), ``source`` itself, or one over a bare registry.

    Over a registry with a :class:`FleetConfig` the pages know the fleet's samples, retraining
    policy and rollout defaults, but have no rollout driver (no MQTT link): no rollout actions.
    """
    from ..app import FleetApp

    if isinstance(source, FleetApp):
        return source.dashboard
    if isinstance(source, data.DashContext):
        return source
    if not isinstance(source, Registry):
        raise TypeError(f"the dashboard needs a Registry or a DashContext, not {type(source).__name__}")
    if isinstance(config, FleetConfig):
        return data.DashContext.for_fleet(config, source, page_size=page_size)
    return data.DashContext(registry=source, page_size=page_size)


def _int(v: str | None, default: int = 1) -> int:
    try:
        return max(1, int(v)) if v else default
    except ValueError:
        return default


def _bool(v: str | None) -> bool | None:
    return None if v in (None, "", "any") else v in ("1", "true", "yes", "on")


def _float(v: str | None) -> float | None:
    try:
        f = float(v) if v not in (None, "") else None
    except ValueError:
        return None
    return f if f is None or math.isfinite(f) else None  # "nan" / "inf" filter nothing


async def _form(request: Request) -> dict[str, str]:
    """The POST body as a flat dict: JSON or url-encoded (no python-multipart dependency)."""
    body = await request.body()
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            parsed = parse_json(body or b"{}", what="request body")
        except ProtocolError as exc:
            raise HTTPException(400, str(exc)) from exc
        if not isinstance(parsed, dict):
            raise HTTPException(400, "body must be a JSON object of form fields")
        return {str(k): str(v) for k, v in parsed.items()}
    return {k: v[-1] for k, v in urllib.parse.parse_qs(body.decode(errors="replace"), keep_blank_values=True).items()}


async def _upload_form(request: Request) -> dict[str, Any]:
    """A ``multipart/form-data`` POST (the models page's upload form) as a dict: text fields as
    ``str``, the ``bundle`` file as bytes and its name as ``filename`` (parsed with the standard
    library's MIME parser: no python-multipart dependency).  A raw body (``application/octet-stream``,
    what scripts send) is the bundle itself, named by ``?filename=``."""
    from email.parser import BytesParser
    from email.policy import HTTP

    ctype = request.headers.get("content-type", "")
    length = int(request.headers.get("content-length") or 0)
    if length > actions.MAX_UPLOAD_BYTES + 65536:
        raise HTTPException(413, f"upload larger than {actions.MAX_UPLOAD_BYTES >> 20} MB")
    body = await request.body()
    if not ctype.startswith("multipart/form-data"):
        return {"bundle": body, "filename": Path(request.query_params.get("filename") or "upload.elb").name}
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise HTTPException(400, "malformed multipart body")
    out: dict[str, Any] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "bundle":
            out["bundle"], out["filename"] = payload, Path(part.get_filename() or "upload.elb").name
        elif isinstance(name, str):
            out[name] = payload.decode("utf-8", errors="replace")
    return out


def _safe_next(url: str | None, prefix: str) -> str:
    # Only same-site paths under the dashboard: an open redirect would help phishing.
    if url and url.startswith(prefix) and not url.startswith("//") and "\\" not in url:
        return url
    return prefix + "/"


def create_router(source: Registry | data.DashContext | FleetApp, config: Any = None, *, prefix: str = "/dashboard",
                  clock: Callable[[], float] = time.time) -> APIRouter:
    """The dashboard router.  ``config``: FleetConfig (its ``dashboard``), DashboardConfig, dict or None."""
    cfg: DashboardConfig = dashboard_config_from(config)
    ctx = build_context(source, config, page_size=cfg.page_size)
    auth = Authenticator(cfg, clock=clock)
    views = Views(prefix=prefix, refresh_s=cfg.refresh_s)
    router = APIRouter(prefix=prefix, tags=["dashboard"])
    static_dir = Path(__file__).parent / "static"

    def who(request: Request) -> tuple[Session | None, bool]:
        """(session, via_bearer); raises 403 for remote clients unless allowed."""
        if not cfg.allow_remote and not is_loopback(request.client.host if request.client else None):
            raise HTTPException(403, "the dashboard only answers loopback clients (set dashboard.allow_remote)")
        authz = request.headers.get("authorization", "")
        if authz.lower().startswith("bearer "):
            role = auth.role_for_token(authz[7:].strip())
            if role is None:
                raise HTTPException(401, "invalid bearer token")
            return Session(user=f"{role}-token", role=role, sid="bearer", exp=clock() + 60), True
        return auth.decode(request.cookies.get(SESSION_COOKIE)), False

    def page(name: str, request: Request, build: Callable[[], dict[str, Any]], **extra: Any) -> Response:
        session, _ = who(request)
        if session is None:
            nxt = urllib.parse.quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
            return RedirectResponse(f"{prefix}/login?next={nxt}", status_code=303)
        try:
            payload = build()
        except EdgeloopError as exc:
            return HTMLResponse(views.render("error.html", session=session, csrf=auth.csrf_token(session.sid),
                                             error=str(exc), hint=exc.hint), status_code=404)
        html = views.render(name, session=session, csrf=auth.csrf_token(session.sid), d=payload,
                            partial=request.headers.get("x-live") == "1", msg=request.query_params.get("msg"),
                            err=request.query_params.get("err"), **extra)
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    def api(request: Request, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        session, _ = who(request)
        if session is None:
            raise HTTPException(401, "log in at /dashboard/login or send Authorization: Bearer <token>")
        try:
            return build()
        except EdgeloopError as exc:
            raise HTTPException(404, f"{exc}") from exc

    async def act(request: Request, fn: Callable[[dict[str, Any], Session], dict[str, Any]],
                  back: str, *, parse: Callable[[Request], Any] = _form) -> Response:
        """Run a POST action: operator role, CSRF (cookie sessions), JSON or redirect answer."""
        session, bearer = who(request)
        wants_json = "application/json" in request.headers.get("accept", "") or bearer
        if session is None:
            raise HTTPException(401, "not logged in")
        form = await parse(request)
        if not bearer and not auth.check_csrf(session.sid, form.get("csrf_token")
                                               or request.headers.get("x-csrf-token")):
            raise HTTPException(403, "missing or wrong CSRF token (reload the page)")
        if not session.can_act:
            raise HTTPException(403, f"user {session.user} is read-only (operator role needed)")
        nxt = _safe_next(form.get("next") or back, prefix)
        sep = "&" if "?" in nxt else "?"
        try:
            result = fn(form, session)
        except EdgeloopError as exc:
            if wants_json:
                return JSONResponse({"error": exc.message, "hint": exc.hint}, status_code=400)
            text = exc.message + (f" — {exc.hint}" if exc.hint else "")
            return RedirectResponse(f"{nxt}{sep}err={urllib.parse.quote(text)}", status_code=303)
        if wants_json:
            return JSONResponse(result)
        nxt = _safe_next(form.get("next") or back, prefix)  # the action may have named where to go
        sep = "&" if "?" in nxt else "?"
        note = result.get("message") or ", ".join(f"{k}={v}" for k, v in result.items() if k != "plan")
        return RedirectResponse(f"{nxt}{sep}msg={urllib.parse.quote(str(note))}", status_code=303)

    # ------------------------------------------------------------------ login
    @router.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request, next: str | None = None, err: str | None = None) -> Response:
        who(request)  # the loopback check
        nonce = request.cookies.get(PRELOGIN_COOKIE) or auth.csrf_token(str(clock()) + str(id(request)))[:24]
        html = views.render("login.html", session=None, csrf=auth.csrf_token("pre:" + nonce), d={},
                            next=_safe_next(next, prefix), err=err, has_logins=cfg.has_logins,
                            has_users=bool(cfg.users), partial=False, msg=None)
        resp = HTMLResponse(html, headers={"Cache-Control": "no-store"})
        resp.set_cookie(PRELOGIN_COOKIE, nonce, httponly=True, samesite="strict", secure=cfg.cookie_secure,
                        path=prefix)
        return resp

    @router.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        who(request)  # the loopback check
        form = await _form(request)
        nonce = request.cookies.get(PRELOGIN_COOKIE, "")
        nxt = _safe_next(form.get("next"), prefix)
        if not nonce or not auth.check_csrf("pre:" + nonce, form.get("csrf_token")):
            raise HTTPException(403, "missing or wrong CSRF token (reload the login page)")
        session = auth.login(token=form.get("token") or None, user=form.get("username") or None,
                             password=form.get("password"), client=request.client.host if request.client else None)
        if session is None:
            q = urllib.parse.urlencode({"next": nxt, "err": "wrong token or user/password"})
            return RedirectResponse(f"{prefix}/login?{q}", status_code=303)
        resp = RedirectResponse(nxt, status_code=303)
        resp.set_cookie(SESSION_COOKIE, auth.encode(session), max_age=int(cfg.session_ttl_s), httponly=True,
                        samesite="strict", secure=cfg.cookie_secure, path=prefix)
        resp.delete_cookie(PRELOGIN_COOKIE, path=prefix)
        return resp

    @router.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        session, via_bearer = who(request)
        form = await _form(request)
        if session is not None and not auth.check_csrf(session.sid, form.get("csrf_token")):
            raise HTTPException(403, "missing or wrong CSRF token")
        if not via_bearer:  # a bearer token is not a session: revoke only cookies
            auth.revoke(session)  # the cookie stops working even if a copy of it survives
        resp = RedirectResponse(f"{prefix}/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path=prefix)
        return resp

    # ------------------------------------------------------------------ static and images
    @router.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in _STATIC:
            raise HTTPException(404)
        return Response((static_dir / name).read_bytes(), media_type=_STATIC[name],
                        headers={"Cache-Control": "max-age=300"})

    @router.get("/samples/{sample_id}.png", include_in_schema=False)
    def sample_png(sample_id: str, request: Request) -> Response:
        if who(request)[0] is None:
            raise HTTPException(401)
        return Response(views.sample_png(ctx, sample_id), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    # ------------------------------------------------------------------ pages + JSON twins
    q = lambda r, k: r.query_params.get(k)  # noqa: E731 - short accessor keeps the route table readable
    builders: dict[str, tuple[str, Callable[[Request], dict[str, Any]]]] = {
        "": ("overview.html", lambda r: data.overview(ctx)),
        "devices": ("devices.html", lambda r: data.devices_page(ctx, page=_int(q(r, "page")), q=q(r, "q"),
                                                                 online=_bool(q(r, "online")),
                                                                 alarm=_bool(q(r, "alarm")))),
        "drift": ("drift.html", lambda r: data.drift_overview(ctx, since=_float(q(r, "since")),
                                                               page=_int(q(r, "page")))),
        "labels": ("labels.html", lambda r: data.labelling(ctx, page=_int(q(r, "page")),
                                                            device_id=q(r, "device") or None)),
        "samples": ("samples.html", lambda r: data.samples_page(
            ctx, device_id=q(r, "device") or None, labelled=_bool(q(r, "labelled")), since=_float(q(r, "since")),
            until=_float(q(r, "until")), page=_int(q(r, "page")))),
        "models": ("models.html", lambda r: data.models_page(ctx)),
        "rollouts": ("rollouts.html", lambda r: data.rollouts_page(ctx)),
    }

    def add_page(path: str, template: str, build: Callable[[Request], dict[str, Any]]) -> None:
        name = path or "overview"

        def html_route(request: Request) -> Response:
            return page(template, request, lambda: build(request), active=name)

        def json_route(request: Request) -> dict[str, Any]:
            return api(request, lambda: build(request))

        router.add_api_route(f"/{path}", html_route, methods=["GET"], include_in_schema=False,
                             response_class=HTMLResponse, name=f"dashboard_{name}")
        router.add_api_route(f"/api/{name}", json_route, methods=["GET"], name=f"dashboard_api_{name}",
                             summary=f"Dashboard data: {name}", response_model=None)

    for path, (template, build) in builders.items():
        add_page(path, template, build)

    @router.get("/devices/{device_id}", response_class=HTMLResponse, include_in_schema=False)
    def device_page(device_id: str, request: Request) -> Response:
        return page("device.html", request, lambda: data.device_detail(ctx, device_id, log_level=q(request, "level")),
                    active="devices")

    @router.get("/api/devices/{device_id}", summary="Dashboard data: one device", response_model=None)
    def device_api(device_id: str, request: Request) -> dict[str, Any]:
        return api(request, lambda: data.device_detail(ctx, device_id, log_level=q(request, "level")))

    @router.get("/rollouts/{rollout_id}", response_class=HTMLResponse, include_in_schema=False)
    def rollout_page(rollout_id: str, request: Request) -> Response:
        return page("rollout.html", request, lambda: data.rollout_detail(ctx, rollout_id), active="rollouts")

    @router.get("/api/rollouts/{rollout_id}", summary="Dashboard data: one rollout", response_model=None)
    def rollout_api(rollout_id: str, request: Request) -> dict[str, Any]:
        return api(request, lambda: data.rollout_detail(ctx, rollout_id))

    # ------------------------------------------------------------------ actions
    @router.post("/actions/label", summary="Label a sample (operator; CSRF token or bearer)")
    async def label_action(request: Request) -> Response:
        return await act(request, lambda f, s: actions.label_sample(ctx, f.get("sample_id", ""), f.get("label", ""),
                                                                     user=s.user), f"{prefix}/labels")

    @router.post("/actions/rollout", summary="Start a staged rollout (operator; CSRF token or bearer)")
    async def rollout_action(request: Request) -> Response:
        def run(f: dict[str, str], s: Session) -> dict[str, Any]:
            out = actions.start_rollout(ctx, f.get("name", ""), f.get("version", ""),
                                        canary=f.get("canary") or "10%", waves=f.get("waves") or "25,50,100",
                                        soak=f.get("soak") or "60s", max_failures=f.get("max_failures") or "5%",
                                        job_timeout=f.get("job_timeout") or None, target=f.get("target") or None)
            out["message"] = f"rollout {out['rollout_id']} started over {out['devices']} devices ({out['target']})"
            f.setdefault("next", f"{prefix}/rollouts/{out['rollout_id']}")
            return out

        return await act(request, run, f"{prefix}/rollouts")

    @router.post("/actions/models", summary="Register a signed bundle (operator; multipart form or raw body)")
    async def model_upload(request: Request) -> Response:
        return await act(request, lambda f, s: actions.upload_model(ctx, f.get("bundle") or b"",
                                                                     f.get("filename") or "upload.elb"),
                         f"{prefix}/models", parse=_upload_form)

    @router.post("/actions/devices/{device_id}/group", summary="Set a device's group tag (operator)")
    async def group_action(device_id: str, request: Request) -> Response:
        return await act(request, lambda f, s: actions.set_device_group(ctx, device_id, f.get("group", "")),
                         f"{prefix}/devices/{urllib.parse.quote(device_id)}")

    @router.post("/actions/devices/{device_id}/logs", summary="Ask a device for its recent log lines (operator)")
    async def logs_action(device_id: str, request: Request) -> Response:
        return await act(request, lambda f, s: actions.request_device_logs(ctx, device_id),
                         f"{prefix}/devices/{urllib.parse.quote(device_id)}#logs")

    @router.post("/actions/rollouts/{rollout_id}/{verb}", summary="pause / resume / abort / rollback a rollout")
    async def rollout_verb(rollout_id: str, verb: str, request: Request) -> Response:
        return await act(request, lambda f, s: actions.rollout_command(ctx, rollout_id, verb, user=s.user),
                         f"{prefix}/rollouts/{rollout_id}")

    return router


def mount_dashboard(app: FastAPI, source: Registry | data.DashContext | FleetApp, config: Any = None, *,
                    prefix: str = "/dashboard") -> APIRouter:
    """Include the dashboard in ``app`` (also redirects ``/`` to it when ``/`` is free)."""
    router = create_router(source, config, prefix=prefix)
    app.include_router(router)
    if not any(getattr(r, "path", None) == "/" for r in app.routes):
        app.add_api_route("/", lambda: RedirectResponse(prefix + "/"), include_in_schema=False)
    return router
