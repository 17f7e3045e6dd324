"""``edgeloop demo --quick``: the whole loop, asserted to close (slow: trains twice, runs 6 agents)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from demo.shifts import DEMO_SHIFT, NO_SHIFT, CameraShift, gaussian_blur, rotate


def test_shifts_are_deterministic_and_do_what_they_say() -> None:
    img = np.zeros((16, 16), np.uint8)
    img[4:12, 7:9] = 200  # a vertical bar
    assert NO_SHIFT.apply(img[None], np.random.default_rng(0)) is not None
    rot = rotate(img, 90.0)
    assert rot[7:9, 4:12].mean() > 150 and rot[4:12, 7:9].mean() < 150  # the bar is horizontal now
    blurred = gaussian_blur(img, 1.5)
    assert blurred.max() < 200 and int(blurred.sum()) == pytest.approx(int(img.sum()), rel=0.05)
    a = DEMO_SHIFT.apply(np.stack([img] * 3), np.random.default_rng(1))
    b = DEMO_SHIFT.apply(np.stack([img] * 3), np.random.default_rng(1))
    assert np.array_equal(a, b) and a.dtype == np.uint8 and a.mean() < img.mean()
    with pytest.raises(Exception, match="gain"):
        CameraShift(gain=0.0)


@pytest.mark.slow
@pytest.mark.broker
def test_demo_quick_closes_the_loop(tmp_path: Path) -> None:
    from demo.run import DemoConfig, run_demo

    lines: list[str] = []
    result = run_demo(DemoConfig(out=tmp_path, quick=True, timeout_s=900), say=lines.append)
    assert result.closed, (result.reason, lines)
    # accuracy fell under the shift and came back within a point of its pre-drift level
    acc = result.accuracy
    assert acc["drifted"]["shifted"] < acc["baseline"]["shifted"] - 0.1
    assert result.recovery_gap_pp is not None and result.recovery_gap_pp <= 1.0
    assert result.retrain["status"] == "accepted" and result.rollout["status"] == "completed"
    assert set(result.versions.values()) == {result.retrain["version"]}
    kinds = [e.kind for e in result.events]
    for k in ("online", "shift", "trigger", "candidate", "rollout_started", "rollout_done", "closed"):
        assert k in kinds, kinds
    assert kinds.index("shift") < kinds.index("trigger") < kinds.index("candidate") < kinds.index("rollout_done")
    for f in ("report.md", "report.json", "accuracy.png", "drift.png"):
        assert (tmp_path / f).is_file()
    assert json.loads((tmp_path / "report.json").read_text())["closed"] is True
