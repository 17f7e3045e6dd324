"""``fleet.toml``: the fleet manager's configuration, as frozen dataclasses.

Every section is a dataclass validated in ``__post_init__``; a bad value raises
:class:`ConfigError` naming the key (``broker.port``), and an unknown key is refused
rather than silently ignored (a typo in ``max_failures`` must not go unnoticed).

Minimal file::

    [fleet]
    data_dir = "fleet-data"

Relative paths are resolved against the directory of the TOML file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from core.errors import ConfigError
from core.protocol import DEFAULT_PREFIX
from fleet.dashboard.config import DashboardConfig

__all__ = [
    "BrokerConfig",
    "DatabaseConfig",
    "ApiConfig",
    "IngestConfig",
    "TriggerConfig",
    "GateConfig",
    "RolloutConfig",
    "FleetConfig",
    "load_config",
    "default_config",
    "render_config",
]


def _bad(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"fleet config: {key} = {value!r} is invalid: {why}", hint=f"fix `{key}` in fleet.toml",
                       key=key)


@dataclass(frozen=True)
class BrokerConfig:
    """How the fleet reaches the MQTT broker (``[broker]``)."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    protocol: str = "auto"  # "auto" (try MQTT 5, fall back to 3.1.1), "5", "3.1.1"
    shared_group: str = "fleet"  # $share/<group>/... on MQTT 5 brokers
    client_id: str | None = None
    keepalive: int = 30

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise _bad("broker.port", self.port, "a TCP port is 1-65535")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise _bad("broker.protocol", self.protocol, "one of 'auto', '5', '3.1.1'")
        if not self.shared_group or "/" in self.shared_group or "+" in self.shared_group:
            raise _bad("broker.shared_group", self.shared_group, "a non-empty name without '/' or '+'")
        if self.keepalive < 5:
            raise _bad("broker.keepalive", self.keepalive, "at least 5 seconds")


