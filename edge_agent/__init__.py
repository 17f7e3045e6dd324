"""edgeloop's device agent: numpy + onnxruntime (or LiteRT) + paho-mqtt, never torch."""

from .errors import EdgeloopError

__all__ = ["EdgeloopError"]
