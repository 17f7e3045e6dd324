"""``edgeloop demo``: the closed loop on one machine (broker, fleet, real agents, retraining, rollout).

Heavy imports (torch, onnx) happen inside :func:`demo.run.run_demo`, not here.
"""

from __future__ import annotations

__all__ = ["run_demo", "DemoConfig"]


def __getattr__(name: str):  # lazy: importing the package must stay cheap
    if name in __all__:
        from . import run

        return getattr(run, name)
    raise AttributeError(name)
