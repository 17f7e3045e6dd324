"""edgeloop: the closed loop of machine learning at the edge.

The distribution holds five packages: ``train`` and ``export`` (cloud side),
``edge_agent`` (the device; numpy + onnxruntime + paho-mqtt only), ``fleet`` (the
fleet manager) and ``benchmarks``.  This package only holds the ``edgeloop`` CLI.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
