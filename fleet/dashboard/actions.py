"""What an operator can do from the dashboard: label samples, register models, tag devices,
start and steer rollouts.

Each action is a plain function over :class:`~fleet.dashboard.data.DashContext` that
calls the registry or the rollout driver (:class:`fleet.rollout_driver.RolloutDriver`)
exactly as the CLI does, and returns a JSON-ready result.  Routes check the role and
the CSRF token before calling them; errors are :class:`EdgeloopError` subclasses with
a hint, which the routes show as a flash message (HTML) or a 4xx body (JSON).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

from core.errors import ConfigError, EdgeloopError, FleetError, RolloutError

from .data import DashContext, class_names, model_labels, parse_shares

__all__ = ["label_sample", "start_rollout", "rollout_command", "ROLLOUT_VERBS", "parse_duration", "upload_model",
           "set_device_group", "request_device_logs", "MAX_UPLOAD_BYTES"]

MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # a bundle of a few models; the body is read into memory

ROLLOUT_VERBS = ("pause", "resume", "abort", "rollback")


def label_sample(ctx: DashContext, sample_id: str, label: str, *, user: str = "operator") -> dict[str, Any]:
    """Record the true label of one sample (source ``operator``); the label must be a class of the model."""
    rec = ctx.registry.sample(sample_id)
    if rec is None:
        raise FleetError(f"no sample {sample_id}", hint="it may have been deleted; reload the page")
    label = label.strip()
    classes = model_labels(ctx)  # authoritative only when the model's manifest is readable
    if not label or len(label) > 128 or not label.isprintable() or (classes is not None and label not in classes):
        raise FleetError(f"label {label!r} is not a class of the model",
                         hint=f"one of {', '.join(classes or class_names(ctx))}")
    n = ctx.registry.label_samples([(sample_id, label, "operator")])
    return {"sample_id": sample_id, "label": label, "labelled": n, "by": user}


def parse_duration(text: str | float) -> float:
    """``"60s"`` / ``"2m"`` / ``"1h"`` / ``"30"`` -> seconds."""
    s = str(text).strip().lower()
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(s[-1:], None)
    try:
        return float(s[:-1]) * scale if scale else float(s)
    except ValueError as exc:
        raise ConfigError(f"bad duration {text!r}", hint="e.g. 60s, 2m or 1h") from exc


def _require_driver(ctx: DashContext) -> Any:
    driver = ctx.get_driver()
    if driver is None:
        raise RolloutError("this dashboard has no rollout driver (the fleet's MQTT link)",
                           hint="open the dashboard served by `edgeloop fleet serve`")
    return driver


def upload_model(ctx: DashContext, data: bytes, filename: str = "upload.elb") -> dict[str, Any]:
    """Register an uploaded bundle exactly as ``edgeloop fleet model add`` does (:func:`fleet.setup.add_model`):
    verified against the fleet's trusted keys, stored signed by the fleet.  Nothing is stored when it fails."""
    from ..setup import add_model

    cfg = ctx.config
    if cfg is None:
        raise FleetError("this dashboard does not know the fleet's config (trusted keys, bundle store)",
                         hint="use the dashboard served by `edgeloop fleet serve`, or `edgeloop fleet model add`")
    if not data:
        raise FleetError("no bundle uploaded", hint="choose a signed .elb file (edgeloop bundle create --sign)")
    if len(data) > MAX_UPLOAD_BYTES:
        raise FleetError(f"bundle {filename} is larger than {MAX_UPLOAD_BYTES >> 20} MB",
                         hint="register it with `edgeloop fleet model add` on the fleet host")
    cfg.bundles_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".elb", dir=cfg.bundles_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            rec = add_model(cfg, ctx.registry, Path(tmp))
        except EdgeloopError as exc:  # name the file the operator chose, not our temporary copy
            text = exc.message.replace(str(Path(tmp).resolve()), filename).replace(tmp, filename)
            raise FleetError(f"bundle not registered: {text}", hint=exc.hint) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {"name": rec.name, "version": rec.version, "status": rec.status, "signed_by": rec.signed_by,
            "sha256": rec.sha256, "message": f"registered {rec.name} {rec.version} from {filename}"}


