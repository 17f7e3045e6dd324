"""Model updates: variant choice, HTTP download with resume, every refusal, health check, boot counter, kill -9,
corrupt MQTT transfers requested again."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.errors import BundleError, SignatureError, UpdateError
from core.mqtt import connect_client
from core.protocol import (
    BUNDLE_KIND,
    BundleRequest,
    DeployCommand,
    RollbackCommand,
    TopicScheme,
    decode_as,
    split,
)
from edge_agent.agent import Agent
from edge_agent.updater import compare_versions, download_http
from tests.plugins.agent_kit import agent_config, digits, make_bundle
from tests.plugins.broker import MosquittoBroker
from tests.plugins.files import FileServer, deploy_command, file_url

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def agent(tmp_path: Path, tiny_bundles: dict[str, Path]) -> Iterator[Agent]:
    a = Agent(agent_config(tmp_path / "state")).start()
    a.install(tiny_bundles["v1"])
    assert a.worker is not None
    a.worker.retry_wait_s = 0.0
    yield a
    a.close()


def _steps(agent: Agent, job: str) -> list[str]:
    return [j.step for j in agent.jobs if j.job_id == job]


def _still_serves(agent: Agent, version: str) -> None:
    p = agent.predict(digits().test_x[0])
    assert p.model_version == version


# --------------------------------------------------------------------------- variant choice
def test_auto_selection_measures_and_picks_the_fastest_within_budget(tmp_path: Path,
                                                                     tiny_bundles: dict[str, Path]) -> None:
    with Agent(agent_config(tmp_path / "s")).start() as a:
        res = a.install(tiny_bundles["multi"])
        c = res.choice
        # the "int8" variant is listed first and is 50x slower here: measured, not assumed
        assert c.mode == "auto" and c.variant == "onnx-fp32"
        assert set(c.latency_ms) == {"onnx-fp32", "onnx-int8-static"}
        assert c.latency_ms["onnx-int8-static"] > c.latency_ms["onnx-fp32"]
        assert "onnx-int8-dynamic" in c.skipped and "budget" in c.skipped["onnx-int8-dynamic"]
        state = a.device_state()
        assert state.variant == "onnx-fp32" and state.variant_latency_ms == c.latency_ms
        assert a.status().choice == c


def test_fixed_variant_preference(tmp_path: Path, tiny_bundles: dict[str, Path]) -> None:
    with Agent(agent_config(tmp_path / "s", model={"variant": "onnx-int8-static"})).start() as a:
        assert a.install(tiny_bundles["multi"]).choice.variant == "onnx-int8-static"
        assert a.predict(digits().test_x[0]).variant == "onnx-int8-static"
    with Agent(agent_config(tmp_path / "t", model={"variant": "tflite-int8"})).start() as a:
        with pytest.raises(UpdateError, match="configured variant 'tflite-int8' is not in bundle"):
            a.install(tiny_bundles["multi"])


# --------------------------------------------------------------------------- deploy over HTTP
def test_deploy_happy_path_with_interrupted_download_resuming(agent: Agent, file_server: FileServer,
                                                              tiny_bundles: dict[str, Path]) -> None:
    cmd = deploy_command(file_server, tiny_bundles["v2"], "job-1", "1.1.0")
    file_server.cut_first.add(f"/{tiny_bundles['v2'].name}")
    agent.worker.submit(cmd)
    assert agent.worker.wait_idle(60)
    steps = _steps(agent, "job-1")
    assert steps[0] == "received" and steps[-3:] == ["health_check", "switched", "completed"]
    assert {"downloading", "verifying", "installing"} <= set(steps)
    # the first response broke off halfway; the second asked only for the rest
    assert file_server.ranges[0] is None and file_server.ranges[1] == f"bytes={cmd.size // 2}-"
    _still_serves(agent, "1.1.0")
    assert agent.status().previous_version == "1.0.0"
    assert all(j.previous_version == "1.0.0" for j in agent.jobs if j.job_id == "job-1")
    assert not list((agent.config.state_dir / "downloads").iterdir())  # nothing left behind
    # the fleet's rollback command returns to the previous slot, no download
    agent.worker.submit(RollbackCommand(job_id="job-2", reason="canary failed"))
    assert agent.worker.wait_idle(30)
    assert _steps(agent, "job-2") == ["rolled_back"]
    _still_serves(agent, "1.0.0")


@pytest.mark.parametrize(
    ("which", "sha_ok", "match"),
    [
        ("tampered", True, "corrupt|modified|hash"),  # the member check catches a flipped byte
        ("wrong_key", True, "signature|key"),
        ("unsigned", True, "signature|unsigned|signed"),
        ("v2", False, "does not match the deploy command"),  # wrong hash announced
        ("v0", True, "older than the installed 1.0.0"),  # downgrade
        ("rgb", True, "expects 3-channel input"),  # input spec incompatible with the device
    ],
)
def test_rejected_updates_leave_the_old_model_serving(tmp_path: Path, file_server: FileServer, which: str, sha_ok: bool,
                                                      match: str, tiny_bundles: dict[str, Path]) -> None:
    cfg = agent_config(tmp_path / "state", model={"input_channels": 1})
    with Agent(cfg).start() as a:
        a.install(tiny_bundles["v1"])
        a.worker.retry_wait_s = 0.0
        cmd = deploy_command(file_server, tiny_bundles[which], f"job-{which}", "9.9.9", sha=None if sha_ok else "0" * 64)
        a.worker.submit(cmd)
        assert a.worker.wait_idle(60)
        last = [j for j in a.jobs if j.job_id == cmd.job_id][-1]
        assert last.step == "failed" and not last.ok
        import re

        assert re.search(match, last.detail, re.I), last.detail
        assert "\n" not in last.detail
        _still_serves(a, "1.0.0")
        assert len(a.slots.slots()) == 1  # no half-installed slot


def test_downgrade_allowed_with_force(agent: Agent, tiny_bundles: dict[str, Path]) -> None:
    with pytest.raises(UpdateError, match="older than"):
        agent.install(tiny_bundles["v0"])
    assert agent.install(tiny_bundles["v0"], force=True).version == "0.9.0"


def test_renaming_the_model_is_no_way_around_downgrade_protection(agent: Agent, tmp_path: Path) -> None:
    renamed = make_bundle(tmp_path / "other.elb", "0.1.0", name="not-tiny-mlp")
    with pytest.raises(UpdateError, match="serves 'tiny-mlp'"):
        agent.install(renamed)
    _still_serves(agent, "1.0.0")
    assert agent.install(renamed, force=True).version == "0.1.0"


def test_signature_errors_are_bundle_errors(agent: Agent, tiny_bundles: dict[str, Path]) -> None:
    with pytest.raises(SignatureError):
        agent.install(tiny_bundles["wrong_key"])
    with pytest.raises(BundleError):
        agent.install(tiny_bundles["tampered"])
    _still_serves(agent, "1.0.0")


# --------------------------------------------------------------------------- health check, disk
def test_failing_health_check_rolls_back(agent: Agent, tiny_bundles: dict[str, Path]) -> None:
    with pytest.raises(UpdateError, match="health check failed") as info:
        agent.install(tiny_bundles["broken"], job_id="job-h")
    assert "class agreement" in str(info.value)
    assert _steps(agent, "job-h")[-2:] == ["failed", "rolled_back"]
    _still_serves(agent, "1.0.0")
    assert len(agent.slots.slots()) == 1


def test_not_enough_disk_is_one_line_and_keeps_serving(agent: Agent, tiny_bundles: dict[str, Path]) -> None:
    agent.installer.config = agent.config.replace(update={"min_free_mb": 1e9})
    with pytest.raises(UpdateError, match="not enough disk space") as info:
        agent.install(tiny_bundles["v2"])
    assert "\n" not in str(info.value)
    _still_serves(agent, "1.0.0")


@pytest.fixture()
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (a full SD card in miniature); skipped where mounting is not allowed."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_download_into_a_full_disk(tiny_fs: Path, file_server: FileServer, tiny_bundles: dict[str, Path]) -> None:
    (tiny_fs / "filler").write_bytes(b"\0" * (1024 * 1024 - 16 * 1024))
    data = tiny_bundles["v2"].read_bytes()
    file_server.files["/b.elb"] = data
    with pytest.raises(UpdateError, match="not enough disk space") as info:
        download_http(file_url(file_server, "/b.elb"), tiny_fs / "b.elb", size=len(data),
                      sha256=hashlib.sha256(data).hexdigest())
    assert "\n" not in str(info.value)
    assert not (tiny_fs / "b.elb.part").exists()


# --------------------------------------------------------------------------- boot counter, kill -9
def test_boot_counter_rolls_back_after_repeated_crashes(tmp_path: Path, tiny_bundles: dict[str, Path]) -> None:
    clock = [1000.0]
    cfg = agent_config(tmp_path / "state", update={"max_boots": 3, "boot_window_min": 10.0})
    with Agent(cfg, clock=lambda: clock[0]).start() as a:
        a.install(tiny_bundles["v1"])
        a.slots.confirm()
        a.install(tiny_bundles["v2"])  # switched, on probation
    a = Agent(cfg, clock=lambda: clock[0]).start()  # after a clean stop: not counted
    assert a.model.version == "1.1.0" and a.slots.boot_count() == 0
    a.close(clean=False)  # the new model "crashes" the agent shortly after every start
    for n in (1, 2):
        clock[0] += 60
        a = Agent(cfg, clock=lambda: clock[0]).start()
        assert a.model.version == "1.1.0" and a.slots.boot_count() == n
        a.close(clean=False)
    clock[0] += 60
    with Agent(cfg, clock=lambda: clock[0]).start() as a:  # third start after a crash within 10 min: roll back
        assert a.model.version == "1.0.0"
        assert a.boot_rollback is not None
        assert [j.step for j in a.jobs][-1] == "rolled_back"
        assert a.status().rolled_back_from == a.boot_rollback


def test_clean_restarts_do_not_count(tmp_path: Path, tiny_bundles: dict[str, Path]) -> None:
    clock = [1000.0]
    cfg = agent_config(tmp_path / "state", update={"max_boots": 2, "boot_window_min": 10.0})
    with Agent(cfg, clock=lambda: clock[0]).start() as a:
        a.install(tiny_bundles["v1"])
        a.install(tiny_bundles["v2"])
    for _ in range(5):  # the documented example, run again and again within the window
        clock[0] += 10
        with Agent(cfg, clock=lambda: clock[0]).start() as a:
            assert a.model.version == "1.1.0" and a.slots.boot_count() == 0
            assert not a.slots.pointer().confirmed  # still on probation: only crashes count


def test_healthy_run_clears_the_boot_counter(tmp_path: Path, tiny_bundles: dict[str, Path]) -> None:
    clock = [1000.0]
    cfg = agent_config(tmp_path / "state", update={"max_boots": 2, "boot_window_min": 10.0})
    with Agent(cfg, clock=lambda: clock[0]).start() as a:
        a.install(tiny_bundles["v1"])
        a.install(tiny_bundles["v2"])
    with Agent(cfg, clock=lambda: clock[0]).start() as a:
        assert not a.maybe_confirm()
        clock[0] += 601  # ran healthily for the whole window
        assert a.maybe_confirm() and a.slots.pointer().confirmed
    for _ in range(3):
        clock[0] += 10
        with Agent(cfg, clock=lambda: clock[0]).start() as a:
            assert a.model.version == "1.1.0"  # confirmed: restarts no longer count


_KILL_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from edge_agent.agent import Agent
from edge_agent import slots
from tests.plugins.agent_kit import agent_config
cfg = agent_config(Path({state!r}))
a = Agent(cfg).start()
real = os.replace
def killed(src, dst):
    if Path(dst).name == "current":
        if {when!r} == "after":
            real(src, dst)
        os.kill(os.getpid(), 9)  # kill -9 in the middle of the switch
    return real(src, dst)
slots.os.replace = killed
a.install(Path({bundle!r}))
"""


