"""The fleet commands' shared ``-c/--config`` flag and how it is read (no heavy imports).

Every ``edgeloop fleet`` command that reads the fleet takes ``-c/--config FILE`` (default
``./fleet.toml``).  A missing file is an error that names it and the fix: no command
creates fleet state in the current directory without being asked (``fleet init`` is the
one that creates a fleet).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import ConfigError

if TYPE_CHECKING:
    from fleet.config import FleetConfig

__all__ = ["add_config", "fleet_config", "DEFAULT_CONFIG"]

DEFAULT_CONFIG = "fleet.toml"


def add_config(p: argparse.ArgumentParser) -> None:
    """Add ``-c/--config`` (the fleet's ``fleet.toml``)."""
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help="the fleet's config (default ./fleet.toml, written by `edgeloop fleet init`)")


def fleet_config(args: argparse.Namespace) -> FleetConfig:
    """Load ``args.config``; a missing file says which and how to make one."""
    from fleet.config import load_config

    path = Path(args.config)
    if not path.is_file():
        where = "in this directory" if args.config == DEFAULT_CONFIG else "there"
        raise ConfigError(f"no fleet config {path} {where}",
                          hint="run the command in the fleet's folder, pass -c/--config PATH/fleet.toml, "
                               "or create a fleet with `edgeloop fleet init`", path=str(path))
    return load_config(path)
