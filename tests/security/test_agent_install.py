"""An install killed half-way (kill -9, power cut) leaves nothing behind once the agent starts
again (issue 16 §4): no temporary or half-written slot, the old model serving, and the next
install works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from tests.plugins.agent_kit import agent_config, digits

ROOT = Path(__file__).resolve().parents[2]

_KILL_DURING_INSTALL = """
import os, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from edge_agent.agent import Agent
from edge_agent import slots
from tests.plugins.agent_kit import agent_config
a = Agent(agent_config(Path({state!r}))).start()
if {where!r} == "unpacking":  # the first member fsync'd into the temporary directory
    os.fsync = lambda fd: os.kill(os.getpid(), 9)
else:  # unpacked and checked, slot.json (written last) not yet
    real = slots.atomic_write_bytes
    def killed(path, data):
        if Path(path).name == "slot.json":
            os.kill(os.getpid(), 9)
        return real(path, data)
    slots.atomic_write_bytes = killed
a.install(Path({bundle!r}))
"""


@pytest.mark.parametrize("where", ["unpacking", "recording"])
def test_a_killed_install_leaves_no_temporary_directory(tmp_path: Path, tiny_bundles: dict[str, Path],
                                                        where: str) -> None:
    state = tmp_path / "state"
    with Agent(agent_config(state)).start() as a:
        a.install(tiny_bundles["v1"])
        v1_slot = a.slots.pointer().slot
    script = _KILL_DURING_INSTALL.format(root=str(ROOT), state=str(state), where=where,
                                         bundle=str(tiny_bundles["v2"]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    left = sorted(p.name for p in (state / "slots").iterdir())
    assert left != [v1_slot]  # the kill did leave something behind ...
    with Agent(agent_config(state)).start() as a:
        assert sorted(p.name for p in (state / "slots").iterdir()) == [v1_slot]  # ... which the start removed
        assert a.predict(digits().test_x[0]).model_version == "1.0.0"
        a.install(tiny_bundles["v2"])
        assert a.predict(digits().test_x[0]).model_version == "1.1.0"