def set_device_group(ctx: DashContext, device_id: str, group: str) -> dict[str, Any]:
    """Set (or, with an empty ``group``, clear) a device's ``group`` tag: rollouts target it (``group=...``)."""
    if ctx.registry.devices.get(device_id) is None:
        raise FleetError(f"no device {device_id}", device_id=device_id, hint="see the devices page")
    group = group.strip()
    if len(group) > 64 or not all(c.isalnum() or c in "-_." for c in group):
        raise ConfigError(f"group {group!r} is not a plain name", hint="letters, digits, - _ . (e.g. cams-north)")
    ctx.registry.devices.upsert(device_id, tags={"group": group or None})
    return {"device_id": device_id, "group": group or None,
            "message": f"{device_id}: group {group}" if group else f"{device_id}: no group"}


def request_device_logs(ctx: DashContext, device_id: str) -> dict[str, Any]:
    """Ask a device for its new log lines (:func:`fleet.remote_logs.request_logs`); ingestion stores the answer."""
    from ..remote_logs import request_logs

    if ctx.registry.devices.get(device_id) is None:
        raise FleetError(f"no device {device_id}", device_id=device_id, hint="see the devices page")
    driver = _require_driver(ctx)
    req = request_logs(driver.publisher.publish, driver.topics, ctx.registry, device_id)
    return {"device_id": device_id, "request_id": req.request_id,
            "message": f"asked {device_id} for its log lines: reload in a second"}


def start_rollout(ctx: DashContext, name: str, version: str, *, canary: str = "10%", waves: str = "25,50,100",
                  soak: str = "60s", max_failures: str = "5%", job_timeout: str | None = None,
                  target: str | None = None) -> dict[str, Any]:
    """Start a staged rollout of a registered version (same rules as ``edgeloop fleet rollout``);
    ``target``: all devices, or a tag selector such as ``group=cams-north``."""
    from ..rollout import RolloutPlan, parse_target
    from ..rollout_driver import analysis_from_config

    driver = _require_driver(ctx)
    try:
        extra = {"job_timeout_s": parse_duration(job_timeout)} if job_timeout else {}
        # The form sets the stages; the canary analysis comes from fleet.toml's [rollout], as in the CLI.
        plan = RolloutPlan(canary=parse_shares(canary, single=True)[0], waves=tuple(parse_shares(waves)),
                           soak_s=parse_duration(soak), max_failures=parse_shares(max_failures, single=True)[0],
                           analysis=analysis_from_config(ctx.rollout_defaults), **extra)
    except ValueError as exc:
        raise ConfigError(f"bad rollout settings: {exc}", hint="canary 10%, waves 25,50,100, soak 60s") from exc
    state = driver.start(name, version, plan, target=parse_target(target))
    return {"rollout_id": state.rollout_id, "status": state.status, "devices": len(state.devices),
            "target": state.target,
            "n_waves": state.n_waves, "plan": dataclasses.asdict(plan)}


def rollout_command(ctx: DashContext, rollout_id: str, verb: str, *, user: str = "operator") -> dict[str, Any]:
    """pause / resume / abort / rollback one rollout through the driver."""
    if verb not in ROLLOUT_VERBS:
        raise RolloutError(f"unknown rollout action {verb!r}", hint=f"one of {', '.join(ROLLOUT_VERBS)}")
    driver = _require_driver(ctx)
    if verb in ("abort", "rollback"):
        state = getattr(driver, verb)(rollout_id, f"{'aborted' if verb == 'abort' else 'rolled back'} by {user} "
                                                  "from the dashboard")
    else:
        state = getattr(driver, verb)(rollout_id)
    return {"rollout_id": rollout_id, "action": verb, "status": state.status, "phase": state.phase,
            "wave": state.wave, "message": f"{verb}: rollout {rollout_id} is now {state.status.replace('_', ' ')}"}
