"""The agent runs on a device with numpy + onnxruntime + paho-mqtt: it must never import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import sys, tempfile
sys.path.insert(0, {root!r})
from pathlib import Path
import numpy as np
import edge_agent, edge_agent.agent, edge_agent.cli, edge_agent.http, edge_agent.deploy, core.mqtt
from edge_agent.agent import Agent
from core.agent_config import parse_config
state = Path(tempfile.mkdtemp())
cfg = parse_config({{"agent": {{"device_id": "d", "state_dir": str(state), "trusted_key": {key!r}}},
                    "broker": {{"enabled": False}}, "http": {{"enabled": True, "port": 0}},
                    "model": {{"benchmark_runs": 2}}, "update": {{"min_free_mb": 0.0}}}})
with Agent(cfg).start() as a:
    a.install(Path({bundle!r}))
    p = a.predict(np.zeros((8, 8), np.uint8))
    assert p.model_version == "1.0.0"
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "train", "export", "fleet",
                                                            "sklearn", "onnx"))
assert not heavy, heavy
print("ok")
"""


def test_agent_never_imports_torch(tiny_bundles: dict[str, Path]) -> None:
    from tests.plugins.agent_kit import keys

    script = _SCRIPT.format(root=str(ROOT), key=str(keys().public), bundle=str(tiny_bundles["v1"]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"
