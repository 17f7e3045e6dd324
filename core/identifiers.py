"""The naming rules of the wire: device ids, job names and topic prefixes.

Device ids become topic levels and file names; job ids may become file names on a device;
a topic prefix must be a valid MQTT topic without wildcards.  Re-exported by
:mod:`core.protocol`.
"""

from __future__ import annotations

import re

from .errors import ProtocolError

__all__ = ["validate_device_id", "validate_name", "validate_topic_prefix"]

_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Job ids (and other names a device may turn into a file name): no '/', no leading '.'.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+=-]{0,199}$")


def validate_device_id(device_id: str) -> str:
    """Device ids become topic levels and file names: letters, digits, ``_ . -``, max 64."""
    if not isinstance(device_id, str) or not _DEVICE_ID_RE.fullmatch(device_id):
        raise ProtocolError(
            f"invalid device id {device_id!r}",
            hint="use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return device_id


def validate_topic_prefix(prefix: str) -> str:
    """The one rule for a topic prefix (configs and :class:`TopicScheme` alike).

    Non-empty levels separated by ``/`` (so no leading, trailing or double ``/``), none
    starting with ``$`` (reserved by brokers) nor holding a wildcard ``+``/``#`` or NUL.
    """
    levels = prefix.split("/") if isinstance(prefix, str) and prefix else [""]
    if any(not lv or lv.startswith("$") or set(lv) & {"+", "#", "\0"} for lv in levels):
        raise ProtocolError(f"invalid topic prefix {prefix!r}",
                            hint="use non-empty levels without wildcards, e.g. 'edgeloop/v1'")
    return prefix




def validate_name(value: str, what: str = "job id") -> str:
    """Names that may become file names on a device (job ids): 1-200 letters, digits and
    ``_ . : @ + = -``, starting with a letter or digit -- never a path (no ``/``, no ``..``)."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ProtocolError(f"invalid {what} {str(value)[:80]!r}",
                            hint="use 1-200 letters, digits, '_', '.', ':', '@', '+', '=' or '-', "
                                 "starting with a letter or digit")
    return value
