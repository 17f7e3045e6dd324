"""Fine-tuning in its own process, so that the fleet and the training do not share one GIL.

The fleet serves ingestion, the HTTP API, the rollout driver and (in the demo) six agents
from one Python process.  A retraining job on a thread of that process held the GIL for
every optimiser step between torch kernels, and every MQTT callback held it from the
training: the quick demo's fine-tune of 8 epochs took 121 s idle and 491-653 s on a loaded
2-core machine, for work that takes about 15 s alone.  :func:`train_isolated` runs
:func:`train.api.train_run` in a fresh interpreter (``spawn``: no forked locks or threads)
and returns the run directory; an edgeloop error in the child comes back as itself, with
its message and hint, anything else as a :class:`~core.errors.TrainError` naming the cause.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from core import errors
from core.errors import EdgeloopError, TrainError

__all__ = ["train_isolated"]


def _child(config: Any, extra_images: Any, extra_labels: Any) -> tuple[str, str, str | None, str]:
    """In the child: train; errors come back as (kind, message, hint, class name), never as pickled exceptions."""
    from train.api import train_run

    try:
        return "ok", str(train_run(config, extra_images=extra_images, extra_labels=extra_labels)), None, ""
    except EdgeloopError as exc:
        return "error", exc.message, exc.hint, type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises TrainError
        return "error", f"{type(exc).__name__}: {exc}", None, "TrainError"


def train_isolated(config: Any, *, extra_images: Any = None, extra_labels: Any = None) -> Path:
    """:func:`train.api.train_run` in a child process; the new run directory."""
    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            kind, text, hint, cls = pool.submit(_child, config, extra_images, extra_labels).result()
    except BrokenProcessPool as exc:
        raise TrainError("the training process died before it finished (killed, or out of memory?)",
                         hint="check the fleet host's memory; `dmesg` names an OOM kill") from exc
    if kind == "ok":
        return Path(text)
    err = getattr(errors, cls, None)
    raise (err if isinstance(err, type) and issubclass(err, EdgeloopError) else TrainError)(text, hint=hint)
