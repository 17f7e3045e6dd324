"""Session fixture: the ``digits_run`` exported once to a signed bundle (loaded from conftest as a plugin).

``exported_bundle`` holds ONNX FP32, ONNX INT8 (static), TFLite FP32 and TFLite INT8,
each gated at 0.5 points.  It is path-like (``open_bundle(exported_bundle)`` works) and
also carries the export report, the signing keys and the export's working directory
(intermediate ONNX/TFLite files, shared so tests need not convert again).  Treat it as
read-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class ExportedBundle:
    """A signed bundle made by ``export_run`` and what went into it."""

    path: Path
    report: Any  # export.report.ExportReport
    private_key: Path
    public_key: Path
    workdir: Path

    def __fspath__(self) -> str:
        return str(self.path)


@pytest.fixture(scope="session")
def exported_bundle(digits_run: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportedBundle:
    """``export_run(digits_run)`` with both formats, signed, version 1.0.0."""
    from core.signing import save_keypair
    from export.pipeline import export_run

    root = tmp_path_factory.mktemp("export")
    keys = save_keypair(root / "keys" / "test")
    report = export_run(digits_run, out=root / "digits-1.0.0.elb", sign_key=keys.private, version="1.0.0",
                        workdir=root / "work")
    return ExportedBundle(report.bundle, report, keys.private, keys.public, root / "work")
