"""The agent's configuration: one TOML file, frozen dataclasses, validated on load.

Loaded by :mod:`core.configfile`, so every error names the file and the key
(``agent.toml: [broker].port: expected an integer in [1, 65535], got 70000``).
``edgeloop agent init`` writes :data:`TEMPLATE`, a commented file with every key at its
default.  Unknown sections and keys are errors too: a typo must not silently leave a
default in force on a device nobody looks at.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .configfile import (
    check,
    from_mapping,
    invalid,
    knob,
    parse_toml,
    read_mapping,
    relocate,
    supported_schema,
)
from .configwrite import to_dict
from .errors import ConfigError
from .protocol import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_PREFIX,
    MQTT_VERSION_ALIASES,
    MqttVersion,
    validate_device_id,
    validate_topic_prefix,
)

__all__ = [
    "AgentSection", "ModelSection", "BrokerSection", "DriftSection", "SamplingSection", "OutboxSection",
    "TelemetrySection", "HttpSection", "HealthSection", "UpdateSection", "SourceSection", "ResultsSection",
    "AgentConfig",
    "load_config", "parse_config", "write_template", "TEMPLATE", "CONFIG_SCHEMA_VERSION",
]

CONFIG_SCHEMA_VERSION = 1


def _bind_address(bind: str) -> None:
    if bind != "localhost":
        try:
            ipaddress.ip_address(bind)
        except ValueError:
            raise ValueError(f"expected an IP address or \"localhost\", got {bind!r}") from None


def _drift_window(window: int) -> None:
    if window != 0 and not 10 <= window <= 1_000_000:
        raise ValueError(f"expected 0 (the bundle's) or an integer in [10, 1000000], got {window}")


def _drift_budget(rate: float) -> None:
    if rate != 0 and not 0.0 < rate < 0.5:
        raise ValueError(f"expected 0 (the bundle's) or a fraction of windows in (0, 0.5), e.g. 0.01, got {rate}")


@dataclass(frozen=True)
class AgentSection:
    """Who this device is and where it keeps its state."""

    device_id: str = knob("edge-device", check=validate_device_id)
    state_dir: str = knob("./edgeloop-state", nonempty=True)
    trusted_key: str = ""  # public key file (or base64); "" only with allow_unsigned
    allow_unsigned: bool = False

    def __post_init__(self) -> None:
        check(self)
        if not self.trusted_key and not self.allow_unsigned:
            raise invalid("trusted_key", "is required",
                          hint="name the fleet's public key file, or set allow_unsigned = true for development")


@dataclass(frozen=True)
class ModelSection:
    """Which variant to run and what inputs this device produces."""

    variant: str = knob("auto", nonempty=True)  # "auto" or a variant id such as "onnx-int8-static"
    threads: int = knob(1, ge=1, le=256)
    benchmark_runs: int = knob(30, ge=1, le=10_000)  # timed batch-1 runs per variant for "auto"
    input_channels: Literal[0, 1, 3] = 0  # 0: whatever the bundle says; else bundles must expect this many
    input_size: tuple[int, ...] = knob((), ge=1)  # (): any; else [height, width] bundles must expect
    strict_size: bool = False  # refuse images whose size differs from the model's instead of resizing

    def __post_init__(self) -> None:
        check(self)
        if len(self.input_size) not in (0, 2):
            raise invalid("input_size", f"expected [] or [height, width], got {list(self.input_size)}")


@dataclass(frozen=True)
class BrokerSection:
    """The MQTT broker (``enabled = false`` runs the agent stand-alone)."""

    enabled: bool = True
    host: str = knob("localhost", nonempty=True)
    port: int = knob(1883, ge=1, le=65535)
    tls: bool = False
    ca_file: str = ""
    username: str = ""
    password: str = knob("", secret=True)
    password_file: str = ""  # preferred over password: keeps the secret out of the config
    # "auto" (MQTT 5, falling back to 3.1.1) | "5" | "3.1.1"; the older "mqtt5" / "mqtt311" still load
    protocol: MqttVersion = knob("auto", values=MQTT_VERSION_ALIASES)
    keepalive: int = knob(30, ge=5, le=3600)
    topic_prefix: str = knob(DEFAULT_PREFIX, check=validate_topic_prefix)
    receipts: bool = True  # end-to-end receipts from the fleet (MQTT 5; docs/protocol.md "Receipts")
    receipt_grace_s: float = knob(10.0, ge=0, le=86400)  # resend a message the fleet skipped while receipting one sent this much later
    receipt_timeout_s: float = knob(60.0, gt=0, le=86400)  # resend a message with no receipt after this long (doubling, up to 16x)

    def __post_init__(self) -> None:
        check(self)
        if self.password and self.password_file:
            raise invalid("password_file", "and [broker].password are both set; keep one")

    def secret(self) -> str | None:
        """The password, read from ``password_file`` when that is set."""
        if self.password_file:
            try:
                return Path(self.password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"[broker].password_file cannot be read: {exc}", key="broker.password_file",
                                  hint="fix the key in the config file (see `edgeloop agent init`)") from exc
        return self.password or None


@dataclass(frozen=True)
class DriftSection:
    """The drift monitor: window size and false-alarm budgets (docs/drift.md).

    The budgets are fractions of undrifted windows; the thresholds for any budget come from
    the bundle's calibrated null (``baseline.npz``), so changing one needs no re-export.
    0 keeps what the export calibrated (1 % and 0.5 % by default).
    """

    window: int = knob(0, check=_drift_window)  # inferences per drift window; 0: the bundle's calibrated default
    enabled: bool = True
    # share of undrifted windows flagged "input changed" (reported, not an alarm); 0: the bundle's
    input_budget: float = knob(0.0, check=_drift_budget)
    # share of undrifted windows with the drift alarm on, after its hysteresis; 0: the bundle's
    alarm_budget: float = knob(0.0, check=_drift_budget, aliases=("alarm_rate",))

    def __post_init__(self) -> None:
        check(self)

    @property
    def budgets(self) -> tuple[float, float]:
        """``(input_budget, alarm_budget)``, as the serving model's drift monitor takes them."""
        return self.input_budget, self.alarm_budget


