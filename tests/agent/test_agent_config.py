"""Agent config: the template is valid, and every invalid value is refused naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.agent_config import AgentConfig, load_config, parse_config, write_template
from core.errors import ConfigError
from edge_agent.cli import register  # noqa: F401  (the CLI module must import without heavy deps)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_template_round_trips_and_resolves_relative_paths(tmp_path: Path) -> None:
    p = write_template(tmp_path / "agent.toml", device_id="pi-01", trusted_key="fleet.pub")
    cfg = load_config(p)
    assert isinstance(cfg, AgentConfig)
    assert cfg.agent.device_id == "pi-01"
    assert cfg.http.bind == "127.0.0.1"  # localhost unless configured otherwise
    assert cfg.model.variant == "auto"
    assert cfg.state_dir == (tmp_path / "edgeloop-state").resolve()
    with pytest.raises(ConfigError, match="already exists"):
        write_template(p)


@pytest.mark.parametrize(
    ("section", "line", "message"),
    [
        ("broker", "port = 70000", r"agent.toml: \[broker\].port: expected an integer in \[1, 65535\], got 70000"),
        ("broker", 'port = "1883"', r"agent.toml: \[broker\].port: expected an integer in \[1, 65535\], got \"1883\""),
        ("broker", "tls = 1", r"\[broker\].tls: expected true or false, got 1"),
        ("broker", 'protocol = "mqtt4"', r"\[broker\].protocol: expected one of \"auto\", \"5\", \"3.1.1\""),
        ("broker", 'topic_prefix = "a//b"', r"\[broker\].topic_prefix: invalid topic prefix"),
        ("model", "threads = 0", r"\[model\].threads: expected an integer in \[1, 256\], got 0"),
        ("model", "input_size = [64]", r"\[model\].input_size: expected \[\] or \[height, width\]"),
        ("model", "input_channels = 2", r"\[model\].input_channels: expected one of 0, 1, 3, got 2"),
        ("drift", "window = 3", r"\[drift\].window: expected 0 \(the bundle's\) or an integer"),
        ("sampling", "low_confidence = 1.5", r"\[sampling\].low_confidence: expected a number in \[0, 1\], got 1.5"),
        ("http", 'bind = "my laptop"', r"\[http\].bind: expected an IP address"),
        ("update", "max_boots = 0", r"\[update\].max_boots: expected an integer"),
        ("update", "colour = 3", r"\[update\].colour: unknown key"),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, section: str, line: str, message: str) -> None:
    text = f'[agent]\ndevice_id = "d1"\ntrusted_key = "k.pub"\n[{section}]\n{line}\n'
    if section == "agent":
        text = f"[agent]\n{line}\n"
    with pytest.raises(ConfigError, match=message) as info:
        load_config(_write(tmp_path, text))
    assert info.value.context["key"].startswith(section)
    assert "\n" not in str(info.value)


def test_unknown_section_missing_key_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[brokr\]: unknown section \(did you mean broker\?"):
        load_config(_write(tmp_path, '[brokr]\nhost = "x"\n'))
    with pytest.raises(ConfigError, match=r"\[agent\].trusted_key: is required"):
        load_config(_write(tmp_path, '[agent]\ndevice_id = "d1"\n'))
    with pytest.raises(ConfigError, match=r"\[agent\].device_id: invalid device id"):
        load_config(_write(tmp_path, '[agent]\ndevice_id = "a/b"\ntrusted_key = "k"\n'))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[agent\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")


def test_replace_and_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    cfg = parse_config({"agent": {"allow_unsigned": True}, "broker": {"password_file": str(secret)}})
    assert cfg.broker.secret() == "s3cret"
    assert cfg.replace(http={"port": 0}).http.port == 0
    with pytest.raises(ConfigError, match=r"\[http\].port"):
        cfg.replace(http={"port": -1})


def test_cli_init_writes_a_loadable_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgeloop.cli import main

    out = tmp_path / "a.toml"
    assert main(["agent", "init", str(out), "--device-id", "cam-7", "--json"]) == 0
    assert load_config(out).agent.device_id == "cam-7"
    assert main(["agent", "init", str(out)]) == 2  # exists: one line, no traceback
    assert "already exists" in capsys.readouterr().err
