"""``fleet.toml``: the fleet manager's configuration, as frozen dataclasses.

Every section is a dataclass checked by :mod:`core.configfile`; a bad value raises
:class:`ConfigError` naming the file and the key (``fleet.toml: [broker].port: expected
an integer in [1, 65535], got 70000``), and an unknown key is refused rather than
silently ignored (a typo in ``max_failures`` must not go unnoticed).  ``[trigger]`` and
``[acceptance]`` are the retrain policy's classes (:mod:`fleet.policy`).

Minimal file::

    schema_version = 1    # optional: files without it are read as version 1
    [fleet]
    data_dir = "fleet-data"

Old names that still load: ``[gate]`` (now ``[acceptance]``), ``[trigger].labelled_samples``
(now ``min_labelled_samples``), ``protocol = "mqtt5"`` / ``"mqtt311"`` (now ``"5"`` / ``"3.1.1"``).

Relative paths are resolved against the directory of the TOML file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.configfile import (
    accepted_keys,
    check,
    fail,
    from_mapping,
    invalid,
    knob,
    read_mapping,
    supported_schema,
)
from core.configwrite import to_dict, to_toml
from core.protocol import DEFAULT_PREFIX, MQTT_VERSION_ALIASES, MqttVersion, validate_topic_prefix
from fleet.concept_drift import ConceptDriftConfig
from fleet.dashboard.config import DashboardConfig
from fleet.policy import CandidateGate, TriggerPolicy

__all__ = [
    "FLEET_CONFIG_SCHEMA_VERSION",
    "BrokerConfig",
    "DatabaseConfig",
    "ApiConfig",
    "IngestConfig",
    "RolloutConfig",
    "FleetConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "default_config",
    "render_config",
]

# 1: the first versioned fleet.toml (files without the key are read as 1).  [gate] became
# [acceptance] and [trigger].labelled_samples became min_labelled_samples: old names load.
FLEET_CONFIG_SCHEMA_VERSION = 1


def _share_group(name: str) -> None:
    if not name or any(c in name for c in "/+#"):
        raise ValueError(f"expected a non-empty name without '/', '+' or '#', got {name!r}")


def _database_url(url: str) -> None:
    if url and not url.startswith(("sqlite:", "sqlite+", "postgresql")):
        raise ValueError("expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")


def _api_token(token: str) -> None:
    if len(token) < 8:
        raise ValueError("use at least 8 characters (e.g. `openssl rand -hex 16`)")


@dataclass(frozen=True)
class BrokerConfig:
    """How the fleet reaches the MQTT broker (``[broker]``)."""

    host: str = knob("127.0.0.1", nonempty=True)
    port: int = knob(1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = knob(None, secret=True)
    tls: bool = False
    ca_file: str | None = None
    # "auto" (try MQTT 5, fall back to 3.1.1), "5", "3.1.1" (core.protocol.MqttVersion)
    protocol: MqttVersion = knob("auto", values=MQTT_VERSION_ALIASES)
    shared_group: str = knob("fleet", check=_share_group)  # $share/<group>/... on MQTT 5 brokers
    client_id: str | None = None
    keepalive: int = knob(30, ge=5)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class DatabaseConfig:
    """``[database]``: ``url`` empty means SQLite at ``<data_dir>/fleet.db`` (WAL)."""

    url: str = knob("", check=_database_url)
    busy_timeout_ms: int = knob(10_000, ge=0)
    echo: bool = False

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class ApiConfig:
    """``[api]``: the HTTP API and bundle server.  Bound to localhost unless told otherwise."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = knob(8080, ge=0, le=65535)  # 0: any free port
    token: str | None = knob(None, secret=True, check=_api_token)  # bearer token for /api/*; None -> no auth (localhost only!)
    public_url: str | None = None  # base URL devices use for bundle downloads
    bundle_auth: bool = False  # also require the token on /bundles/*

    def __post_init__(self) -> None:
        check(self)

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


@dataclass(frozen=True)
class IngestConfig:
    """``[ingest]``: batching of DB writes (one transaction per batch)."""

    flush_ms: int = knob(100, ge=1, le=60_000)
    batch_max: int = knob(2000, ge=1)
    queue_max: int = knob(200_000, ge=1)  # messages held in memory before the subscriber applies back-pressure
    max_sample_bytes: int = knob(8 << 20, ge=1)
    receipts: bool = True  # tell MQTT 5 devices which of their messages are committed (docs/protocol.md)
    receipt_ms: int = knob(3000, ge=0, le=60_000)  # gather receipts for this long (0: after every batch)
    workers: int = knob(1, ge=1, le=64)  # ingest processes; >1 splits drift/telemetry/feedback over MQTT 5 shared subscriptions

    def __post_init__(self) -> None:
        check(self)
        if self.queue_max < self.batch_max:
            raise invalid("queue_max", f"must be >= [ingest].batch_max ({self.batch_max}), got {self.queue_max}")


