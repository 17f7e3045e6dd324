"""``edgeloop fleet provision DEVICE``: credentials, broker files and a ready ``agent.toml``.

The fleet keeps only password *hashes* (``credentials`` table); the password is written
once into the device's kit (``mqtt.password``, mode 0600) and never again.  Every call
regenerates the whole Mosquitto password file and ACL from the database, so the files
always match what the fleet has issued; Mosquitto rereads them on ``SIGHUP``.  The broker
files are group ``mosquitto``, mode 0640, where that group exists (Debian's broker runs as
user ``mosquitto``): :func:`fleet.mosquitto.make_broker_readable`.

Paths in the kit's ``agent.toml`` are relative to the kit (the agent reads them relative to
its config file), so the kit works wherever it is copied; ``owner`` hands its files to the
agent's user (``fleet provision --owner``).

The kit directory holds everything a device needs::

    agent.toml      broker host/port/user, password_file, the fleet's public key pinned
    mqtt.password   the device's MQTT password
    fleet.pub       the fleet's Ed25519 public key (bundles must be signed by it)
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core.errors import FleetError
from core.protocol import validate_device_id

from .acl import fleet_usernames, hash_password, new_password, render_acl, render_password_file, write_private
from .config import FleetConfig
from .registry import Registry

__all__ = ["ProvisionResult", "BrokerFiles", "ensure_signing_key", "ensure_fleet_user", "write_broker_files",
           "provision_device", "render_agent_toml", "render_mosquitto_conf", "MAX_PACKET_BYTES"]


@dataclass(frozen=True)
class BrokerFiles:
    password_file: Path
    acl_file: Path
    conf_snippet: Path
    readable_by_broker: bool = False  # group mosquitto 0640 (else 0600: run the broker as this user)


@dataclass(frozen=True)
class ProvisionResult:
    device_id: str
    username: str
    kit_dir: Path
    agent_toml: Path
    password_path: Path
    public_key: Path
    broker: BrokerFiles


def ensure_signing_key(config: FleetConfig) -> Path:
    """The fleet's Ed25519 signing key (created on first use, 0600); returns the public key path."""
    from core.signing import save_keypair

    priv, pub = config.signing_key_path, config.public_key_path
    if not priv.exists():
        paths = save_keypair(priv.with_suffix(""))
        return paths.public
    if not pub.exists():
        from core.signing import load_private_key

        save_keypair(priv.with_suffix(""), load_private_key(priv), overwrite=True)
    return pub


def _set_credential(registry: Registry, username: str, role: str, password: str) -> None:
    registry.credentials.put(username, role, hash_password(password))


def ensure_fleet_user(config: FleetConfig, registry: Registry) -> None:
    """Record the fleet's own broker user (from ``[broker]`` username/password) in the credentials."""
    b = config.broker
    if b.username and b.password:
        _set_credential(registry, b.username, "fleet", b.password)


def write_broker_files(config: FleetConfig, registry: Registry) -> BrokerFiles:
    """Regenerate ``mosquitto/passwd``, ``mosquitto/acl`` and a config snippet from the database."""
    creds = registry.credentials.find()
    fleet = [c for c in creds if c.role == "fleet"]
    if not fleet:
        raise FleetError("no fleet broker user to write into the ACL",
                         hint="set [broker] username and password in fleet.toml (`edgeloop fleet init` does)")
    # Each fleet process has its own user (client ids are bound to user names), same password.
    users = {name: c.password_hash for c in fleet for name in fleet_usernames(c.username)}
    devices = {c.username: c.password_hash for c in creds if c.role == "device"}
    clash = sorted(set(users) & set(devices))
    if clash:
        raise FleetError(f"device ids {clash} are the fleet's own broker users",
                         hint="provision those devices under other names")
    d = config.mosquitto_dir
    passwd = write_private(d / "passwd", render_password_file({**users, **devices}))
    acl = write_private(d / "acl", render_acl(config.prefix, fleet_users=sorted(users),
                                              devices={u: u for u in devices}))
    conf = write_private(d / "mosquitto.conf", render_mosquitto_conf(config.broker.port, passwd, acl))
    from .mosquitto import make_broker_readable

    shared = make_broker_readable(d, passwd, acl, conf)
    return BrokerFiles(password_file=passwd, acl_file=acl, conf_snippet=conf, readable_by_broker=shared)


# The largest MQTT packet the broker takes: one sample chunk frame of the fleet's limit
# (fleet.ingest_guard.Budgets.max_frame_bytes) plus topic and properties.
MAX_PACKET_BYTES = 1024 * 1024 + 80 * 1024