@dataclass(frozen=True)
class SamplingSection:
    """Which inputs are kept and uploaded for retraining."""

    enabled: bool = True
    low_confidence: float = knob(0.6, ge=0, le=1)  # capture inputs predicted with less confidence than this
    reservoir_size: int = knob(16, ge=0, le=10_000)  # uniform sample of ordinary inputs kept between uploads (unbiased)
    reservoir_interval_s: float = knob(3600.0, gt=0)  # how often the reservoir is uploaded
    max_per_minute: float = knob(6.0, ge=0)  # rate limit on drift / low-confidence captures
    burst: int = knob(10, ge=1, le=10_000)  # captures allowed at once before the rate limit applies
    score_rate: float = knob(30.0, ge=0)  # inputs per second given a drift score for capture (0: every input)
    chunk_size: int = knob(DEFAULT_CHUNK_SIZE, ge=1024, le=256 * 1024 * 1024)  # MQTT payload ceiling for sample uploads

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class OutboxSection:
    max_bytes: int = knob(64 * 1024 * 1024, ge=64 * 1024)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class TelemetrySection:
    interval_s: float = knob(30.0, gt=0, le=86400)
    latency_window: int = knob(1024, ge=16, le=1_000_000)  # inferences in the latency ring (bounded memory)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class HttpSection:
    enabled: bool = True
    bind: str = knob("127.0.0.1", check=_bind_address)  # localhost only unless you mean it
    port: int = knob(8765, ge=0, le=65535)  # 0: any free port (tests)
    max_body_bytes: int = knob(16 * 1024 * 1024, ge=1024)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class HealthSection:
    """What a new model must pass before it serves (the bundle's reference.npz)."""

    atol: float = knob(1e-3, gt=0)  # max |logit - expected| for float variants
    quantized_atol: float = knob(0.5, gt=0)  # int8 variants round; their logits may move more
    min_agreement: float = knob(0.98, ge=0, le=1)  # fraction of reference inputs whose predicted class must match
    max_latency_ms: float = knob(2000.0, gt=0)  # a batch-1 inference slower than this is not sane

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class UpdateSection:
    """Model updates: slots, downgrades, disk margin and the boot counter."""

    allow_downgrade: bool = False
    keep_slots: int = knob(2, ge=2, le=100)
    min_free_mb: float = knob(16.0, ge=0)  # refuse an update that would leave less free space than this
    max_boots: int = knob(3, ge=1, le=1000)  # roll back after this many starts ...
    boot_window_min: float = knob(10.0, gt=0)  # ... within this many minutes of a switch; healthy this long clears the count
    download_timeout_s: float = knob(30.0, gt=0)
    mqtt_corrupt_retries: int = knob(2, ge=0, le=100)  # a corrupt MQTT-delivered bundle is requested again this many times

    def __post_init__(self) -> None:
        check(self)


