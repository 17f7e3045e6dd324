"""The quick-starts run as written: every ```bash block of docs/quickstart-*.md, in order, in one shell.

The blocks are extracted from the markdown and run verbatim in a fresh folder (``set -euo
pipefail``), with the ``edgeloop`` of this checkout first on ``PATH``.  Only the values of
the variables set in a page's first block are replaced (free ports, this checkout as
``EDGELOOP_SRC``), as each page says.  Background processes a page starts are stopped by
the page itself; whatever is left is killed with the shell's process group.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.plugins.broker import find_mosquitto, free_port

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def bash_blocks(page: Path) -> list[str]:
    """The page's ```bash blocks, in order (```sh blocks — installation — are not run)."""
    return _BLOCK.findall(page.read_text())


def script(page: Path, overrides: Mapping[str, str]) -> str:
    blocks = bash_blocks(page)
    assert blocks, f"{page.name} has no bash blocks"
    first = blocks[0]
    for name, value in overrides.items():
        first, n = re.subn(rf"(?m)^{name}=.*$", f"{name}={value}", first)
        assert n == 1, f"{page.name}: the first bash block does not set {name}"
    return "set -euo pipefail\nset -x\n" + "\n".join([first, *blocks[1:]])


def run_page(page: Path, workdir: Path, overrides: Mapping[str, str], *, timeout: float) -> str:
    """Run the page's commands in ``workdir``; returns the output (fails the test with it on error)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "NO_COLOR": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(["bash", "-c", script(page, overrides)], cwd=workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{page.name} did not finish within {timeout:g} s:\n{out[-6000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # anything the page left running
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"{page.name} failed (exit {proc.returncode}):\n{out[-6000:]}"
    return out


def _need(*tools: str) -> None:
    if find_mosquitto() is None:
        pytest.skip("no mosquitto binary: install the Debian packages mosquitto and mosquitto-clients")
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found (Debian: mosquitto-clients / curl)")


def test_every_quickstart_has_commands() -> None:
    for name in ("quickstart-device.md", "quickstart-benchmark.md", "quickstart-fleet.md"):
        assert bash_blocks(DOCS / name), name


@pytest.mark.broker
def test_device_quickstart(open_dir: Path) -> None:
    _need("mosquitto_sub", "curl")
    out = run_page(DOCS / "quickstart-device.md", open_dir,
                   {"EDGELOOP_SRC": str(REPO), "HTTP_PORT": str(free_port()), "BROKER_PORT": str(free_port())},
                   timeout=600)
    assert '"label"' in out  # the HTTP answer
    assert "edgeloop/v1/devices/pi-01/state" in out  # the agent's retained state over MQTT


@pytest.mark.slow
def test_benchmark_quickstart(open_dir: Path) -> None:
    out = run_page(DOCS / "quickstart-benchmark.md", open_dir, {"EDGELOOP_SRC": str(REPO)}, timeout=900)
    assert "onnx" in out
    assert (open_dir / "digits-1.1.0.elb").is_file() and (open_dir / "digits-1.1.0.elb.report.md").is_file()


def _agent_user() -> str:
    """``nobody`` when it can run this checkout's Python (else root: the kit's modes are still checked)."""
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("starting the device kit as another user needs root and runuser")
    ok = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", "import core"],
                        cwd="/", capture_output=True, env={**os.environ, "PYTHONPATH": ""})
    return "nobody" if ok.returncode == 0 else "root"


@pytest.mark.slow
@pytest.mark.broker
def test_fleet_quickstart(open_dir: Path) -> None:
    _need()
    user = _agent_user()
    out = run_page(DOCS / "quickstart-fleet.md", open_dir,
                   {"EDGELOOP_SRC": str(REPO), "BROKER_PORT": str(free_port()), "API_PORT": str(free_port()),
                    "AGENT_USER": user}, timeout=600)
    assert re.search(r"user admin\s+password \S+", out), "fleet init printed no dashboard login"
    assert "rolled_back" in out
    if user == "root":  # the page ran the agent as root: check at least that the kit works for another user
        kit = shutil.copytree(open_dir / "myfleet" / "kit", open_dir / "kit-nobody")
        subprocess.run(["chown", "-R", "nobody", str(kit)], check=True)
        got = subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(kit / "mqtt.password"),
                              str(kit / "agent.toml")], capture_output=True)
        assert got.returncode == 0, got.stderr
        # Every command of the page ran and passed; only the agent's user differs (this checkout's Python is
        # not reachable by user nobody: a private folder on its path).  The journey was tested, and the kit's
        # files were checked readable by nobody: a pass, with the reason in the captured output.
        print("the page started the agent as root (this checkout is private to root); kit files readable by nobody")