def render_mosquitto_conf(port: int, password_file: Path, acl_file: Path, *,
                          max_packet_bytes: int = MAX_PACKET_BYTES) -> str:
    """The generated Mosquitto 2.x config: loopback only, client id bound to user name, size-capped.

    Devices on other machines need a TLS listener: docs/fleet.md ("Broker settings") has the recipe.
    """
    return (
        "# Mosquitto 2.x, written by `edgeloop fleet provision` (docs/fleet.md, \"Broker settings\")\n"
        "per_listener_settings false\n"
        "allow_anonymous false\n"
        f"password_file {password_file.resolve()}\n"
        f"acl_file {acl_file.resolve()}\n"
        "# the default (1000) drops QoS 1 messages for a fleet that falls behind during a burst\n"
        "max_queued_messages 100000\n"
        "# a client sending a bigger packet is disconnected (MQTT 5 clients are told the limit)\n"
        f"max_packet_size {max_packet_bytes}\n"
        "# loopback only: devices on other machines connect to a TLS listener (see docs/fleet.md)\n"
        f"listener {port} 127.0.0.1\n"
        "# a client's id is its user name: no device can connect as another and knock it offline\n"
        "use_username_as_clientid true\n")


def _replace_key(text: str, section: str, key: str, value: str) -> str:
    """Set ``key = value`` inside ``[section]`` of the agent's commented template (comments kept)."""
    start = text.index(f"[{section}]")
    end = text.find("\n[", start + 1)
    end = len(text) if end < 0 else end
    body, n = re.subn(rf"(?m)^{re.escape(key)} = [^#\n]*?(\s*(#.*)?)$", lambda m: f"{key} = {value}{m.group(1)}",
                      text[start:end], count=1)
    if n != 1:
        raise FleetError(f"the agent config template has no [{section}].{key}",
                         hint="core.agent_config.TEMPLATE changed; update fleet.provision")
    return text[:start] + body + text[end:]


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_agent_toml(config: FleetConfig, device_id: str, *, username: str, password_file: str,
                      trusted_key: str, broker_host: str | None = None, broker_port: int | None = None) -> str:
    """The agent's documented template with this device's identity, broker and pinned key filled in."""
    from core.agent_config import TEMPLATE, parse_config
    from core.configfile import parse_toml

    text = TEMPLATE.format(device_id=device_id, state_dir="./edgeloop-state", trusted_key=trusted_key)
    b = config.broker
    for key, value in (("host", _toml_str(broker_host or b.host)), ("port", str(broker_port or b.port)),
                       ("tls", "true" if b.tls else "false"), ("username", _toml_str(username)),
                       ("password_file", _toml_str(password_file)),
                       ("topic_prefix", _toml_str(config.prefix))):
        text = _replace_key(text, "broker", key, value)
    if b.tls and b.ca_file:
        text = _replace_key(text, "broker", "ca_file", _toml_str(str(b.ca_file)))
    parse_config(parse_toml(text, source="agent.toml"), source="agent.toml")  # never hand out a config the agent refuses
    return text


def _hand_over(kit: Path, owner: str, files: tuple[Path, ...]) -> None:
    """``chown owner[:group]`` the kit folder and its files (the agent runs as that user)."""
    user, _, group = owner.partition(":")
    try:
        for p in (kit, *files):
            shutil.chown(p, user=user, group=group or None)
    except (LookupError, PermissionError) as exc:
        raise FleetError(f"cannot hand the kit to {owner!r}: {exc}",
                         hint="run as root, or copy the kit and `chown -R USER` it on the device") from exc


def provision_device(config: FleetConfig, registry: Registry, device_id: str, *, out_dir: Path | None = None,
                     password: str | None = None, broker_host: str | None = None,
                     broker_port: int | None = None, owner: str | None = None,
                     tags: Mapping[str, str] | None = None) -> ProvisionResult:
    """Issue (or re-issue) ``device_id``'s credentials and write its kit; returns where everything went.

    ``tags`` (e.g. ``{"group": "cams-north"}``) are merged into the device's tags, which rollouts
    can target (``fleet rollout --target group=cams-north``).
    """
    validate_device_id(device_id)
    if config.broker.username and device_id in fleet_usernames(config.broker.username):
        raise FleetError(f"device id {device_id!r} is one of the fleet's own broker users",
                         hint="choose another device id")
    pub = ensure_signing_key(config)
    ensure_fleet_user(config, registry)
    secret = password or new_password()
    _set_credential(registry, device_id, "device", secret)
    registry.upsert_device(device_id, tags=dict(tags) if tags else None)
    kit = Path(out_dir) if out_dir is not None else config.data_dir / "devices" / device_id
    kit.mkdir(parents=True, exist_ok=True)
    password_path = write_private(kit / "mqtt.password", secret + "\n")
    key_copy = kit / "fleet.pub"
    shutil.copyfile(pub, key_copy)
    # Relative to agent.toml (the agent resolves them against its config file's folder): the kit
    # works wherever it is copied to.
    toml = render_agent_toml(config, device_id, username=device_id, password_file=password_path.name,
                             trusted_key=key_copy.name, broker_host=broker_host, broker_port=broker_port)
    agent_toml = write_private(kit / "agent.toml", toml)
    if owner:
        _hand_over(kit, owner, (agent_toml, password_path, key_copy))
    files = write_broker_files(config, registry)
    return ProvisionResult(device_id=device_id, username=device_id, kit_dir=kit, agent_toml=agent_toml,
                           password_path=password_path, public_key=key_copy, broker=files)
