"""PyTorch -> ONNX: one graph with two named outputs, ``logits`` and ``embedding``.

The device's drift monitor needs the penultimate embedding as well as the logits, so
the exported graph returns both.  The batch dimension is dynamic; the graph is checked
with ``onnx.checker``, simplified (constant folding and dead-code elimination by the
onnxscript optimizer: onnxsim does not install here) and compared with PyTorch in ONNX
Runtime, the same runtime the device uses.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ExportError

__all__ = ["OnnxExport", "export_onnx", "torch_outputs", "EmbeddingHead", "INPUT_NAME"]

log = logging.getLogger(__name__)

INPUT_NAME = "input"
DEFAULT_OPSET = 18


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` produced and how close it is to PyTorch."""

    path: Path
    opset: int
    max_abs_diff: float  # logits, ONNX Runtime vs PyTorch, on the check inputs
    max_abs_diff_embedding: float | None
    nodes_before: int
    nodes_after: int
    embedding_dim: int | None
    seconds: float


def EmbeddingHead(model: Any) -> Any:  # noqa: N802 - a module factory reads like a class
    """Wrap ``model`` so ``forward(x)`` returns ``(logits, embedding)`` (or logits only).

    A model without ``forward_with_embedding`` (bring-your-own) exports logits only.
    The wrapped model is a copy with its dropout layers replaced by identities: they do
    nothing at inference, but PT2E quantization gives a dropout's output its own
    quantizer, which breaks the TFLite converter when the embedding feeds both the head
    and a graph output (measured: "type of return operand 1 doesn't match").
    """
    import copy

    import torch

    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.modules.dropout._DropoutNd):
                setattr(parent, child_name, torch.nn.Identity())

    class _Head(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> Any:
            if hasattr(self.inner, "forward_with_embedding"):
                logits, emb = self.inner.forward_with_embedding(x)
                return logits, emb.flatten(1)
            return self.inner(x)

    return _Head(model).eval()


def torch_outputs(model: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits and embedding of the PyTorch model for a float32 NCHW batch."""
    import torch

    head = EmbeddingHead(model)
    with torch.no_grad():
        out = head(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    if isinstance(out, tuple):
        return out[0].numpy(), out[1].numpy()
    return out.numpy(), None


def _simplify(model_proto: Any) -> Any:
    """Constant folding + dead-code elimination; the input model is returned if that fails."""
    try:
        import onnxscript.optimizer

        return onnxscript.optimizer.optimize(model_proto)
    except Exception as exc:  # an optimizer bug must not fail an otherwise valid export
        log.warning("onnxscript optimizer failed (%s); keeping the unsimplified graph", exc)
        return model_proto


def export_onnx(model: Any, path: str | Path, sample: np.ndarray, *, check_inputs: np.ndarray | None = None,
                opset: int = DEFAULT_OPSET, atol: float = 1e-4) -> OnnxExport:
    """Export ``model`` to ``path`` (opset >= 17, dynamic batch) and verify it against PyTorch.

    ``sample`` is one float32 NCHW input (batch 1) used for tracing; ``check_inputs``
    (default: ``sample``) are run through both PyTorch and ONNX Runtime and the largest
    absolute difference is reported.  Raises :class:`ExportError` when tracing fails,
    the checker rejects the graph or the outputs differ by more than ``atol``.
    """
    import onnx
    import torch

    if opset < 17:
        raise ValueError("opset must be >= 17")
    t0 = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = EmbeddingHead(model)
    x = torch.from_numpy(np.ascontiguousarray(sample[:1], dtype=np.float32))
    with torch.no_grad():
        probe = head(x)
    has_emb = isinstance(probe, tuple)
    outputs = ["logits", "embedding"] if has_emb else ["logits"]
    try:
        torch.onnx.export(head, (x,), str(path), dynamo=True, external_data=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=outputs,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
                          optimize=True, verbose=False)
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {exc}".splitlines()[0],
                          hint="the model must be traceable by torch.export", path=str(path)) from exc
    proto = onnx.load(str(path))
    nodes_before = len(proto.graph.node)
    proto = _simplify(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported ONNX graph is invalid: {exc}", path=str(path)) from exc
    onnx.save(proto, str(path))

    from core.runtime import open_model

    xs = np.ascontiguousarray(sample if check_inputs is None else check_inputs, dtype=np.float32)
    ref_logits, ref_emb = torch_outputs(model, xs)
    got = open_model(path).run(xs)
    diff = float(np.max(np.abs(got.logits - ref_logits)))
    diff_emb = None
    if ref_emb is not None and got.embedding is not None:
        diff_emb = float(np.max(np.abs(got.embedding - ref_emb)))
    scale = max(1.0, float(np.max(np.abs(ref_logits))))
    if diff > atol * scale:
        raise ExportError(f"ONNX Runtime output differs from PyTorch by {diff:.3g} (> {atol * scale:.3g})",
                          hint="an operator is exported wrongly; try another opset", path=str(path))
    return OnnxExport(path=path, opset=opset, max_abs_diff=diff, max_abs_diff_embedding=diff_emb,
                      nodes_before=nodes_before, nodes_after=len(proto.graph.node),
                      embedding_dim=None if ref_emb is None else int(ref_emb.shape[1]),
                      seconds=time.perf_counter() - t0)