@dataclass(frozen=True)
class RolloutConfig:
    """``[rollout]``: defaults of ``edgeloop fleet rollout`` and of automatic rollouts."""

    auto: bool = True  # roll out an accepted retrained model automatically
    canary: float = knob(0.10, gt=0, le=1)
    waves: tuple[float, ...] = knob((0.25, 0.50, 1.0), gt=0, le=1, nonempty=True)
    soak_s: float = knob(60.0, ge=0)
    max_failures: float = knob(0.05, ge=0, le=1)
    delivery: Literal["auto", "http", "mqtt"] = "auto"  # "auto": the device's choice
    resend_after_s: float = knob(30.0, gt=0)  # resend a command no job step answered after this long (doubling, <= 300 s)
    # Canary analysis (fleet.canary; docs/fleet.md "Rollouts: canary analysis"): each wave against devices
    # still on the old version over the same window.  Checked as a whole by fleet.canary.CanaryPolicy
    # when a rollout plan is built from them (rollout_driver.plan_from_config).
    canary_alpha: float = 0.05  # significance level of each one-sided test
    canary_latency_fail_alpha: float = 0.0125  # what a latency fail needs (the judge looks at every extension)
    canary_max_latency_ratio: float = 1.5  # how many times slower (Hodges-Lehmann, interval medians) fails
    canary_max_error_increase: float = 0.02  # absolute error-rate increase that fails
    canary_max_accuracy_drop: float = 0.05  # absolute accuracy drop on feedback labels that fails
    canary_max_drift_alarm_increase: float = 0.25  # increase of the share of drift windows in alarm
    canary_max_confidence_drop: float = 0.10  # drop of the mean top-1 confidence
    canary_min_latency_samples: int = 100  # inferences per group before latency may vote
    canary_min_latency_intervals: int = 5  # telemetry intervals per group: the latency test's units
    canary_min_inferences: int = 100  # attempts per group before the error rate may vote
    canary_min_feedback: int = 30  # labels per group before accuracy may vote
    canary_min_drift_windows: int = 5  # drift reports per group
    canary_min_confidence_intervals: int = 5  # telemetry intervals with a confidence per group
    canary_required: tuple[str, ...] = ("latency", "errors")  # metrics that must have data to decide
    canary_critical: tuple[str, ...] = ("latency", "errors", "accuracy")  # one failure fails the wave
    canary_pass_score: float = 90.0  # share of voting metrics that passed, in %, to pass
    canary_marginal_score: float = 60.0  # below: fail; between: marginal (extends the soak)
    canary_max_extension_s: float = 120.0  # extra soak while data is missing
    canary_extension_step_s: float = 0.0  # per extension (0: the soak time)
    canary_on_inconclusive: str = "proceed"  # then: "proceed" (with a warning) or "hold" (pause the rollout)
    canary_match_tag: str = "group"  # device tag pairing canary and control devices ("": any)
    canary_max_shadow_disagreement: float = 0.10  # shadow stage: share of inputs answered otherwise that fails
    canary_min_shadow_inputs: int = 50  # shadow stage: shadowed inputs before agreement may vote
    # Shadow stage (docs/fleet.md): the canary devices first run the candidate beside the serving
    # model, never serving it.  On for automatic rollouts of retrained models (0 turns it off);
    # `edgeloop fleet rollout --shadow DURATION` asks for it on a manual one.
    shadow_s: float = knob(60.0, ge=0)
    shadow_every: int = knob(10, ge=1)  # the candidate sees every n-th input (the device's extra cost)

    def __post_init__(self) -> None:
        check(self)
        if list(self.waves) != sorted(self.waves):
            raise invalid("waves", f"expected increasing fractions, e.g. [0.25, 0.5, 1.0], got {list(self.waves)}")