_SERVE_SCRIPT = """
import signal, sys, threading
sys.path.insert(0, {root!r})
from pathlib import Path
from edge_agent.agent import Agent
from tests.plugins.agent_kit import agent_config
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
a = Agent(agent_config(Path({state!r}), update={{"max_boots": 3, "boot_window_min": 10.0}})).start()
print("serving", a.model.version, flush=True)
stop.wait()
a.close()
"""


def _serve_and_stop(state: Path, sig: int) -> str:
    """Run an agent process until it serves, then send it ``sig``; the version it served."""
    proc = subprocess.Popen([sys.executable, "-c", _SERVE_SCRIPT.format(root=str(ROOT), state=str(state))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("serving "), proc.communicate(timeout=60)[1][-2000:]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == (0 if sig == signal.SIGTERM else -sig), err[-2000:]
    return line.split()[1]


@pytest.mark.parametrize(("sig", "expect"), [(signal.SIGTERM, "1.1.0"), (signal.SIGKILL, "1.0.0")])
def test_three_clean_stops_keep_the_model_three_kills_roll_it_back(tmp_path: Path, tiny_bundles: dict[str, Path],
                                                                   sig: int, expect: str) -> None:
    state = tmp_path / "state"
    cfg = agent_config(state, update={"max_boots": 3, "boot_window_min": 10.0})
    with Agent(cfg).start() as a:
        a.install(tiny_bundles["v1"])
        a.install(tiny_bundles["v2"])  # on probation
    assert [_serve_and_stop(state, sig) for _ in range(3)] == ["1.1.0"] * 3
    with Agent(cfg).start() as a:  # the start after the third kill -9 rolls back; after SIGTERMs nothing counts
        assert a.model.version == expect
        assert (a.boot_rollback is not None) == (sig == signal.SIGKILL)
        _still_serves(a, expect)


@pytest.mark.parametrize(("when", "expect"), [("before", "1.0.0"), ("after", "1.1.0")])
def test_killed_during_the_switch_serves_old_or_new_never_none(tmp_path: Path, tiny_bundles: dict[str, Path],
                                                               when: str, expect: str) -> None:
    state = tmp_path / "state"
    with Agent(agent_config(state)).start() as a:
        a.install(tiny_bundles["v1"])
    script = _KILL_SCRIPT.format(root=str(ROOT), state=str(state), when=when, bundle=str(tiny_bundles["v2"]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    with Agent(agent_config(state)).start() as a:
        assert a.model is not None and a.model.version == expect
        _still_serves(a, expect)
        a.slots.gc()
        assert not list(state.glob(".current.*"))  # the temp pointer of the killed switch is gone


def test_version_ordering() -> None:
    assert compare_versions("1.10.0", "1.9.3") == 1
    assert compare_versions("v2", "v10") == -1
    assert compare_versions("1.0.0", "1.0.0") == 0


def test_gc_keeps_current_and_previous(agent: Agent, tiny_bundles: dict[str, Path], tmp_path: Path) -> None:
    from tests.plugins.agent_kit import make_bundle

    agent.install(tiny_bundles["v2"])
    v3 = make_bundle(tmp_path / "v3.elb", "1.6.0")
    res = agent.install(v3)
    assert len(agent.slots.slots()) == 2 and res.removed_slots
    assert agent.status().previous_version == "1.1.0"
    np.testing.assert_equal(agent.predict(digits().test_x[0]).model_version, "1.6.0")


# --------------------------------------------------------------------------- corrupt MQTT transfers
class _BundleFleet:
    """Answers a device's ``BundleRequest``s over a real Mosquitto; the first ``corrupt``
    answers carry one chunk with a flipped byte (the frame itself stays well-formed)."""

    def __init__(self, broker: MosquittoBroker, topics: TopicScheme, device: str, data: bytes, *,
                 corrupt: int) -> None:
        self.topics, self.device, self.data, self.corrupt = topics, device, data, corrupt
        self.starts: list[int] = []
        self.conn = connect_client(broker.host, broker.port, client_id=f"fleet-{device}", clean=True,
                                   subscriptions=[topics.device(device, "bundle-req")],
                                   on_message=self._on_request, wait_s=30)

    def _on_request(self, msg: Any) -> None:
        req = decode_as(bytes(msg.payload), BundleRequest)
        self.starts.append(req.start)
        frames = split(req.job_id, self.data, chunk_size=4096, kind=BUNDLE_KIND)
        if self.corrupt > 0:
            self.corrupt -= 1
            i = len(frames) // 2
            frames[i] = frames[i][:-1] + bytes([frames[i][-1] ^ 0xFF])
        for f in frames[req.start:]:
            self.conn.publish(self.topics.command(self.device, "bundle"), f, qos=1)


@pytest.mark.broker
@pytest.mark.parametrize(("corrupt", "retries", "outcome"), [(1, 2, "completed"), (3, 2, "failed"),
                                                              (1, 0, "failed")])
def test_a_corrupt_mqtt_transfer_is_requested_again(session_broker: MosquittoBroker, topic_prefix: str,
                                                    tmp_path: Path, tiny_bundles: dict[str, Path],
                                                    corrupt: int, retries: int, outcome: str) -> None:
    topics = TopicScheme(topic_prefix)
    data = tiny_bundles["v2"].read_bytes()
    fleet = _BundleFleet(session_broker, topics, "dev-mq", data, corrupt=corrupt)
    cfg = agent_config(tmp_path / "state", agent={"device_id": "dev-mq"}, update={"mqtt_corrupt_retries": retries},
                       broker={"enabled": True, "host": session_broker.host, "port": session_broker.port,
                               "topic_prefix": topic_prefix})
    try:
        with Agent(cfg).start() as a:
            a.install(tiny_bundles["v1"])
            a.worker.submit(DeployCommand(job_id="job-c", name="tiny-mlp", version="1.1.0", size=len(data),
                                          sha256=hashlib.sha256(data).hexdigest(), delivery="mqtt"))
            assert a.worker.wait_idle(60)
            jobs = [j for j in a.jobs if j.job_id == "job-c"]
            again = [j.detail for j in jobs if j.step == "downloading" and "corrupt" in j.detail]
            assert again == [f"transfer corrupt, requesting again ({n}/{retries})"
                             for n in range(1, min(corrupt, retries) + 1)]
            assert jobs[-1].step == outcome
            assert fleet.starts == [0] * (min(corrupt, retries) + 1)  # each time from chunk 0
            if outcome == "failed":
                assert "corrupt" in jobs[-1].detail and "\n" not in jobs[-1].detail
                _still_serves(a, "1.0.0")
            else:
                _still_serves(a, "1.1.0")
    finally:
        fleet.conn.close()


def test_the_canary_deploy_after_a_shadow_reuses_the_shadowed_bundle(agent: Agent, file_server: FileServer,
                                                                      tiny_bundles: dict[str, Path]) -> None:
    """The shadow stage's bundle is the canary's: the second deploy needs no transfer, and is verified all the same."""
    shadow = dataclasses.replace(deploy_command(file_server, tiny_bundles["v2"], "job-s", "1.1.0"), shadow=True,
                                 shadow_every=2)
    agent.worker.submit(shadow)
    assert agent.worker.wait_idle(60) and _steps(agent, "job-s")[-1] == "completed"
    fetched = len(file_server.ranges)
    _still_serves(agent, "1.0.0")  # shadowing, not serving
    agent.worker.submit(deploy_command(file_server, tiny_bundles["v2"], "job-d", "1.1.0"))
    assert agent.worker.wait_idle(60)
    steps = _steps(agent, "job-d")
    assert steps[-3:] == ["health_check", "switched", "completed"] and "verifying" in steps
    assert len(file_server.ranges) == fetched  # nothing downloaded again
    _still_serves(agent, "1.1.0")
    assert not list((agent.config.state_dir / "downloads").iterdir())  # the kept copy was used up
