"""The one exception tree of edgeloop.

Every error a user can cause or meet derives from :class:`EdgeloopError`; the CLI
turns it into one line on stderr and a non-zero exit.  Built-in exceptions are kept
for programmer misuse only.

    EdgeloopError
    ├── ConfigError            bad config file / option (names the key)
    ├── DataError              unreadable images, empty class folders, wrong shapes
    ├── TrainError
    ├── ExportError
    │   └── QuantizationError  a variant cannot be quantized within budget
    ├── BundleError            corrupt / tampered / unsigned bundle (names the member)
    │   └── SignatureError
    ├── RuntimeBackendError    ONNX Runtime / LiteRT missing or failing
    ├── InputError             a predict() input of the wrong size / channels / dtype
    │   └── ImageTooLargeError over the pixel budget before decoding (HTTP 413)
    ├── SourceError            a camera / stream / file source that cannot be opened
    ├── ProtocolError          malformed or unknown wire message
    │   └── OverBudgetError    a chunk frame refused for lack of reassembly budget (send it later)
    ├── BrokerError            broker unreachable / gone
    ├── QueueError             the outbox (disk full, corrupt)
    ├── UpdateError            a model update failed (download, verify, health check)
    │   └── HealthCheckError   the new model failed its health check; the old one kept serving
    ├── FleetError
    │   └── RolloutError
    └── BenchmarkError

This module is part of ``edge_agent`` because the agent is the bottom of the
dependency graph: ``train``, ``export`` and ``fleet`` import it from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "EdgeloopError",
    "ConfigError",
    "DataError",
    "TrainError",
    "ExportError",
    "QuantizationError",
    "BundleError",
    "SignatureError",
    "RuntimeBackendError",
    "InputError",
    "ImageTooLargeError",
    "SourceError",
    "ProtocolError",
    "OverBudgetError",
    "BrokerError",
    "QueueError",
    "UpdateError",
    "HealthCheckError",
    "FleetError",
    "RolloutError",
    "BenchmarkError",
]


class EdgeloopError(Exception):
    """Base of every error edgeloop raises on purpose.

    ``hint`` says how to fix it; ``context`` carries what it is about (path,
    device id, model version, member name...).
    """

    def __init__(self, message: str, *, hint: str | None = None, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.context = context

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message

    @property
    def path(self) -> Path | None:
        p = self.context.get("path")
        return Path(p) if p is not None else None


class ConfigError(EdgeloopError):
    """A configuration file or option is invalid; the message names the key."""


class DataError(EdgeloopError):
    """Training or inference data cannot be used; the message names the file or folder."""


class TrainError(EdgeloopError):
    """Training failed."""


class ExportError(EdgeloopError):
    """Export to ONNX / TFLite failed."""


class QuantizationError(ExportError):
    """A quantized variant cannot be made or does not meet its accuracy budget."""


class BundleError(EdgeloopError):
    """A bundle is corrupt, incomplete or tampered with; ``context['member']`` names the member."""


class SignatureError(BundleError):
    """A bundle's signature is missing or does not match the trusted key."""


class RuntimeBackendError(EdgeloopError):
    """An inference runtime is missing or failed to load / run a model."""


class InputError(EdgeloopError):
    """An inference input has the wrong size, channel count or dtype."""


class ImageTooLargeError(InputError):
    """An image's declared size is over the pixel budget; refused before decoding (HTTP 413)."""


class SourceError(EdgeloopError):
    """A frame source (camera, stream, video file, folder, tensor stream) cannot be opened or read."""


class ProtocolError(EdgeloopError):
    """A wire message is malformed, of an unknown type or of an unsupported schema version."""


class OverBudgetError(ProtocolError):
    """A chunk frame refused because its owner (or the whole reassembly buffer) is at its budget.

    Nothing was dropped for it: the sender should keep the frame and send it later.
    Raised by :class:`core.chunks.Reassembler` (and re-exported from :mod:`core.chunks`)."""


class BrokerError(EdgeloopError):
    """The MQTT broker cannot be reached or went away."""


class QueueError(EdgeloopError):
    """The disk-backed outbox failed (disk full, corrupt database)."""


class UpdateError(EdgeloopError):
    """A model update failed: download, verification, health check or switch."""


class HealthCheckError(UpdateError):
    """A new model failed its health check on the device; the serving model was kept."""


class FleetError(EdgeloopError):
    """The fleet manager failed."""


class RolloutError(FleetError):
    """A rollout cannot start or continue."""


class BenchmarkError(EdgeloopError):
    """A benchmark could not run."""