@dataclass(frozen=True)
class FleetConfig:
    """The whole ``fleet.toml``.  ``data_dir`` holds the DB, samples, bundles and keys.

    ``[trigger]`` and ``[acceptance]`` are the retrain policy's own classes
    (:mod:`fleet.policy`), so their keys and defaults are defined once.
    """

    data_dir: Path = Path("fleet-data")
    prefix: str = knob(DEFAULT_PREFIX, check=validate_topic_prefix)
    model_name: str | None = None  # the model this fleet serves (None: whatever devices report)
    signing_key: Path | None = None  # default <data_dir>/keys/fleet.key
    broker: BrokerConfig = knob(factory=BrokerConfig)
    database: DatabaseConfig = knob(factory=DatabaseConfig)
    api: ApiConfig = knob(factory=ApiConfig)
    ingest: IngestConfig = knob(factory=IngestConfig)
    trigger: TriggerPolicy = knob(factory=TriggerPolicy)
    acceptance: CandidateGate = knob(factory=CandidateGate, aliases=("gate",))
    rollout: RolloutConfig = knob(factory=RolloutConfig)
    concept: ConceptDriftConfig = knob(factory=ConceptDriftConfig)  # concept drift from feedback labels
    dashboard: DashboardConfig = knob(factory=DashboardConfig)
    schema_version: int = knob(FLEET_CONFIG_SCHEMA_VERSION, check=supported_schema(FLEET_CONFIG_SCHEMA_VERSION))

    def __post_init__(self) -> None:
        check(self)

    # Derived locations: one place decides the layout of data_dir.
    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{(self.data_dir / 'fleet.db').resolve()}"

    @property
    def samples_dir(self) -> Path:
        return self.data_dir / "samples"

    @property
    def bundles_dir(self) -> Path:
        return self.data_dir / "bundles"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def signing_key_path(self) -> Path:
        return self.signing_key or self.keys_dir / "fleet.key"

    @property
    def public_key_path(self) -> Path:
        return self.signing_key_path.with_suffix(".pub")

    @property
    def mosquitto_dir(self) -> Path:
        return self.data_dir / "mosquitto"


# fleet.toml keeps these top-level fields in its [fleet] table
_TOP_KEYS = ("data_dir", "prefix", "model_name", "signing_key")
_TABLE_OF = {key: "fleet" for key in _TOP_KEYS}


def config_from_dict(data: Mapping[str, Any], *, base_dir: Path | None = None,
                     source: str = "fleet.toml") -> FleetConfig:
    """Build a :class:`FleetConfig` from parsed TOML; relative paths resolve against ``base_dir``."""
    rest = dict(data)
    top = rest.pop("fleet", {})
    if not isinstance(top, Mapping):
        raise fail(source, ("fleet",), "expected a table", table=True)
    for key in top:
        if key not in _TOP_KEYS:
            raise fail(source, ("fleet", key), "unknown key", hint=f"known: {', '.join(_TOP_KEYS)}")
    tables = [f.name for f in dataclasses.fields(FleetConfig) if f.name not in _TOP_KEYS]
    for key in rest:
        if key in _TOP_KEYS:
            raise fail(source, (key,), "unknown key", hint=f"{key} belongs in the [fleet] table")
        if key not in accepted_keys(FleetConfig):
            raise fail(source, (key,), f"unknown {'section' if isinstance(rest[key], Mapping) else 'key'}",
                       hint=f"known: fleet, {', '.join(tables)}", table=isinstance(rest[key], Mapping))
    top = dict(top)
    base = base_dir or Path.cwd()
    for key in ("data_dir", "signing_key"):
        if isinstance(top.get(key), str) and top[key]:
            p = Path(top[key]).expanduser()
            top[key] = p if p.is_absolute() else base / p
    top.setdefault("data_dir", base / "fleet-data")
    return from_mapping(FleetConfig, {**rest, **top}, source=source, table_of=_TABLE_OF)


def load_config(path: str | Path) -> FleetConfig:
    """Read and validate ``fleet.toml`` (or a JSON file of the same shape)."""
    p = Path(path)
    data = read_mapping(p, missing_hint="create one with `edgeloop fleet init`")
    return config_from_dict(data, base_dir=p.resolve().parent, source=str(p))


def default_config(data_dir: str | Path = "fleet-data", **overrides: Any) -> FleetConfig:
    """A config with every default (tests, the demo)."""
    return dataclasses.replace(FleetConfig(data_dir=Path(data_dir)), **overrides)


def config_to_dict(cfg: FleetConfig) -> dict[str, Any]:
    """``cfg`` as plain data shaped like fleet.toml (JSON-ready); :func:`config_from_dict` reads it back."""
    return to_dict(cfg, table_of=_TABLE_OF)


def render_config(cfg: FleetConfig) -> str:
    """``cfg`` as TOML text (keys set to None are left out); :func:`load_config` reads it back equal."""
    return to_toml(cfg, table_of=_TABLE_OF)
