"""The agent's configuration: one TOML file, frozen dataclasses, validated on load.

Every error names the file and the key (``agent.toml: [broker].port must be an
integer 1-65535``).  ``edgeloop agent init`` writes :data:`TEMPLATE`, a commented file
with every key at its default.  Unknown sections and keys are errors too: a typo
must not silently leave a default in force on a device nobody looks at.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, ProtocolError
from .protocol import DEFAULT_CHUNK_SIZE, DEFAULT_PREFIX, validate_device_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 devices
    import tomli as tomllib

__all__ = [
    "AgentSection", "ModelSection", "BrokerSection", "DriftSection", "SamplingSection", "OutboxSection",
    "TelemetrySection", "HttpSection", "HealthSection", "UpdateSection", "AgentConfig",
    "load_config", "parse_config", "write_template", "TEMPLATE", "CONFIG_SCHEMA_VERSION",
]

CONFIG_SCHEMA_VERSION = 1


def _bad(section: str, key: str, what: str) -> ConfigError:
    return ConfigError(f"[{section}].{key} {what}", key=f"{section}.{key}",
                       hint="fix the key in the config file (see `edgeloop agent init`)")


def _int(section: str, key: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"{lo}-{hi}" if hi is not None else f">= {lo}"
        raise _bad(section, key, f"must be an integer {rng}, got {value!r}")


def _num(section: str, key: str, value: Any, lo: float, hi: float | None = None, *, open_lo: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        ok = (value > lo if open_lo else value >= lo) and (hi is None or value <= hi)
    if not ok:
        rng = f"in ({lo}, {hi}]" if open_lo and hi is not None else f"in [{lo}, {hi}]" if hi is not None else \
            f"> {lo}" if open_lo else f">= {lo}"
        raise _bad(section, key, f"must be a number {rng}, got {value!r}")


def _str(section: str, key: str, value: Any, *, empty: bool = True) -> None:
    if not isinstance(value, str) or (not empty and not value):
        raise _bad(section, key, f"must be a {'non-empty ' if not empty else ''}string, got {value!r}")


def _bool(section: str, key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _bad(section, key, f"must be true or false, got {value!r}")


@dataclass(frozen=True)
class AgentSection:
    """Who this device is and where it keeps its state."""

    device_id: str = "edge-device"
    state_dir: str = "./edgeloop-state"
    trusted_key: str = ""  # public key file (or base64); "" only with allow_unsigned
    allow_unsigned: bool = False

    def __post_init__(self) -> None:
        _str("agent", "device_id", self.device_id, empty=False)
        try:
            validate_device_id(self.device_id)
        except ProtocolError:
            raise _bad("agent", "device_id", "must be 1-64 letters, digits, '_', '.' or '-'") from None
        _str("agent", "state_dir", self.state_dir, empty=False)
        _str("agent", "trusted_key", self.trusted_key)
        _bool("agent", "allow_unsigned", self.allow_unsigned)
        if not self.trusted_key and not self.allow_unsigned:
            raise _bad("agent", "trusted_key", "is required (or set allow_unsigned = true for development)")


@dataclass(frozen=True)
class ModelSection:
    """Which variant to run and what inputs this device produces."""

    variant: str = "auto"  # "auto" or a variant id such as "onnx-int8-static"
    threads: int = 1
    benchmark_runs: int = 30  # timed batch-1 runs per variant for "auto"
    input_channels: int = 0  # 0: whatever the bundle says; else bundles must expect this many
    input_size: tuple[int, ...] = ()  # (): any; else [height, width] bundles must expect
    strict_size: bool = False  # refuse images whose size differs from the model's instead of resizing

    def __post_init__(self) -> None:
        _str("model", "variant", self.variant, empty=False)
        _int("model", "threads", self.threads, 1, 256)
        _int("model", "benchmark_runs", self.benchmark_runs, 1, 10_000)
        if self.input_channels not in (0, 1, 3) or isinstance(self.input_channels, bool):
            raise _bad("model", "input_channels", f"must be 0, 1 or 3, got {self.input_channels!r}")
        size = self.input_size
        if not isinstance(size, (list, tuple)) or len(size) not in (0, 2) or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
            raise _bad("model", "input_size", f"must be [] or [height, width] of positive integers, got {size!r}")
        object.__setattr__(self, "input_size", tuple(size))
        _bool("model", "strict_size", self.strict_size)


@dataclass(frozen=True)
class BrokerSection:
    """The MQTT broker (``enabled = false`` runs the agent stand-alone)."""

    enabled: bool = True
    host: str = "localhost"
    port: int = 1883
    tls: bool = False
    ca_file: str = ""
    username: str = ""
    password: str = ""
    password_file: str = ""  # preferred over password: keeps the secret out of the config
    protocol: str = "auto"  # "auto" (MQTT 5, falling back to 3.1.1) | "mqtt5" | "mqtt311"
    keepalive: int = 30
    topic_prefix: str = DEFAULT_PREFIX
    receipts: bool = True  # end-to-end receipts from the fleet (MQTT 5; docs/protocol.md "Receipts")
    receipt_grace_s: float = 10.0  # resend a message the fleet skipped while receipting one sent this much later
    receipt_timeout_s: float = 60.0  # resend a message with no receipt after this long (doubling, up to 16x)

    def __post_init__(self) -> None:
        _bool("broker", "enabled", self.enabled)
        _str("broker", "host", self.host, empty=False)
        _int("broker", "port", self.port, 1, 65535)
        _bool("broker", "tls", self.tls)
        for key in ("ca_file", "username", "password", "password_file"):
            _str("broker", key, getattr(self, key))
        if self.password and self.password_file:
            raise _bad("broker", "password_file", "and [broker].password are both set; keep one")
        if self.protocol not in ("auto", "mqtt5", "mqtt311"):
            raise _bad("broker", "protocol", f"must be \"auto\", \"mqtt5\" or \"mqtt311\", got {self.protocol!r}")
        _int("broker", "keepalive", self.keepalive, 5, 3600)
        _str("broker", "topic_prefix", self.topic_prefix, empty=False)
        if any(c in self.topic_prefix for c in "#+") or self.topic_prefix.endswith("/"):
            raise _bad("broker", "topic_prefix", "must not contain '#' or '+' nor end with '/'")
        _bool("broker", "receipts", self.receipts)
        _num("broker", "receipt_grace_s", self.receipt_grace_s, 0.0, 86400.0)
        _num("broker", "receipt_timeout_s", self.receipt_timeout_s, 0.0, 86400.0, open_lo=True)

    def secret(self) -> str | None:
        """The password, read from ``password_file`` when that is set."""
        if self.password_file:
            try:
                return Path(self.password_file).read_text().strip()
            except OSError as exc:
                raise _bad("broker", "password_file", f"cannot be read: {exc}") from exc
        return self.password or None


@dataclass(frozen=True)
class DriftSection:
    window: int = 0  # inferences per drift window; 0: the bundle's calibrated default
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.window != 0:
            _int("drift", "window", self.window, 10, 1_000_000)
        _bool("drift", "enabled", self.enabled)


@dataclass(frozen=True)
class SamplingSection:
    """Which inputs are kept and uploaded for retraining."""

    enabled: bool = True
    low_confidence: float = 0.6  # capture inputs predicted with less confidence than this
    reservoir_size: int = 16  # uniform sample of ordinary inputs kept between uploads (unbiased)
    reservoir_interval_s: float = 3600.0  # how often the reservoir is uploaded
    max_per_minute: float = 6.0  # rate limit on drift / low-confidence captures
    burst: int = 10  # captures allowed at once before the rate limit applies
    chunk_size: int = DEFAULT_CHUNK_SIZE  # MQTT payload ceiling for sample uploads

    def __post_init__(self) -> None:
        _bool("sampling", "enabled", self.enabled)
        _num("sampling", "low_confidence", self.low_confidence, 0.0, 1.0)
        _int("sampling", "reservoir_size", self.reservoir_size, 0, 10_000)
        _num("sampling", "reservoir_interval_s", self.reservoir_interval_s, 0.0, open_lo=True)
        _num("sampling", "max_per_minute", self.max_per_minute, 0.0)
        _int("sampling", "burst", self.burst, 1, 10_000)
        _int("sampling", "chunk_size", self.chunk_size, 1024, 256 * 1024 * 1024)


@dataclass(frozen=True)
class OutboxSection:
    max_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        _int("outbox", "max_bytes", self.max_bytes, 64 * 1024)


@dataclass(frozen=True)
class TelemetrySection:
    interval_s: float = 30.0
    latency_window: int = 1024  # inferences in the latency ring (bounded memory)

    def __post_init__(self) -> None:
        _num("telemetry", "interval_s", self.interval_s, 0.0, 86400.0, open_lo=True)
        _int("telemetry", "latency_window", self.latency_window, 16, 1_000_000)


@dataclass(frozen=True)
class HttpSection:
    enabled: bool = True
    bind: str = "127.0.0.1"  # localhost only unless you mean it
    port: int = 8765  # 0: any free port (tests)
    max_body_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        _bool("http", "enabled", self.enabled)
        _str("http", "bind", self.bind, empty=False)
        if self.bind != "localhost":
            try:
                ipaddress.ip_address(self.bind)
            except ValueError:
                raise _bad("http", "bind", f"must be an IP address or \"localhost\", got {self.bind!r}") from None
        _int("http", "port", self.port, 0, 65535)
        _int("http", "max_body_bytes", self.max_body_bytes, 1024)


@dataclass(frozen=True)
class HealthSection:
    """What a new model must pass before it serves (the bundle's reference.npz)."""

    atol: float = 1e-3  # max |logit - expected| for float variants
    quantized_atol: float = 0.5  # int8 variants round; their logits may move more
    min_agreement: float = 0.98  # fraction of reference inputs whose predicted class must match
    max_latency_ms: float = 2000.0  # a batch-1 inference slower than this is not sane

    def __post_init__(self) -> None:
        _num("health", "atol", self.atol, 0.0, open_lo=True)
        _num("health", "quantized_atol", self.quantized_atol, 0.0, open_lo=True)
        _num("health", "min_agreement", self.min_agreement, 0.0, 1.0)
        _num("health", "max_latency_ms", self.max_latency_ms, 0.0, open_lo=True)


@dataclass(frozen=True)
class UpdateSection:
    """Model updates: slots, downgrades, disk margin and the boot counter."""

    allow_downgrade: bool = False
    keep_slots: int = 2
    min_free_mb: float = 16.0  # refuse an update that would leave less free space than this
    max_boots: int = 3  # roll back after this many starts ...
    boot_window_min: float = 10.0  # ... within this many minutes of a switch; healthy this long clears the count
    download_timeout_s: float = 30.0
    mqtt_corrupt_retries: int = 2  # a corrupt MQTT-delivered bundle is requested again this many times

    def __post_init__(self) -> None:
        _bool("update", "allow_downgrade", self.allow_downgrade)
        _int("update", "keep_slots", self.keep_slots, 2, 100)
        _num("update", "min_free_mb", self.min_free_mb, 0.0)
        _int("update", "max_boots", self.max_boots, 1, 1000)
        _num("update", "boot_window_min", self.boot_window_min, 0.0, open_lo=True)
        _num("update", "download_timeout_s", self.download_timeout_s, 0.0, open_lo=True)
        _int("update", "mqtt_corrupt_retries", self.mqtt_corrupt_retries, 0, 100)


_SECTIONS: dict[str, type] = {
    "agent": AgentSection, "model": ModelSection, "broker": BrokerSection, "drift": DriftSection,
    "sampling": SamplingSection, "outbox": OutboxSection, "telemetry": TelemetrySection,
    "http": HttpSection, "health": HealthSection, "update": UpdateSection,
}


@dataclass(frozen=True)
class AgentConfig:
    """The whole agent configuration; ``source`` is the file it came from (for messages)."""

    agent: AgentSection = field(default_factory=AgentSection)
    model: ModelSection = field(default_factory=ModelSection)
    broker: BrokerSection = field(default_factory=BrokerSection)
    drift: DriftSection = field(default_factory=DriftSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)
    http: HttpSection = field(default_factory=HttpSection)
    health: HealthSection = field(default_factory=HealthSection)
    update: UpdateSection = field(default_factory=UpdateSection)
    schema_version: int = CONFIG_SCHEMA_VERSION
    source: str = "<defaults>"

    @property
    def state_dir(self) -> Path:
        """``[agent].state_dir``, relative paths taken from the config file's folder."""
        p = Path(self.agent.state_dir).expanduser()
        if not p.is_absolute() and self.source not in ("<defaults>", "<string>"):
            p = Path(self.source).resolve().parent / p
        return p

    @property
    def trusted_key_path(self) -> str | None:
        """The trusted key as a path (relative to the config file) or the raw string; None when unset."""
        key = self.agent.trusted_key
        if not key:
            return None
        p = Path(key).expanduser()
        if not p.is_absolute() and self.source not in ("<defaults>", "<string>"):
            candidate = Path(self.source).resolve().parent / p
            if candidate.exists():
                return str(candidate)
        return str(p) if p.exists() else key

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    def replace(self, **sections: Any) -> AgentConfig:
        """A copy with some sections' keys changed: ``cfg.replace(http={"port": 0})``."""
        changes = {name: dataclasses.replace(getattr(self, name), **keys) for name, keys in sections.items()}
        return dataclasses.replace(self, **changes)


def parse_config(data: dict[str, Any], *, source: str = "<string>") -> AgentConfig:
    """A parsed TOML document -> :class:`AgentConfig`; errors are prefixed with ``source``."""
    name = Path(source).name if source not in ("<string>", "<defaults>") else source
    try:
        kwargs: dict[str, Any] = {}
        for sect, value in data.items():
            if sect == "schema_version":
                if value != CONFIG_SCHEMA_VERSION:
                    raise ConfigError(f"schema_version must be {CONFIG_SCHEMA_VERSION}, got {value!r}",
                                      key="schema_version")
                continue
            cls = _SECTIONS.get(sect)
            if cls is None:
                raise ConfigError(f"unknown section [{sect}]", key=sect,
                                  hint=f"known sections: {', '.join(_SECTIONS)}")
            if not isinstance(value, dict):
                raise ConfigError(f"[{sect}] must be a table", key=sect)
            names = {f.name for f in dataclasses.fields(cls)}
            for key in value:
                if key not in names:
                    raise ConfigError(f"unknown key [{sect}].{key}", key=f"{sect}.{key}",
                                      hint=f"[{sect}] takes {', '.join(sorted(names))}")
            kwargs[sect] = cls(**value)
        return AgentConfig(**kwargs, source=source)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc.message}", hint=exc.hint, path=source, **{
            k: v for k, v in exc.context.items() if k != "path"}) from None


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate an agent TOML file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file", hint="create one with `edgeloop agent init`",
                          path=str(p)) from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})", path=str(p)) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{p.name}: not valid TOML: {exc}", path=str(p)) from exc
    return parse_config(data, source=str(p))