def _roi(roi: tuple[int, ...]) -> None:
    if len(roi) not in (0, 4) or any(v < 0 for v in roi) or (roi and (roi[2] < 1 or roi[3] < 1)):
        raise ValueError(f"expected [] or [x, y, width, height] with width, height >= 1, got {list(roi)}")


@dataclass(frozen=True)
class SourceSection:
    """One ``[[sources]]`` table: a camera, stream, video file, folder or tensor stream to predict continuously."""

    uri: str = knob("", nonempty=True)  # camera:0, /dev/video0, picamera, rtsp://..., http://..., clip.mp4, dir:PATH, npy:PATH, stdin
    name: str = ""  # how results name this source ("" = the uri)
    fps: float = knob(0.0, ge=0)  # at most this many frames per second to the model; 0 = every frame delivered
    every: int = knob(1, ge=1, le=100_000)  # only every N-th frame
    roi: tuple[int, ...] = knob((), check=_roi)  # [x, y, width, height] of the frame; [] = whole frame
    drop: Literal["auto", "oldest", "never"] = "auto"  # when the model falls behind; auto: oldest for live sources
    queue: int = knob(2, ge=1, le=1000)  # frames waiting for the model
    loop: bool = False  # video files: start again at the end
    realtime: bool = False  # video files: play at the file's frame rate, like a camera (live: drops when behind)
    reconnect_min_s: float = knob(0.5, gt=0, le=3600)  # first back-off when a stream drops (doubles) ...
    reconnect_max_s: float = knob(30.0, gt=0, le=3600)  # ... up to this

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class ResultsSection:
    """Where continuous predictions go (``agent run`` with sources)."""

    mqtt_per_s: float = knob(2.0, ge=0, le=1000)  # results on MQTT ({prefix}/devices/{id}/results), at most this often; 0 = off
    http: bool = True  # GET /results/latest and the SSE stream GET /results/stream
    jsonl: str = ""  # append every result to this file ("" = off; relative: to the config file)
    jsonl_max_bytes: int = knob(64 * 1024 * 1024, ge=4096)  # rotated to FILE.1 above this size

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class AgentConfig:
    """The whole agent configuration; ``source`` is the file it came from (for messages)."""

    agent: AgentSection = knob(factory=AgentSection)
    model: ModelSection = knob(factory=ModelSection)
    broker: BrokerSection = knob(factory=BrokerSection)
    drift: DriftSection = knob(factory=DriftSection)
    sampling: SamplingSection = knob(factory=SamplingSection)
    outbox: OutboxSection = knob(factory=OutboxSection)
    telemetry: TelemetrySection = knob(factory=TelemetrySection)
    http: HttpSection = knob(factory=HttpSection)
    health: HealthSection = knob(factory=HealthSection)
    update: UpdateSection = knob(factory=UpdateSection)
    sources: tuple[SourceSection, ...] = ()  # [[sources]] tables
    results: ResultsSection = knob(factory=ResultsSection)
    schema_version: int = knob(CONFIG_SCHEMA_VERSION, check=supported_schema(CONFIG_SCHEMA_VERSION))
    source: str = knob("<defaults>", internal=True)

    def __post_init__(self) -> None:
        check(self)

    def path(self, value: str) -> Path:
        """A path from the config: relative ones are taken from the config file's folder."""
        p = Path(value).expanduser()
        if not p.is_absolute() and self.source not in ("<defaults>", "<string>"):
            p = Path(self.source).resolve().parent / p
        return p

    @property
    def state_dir(self) -> Path:
        """``[agent].state_dir``, relative paths taken from the config file's folder."""
        return self.path(self.agent.state_dir)

    def broker_password(self) -> str | None:
        """The broker password; ``[broker].password_file`` is read relative to the config file's folder."""
        b = self.broker
        if b.password_file:
            return dataclasses.replace(b, password_file=str(self.path(b.password_file))).secret()
        return b.secret()

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
        """The config as plain data (``source`` left out); :func:`parse_config` reads it back."""
        return to_dict(self)

    def replace(self, **sections: Any) -> AgentConfig:
        """A copy with some sections' keys changed: ``cfg.replace(http={"port": 0})``."""
        changes = {}
        for name, keys in sections.items():
            try:
                changes[name] = dataclasses.replace(getattr(self, name), **keys)
            except ConfigError as exc:
                raise relocate(exc, (name,)) from None
        return dataclasses.replace(self, **changes)


