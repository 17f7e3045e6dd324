"""The canary judge's error-rate benchmark (benchmarks/canary_power.py): small, seeded, no wall clock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.canary_power import main, run


def test_interval_judge_keeps_good_models_and_stops_slow_ones_where_the_pooled_rule_slips() -> None:
    rows = run(trials=15, seed=3, loads=("bursts+late",), slowdowns=(1.0, 3.0), soak=3, max_looks=30)
    same, slow = rows
    assert same["slowdown"] == 1.0 and same["judge"]["fail"] <= 1, same  # a good model is not rolled back
    assert slow["judge"]["pass"] == 0 and slow["judge"]["fail"] >= 14, slow  # a 3x slower one is stopped
    assert same["judge"]["looks_mean"] is not None and same["pooled"]["pass"] + same["pooled"]["fail"] == 15


def test_cli_writes_json_and_refuses_unknown_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cp.json"
    assert main(["--trials", "2", "--loads", "steady", "--max-looks", "5", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["load"] for r in data["rows"]] == ["steady"] * 4 and data["trials"] == 2
    assert "| steady | x3 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--loads", "cloudy", "--out", str(out)])
    assert "unknown cloudy" in capsys.readouterr().err
