"""Labels: true classes for stored samples (feedback, operators, a teacher), and what they say of accuracy."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from sqlalchemy import func, select

from .. import _ingest_sql
from ..models import PendingLabel, SampleRow
from .base import Repository

__all__ = ["LabelRepo"]


class LabelRepo(Repository):
    """``registry.labels``."""

    def apply(self, labels: Iterable[tuple[str, str, str]], *, confidence: Mapping[str, float] | None = None) -> int:
        """Apply ``(sample_id, label, source)`` triples; unknown ids wait in ``pending_labels``.

        Returns how many existing samples were labelled.  ``confidence`` (sample id ->
        teacher confidence) is recorded for pseudo-labels.
        """
        with self._sessions.begin() as s:
            return _ingest_sql.apply_labels(s, list(labels), dict(confidence or {}))

    def pending_count(self) -> int:
        """Labels waiting for their sample to arrive."""
        with self._sessions() as s:
            return int(s.scalar(select(func.count()).select_from(PendingLabel)) or 0)

    def feedback_accuracy(self, *, device_ids: Sequence[str] | None = None, since: float | None = None,
                          model_version: str | None = None) -> tuple[int, int]:
        """``(correct, total)`` over samples whose true label came from feedback (not a teacher)."""
        q = select(SampleRow.prediction, SampleRow.label).where(SampleRow.label.is_not(None),
                                                                SampleRow.label_source != "teacher")
        if device_ids is not None:
            q = q.where(SampleRow.device_id.in_(list(device_ids)))
        if model_version is not None:
            q = q.where(SampleRow.model_version == model_version)
        if since is not None:
            q = q.where(SampleRow.labelled_at >= since)
        with self._sessions() as s:
            rows = list(s.execute(q))
        return sum(1 for p, lab in rows if p is not None and str(p) == str(lab)), len(rows)