def parse_config(data: dict[str, Any], *, source: str = "<string>") -> AgentConfig:
    """A parsed TOML (or JSON) document -> :class:`AgentConfig`; errors are prefixed with ``source``."""
    return dataclasses.replace(from_mapping(AgentConfig, data, source=source), source=source)


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate an agent TOML file (or JSON, for ``*.json``)."""
    p = Path(path)
    return parse_config(read_mapping(p, missing_hint="create one with `edgeloop agent init`"), source=str(p))


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
ca_file = ""          # CA bundle for TLS ("" = the system's; relative: to this file)
username = ""
password = ""
password_file = ""    # preferred: a file holding the password (relative: to this file)
protocol = "auto"     # MQTT 5 where the broker has it, else 3.1.1; or "5" / "3.1.1"
keepalive = 30
topic_prefix = "edgeloop/v1"
receipts = true       # MQTT 5: keep messages until the fleet's receipt, not just the broker's PUBACK
receipt_grace_s = 10.0   # resend a message the fleet skipped while receipting one sent this much later
receipt_timeout_s = 60.0 # resend one with no receipt after this long (doubling per resend, up to 16x)

[drift]
enabled = true
window = 0            # inferences per drift window (one report each); 0: the bundle's calibrated size
input_budget = 0.0    # share of undrifted windows flagged "input changed"; 0: the bundle's (1 %)
alarm_budget = 0.0    # share of undrifted windows with the alarm on, after hysteresis; 0: the bundle's (0.5 %)

[sampling]
enabled = true
low_confidence = 0.6  # capture inputs predicted with less confidence than this (and high drift scores)
reservoir_size = 16   # plus a uniform sample of this many ordinary inputs (unbiased) ...
reservoir_interval_s = 3600.0  # ... uploaded this often
max_per_minute = 6.0  # at most this many drift / low-confidence captures per minute
burst = 10
score_rate = 30.0     # inputs per second given a per-input drift score (0: every input); windows score all
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

[results]             # where `agent run` puts the predictions of its sources
mqtt_per_s = 2.0      # at most this many results a second on {{prefix}}/devices/{{id}}/results; 0 = none
http = true           # GET /results/latest and GET /results/stream (Server-Sent Events)
jsonl = ""            # append every result to this file; "" = off
jsonl_max_bytes = 67108864

# Sources predicted continuously by `agent run` (also: agent run --source URI). One table each:
# [[sources]]
# uri = "camera:0"    # camera:0, /dev/video0, picamera, rtsp://..., http://.../stream.mjpg, clip.mp4,
#                     # dir:PATH (new images in a folder), npy:PATH or stdin (tensor models)
# fps = 0.0           # at most this many frames a second to the model; 0 = as delivered
# every = 1           # or only every N-th frame
# roi = []            # [x, y, width, height]: predict on this region of the frame only
# drop = "auto"       # model behind: "oldest" frame dropped (auto for cameras/streams) or "never" (files)
# queue = 2
# loop = false        # video files: start again at the end
# realtime = false    # video files: at their own frame rate, like a camera (then frames drop when behind)
"""


def write_template(path: str | os.PathLike[str], *, device_id: str = "edge-device", state_dir: str = "./edgeloop-state",
                   trusted_key: str = "fleet.pub", force: bool = False) -> Path:
    """Write the commented default config; refuse to overwrite unless ``force``."""
    p = Path(path)
    if p.exists() and not force:
        raise ConfigError(f"{p} already exists", hint="pass --force to overwrite it", path=str(p))
    text = TEMPLATE.format(device_id=device_id, state_dir=state_dir, trusted_key=trusted_key)
    parse_config(parse_toml(text, source=str(p)), source=str(p))  # the template must always be valid
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p
