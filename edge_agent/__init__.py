"""edgeloop's device agent: numpy + onnxruntime (or LiteRT) + paho-mqtt, never torch."""

from core.errors import EdgeloopError

__all__ = ["EdgeloopError"]
