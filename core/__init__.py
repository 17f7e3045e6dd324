"""edgeloop's shared core: what the device agent, training, export and the fleet all use.

The error tree (:mod:`core.errors`), CLI helpers (:mod:`core.cliutil`), the wire protocol
(:mod:`core.protocol`, :mod:`core.chunks`), the bundle format (:mod:`core.manifest`,
:mod:`core.bundle`, :mod:`core.signing`), preprocessing and runtimes
(:mod:`core.preprocess`, :mod:`core.runtime`), drift maths (:mod:`core.drift` and its
helpers), sample selection (:mod:`core.sampling`), the MQTT connection
(:mod:`core.mqtt`) and the config-loading helper (:mod:`core.configfile`).

Like the agent, it runs on a Raspberry Pi: numpy, plus onnxruntime / LiteRT / paho-mqtt
where a module needs them, never torch, and nothing from ``train``, ``export``,
``fleet`` or ``edge_agent``.
"""

from .errors import EdgeloopError

__all__ = ["EdgeloopError"]
