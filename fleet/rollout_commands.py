"""The commands of rollouts (:class:`fleet.rollout_driver.RolloutDriver`): what a device is told, and how.

:class:`RolloutCommands` turns the rollout machine's actions into :class:`DeployCommand` /
:class:`RollbackCommand` messages and publishes them (QoS 1).  Bundle delivery is the
device's choice (``DeviceState.delivery``) within what the fleet can offer: an HTTP URL on
the fleet API with range requests, or MQTT chunk frames sent in answer to
:class:`BundleRequest` (:meth:`RolloutCommands.handle_bundle_request`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from core import chunks
from core.errors import RolloutError
from core.protocol import BundleRequest, DeployCommand, RollbackCommand, TopicScheme

from . import rollout as rm
from .registry import DeviceRecord, ModelVersion, Registry

__all__ = ["Publisher", "RolloutCommands"]

log = logging.getLogger("fleet.rollout_driver")  # the driver's logger: operators filter on it


class Publisher(Protocol):
    """What the driver needs of an MQTT client (paho's ``Client.publish`` fits)."""

    def publish(self, topic: str, payload: bytes, qos: int = ..., retain: bool = ...) -> Any: ...


class RolloutCommands:
    """Builds and publishes one registry's rollout commands; ``active`` lists the unfinished rollouts."""

    def __init__(self, registry: Registry, publisher: Publisher, topics: TopicScheme, *, api_base_url: str | None,
                 delivery: str, chunk_size: int, clock: Callable[[], float],
                 bundle_url: Callable[[ModelVersion], str] | None,
                 active: Callable[[], list[rm.RolloutState]]) -> None:
        if delivery not in ("auto", "http", "mqtt"):
            raise RolloutError(f"unknown delivery {delivery!r}", hint="use auto, http or mqtt")
        self.registry = registry
        self.publisher = publisher
        self.topics = topics
        self.api_base_url = api_base_url.rstrip("/") if api_base_url else None
        self.delivery = delivery
        self.chunk_size = chunk_size
        self.clock = clock
        self._bundle_url = bundle_url
        self._active = active

    def deploy_command(self, state: rm.RolloutState, model: ModelVersion | None, device: DeviceRecord | None,
                       device_id: str, job_id: str, shadow: bool = False) -> DeployCommand:
        if model is None or not model.bundle_path or not model.sha256 or not model.size:
            raise RolloutError(f"model {state.name} {state.version} has no registered bundle",
                               rollout=state.rollout_id)
        delivery = self.delivery_for(device_id, device)
        url = self.bundle_url(model) if delivery == "http" else None
        return DeployCommand(job_id=job_id, name=state.name, version=state.version, size=model.size,
                             sha256=model.sha256, url=url, delivery=delivery, chunk_size=self.chunk_size,
                             rollout_id=state.rollout_id, ts=self.clock(), shadow=shadow,
                             shadow_every=state.plan.shadow_every if shadow else 0)

    def delivery_for(self, device_id: str, dev: DeviceRecord | None) -> str:
        can_http = self.api_base_url is not None or self._bundle_url is not None
        accepted = [str(x) for x in (dev.delivery if dev and dev.delivery else ["http", "mqtt"])]
        if self.delivery != "auto":
            wanted = [self.delivery]
        else:
            wanted = accepted
        for choice in wanted:
            if choice in accepted and (choice == "mqtt" or can_http):
                return choice
        raise RolloutError(f"device {device_id} accepts {accepted} but the fleet can deliver "
                           f"{'http, mqtt' if can_http else 'mqtt'} (asked for {self.delivery})", device_id=device_id)

    def bundle_url(self, model: ModelVersion) -> str:
        """Where a device downloads the bundle over HTTP (the fleet API serves it with Range)."""
        if self._bundle_url is not None:
            return self._bundle_url(model)
        if self.api_base_url is None:
            raise RolloutError("no fleet API URL to deliver bundles over HTTP", hint="set [api] or use mqtt delivery")
        return f"{self.api_base_url}/bundles/{model.name}/{model.version}.elb"

    def send(self, state: rm.RolloutState, actions: Sequence[rm.Action]) -> None:
        deploys = [a.device_id for a in actions if isinstance(a, rm.Deploy)]
        # One query for the model and one for the devices, however large the wave.
        model = self.registry.model(state.name, state.version) if deploys else None
        devices = self.registry.devices_by_id(deploys) if deploys else {}
        for a in actions:
            if isinstance(a, rm.Deploy):
                try:
                    cmd = self.deploy_command(state, model, devices.get(a.device_id), a.device_id, a.job_id,
                                              a.shadow)
                except RolloutError as exc:
                    log.error("rollout %s: cannot deploy to %s: %s", state.rollout_id, a.device_id, exc)
                    continue  # the job times out and counts as a failure
                self.publisher.publish(self.topics.command(a.device_id, "deploy"), cmd.encode(), qos=1)
            else:
                rb = RollbackCommand(job_id=a.job_id, reason=a.reason, to_version=a.to_version,
                                     rollout_id=state.rollout_id, ts=self.clock())
                self.publisher.publish(self.topics.command(a.device_id, "rollback"), rb.encode(), qos=1)

    def handle_bundle_request(self, req: BundleRequest) -> int:
        """Answer a device's :class:`BundleRequest` with chunk frames from chunk ``req.start`` on.

        The transfer id is the job id; a device that lost chunks asks again with the
        index of the first one it misses.  Returns the number of frames sent.
        """
        model = self.registry.model(self._model_name_for_job(req.job_id), req.version)
        if model is None or not model.bundle_path:
            log.warning("bundle request for unknown %s from %s", req.version, req.device_id)
            return 0
        data = Path(model.bundle_path).read_bytes()
        frames = chunks.split(req.job_id, data, chunk_size=self.chunk_size, kind="bundle",
                              meta={"version": req.version})
        topic = self.topics.command(req.device_id, "bundle")
        for frame in frames[max(0, req.start):]:
            self.publisher.publish(topic, frame, qos=1)
        return max(0, len(frames) - max(0, req.start))

    def _model_name_for_job(self, job_id: str) -> str:
        target = self.registry.target_for_job(job_id)
        if target is not None:
            rec = self.registry.rollout(target.rollout_id)
            if rec is not None:
                return rec.model_name
        for r in self._active():
            return r.name
        return ""
