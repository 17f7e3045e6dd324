"""``open_dir``: a temporary folder other users can walk into (the broker's and the agent's own users).

pytest's ``tmp_path`` lives under ``/tmp/pytest-of-<user>`` (mode 0700), which Mosquitto —
after dropping from root to user ``mosquitto`` — and an agent started as ``nobody`` cannot
enter.  This one is ``/tmp/edgeloop-XXXX`` (0755), removed afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def open_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="edgeloop-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