TEMPLATE = """\
# edgeloop agent configuration (TOML).  `edgeloop agent run --config THIS_FILE`.
# Every key is shown at its default; delete what you do not change.
schema_version = 1

[agent]
device_id = "{device_id}"          # 1-64 letters, digits, '_', '.', '-'; the MQTT topic level
state_dir = "{state_dir}"          # slots, outbox, boot counter (relative: to this file)
trusted_key = "{trusted_key}"      # the fleet's Ed25519 public key file; bundles must be signed by it
allow_unsigned = false             # true only for development: accept unsigned bundles

[model]
variant = "auto"      # "auto": time every variant here at install, run the fastest within the accuracy budget
threads = 1           # inference threads
benchmark_runs = 30   # timed batch-1 runs per variant when choosing
input_channels = 0    # 0: accept the bundle's; 1 or 3: refuse bundles expecting anything else
input_size = []       # []: any; [64, 64]: refuse bundles expecting another size
strict_size = false   # true: refuse images of another size instead of resizing them

[broker]
enabled = true
host = "localhost"
port = 1883
tls = false
ca_file = ""          # CA bundle for TLS ("" = the system's)
username = ""
password = ""
password_file = ""    # preferred: a file holding the password
protocol = "auto"     # MQTT 5 where the broker has it, else 3.1.1; or "mqtt5" / "mqtt311"
keepalive = 30
topic_prefix = "edgeloop/v1"
receipts = true       # MQTT 5: keep messages until the fleet's receipt, not just the broker's PUBACK
receipt_grace_s = 10.0   # resend a message the fleet skipped while receipting one sent this much later
receipt_timeout_s = 60.0 # resend one with no receipt after this long (doubling per resend, up to 16x)

[drift]
enabled = true
window = 0            # inferences per drift window (one report each); 0: the bundle's calibrated size

[sampling]
enabled = true
low_confidence = 0.6  # capture inputs predicted with less confidence than this (and high drift scores)
reservoir_size = 16   # plus a uniform sample of this many ordinary inputs (unbiased) ...
reservoir_interval_s = 3600.0  # ... uploaded this often
max_per_minute = 6.0  # at most this many drift / low-confidence captures per minute
burst = 10
chunk_size = 131072   # MQTT payload ceiling (128 KiB: common managed brokers)

[outbox]
max_bytes = 67108864  # disk cap of the offline queue; the oldest samples go first

[telemetry]
interval_s = 30.0
latency_window = 1024

[http]
enabled = true
bind = "127.0.0.1"    # localhost only; "0.0.0.0" exposes /predict to the network
port = 8765
max_body_bytes = 16777216

[health]
atol = 0.001          # reference logits must match within this (float variants)
quantized_atol = 0.5  # ... and this for int8 variants
min_agreement = 0.98  # fraction of reference inputs whose class must match
max_latency_ms = 2000.0

[update]
allow_downgrade = false
keep_slots = 2
min_free_mb = 16.0
max_boots = 3         # roll back when the agent starts this many times ...
boot_window_min = 10.0  # ... within this many minutes after a switch
download_timeout_s = 30.0
mqtt_corrupt_retries = 2  # request a corrupt MQTT-delivered bundle again (from chunk 0) this many times
"""


def write_template(path: str | os.PathLike[str], *, device_id: str = "edge-device", state_dir: str = "./edgeloop-state",
                   trusted_key: str = "fleet.pub", force: bool = False) -> Path:
    """Write the commented default config; refuse to overwrite unless ``force``."""
    p = Path(path)
    if p.exists() and not force:
        raise ConfigError(f"{p} already exists", hint="pass --force to overwrite it", path=str(p))
    text = TEMPLATE.format(device_id=device_id, state_dir=state_dir, trusted_key=trusted_key)
    parse_config(tomllib.loads(text), source=str(p))  # the template must always be valid
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p
