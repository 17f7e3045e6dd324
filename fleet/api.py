"""The fleet's HTTP API (FastAPI): status as JSON, and bundles with range requests.

    GET /api/status            counts (devices online/offline/alarming, versions, samples, rollouts)
    GET /api/devices           ?online=&alarm=
    GET /api/devices/{id}      one device with its recent drift reports and job statuses
    GET /api/devices/{id}/logs  ?lines=&level= the device's stored log lines (remote logs)
    POST /api/devices/{id}/logs/request        ask the device for its new lines (202)
    GET /api/drift             ?device_id=&since=&limit=
    GET /api/models            ?name=&status=
    GET /api/rollouts          with per-status target counts
    GET /api/samples           ?device_id=&labelled=&limit=&offset= (paginated)
    GET /api/concept-drift     ?model_version=&since= feedback accuracy per slice (device, group, class, hour)
                               and the concept-drift alarms (fleet.concept_drift); default: the model in service
    GET /bundles/{name}/{version}.elb   the signed bundle; Range -> 206 (resumable downloads)
    GET /metrics               Prometheus text: ingestion, refusals per rule and device (fleet.metrics)
    GET /api/openapi.json      the OpenAPI schema

``/api/*`` and ``/metrics`` need ``Authorization: Bearer <api.token>`` when a token is
configured; bundles too with ``api.bundle_auth`` (devices verify the signature anyway, so
a bundle is not secret by default).  The schema is not public (no ``/openapi.json``, no
``/docs``): it is served under ``/api/`` with the same token.
The server binds to 127.0.0.1 unless ``[api].host`` says otherwise.  FastAPI is imported
at module level (its dependency injection resolves annotations from module globals);
``fleet.cli`` imports this module only inside ``serve``.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response

from core.errors import FleetError

from .config import FleetConfig
from .registry import Registry

__all__ = ["create_app", "ApiServer"]


def create_app(config: FleetConfig, registry: Registry, *, ctx: Any = None) -> Any:
    """The FastAPI application over ``registry``."""
    app = FastAPI(title="edgeloop fleet", version="1", description="Fleet registry and bundle server.",
                  openapi_url=None, docs_url=None, redoc_url=None)
    token = config.api.token

    def auth(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    def bundle_auth(request: Request) -> None:
        if config.api.bundle_auth:
            auth(request)

    def plain(obj: Any) -> Any:
        return dataclasses.asdict(obj)

    @app.get("/api/status", dependencies=[Depends(auth)])
    def status() -> dict[str, Any]:
        return plain(registry.status())

    @app.get("/api/devices", dependencies=[Depends(auth)])
    def devices(online: bool | None = None, alarm: bool | None = None) -> list[dict[str, Any]]:
        return [plain(d) for d in registry.devices(online=online, alarm=alarm)]

    @app.get("/api/devices/{device_id}", dependencies=[Depends(auth)])
    def device(device_id: str, history: int = Query(20, ge=0, le=1000)) -> dict[str, Any]:
        rec = registry.device(device_id)
        if rec is None:
            raise HTTPException(status_code=404, detail=f"no device {device_id}")
        jobs = registry.job_statuses(device_id=device_id)[-history:] if history else []
        return {**plain(rec), "drift": [plain(r) for r in registry.drift_reports(device_id=device_id,
                                                                                 limit=history)],
                "jobs": [plain(j) for j in jobs]}

    @app.get("/api/devices/{device_id}/logs", dependencies=[Depends(auth)])
    def device_logs(device_id: str, lines: int = Query(200, ge=1, le=1000),
                    level: str = Query("DEBUG", pattern="^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")) -> dict[str, Any]:
        """The device's stored log lines (newest ``lines`` at ``level`` or above, oldest first)."""
        from .remote_logs import device_logs as stored_logs

        if registry.device(device_id) is None:
            raise HTTPException(status_code=404, detail=f"no device {device_id}")
        return stored_logs(registry, device_id, lines=lines, min_level=level)

    @app.post("/api/devices/{device_id}/logs/request", dependencies=[Depends(auth)], status_code=202)
    def request_device_logs(device_id: str) -> dict[str, Any]:
        """Ask the device for its new lines; ingestion stores the answer (GET the route above after it)."""
        from core.protocol import TopicScheme

        from .remote_logs import request_logs

        if registry.device(device_id) is None:
            raise HTTPException(status_code=404, detail=f"no device {device_id}")
        publisher = getattr(ctx, "publisher", None)  # FleetApp: ingestion's MQTT link
        if publisher is None:
            raise HTTPException(status_code=503, detail="this API has no MQTT connection to reach devices")
        req = request_logs(publisher.publish, TopicScheme(config.prefix), registry, device_id)
        return {"device_id": device_id, "request_id": req.request_id}

    @app.get("/api/drift", dependencies=[Depends(auth)])
    def drift(device_id: str | None = None, since: float | None = Query(None, allow_inf_nan=False),
              limit: int = Query(1000, ge=1, le=100_000)) -> list[dict[str, Any]]:
        return [plain(r) for r in registry.drift_reports(device_id=device_id, since=since, limit=limit)]

    @app.get("/api/models", dependencies=[Depends(auth)])
    def models(name: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        return [plain(m) for m in registry.models(name=name, status=status)]

    @app.get("/api/rollouts", dependencies=[Depends(auth)])
    def rollouts() -> list[dict[str, Any]]:
        out = []
        for r in registry.rollouts():
            counts: dict[str, int] = {}
            for t in registry.rollout_targets(r.id):
                counts[t.status] = counts.get(t.status, 0) + 1
            out.append({**plain(r), "targets": counts})
        return out

    @app.get("/api/samples", dependencies=[Depends(auth)])
    def samples(device_id: str | None = None, labelled: bool | None = None,
                limit: int = Query(100, ge=1, le=10_000), offset: int = Query(0, ge=0)) -> dict[str, Any]:
        ids = [device_id] if device_id else None
        items = registry.samples(device_ids=ids, labelled=labelled, limit=limit, offset=offset)
        return {"items": [plain(s) for s in items], "total": registry.count_samples(device_ids=ids, labelled=labelled),
                "limit": limit, "offset": offset}

    @app.get("/api/concept-drift", dependencies=[Depends(auth)])
    def concept_drift(model_version: str | None = None,
                      since: float | None = Query(None, allow_inf_nan=False)) -> dict[str, Any]:
        from .concept_drift import fleet_concept_drift

        return fleet_concept_drift(registry, config, model_version=model_version, since=since).to_dict()

    @app.get("/bundles/{name}/{version}.elb", dependencies=[Depends(bundle_auth)])
    def bundle(name: str, version: str) -> Any:
        rec = registry.model(name, version)
        if rec is None or not rec.bundle_path or rec.signed_by is None:
            # only bundles that went through register_model (signature verified) are served
            raise HTTPException(status_code=404, detail=f"no signed bundle {name} {version}")
        path = Path(rec.bundle_path)
        if not path.is_file():
            raise HTTPException(status_code=410, detail=f"bundle file of {name} {version} is gone")
        # Starlette's FileResponse answers Range requests with 206 (and 416 when unsatisfiable).
        return FileResponse(path, media_type="application/zip", filename=f"{name}-{version}.elb",
                            headers={"ETag": f'"{rec.sha256}"', "X-Bundle-SHA256": rec.sha256 or ""})

    @app.get("/api/openapi.json", dependencies=[Depends(auth)], include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/metrics", dependencies=[Depends(auth)], include_in_schema=False)
    def metrics() -> Response:
        from .metrics import CONTENT_TYPE, render_metrics

        return Response(render_metrics(getattr(ctx, "ingest", None), registry), media_type=CONTENT_TYPE)

    if config.dashboard.enabled:
        from fleet.dashboard import mount_dashboard

        mount_dashboard(app, ctx if ctx is not None else registry, config)
    return app


class ApiServer:
    """uvicorn in a background thread; ``port`` is the bound port (``[api].port = 0``: any free one)."""

    def __init__(self, config: FleetConfig, registry: Registry, *, ctx: Any = None) -> None:
        import uvicorn

        self._config = uvicorn.Config(create_app(config, registry, ctx=ctx), host=config.api.host, port=config.api.port,
                                      log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None
        self.host = config.api.host
        self.port = config.api.port

    def start(self, timeout: float = 15.0) -> ApiServer:
        self._thread = threading.Thread(target=self._server.run, name="fleet-api", daemon=True)
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout / 0.05)):
            if self._server.started:
                break
            if not self._thread.is_alive():
                raise FleetError(f"the fleet API could not start on {self.host}:{self.port}",
                                 hint="is the port in use? set [api].port")
            deadline.wait(0.05)
        else:
            raise FleetError("the fleet API did not start in time")
        sockets = [s for srv in self._server.servers for s in srv.sockets]
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
