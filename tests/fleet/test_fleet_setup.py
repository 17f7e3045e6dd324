"""The fleet operator's first steps (issue 15): init, keys trust, model add, provision kits, no stray state."""

from __future__ import annotations

import grp
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from core.agent_config import load_config as load_agent_config
from core.bundle import open_bundle
from core.signing import load_public_key, save_keypair
from edgeloop.cli import main
from fleet.config import load_config
from fleet.dashboard.auth import verify_password
from fleet.mosquitto import find_mosquitto, free_port
from fleet.registry import Registry
from tests.plugins.agent_kit import make_bundle


def _init(tmp_path: Path, capsys: pytest.CaptureFixture[str], port: int = 1883) -> tuple[Path, str]:
    assert main(["fleet", "init", "--dir", str(tmp_path), "--broker-port", str(port)]) == 0
    return tmp_path / "fleet.toml", capsys.readouterr().out


def _broker_group() -> int | None:
    try:
        return grp.getgrnam("mosquitto").gr_gid
    except KeyError:
        return None


def test_init_writes_config_key_broker_files_and_a_dashboard_login(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path, out = _init(tmp_path, capsys)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cfg = load_config(path)
    password = re.search(r"user admin\s+password (\S+)", out)
    assert password, out
    (user,) = cfg.dashboard.users
    assert user.role == "operator" and verify_password(password.group(1), user.password_hash)
    assert password.group(1) not in path.read_text()  # only its hash is kept
    assert cfg.public_key_path.exists() and cfg.signing_key_path.exists()
    conf = (cfg.mosquitto_dir / "mosquitto.conf").read_text()
    assert "listener 1883 127.0.0.1" in conf and "allow_anonymous false" in conf
    passwd = (cfg.mosquitto_dir / "passwd").read_text()
    assert passwd.startswith("fleet:") and "fleet.tool:" in passwd
    gid = _broker_group()
    for name in ("passwd", "acl", "mosquitto.conf"):
        st = (cfg.mosquitto_dir / name).stat()
        if gid is not None and os.geteuid() == 0:  # the broker's group may read them, nobody else
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, gid), name
        else:
            assert stat.S_IMODE(st.st_mode) in (0o600, 0o640), name
    assert main(["fleet", "init", "--dir", str(tmp_path)]) == 2  # never overwrites secrets silently
    assert "--force" in capsys.readouterr().err


def test_generated_broker_config_starts_mosquitto_and_admits_the_fleet(open_dir: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """As root, Mosquitto drops to user mosquitto before reading the password file: it must still read it."""
    if find_mosquitto() is None:
        pytest.skip("no mosquitto binary: install the Debian package mosquitto")
    tmp_path = open_dir
    path, _ = _init(tmp_path, capsys, port=free_port())
    cfg = load_config(path)
    from fleet.ingest_workers import connect_client

    proc = subprocess.Popen([find_mosquitto() or "mosquitto", "-c", str(cfg.mosquitto_dir / "mosquitto.conf")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client, _ = connect_client(cfg.broker, client_id="fleet.tool", timeout=20)
        client.disconnect()
        client.loop_stop()
    finally:
        proc.terminate()
        log = proc.communicate(timeout=10)[0].decode(errors="replace")
    assert "Unable to open" not in log, log


def test_reports_outside_a_fleet_folder_fail_and_create_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for argv in (["fleet", "status"], ["fleet", "devices", "--json"], ["fleet", "provision", "cam-1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "fleet.toml" in err and "edgeloop fleet init" in err, err
    assert list(tmp_path.iterdir()) == []


def test_model_add_takes_bundles_of_trusted_keys_and_signs_them_for_the_devices(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _init(tmp_path / "fleet", capsys)
    keys = save_keypair(tmp_path / "me")
    bundle = make_bundle(tmp_path / "tiny.elb", signing_key=keys.private)
    assert main(["fleet", "model", "add", str(bundle), "-c", str(path)]) == 2
    assert "not trusted" in capsys.readouterr().err
    assert main(["fleet", "keys", "trust", str(keys.public), "-c", str(path)]) == 0
    assert main(["fleet", "keys", "list", "-c", str(path)]) == 0
    assert load_public_key(keys.public).key_id in capsys.readouterr().out
    assert main(["fleet", "model", "add", str(bundle), "-c", str(path)]) == 0
    cfg = load_config(path)
    reg = Registry.open(cfg.database_url)
    try:
        (rec,) = reg.models.find()
    finally:
        reg.close()
    assert (rec.name, rec.version, rec.status) == ("tiny-mlp", "1.0.0", "accepted")
    fleet_key = load_public_key(cfg.public_key_path)
    assert rec.signed_by == fleet_key.key_id  # the devices pin the fleet's key only
    stored = open_bundle(rec.bundle_path, trusted_key=cfg.public_key_path, require_signature=True)
    assert stored.manifest == open_bundle(bundle, trusted_key=keys.public).manifest


def test_provision_kit_uses_relative_paths_and_works_anywhere(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _init(tmp_path / "fleet", capsys)
    kit = tmp_path / "kit"
    assert main(["fleet", "provision", "cam-1", "-c", str(path), "--out", str(kit), "--json"]) == 0
    text = (kit / "agent.toml").read_text()
    assert 'password_file = "mqtt.password"' in text and 'trusted_key = "fleet.pub"' in text
    assert str(tmp_path) not in text  # nothing points back at the fleet host
    moved = shutil.copytree(kit, tmp_path / "elsewhere" / "kit")
    cfg = load_agent_config(moved / "agent.toml")
    assert cfg.broker_password() == (kit / "mqtt.password").read_text().strip()
    assert cfg.trusted_key_path == str(moved / "fleet.pub")


def test_provision_tags_the_device_for_rollout_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _init(tmp_path / "fleet", capsys)
    assert main(["fleet", "provision", "cam-1", "-c", str(path), "--tag", "group=cams-north", "--tag", "site=a",
                 "--json"]) == 0
    assert main(["fleet", "provision", "cam-2", "-c", str(path), "--tag", "group", "--json"]) == 2  # no value
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad --tag" in err[0] and "KEY=VALUE" in err[0]
    reg = Registry.open(load_config(path).database_url)
    try:
        assert reg.device("cam-1").tags == {"group": "cams-north", "site": "a"}
        assert reg.device("cam-2") is None  # a refused command creates nothing
    finally:
        reg.close()


def test_rollouts_table_shows_full_ids(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from fleet.cli import _table

    monkeypatch.setenv("COLUMNS", "60")
    rid = "ro-20260101-120000-abcdef"
    _table("rollouts", ["id", "model", "version", "status", "targets", "reason"],
           [[rid, "tiny-mlp", "1.0.0", "completed", "completed 4", "all waves passed the gate"]])
    assert rid in capsys.readouterr().out
