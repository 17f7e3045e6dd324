"""Model versions: every signed bundle the fleet knows, its lineage, metrics and verdict."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core.errors import FleetError

from ..models import ModelVersionRow
from .base import Repository
from .records import MODEL_STATUSES, ModelVersion, to_record

__all__ = ["ModelRepo", "file_sha256"]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_status(status: str) -> None:
    if status not in MODEL_STATUSES:
        raise FleetError(f"unknown model status {status!r}", hint=f"one of {', '.join(MODEL_STATUSES)}")


class ModelRepo(Repository):
    """``registry.models``.  Calling it is :meth:`find`."""

    def register(self, bundle_path: str | Path, *, trusted_key: Any, status: str = "candidate",
                 parent_version: str | None = None, metrics: Mapping[str, Any] | None = None,
                 lineage: Mapping[str, Any] | None = None, reason: str | None = None) -> ModelVersion:
        """Verify a bundle's signature against ``trusted_key`` and record it.

        The fleet never records (and so never pushes) an unsigned or wrongly signed
        bundle: verification failures raise :class:`SignatureError` / :class:`BundleError`.
        Metrics default to the manifest's (per variant); lineage to the manifest's.
        """
        from core.bundle import open_bundle

        p = Path(bundle_path).resolve()
        bundle = open_bundle(p, trusted_key=trusted_key, require_signature=True)
        m = bundle.manifest
        variant_metrics = {v.id: {"test_accuracy": v.test_accuracy, "accuracy_drop": v.accuracy_drop,
                                  "latency_ms": v.latency_ms, "size": v.size} for v in m.variants}
        return self.add(
            m.name, m.version, bundle_path=str(p), sha256=file_sha256(p), size=p.stat().st_size,
            signed_by=bundle.signed_by, status=status, reason=reason,
            parent_version=parent_version if parent_version is not None else m.lineage.parent_version,
            metrics=dict(metrics) if metrics is not None else {"variants": variant_metrics,
                                                               "reference_accuracy": m.reference_accuracy,
                                                               **m.metrics},
            lineage=dict(lineage) if lineage is not None else dataclasses.asdict(m.lineage))

    def add(self, name: str, version: str, *, status: str = "candidate", bundle_path: str | None = None,
            sha256: str | None = None, size: int | None = None, signed_by: str | None = None,
            parent_version: str | None = None, metrics: Mapping[str, Any] | None = None,
            lineage: Mapping[str, Any] | None = None, reason: str | None = None,
            created: float | None = None) -> ModelVersion:
        """Insert or replace the record of ``name`` ``version`` (no bundle verification: see :meth:`register`)."""
        _check_status(status)
        values = dict(parent_version=parent_version, bundle_path=bundle_path, sha256=sha256, size=size,
                      signed_by=signed_by, metrics=dict(metrics or {}), lineage=dict(lineage or {}),
                      status=status, reason=reason, created=created or time.time())
        with self._sessions.begin() as s:
            row = s.scalar(self._one(name, version))
            if row is None:
                row = ModelVersionRow(name=name, version=version, **values)
                s.add(row)
            else:
                for k, v in values.items():
                    setattr(row, k, v)
            s.flush()
            return to_record(ModelVersion, row)

    def get(self, name: str, version: str) -> ModelVersion | None:
        with self._sessions() as s:
            row = s.scalar(self._one(name, version))
            return to_record(ModelVersion, row) if row else None

    def find(self, *, name: str | None = None, status: str | None = None) -> list[ModelVersion]:
        """Model versions, oldest first."""
        q = select(ModelVersionRow).order_by(ModelVersionRow.created, ModelVersionRow.id)
        if name:
            q = q.where(ModelVersionRow.name == name)
        if status:
            q = q.where(ModelVersionRow.status == status)
        with self._sessions() as s:
            return [to_record(ModelVersion, r) for r in s.scalars(q)]

    __call__ = find

    def latest(self, name: str, *, status: str = "accepted") -> ModelVersion | None:
        found = self.find(name=name, status=status)
        return found[-1] if found else None

    def set_status(self, name: str, version: str, status: str, *, reason: str | None = None,
                   metrics: Mapping[str, Any] | None = None) -> ModelVersion:
        """Accept or reject a candidate (the reason is kept); ``metrics`` are merged in."""
        _check_status(status)
        with self._sessions.begin() as s:
            row = s.scalar(self._one(name, version))
            if row is None:
                raise FleetError(f"no model {name} {version} in the registry", model=name, version=version)
            row.status, row.reason = status, reason
            if metrics:
                row.metrics = {**(row.metrics or {}), **metrics}
            s.flush()
            return to_record(ModelVersion, row)

    @staticmethod
    def _one(name: str, version: str) -> Any:
        return select(ModelVersionRow).where(ModelVersionRow.name == name, ModelVersionRow.version == version)
