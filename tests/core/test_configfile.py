"""core/configfile: one strict loader for every config; errors name the file and the key."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from core.configfile import check, from_mapping, invalid, knob, load_file, read_mapping, supported_schema
from core.configwrite import to_dict, to_json, to_toml
from core.errors import ConfigError, ProtocolError
from core.protocol import TopicScheme, validate_topic_prefix

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Inner:
    soak_s: float = knob(60.0, ge=0)
    waves: tuple[float, ...] = knob((0.25, 1.0), gt=0, le=1, nonempty=True)
    delivery: Literal["auto", "http"] = knob("auto", values={"any": "auto"})
    token: str | None = knob(None, secret=True)

    def __post_init__(self) -> None:
        check(self)
        if list(self.waves) != sorted(self.waves):
            raise invalid("waves", "must increase")


@dataclass(frozen=True)
class Item:
    name: str = knob(nonempty=True)
    weight: int = 1

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class Outer:
    rollout: Inner = knob(factory=Inner, aliases=("roll",))
    items: tuple[Item, ...] = ()
    path: Path = Path("data")
    name: str | None = None
    count: int = knob(3, ge=1, le=10)
    schema_version: int = knob(1, check=supported_schema(1))
    source: str = knob("<defaults>", internal=True)

    def __post_init__(self) -> None:
        check(self)


def _err(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_mapping(Outer, data, source="/etc/edgeloop/fleet.toml")
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize(("data", "key", "text"), [
    ({"rollout": {"soak_s": "abc"}}, "rollout.soak_s",
     'fleet.toml: [rollout].soak_s: expected a number >= 0, got "abc"'),
    ({"rollout": {"soak_s": -1}}, "rollout.soak_s", "fleet.toml: [rollout].soak_s: expected a number >= 0, got -1"),
    ({"rollout": {"soak_s": True}}, "rollout.soak_s", "expected a number >= 0, got true"),
    ({"rollout": {"waves": [0.5, 2]}}, "rollout.waves", "[rollout].waves: expected a list of numbers in (0, 1]"),
    ({"rollout": {"waves": []}}, "rollout.waves", "[rollout].waves: expected a non-empty list"),
    ({"rollout": {"waves": "0.5"}}, "rollout.waves", "[rollout].waves: expected a list of numbers"),
    ({"rollout": {"waves": [1.0, 0.5]}}, "rollout.waves", "[rollout].waves: must increase"),
    ({"rollout": {"delivery": "mqtt"}}, "rollout.delivery", '[rollout].delivery: expected one of "auto", "http"'),
    ({"rollout": {"token": 5}}, "rollout.token", "[rollout].token: expected a string, got ***"),
    ({"rollout": 3}, "rollout", "[rollout]: expected a table, got 3"),
    ({"count": 11}, "count", "fleet.toml: count: expected an integer in [1, 10], got 11"),
    ({"count": 2.0}, "count", "count: expected an integer in [1, 10], got 2.0"),
    ({"path": 3}, "path", "path: expected a path, got 3"),
    ({"items": [{"name": "a"}, {"weight": 2}]}, "items[1].name", "[items][1].name: is required"),
    ({"items": [{"name": "a", "weight": "x"}]}, "items[0].weight", '[items][0].weight: expected an integer, got "x"'),
    ({"schema_version": 2}, "schema_version", "schema_version: this edgeloop reads schema_version 1, got 2"),
])
def test_errors_name_the_file_and_the_key(data: dict[str, Any], key: str, text: str) -> None:
    err = _err(data)
    assert text in str(err)
    assert err.context["key"] == key
    assert err.context["path"] == "/etc/edgeloop/fleet.toml"
    assert err.hint  # every error says how to fix it


def test_unknown_keys_are_refused_with_the_known_ones() -> None:
    err = _err({"rollout": {"soak": 1}})
    assert str(err).startswith("fleet.toml: [rollout].soak: unknown key")
    assert "did you mean soak_s?" in err.hint and "known: soak_s, waves, delivery, token" in err.hint
    err = _err({"rolout": {}})
    assert str(err).startswith("fleet.toml: [rolout]: unknown section")
    err = _err({"source": "x"})  # internal fields are not keys of the file
    assert "unknown key" in str(err) and "source" not in err.hint


def test_aliases_values_and_normalisation(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="core.configfile"):
        cfg = from_mapping(Outer, {"roll": {"soak_s": 5, "waves": [0.5, 1], "delivery": "any"},
                                   "items": [{"name": "a"}], "path": "x/y"})
    assert "deprecated" in caplog.text
    assert cfg.rollout == Inner(soak_s=5.0, waves=(0.5, 1.0), delivery="auto")
    assert isinstance(cfg.rollout.soak_s, float) and cfg.items == (Item("a"),) and cfg.path == Path("x/y")
    assert "old name of rollout" in str(_err({"roll": {}, "rollout": {}}))
    # construction in code is held to the same rules (and normalised the same way)
    assert Inner(waves=[0.5]).waves == (0.5,)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^soak_s: expected a number >= 0, got -1"):
        Inner(soak_s=-1)


def test_round_trip_toml_and_json(tmp_path: Path) -> None:
    cfg = Outer(rollout=Inner(soak_s=1.5, token="t0k3n-secret"), items=(Item("a"), Item("b", 2)), name="n")
    text = to_toml(cfg)
    assert "[[items]]" in text and "source" not in text
    assert from_mapping(Outer, tomllib.loads(text)) == cfg
    assert from_mapping(Outer, json.loads(to_json(cfg))) == cfg
    (tmp_path / "c.toml").write_text(text)
    (tmp_path / "c.json").write_text(to_json(cfg))
    assert load_file(Outer, tmp_path / "c.toml") == load_file(Outer, tmp_path / "c.json") == cfg


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        read_mapping(tmp_path / "missing.toml", missing_hint="create one")
    (tmp_path / "bad.toml").write_text("[a\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        read_mapping(tmp_path / "bad.toml")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="bad.json: expected a table"):
        read_mapping(tmp_path / "bad.json")


# --------------------------------------------------------------- the five real configs


def _agent() -> Any:
    from core.agent_config import parse_config

    return parse_config({"agent": {"device_id": "cam-1", "trusted_key": "fleet.pub"},
                         "broker": {"port": 8883, "protocol": "3.1.1", "topic_prefix": "site/a"},
                         "model": {"input_size": [64, 64]}, "update": {"keep_slots": 3}})


def _fleet(tmp_path: Path) -> Any:
    from fleet.config import ApiConfig, default_config
    from fleet.dashboard.auth import hash_password
    from fleet.dashboard.config import DashboardConfig, DashboardUser
    from fleet.policy import CandidateGate, TriggerPolicy

    users = (DashboardUser("bob", hash_password("pw-123456", iterations=1000), "operator"),)
    return default_config(tmp_path / "data", model_name="digits", prefix="site/b",
                          api=ApiConfig(token="a-long-token"), trigger=TriggerPolicy(alarm_devices=2),
                          acceptance=CandidateGate(min_improvement=0.05),
                          dashboard=DashboardConfig(viewer_token="v" * 16, users=users))


def test_every_config_round_trips_through_toml_and_json(tmp_path: Path) -> None:
    from core.agent_config import AgentConfig, parse_config
    from fleet.config import config_from_dict, config_to_dict, load_config, render_config
    from fleet.dashboard.config import DashboardConfig
    from fleet.policy import RetrainPolicyConfig

    agent = _agent()
    for data in (tomllib.loads(to_toml(agent)), json.loads(to_json(agent))):
        assert parse_config(data, source="<string>") == agent
    assert isinstance(agent, AgentConfig) and agent.broker.protocol == "3.1.1"

    fleet = _fleet(tmp_path)
    (tmp_path / "fleet.toml").write_text(render_config(fleet))
    assert load_config(tmp_path / "fleet.toml") == fleet
    assert config_from_dict(json.loads(json.dumps(config_to_dict(fleet))), base_dir=tmp_path) == fleet
    dash = fleet.dashboard
    assert DashboardConfig.from_dict(tomllib.loads(to_toml(dash))) == dash
    assert DashboardConfig.from_dict(json.loads(to_json(dash))) == dash

    policy = RetrainPolicyConfig(alarm_devices=5, fine_tune_lr=1e-4)
    assert RetrainPolicyConfig.from_dict(tomllib.loads(to_toml(policy))) == policy
    assert RetrainPolicyConfig.from_dict(json.loads(to_json(policy))) == policy


def test_train_config_round_trips(tmp_path: Path) -> None:
    train_config = pytest.importorskip("train.config")
    cfg = train_config.TrainConfig(model="tiny-cnn", epochs=3, channels=1, dataset=str(tmp_path))
    assert train_config.TrainConfig.from_dict(json.loads(to_json(cfg))) == cfg
    (tmp_path / "train.toml").write_text(to_toml(cfg))
    assert train_config.TrainConfig.load(tmp_path / "train.toml") == cfg
    with pytest.raises(ConfigError, match=r"train.toml: epochs: expected an integer in \[1, 10000\], got 0"):
        (tmp_path / "train.toml").write_text("epochs = 0\n")
        train_config.TrainConfig.load(tmp_path / "train.toml")


def test_errors_of_the_real_configs_name_file_and_key(tmp_path: Path) -> None:
    from core.agent_config import load_config as load_agent
    from fleet.config import load_config as load_fleet

    p = tmp_path / "fleet.toml"
    for text, message in (
            ('[rollout]\nsoak_s = "abc"\n', 'fleet.toml: [rollout].soak_s: expected a number >= 0, got "abc"'),
            ("[fleet]\nprefx = 1\n", "fleet.toml: [fleet].prefx: unknown key"),
            ("data_dir = 'x'\n", "fleet.toml: data_dir: unknown key"),
            ("[acceptance]\nholdout_fraction = 1\n", "fleet.toml: [acceptance].holdout_fraction: expected a number"),
            ("[dashboard]\n[[dashboard.users]]\nname = 'x'\npassword_hash = 'plain'\n",
             "fleet.toml: [dashboard].users[0].password_hash: expected pbkdf2_sha256$"),
            ("schema_version = 9\n", "fleet.toml: schema_version: this edgeloop reads schema_version 1")):
        p.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_fleet(p)
        assert str(info.value).startswith(message), str(info.value)
    a = tmp_path / "agent.toml"
    a.write_text('[agent]\ndevice_id = "d"\ntrusted_key = "k"\n[telemetry]\ninterval_s = "often"\n')
    with pytest.raises(ConfigError, match=r'^agent.toml: \[telemetry\].interval_s: expected a number in \(0, 86400\], '
                                          r'got "often"'):
        load_agent(a)


def test_old_files_still_load(tmp_path: Path) -> None:
    from core.agent_config import parse_config
    from fleet.config import FLEET_CONFIG_SCHEMA_VERSION, load_config

    assert parse_config({"agent": {"allow_unsigned": True}, "broker": {"protocol": "mqtt5"}}).broker.protocol == "5"
    p = tmp_path / "fleet.toml"  # a file from before schema_version, [acceptance] and the unified names
    p.write_text('[fleet]\ndata_dir = "d"\n[broker]\nprotocol = "3.1.1"\n[trigger]\nlabelled_samples = 100\n'
                 "alarm_persist_s = 120\n[gate]\nmin_improvement = 0.03\n")
    cfg = load_config(p)
    assert cfg.schema_version == FLEET_CONFIG_SCHEMA_VERSION and cfg.data_dir == tmp_path / "d"
    assert (cfg.trigger.min_labelled_samples, cfg.trigger.alarm_persist_s, cfg.acceptance.min_improvement) == \
        (100, 120.0, 0.03)


def test_the_agent_template_spells_out_the_defaults() -> None:
    from core.agent_config import TEMPLATE, AgentConfig, AgentSection, parse_config

    cfg = parse_config(tomllib.loads(TEMPLATE.format(device_id="edge-device", state_dir="./edgeloop-state",
                                                     trusted_key="fleet.pub")))
    defaults = AgentConfig(agent=AgentSection(trusted_key="fleet.pub"), source="<string>")
    assert cfg == defaults  # one default per knob: the commented template cannot drift from the classes


@pytest.mark.parametrize("prefix", ["a//b", "/a", "a/", "", "a/+/b", "a/#", "$SYS/x", "a/$b"])
def test_one_topic_prefix_rule_for_both_configs_and_the_protocol(prefix: str) -> None:
    from core.agent_config import BrokerSection
    from fleet.config import FleetConfig

    with pytest.raises(ProtocolError):
        validate_topic_prefix(prefix)
    with pytest.raises(ProtocolError):
        TopicScheme(prefix)
    with pytest.raises(ConfigError, match="topic_prefix: invalid topic prefix"):
        BrokerSection(topic_prefix=prefix)
    with pytest.raises(ConfigError, match="prefix: invalid topic prefix"):
        FleetConfig(prefix=prefix)


def test_good_prefixes_pass_everywhere() -> None:
    from core.agent_config import BrokerSection
    from fleet.config import FleetConfig

    for prefix in ("edgeloop/v1", "site-3/line_2", "x"):
        assert TopicScheme(prefix).prefix == BrokerSection(topic_prefix=prefix).topic_prefix == \
            FleetConfig(prefix=prefix).prefix == validate_topic_prefix(prefix)


def test_to_dict_is_plain_data() -> None:
    data = to_dict(Outer(path=Path("p"), items=(Item("a"),)))
    assert data["path"] == "p" and data["items"] == [{"name": "a", "weight": 1}] and "source" not in data
    json.dumps(data)
