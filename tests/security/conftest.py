"""Fixtures of the hostile-device suite (defined in tests/plugins/hostile.py)."""

from tests.plugins.hostile import hardened_fleet  # noqa: F401 - a fixture, re-exported for this directory
