"""A fleet that sets itself up: ``fleet init``, ``fleet keys trust|list`` and ``fleet model add``.

``fleet init`` writes everything a fleet needs to start, in one folder::

    fleet.toml                          0600: broker password, API token, dashboard login hash
    fleet-data/keys/fleet.key|.pub      the signing key (devices pin fleet.pub)
    fleet-data/mosquitto/mosquitto.conf loopback listener, passwords, ACL (group mosquitto, 0640)
    fleet-data/mosquitto/passwd, acl    the fleet's own broker users (devices are added by provision)
    fleet-data/fleet.db                 the registry

and returns the dashboard admin's password, which is printed once and stored only as a hash.

Trusted keys: the fleet accepts bundles signed by its own key or by any public key copied
into ``<data_dir>/keys/trusted/`` (``fleet keys trust PUB``).  Devices pin only the fleet's
key, so ``fleet model add`` re-signs a bundle signed by another trusted key with the
fleet's key (the manifest, and so every member's hash, stays as it was) before registering
it: the fleet vouches for what it pushes.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import ConfigError

if TYPE_CHECKING:
    from .config import FleetConfig
    from .models import ModelVersion
    from .provision import BrokerFiles
    from .registry import Registry

__all__ = ["InitResult", "init_fleet", "trusted_key_paths", "trust_key", "add_model", "ADMIN_USER"]

ADMIN_USER = "admin"


@dataclass(frozen=True)
class InitResult:
    config: Path
    data_dir: Path
    public_key: Path
    broker: BrokerFiles
    admin_user: str
    admin_password: str  # shown once; fleet.toml keeps only its hash
    api_url: str


def init_fleet(directory: Path, *, force: bool = False, broker_port: int = 1883, api_port: int = 8080,
               admin_user: str = ADMIN_USER) -> InitResult:
    """Write ``fleet.toml`` with fresh secrets, the signing key, the registry and the broker files."""
    from .acl import new_password, write_private
    from .config import ApiConfig, BrokerConfig, default_config, load_config, render_config
    from .dashboard.auth import hash_password
    from .dashboard.config import DashboardConfig, DashboardUser
    from .provision import ensure_fleet_user, ensure_signing_key, write_broker_files
    from .registry import Registry

    path = Path(directory) / "fleet.toml"
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists", hint="pass --force to overwrite it", path=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    admin_password = new_password()
    cfg = dataclasses.replace(
        default_config("fleet-data"),
        # an unguessable MQTT 5 share group: no device can join the fleet's (docs/fleet.md)
        broker=BrokerConfig(port=broker_port, username="fleet", password=new_password(),
                            shared_group=f"fleet-{secrets.token_hex(12)}"),
        api=ApiConfig(port=api_port, token=secrets.token_hex(16)),
        dashboard=DashboardConfig(users=(DashboardUser(name=admin_user, role="operator",
                                                       password_hash=hash_password(admin_password)),),
                                  session_secret=secrets.token_hex(16)))
    write_private(path, render_config(cfg))  # 0600 from creation: it holds the broker password and the API token
    cfg = load_config(path)
    pub = ensure_signing_key(cfg)
    registry = Registry.open(cfg.database_url, busy_timeout_ms=cfg.database.busy_timeout_ms)
    try:
        ensure_fleet_user(cfg, registry)
        files = write_broker_files(cfg, registry)
    finally:
        registry.close()
    return InitResult(config=path, data_dir=cfg.data_dir, public_key=pub, broker=files, admin_user=admin_user,
                      admin_password=admin_password, api_url=cfg.api.base_url)


# --------------------------------------------------------------------------- trusted keys
def _trusted_dir(config: FleetConfig) -> Path:
    return config.keys_dir / "trusted"


def trusted_key_paths(config: FleetConfig) -> list[Path]:
    """The fleet's own public key, then every key ``fleet keys trust`` added."""
    d = _trusted_dir(config)
    return [config.public_key_path, *(sorted(d.glob("*.pub")) if d.is_dir() else [])]


def trust_key(config: FleetConfig, public_key: Path) -> Path:
    """Copy ``public_key`` (an ``edgeloop keys new`` .pub file) into the trusted keys; returns the copy."""
    from core.signing import load_public_key

    key = load_public_key(public_key)  # refuses anything that is not a public key
    dest = _trusted_dir(config) / f"{key.key_id}.pub"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(public_key, dest)
    return dest


# --------------------------------------------------------------------------- models
def _resign(src: Path, dest: Path, config: FleetConfig) -> None:
    """Copy bundle ``src`` to ``dest`` with its manifest signed by the fleet's key (members unchanged)."""
    from core.bundle import MANIFEST_MEMBER, SIGNATURE_MEMBER, _signature_bytes, _zipinfo, open_bundle
    from core.signing import load_private_key

    key = load_private_key(config.signing_key_path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(src) as zin, \
                zipfile.ZipFile(fh, "w", allowZip64=True) as zout:
            mbytes = zin.read(MANIFEST_MEMBER)
            zout.writestr(zin.getinfo(MANIFEST_MEMBER), mbytes)
            zout.writestr(_zipinfo(SIGNATURE_MEMBER), _signature_bytes(key, mbytes))
            for info in zin.infolist():
                if info.filename in (MANIFEST_MEMBER, SIGNATURE_MEMBER):
                    continue
                with zin.open(info) as r, zout.open(info, "w") as w:
                    shutil.copyfileobj(r, w, 1 << 20)
        open_bundle(tmp, trusted_key=config.public_key_path, require_signature=True)  # what devices will check
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def add_model(config: FleetConfig, registry: Registry, bundle: Path, *, status: str = "accepted") -> ModelVersion:
    """Verify ``bundle`` against the trusted keys, store it (signed by the fleet) and register it.

    No device needs to be online; ``fleet rollout NAME:VERSION`` rolls it out later.
    """
    from core.bundle import open_bundle
    from core.signing import load_public_key

    from .provision import ensure_signing_key

    ensure_signing_key(config)
    opened = open_bundle(bundle, trusted_key=trusted_key_paths(config), require_signature=True)
    m = opened.manifest
    dest = config.bundles_dir / f"{m.name}-{m.version}.elb"
    dest.parent.mkdir(parents=True, exist_ok=True)
    own = load_public_key(config.public_key_path)
    if opened.signed_by == own.key_id:
        if Path(bundle).resolve() != dest.resolve():
            shutil.copyfile(bundle, dest)
    else:
        _resign(Path(bundle), dest, config)
    return registry.models.register(dest, trusted_key=own, status=status)
