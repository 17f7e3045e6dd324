"""Shared fixtures: a real Mosquitto per test (``broker``) or per session (``session_broker``).

The other fixtures live in plugins under ``tests/plugins/``: trained and exported models
(``train``, ``export``: once per session), the numpy-trained tiny bundles the agent tests
use (``agent_kit``), a Range-capable file server (``files``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugins.broker import MosquittoBroker, find_mosquitto

pytest_plugins = ["tests.plugins.train", "tests.plugins.export", "tests.plugins.agent_kit", "tests.plugins.files",
                  "tests.plugins.canary_fleet", "tests.plugins.streams", "tests.plugins.models",
                  "tests.plugins.workdirs", "tests.plugins.optimize_kit", "tests.plugins.postgres"]

_NO_BROKER = "no mosquitto binary: install the Debian package mosquitto (apt-get install -y mosquitto)"


def _require_mosquitto() -> None:
    if find_mosquitto() is None:
        pytest.skip(_NO_BROKER)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A fresh Mosquitto on a free loopback port, for tests that stop, restart or configure it."""
    _require_mosquitto()
    b = MosquittoBroker(tmp_path / "mosquitto").start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def session_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One Mosquitto for the whole session; tests must not stop it.  Use ``topic_prefix``."""
    _require_mosquitto()
    b = MosquittoBroker(tmp_path_factory.mktemp("session-mosquitto")).start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix of its own for each test, so tests sharing a broker never see each other."""
    return f"test-{uuid.uuid4().hex[:12]}/edgeloop/v1"