@dataclass(frozen=True)
class DatabaseConfig:
    """``[database]``: ``url`` empty means SQLite at ``<data_dir>/fleet.db`` (WAL)."""

    url: str = ""
    busy_timeout_ms: int = 10_000
    echo: bool = False

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("sqlite:", "sqlite+", "postgresql")):
            raise _bad("database.url", self.url, "use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
        if self.busy_timeout_ms < 0:
            raise _bad("database.busy_timeout_ms", self.busy_timeout_ms, "must be >= 0")


@dataclass(frozen=True)
class ApiConfig:
    """``[api]``: the HTTP API and bundle server.  Bound to localhost unless told otherwise."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None  # bearer token for /api/*; None -> no auth (localhost only!)
    public_url: str | None = None  # base URL devices use for bundle downloads
    bundle_auth: bool = False  # also require the token on /bundles/*

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise _bad("api.port", self.port, "0 (any free port) or 1-65535")
        if self.token is not None and len(self.token) < 8:
            raise _bad("api.token", "***", "use at least 8 characters (e.g. `openssl rand -hex 16`)")

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


@dataclass(frozen=True)
class IngestConfig:
    """``[ingest]``: batching of DB writes (one transaction per batch)."""

    flush_ms: int = 100
    batch_max: int = 2000
    queue_max: int = 200_000  # messages held in memory before the subscriber applies back-pressure
    max_sample_bytes: int = 8 << 20
    receipts: bool = True  # tell MQTT 5 devices which of their messages are committed (docs/protocol.md)
    receipt_ms: int = 3000  # gather receipts for this long: one Receipt per device per interval
    workers: int = 1  # ingest processes; >1 splits drift/telemetry/feedback over MQTT 5 shared subscriptions

    def __post_init__(self) -> None:
        if not 1 <= self.flush_ms <= 60_000:
            raise _bad("ingest.flush_ms", self.flush_ms, "1-60000 ms")
        if not 0 <= self.receipt_ms <= 60_000:
            raise _bad("ingest.receipt_ms", self.receipt_ms, "0-60000 ms (0: after every batch)")
        if self.batch_max < 1:
            raise _bad("ingest.batch_max", self.batch_max, "at least 1")
        if not 1 <= self.workers <= 64:
            raise _bad("ingest.workers", self.workers, "1-64 processes")
        if self.queue_max < self.batch_max:
            raise _bad("ingest.queue_max", self.queue_max, "must be >= ingest.batch_max")


@dataclass(frozen=True)
class TriggerConfig:
    """``[trigger]``: when to retrain (defaults in the spirit of KubeEdge Sedna)."""

    enabled: bool = True
    alarm_devices: int = 3  # retrain when drift alarms persist on at least this many devices...
    alarm_persist_s: float = 120.0  # ...for at least this long
    labelled_samples: int = 500  # ...or when this many labelled drift samples have arrived
    check_interval_s: float = 60.0
    cooldown_s: float = 3600.0

    def __post_init__(self) -> None:
        for key in ("alarm_devices", "labelled_samples"):
            if getattr(self, key) < 1:
                raise _bad(f"trigger.{key}", getattr(self, key), "at least 1")
        for key in ("alarm_persist_s", "check_interval_s", "cooldown_s"):
            if getattr(self, key) < 0:
                raise _bad(f"trigger.{key}", getattr(self, key), "must be >= 0")


@dataclass(frozen=True)
class GateConfig:
    """``[gate]``: what a retrained candidate must show to be accepted."""

    min_improvement: float = 0.02  # on held-out labelled drift samples (fraction)
    max_original_drop: float = 0.01  # budget on the original test split (fraction)
    holdout_fraction: float = 0.3

    def __post_init__(self) -> None:
        if not -1 <= self.min_improvement <= 1:
            raise _bad("gate.min_improvement", self.min_improvement, "a fraction in [-1, 1]")
        if not 0 <= self.max_original_drop <= 1:
            raise _bad("gate.max_original_drop", self.max_original_drop, "a fraction in [0, 1]")
        if not 0 < self.holdout_fraction < 1:
            raise _bad("gate.holdout_fraction", self.holdout_fraction, "a fraction in (0, 1)")


@dataclass(frozen=True)
class RolloutConfig:
    """``[rollout]``: defaults of ``edgeloop fleet rollout`` and of automatic rollouts."""

    auto: bool = True  # roll out an accepted retrained model automatically
    canary: float = 0.10
    waves: tuple[float, ...] = (0.25, 0.50, 1.0)
    soak_s: float = 60.0
    max_failures: float = 0.05
    delivery: str = "auto"  # "auto" (device's choice), "http", "mqtt"
    resend_after_s: float = 30.0  # resend a command no job step answered after this long (doubling, <= 300 s)
    # Canary analysis (fleet.canary; docs/fleet.md "Canary analysis"): each wave against devices still
    # on the old version over the same window.  Checked when a rollout plan is built from them.
    canary_alpha: float = 0.05  # significance level of each one-sided test
    canary_max_latency_ratio: float = 1.5  # canary / control median latency that fails (when significant)
    canary_max_error_increase: float = 0.02  # absolute error-rate increase that fails
    canary_max_accuracy_drop: float = 0.05  # absolute accuracy drop on feedback labels that fails
    canary_max_drift_alarm_increase: float = 0.25  # increase of the share of drift windows in alarm
    canary_max_confidence_drop: float = 0.10  # drop of the mean top-1 confidence
    canary_min_latency_samples: int = 100  # inferences per group before latency may vote
    canary_min_latency_intervals: int = 5  # telemetry intervals per group (agents without histograms)
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
    canary_on_inconclusive: str = "hold"  # then: "hold" (pause the rollout) or "proceed" (with a warning)
    canary_match_tag: str = "group"  # device tag pairing canary and control devices ("": any)

    def __post_init__(self) -> None:
        object.__setattr__(self, "waves", tuple(float(w) for w in self.waves))
        if not 0 < self.canary <= 1:
            raise _bad("rollout.canary", self.canary, "a fraction in (0, 1]")
        if not self.waves or any(not 0 < w <= 1 for w in self.waves) or list(self.waves) != sorted(self.waves):
            raise _bad("rollout.waves", self.waves, "increasing fractions in (0, 1], e.g. [0.25, 0.5, 1.0]")
        if self.soak_s < 0:
            raise _bad("rollout.soak_s", self.soak_s, "must be >= 0")
        if not 0 <= self.max_failures <= 1:
            raise _bad("rollout.max_failures", self.max_failures, "a fraction in [0, 1]")
        if self.delivery not in ("auto", "http", "mqtt"):
            raise _bad("rollout.delivery", self.delivery, "one of 'auto', 'http', 'mqtt'")
        if not self.resend_after_s > 0:
            raise _bad("rollout.resend_after_s", self.resend_after_s, "must be > 0 seconds")


@dataclass(frozen=True)
class FleetConfig:
    """The whole ``fleet.toml``.  ``data_dir`` holds the DB, samples, bundles and keys."""

    data_dir: Path = Path("fleet-data")
    prefix: str = DEFAULT_PREFIX
    model_name: str | None = None  # the model this fleet serves (None: whatever devices report)
    signing_key: Path | None = None  # default <data_dir>/keys/fleet.key
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.signing_key is not None:
            object.__setattr__(self, "signing_key", Path(self.signing_key))
        if not self.prefix or self.prefix.startswith("/") or self.prefix.endswith("/") or \
                any(c in self.prefix for c in "#+"):
            raise _bad("fleet.prefix", self.prefix, "a topic prefix like 'edgeloop/v1' (no leading/trailing '/')")

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


_SECTIONS: dict[str, type] = {
    "broker": BrokerConfig, "database": DatabaseConfig, "api": ApiConfig, "ingest": IngestConfig,
    "trigger": TriggerConfig, "gate": GateConfig, "rollout": RolloutConfig, "dashboard": DashboardConfig,
}
_TOP_KEYS = ("data_dir", "prefix", "model_name", "signing_key")


def _section(name: str, cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise _bad(name, data, "must be a table")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"fleet config: unknown key {name}.{key}",
                              hint=f"known keys in [{name}]: {', '.join(sorted(names))}", key=f"{name}.{key}")
    try:
        return cls(**data)
    except TypeError as exc:  # wrong value types reach here as comparisons between str and int
        raise ConfigError(f"fleet config: bad value in [{name}]: {exc}", hint=f"check the types in [{name}]",
                          key=name) from exc


def config_from_dict(data: dict[str, Any], *, base_dir: Path | None = None) -> FleetConfig:
    """Build a :class:`FleetConfig` from parsed TOML; relative paths resolve against ``base_dir``."""
    top = dict(data.get("fleet", {}))
    for key in top:
        if key not in _TOP_KEYS:
            raise ConfigError(f"fleet config: unknown key fleet.{key}", hint=f"known: {', '.join(_TOP_KEYS)}",
                              key=f"fleet.{key}")
    for key in data:
        if key != "fleet" and key not in _SECTIONS:
            raise ConfigError(f"fleet config: unknown section [{key}]",
                              hint=f"known sections: fleet, {', '.join(_SECTIONS)}", key=key)
    base = base_dir or Path.cwd()
    for key in ("data_dir", "signing_key"):
        if top.get(key) is not None:
            p = Path(str(top[key])).expanduser()
            top[key] = p if p.is_absolute() else base / p
    if "data_dir" not in top:
        top["data_dir"] = base / "fleet-data"
    sections = {name: _section(name, cls, data.get(name, {})) for name, cls in _SECTIONS.items()}
    return FleetConfig(**top, **sections)


def load_config(path: str | Path) -> FleetConfig:
    """Read and validate ``fleet.toml``."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"fleet config {p} not found", hint="create one with `edgeloop fleet init`",
                          path=str(p)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"fleet config {p} is not valid TOML: {exc}", path=str(p)) from exc
    return config_from_dict(data, base_dir=p.resolve().parent)


def default_config(data_dir: str | Path = "fleet-data", **overrides: Any) -> FleetConfig:
    """A config with every default (tests, the demo)."""
    return dataclasses.replace(FleetConfig(data_dir=Path(data_dir)), **overrides)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(cfg: FleetConfig) -> str:
    """``cfg`` as TOML text (keys set to None are left out)."""
    lines = ["[fleet]"]
    for key in _TOP_KEYS:
        v = getattr(cfg, key)
        if v is not None:
            lines.append(f"{key} = {_toml_value(v)}")
    for name in _SECTIONS:
        lines += ["", f"[{name}]"]
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            if isinstance(v, tuple) and v and dataclasses.is_dataclass(v[0]):
                continue  # arrays of tables ([[dashboard.users]]) are written by hand
            if v is not None:
                lines.append(f"{f.name} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"
