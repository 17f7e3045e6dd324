"""Labels for drift samples: feedback, CSV round trips for outside tools, teacher pseudo-labels.

Three sources, one column (``samples.label`` + ``label_source``):

* **feedback** — ``Feedback`` messages on a device's ``feedback`` topic or the
  operator topic ``{prefix}/feedback`` (ingestion applies them; a label for a sample
  that has not arrived yet waits in ``pending_labels``);
* **CSV** — ``edgeloop fleet label export`` writes one row per sample with the path
  of its payload; ``label import`` reads ``sample_id,label`` back (``source=import``);
* **teacher** — a larger model's prediction, kept only above a confidence threshold
  (``source=teacher``, the confidence recorded).  The trigger and the retraining gate
  may treat teacher labels differently from true ones; feedback accuracy ignores them.

Labels are class *names* (``labels.txt`` of the bundle); for the digits model they are
"0".."9", the same strings as the predicted class index.
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import DataError

from .registry import Registry
from .samples import SampleStore

__all__ = ["ImportResult", "TeacherResult", "import_labels_csv", "export_labels_csv", "pseudo_label"]

EXPORT_COLUMNS = ("sample_id", "device_id", "path", "ts", "model_version", "prediction", "confidence", "reason",
                  "label", "label_source")


@dataclass(frozen=True)
class ImportResult:
    rows: int
    labelled: int  # samples that exist and got the label
    pending: int  # labels for samples not (yet) in the registry


@dataclass(frozen=True)
class TeacherResult:
    considered: int
    labelled: int
    below_threshold: int
    unreadable: int


def import_labels_csv(registry: Registry, path: str | Path, *, source: str = "import") -> ImportResult:
    """Read ``sample_id,label`` rows (a header row naming both columns is required)."""
    p = Path(path)
    try:
        with p.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            cols = set(reader.fieldnames or ())
            if not {"sample_id", "label"} <= cols:
                raise DataError(f"{p}: CSV needs the columns sample_id and label, found {sorted(cols)}",
                                hint="first line: sample_id,label", path=str(p))
            rows = []
            for n, row in enumerate(reader, start=2):
                sid, label = (row.get("sample_id") or "").strip(), (row.get("label") or "").strip()
                if not sid or not label:
                    raise DataError(f"{p}:{n}: empty sample_id or label", path=str(p))
                rows.append((sid, label, source))
    except FileNotFoundError as exc:
        raise DataError(f"label file {p} not found", path=str(p)) from exc
    labelled = registry.label_samples(rows)
    unique = len({r[0] for r in rows})
    return ImportResult(rows=len(rows), labelled=labelled, pending=unique - labelled)


def export_labels_csv(registry: Registry, store: SampleStore, path: str | Path, *,
                      labelled: bool | None = None, device_ids: list[str] | None = None) -> int:
    """Write one row per sample (absolute payload path included); returns the row count."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with p.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(EXPORT_COLUMNS)
        offset, page = 0, 5000
        while True:  # paged so a million samples never sit in memory at once
            recs = registry.samples(labelled=labelled, device_ids=device_ids, limit=page, offset=offset)
            for r in recs:
                w.writerow([r.id, r.device_id, str(store.root.resolve() / r.path), r.ts, r.model_version or "",
                            r.prediction or "", "" if r.confidence is None else r.confidence, r.reason or "",
                            r.label or "", r.label_source or ""])
            n += len(recs)
            if len(recs) < page:
                return n
            offset += page


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def pseudo_label(registry: Registry, store: SampleStore, bundle_path: str | Path, *, trusted_key: object,
                 threshold: float = 0.9, variant: str | None = None, overwrite_teacher: bool = False,
                 batch: int = 64) -> TeacherResult:
    """Label unlabelled samples with a teacher bundle's prediction where its confidence >= ``threshold``.

    The teacher bundle is verified like any other (signature against ``trusted_key``)
    and run with the agent's own runtime and preprocessing, so it sees exactly what
    the device saw.  True labels are never overwritten.
    """
    from core.bundle import open_bundle
    from core.preprocess import preprocess
    from core.runtime import open_model
    from core.sampling import decode_sample

    if not 0 < threshold <= 1:
        raise DataError(f"teacher confidence threshold {threshold} is not in (0, 1]", hint="e.g. --threshold 0.9")
    bundle = open_bundle(bundle_path, trusted_key=trusted_key)
    m = bundle.manifest
    v = m.variant(variant) if variant else next((x for x in m.variants if x.precision == "fp32"), m.variants[0])
    todo = registry.samples(labelled=False)
    if overwrite_teacher:
        todo += registry.samples(label_source="teacher")
    labels: list[tuple[str, str, str]] = []
    conf: dict[str, float] = {}
    unreadable = below = 0
    with tempfile.TemporaryDirectory(prefix="edgeloop-teacher-") as tmp:
        model_path = Path(tmp) / Path(v.file).name
        model_path.write_bytes(bundle.variant_bytes(v.id))
        model = open_model(model_path, v)
        for i in range(0, len(todo), batch):
            chunk, images = [], []
            for rec in todo[i:i + batch]:
                try:
                    images.append(decode_sample(store.read(rec)).image)
                    chunk.append(rec)
                except Exception:  # noqa: BLE001 - a missing or corrupt payload is counted, not fatal
                    unreadable += 1
            if not chunk:
                continue
            x = preprocess(images, m.preprocessing)
            probs = np.concatenate([_softmax(model.run(x[j:j + 1]).logits) for j in range(len(x))])
            for rec, pr in zip(chunk, probs, strict=True):
                k = int(pr.argmax())
                if float(pr[k]) >= threshold:
                    labels.append((rec.id, m.labels[k], "teacher"))
                    conf[rec.id] = float(pr[k])
                else:
                    below += 1
    labelled = registry.label_samples(labels, confidence=conf) if labels else 0
    return TeacherResult(considered=len(todo), labelled=labelled, below_threshold=below, unreadable=unreadable)
