"""The task layer: between the runtime's named tensors and the agent's answers.

``TASKS`` maps a bundle's ``task.kind`` to its class; :func:`build_task` opens one for a
manifest and a loaded backend.  Each task turns an input into the model's feeds
(``prepare``), outputs into a :class:`TaskResult` (``decode``) and both into what the
drift detector gets (``drift_features``).  ``docs/models.md`` describes them for users.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import BundleError
from ..manifest import Manifest
from ..runtime import Backend
from .base import Detection, Prepared, Task, TaskResult, tensor_feed
from .classification import Classification, softmax
from .detection import DECODERS, DetectionTask, box_iou, nms
from .tensor import TensorTask

__all__ = ["TASKS", "build_task", "Task", "TaskResult", "Detection", "Prepared", "Classification", "DetectionTask",
           "TensorTask", "DECODERS", "nms", "box_iou", "softmax", "tensor_feed"]

#: task kind -> task class; the table (not an if-chain) decides how outputs are read.
TASKS: dict[str, Callable[[Manifest, Backend], Task]] = {
    "classification": Classification,
    "detection": DetectionTask,
    "tensor": TensorTask,
}


def build_task(manifest: Manifest, backend: Backend) -> Task:
    """The task object for ``manifest.task.kind`` on a loaded ``backend``."""
    factory = TASKS.get(manifest.task.kind)
    if factory is None:
        raise BundleError(f"unknown task {manifest.task.kind!r}", hint=f"one of {', '.join(TASKS)}")
    return factory(manifest, backend)
