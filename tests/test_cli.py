"""The ``edgeloop`` entry point: a missing extra is one line naming it; ``-q``/``-v`` after any sub-command."""

from __future__ import annotations

import argparse

import pytest

import train.cli
from edgeloop.cli import build_parser, main


def test_a_missing_extra_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    def needs_torch(_args: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(train.cli, "_train", needs_torch)  # as on a device with only [agent]
    assert main(["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("edgeloop: error: `edgeloop train` needs the [train] extra")
    assert "pip install 'edgeloop[train]'" in err


def test_an_unknown_missing_module_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_args: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'train.nothing'", name="train.nothing")

    monkeypatch.setattr(train.cli, "_train", broken)
    with pytest.raises(ModuleNotFoundError):
        main(["train"])


@pytest.mark.parametrize("argv", [["agent", "run", "-q", "-c", "a.toml"], ["-q", "agent", "run"],
                                  ["fleet", "rollouts", "--quiet"], ["agent", "status", "-vv"]])
def test_quiet_and_verbose_work_after_any_sub_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    quiet = args.quiet or getattr(args, "_sub_quiet", False)
    verbose = args.verbose + getattr(args, "_sub_verbose", 0)
    assert (quiet, verbose) == (("-q" in argv or "--quiet" in argv), 2 if "-vv" in argv else 0)
