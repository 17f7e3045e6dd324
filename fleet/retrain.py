"""The retraining job: fine-tune, export, gate against the model in service, record the verdict.

1. The model in service is the newest *accepted* version of ``name``; its bundle's
   lineage names the training run (``runs_dir/<run_id>``) to fine-tune from.
2. The labelled drift samples are decoded from the sample store and split, stratified
   and stable (a sample's side depends only on its id), into a training part and a
   held-out part.
3. :func:`train.api.train_run` fine-tunes the parent run on its original data plus the
   training part, in a process of its own (:mod:`fleet.retrain_process`: the fleet's GIL
   stays free); :func:`export.pipeline.export_run` exports it with the parent bundle's
   accuracy budget, signs it with the fleet key and writes the candidate bundle.
   The candidate gets one drift baseline per domain it serves: the default one on the
   parent run's clean validation + test images, and ``adapted`` on the newest samples
   captured while their device was drifted that it was not trained on, labelled or not
   (:mod:`fleet.retrain_domains`); the agent alarms only on windows that match neither
   (``core.drift_domains``).
   One baseline pooled from both fits no camera's pure window (issue 11 §2: 76-100 % of
   the recovered cameras' windows and 44-89 % of the clean ones alarmed).
4. Both bundles run in ONNX Runtime / LiteRT (the variant the devices serve) on the
   held-out drift samples and on the parent run's original test split.  The candidate is
   accepted only if it gains at least ``gate.min_improvement`` on the former and loses at
   most ``gate.max_original_drop`` on the latter; either way it stays in the registry,
   with its metrics and, when rejected, the reason.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import EdgeloopError, FleetError

from .policy import GatePolicy, RetrainPolicyConfig
from .registry import ModelVersion, Registry, SampleRecord

__all__ = ["RetrainSettings", "RetrainOutcome", "split_labelled", "next_version", "gate_verdict", "evaluate_bundle",
           "run_retrain"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrainSettings:
    """Where a retraining job reads and writes, and how hard it trains."""

    runs_dir: Path
    bundles_dir: Path
    samples_dir: Path
    signing_key: Path
    public_key: Path
    policy: RetrainPolicyConfig = field(default_factory=RetrainPolicyConfig)
    threads: int | None = None  # torch threads; None: all cores
    batch_size: int | None = None  # None: the parent run's

    def __post_init__(self) -> None:
        for name in ("runs_dir", "bundles_dir", "samples_dir", "signing_key", "public_key"):
            object.__setattr__(self, name, Path(getattr(self, name)))


@dataclass(frozen=True)
class RetrainOutcome:
    """What one job did; ``status`` is ``accepted``, ``rejected`` or ``skipped``."""

    status: str
    reason: str
    name: str
    parent_version: str | None
    version: str | None = None
    bundle: Path | None = None
    run_dir: Path | None = None
    trigger: str = "manual"
    n_labelled: int = 0
    n_train: int = 0
    n_holdout: int = 0
    holdout_current: float | None = None
    holdout_candidate: float | None = None
    test_current: float | None = None
    test_candidate: float | None = None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    adapted_domain: dict[str, Any] = field(default_factory=dict)  # what the "adapted" drift baseline was built on

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"


# --------------------------------------------------------------------------- pure helpers


def split_labelled(ids: Sequence[str], labels: Sequence[str], holdout_fraction: float, seed: int = 0
                   ) -> tuple[list[int], list[int]]:
    """Indices of the (train, held-out) parts: deterministic, stratified and stable per sample id.

    A sample is held out when a hash of ``seed`` and its id, read as a number in [0, 1),
    falls below ``holdout_fraction``: its side never changes as more samples arrive, so
    a later job never measures on what an earlier accepted model trained on.  Per class,
    the share held out is the fraction in expectation, and every class with two or more
    samples gets at least one on each side.
    """
    def u(i: int) -> float:
        return int.from_bytes(hashlib.sha256(f"{seed}:{ids[i]}".encode()).digest()[:8], "big") / 2.0**64

    by_class: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(str(lab), []).append(i)
    train, hold = [], []
    for members in by_class.values():
        members.sort(key=u)
        k = sum(1 for i in members if u(i) < holdout_fraction)
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        else:
            k = 0
        hold += members[:k]
        train += members[k:]
    return sorted(train), sorted(hold)


def next_version(current: str, taken: Sequence[str] = ()) -> str:
    """The next free version after ``current``: ``1.2.0`` -> ``1.3.0``; ``v7`` -> ``v7.1``."""
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", current)
    n = 1
    while True:
        cand = f"{m.group(1)}.{int(m.group(2)) + n}.0" if m else f"{current}.{n}"
        if cand not in taken:
            return cand
        n += 1


def gate_verdict(gate: GatePolicy, holdout_current: float, holdout_candidate: float, test_current: float,
                 test_candidate: float) -> tuple[str, str]:
    """``("accepted" | "rejected", reason)`` from the four accuracies (fractions)."""
    gain, drop = holdout_candidate - holdout_current, test_current - test_candidate
    failures = []
    if gain < gate.min_improvement:
        failures.append(f"held-out drift accuracy {holdout_current:.3f} -> {holdout_candidate:.3f} "
                        f"(gain {gain:+.3f} < {gate.min_improvement:.3f})")
    if drop > gate.max_original_drop + 1e-12:
        failures.append(f"original test accuracy {test_current:.3f} -> {test_candidate:.3f} "
                        f"(drop {drop:.3f} > {gate.max_original_drop:.3f})")
    if failures:
        return "rejected", "; ".join(failures)
    return "accepted", (f"held-out drift accuracy {holdout_current:.3f} -> {holdout_candidate:.3f}, "
                        f"original test {test_current:.3f} -> {test_candidate:.3f}")


# --------------------------------------------------------------------------- evaluation


def evaluate_bundle(bundle_path: Path, images: np.ndarray, labels: np.ndarray, *, variant_id: str | None = None,
                    trusted_key: Any = None, batch: int = 256) -> float:
    """Accuracy of a bundle's variant on raw uint8 images, in the runtime the device uses."""
    from core.bundle import open_bundle
    from core.preprocess import preprocess
    from core.runtime import open_model

    if len(images) == 0:
        raise FleetError("no images to evaluate on")
    b = open_bundle(bundle_path, trusted_key=trusted_key, require_signature=trusted_key is not None)
    m = b.manifest
    variant = m.variant(variant_id) if variant_id and variant_id in {v.id for v in m.variants} else m.variants[0]
    with tempfile.TemporaryDirectory(prefix="edgeloop-eval-") as tmp:
        b.extract_to(tmp)
        backend = open_model(Path(tmp) / variant.file, variant, threads=1)
        fixed = backend.input_shape[0] if backend.input_shape and backend.input_shape[0] > 0 else None
        step = fixed or batch
        preds = []
        for i in range(0, len(images), step):
            x = preprocess(images[i:i + step], m.preprocessing)
            if fixed and len(x) != fixed:  # a static-batch model (TFLite): pad the tail
                x = np.concatenate([x, np.repeat(x[-1:], fixed - len(x), axis=0)])
            preds.append(np.argmax(backend.run(x).logits, axis=1)[: len(images[i:i + step])])
    return float(np.mean(np.concatenate(preds) == labels))


def _served_variant(registry: Registry, version: str) -> str | None:
    """The variant most devices on ``version`` run (what the comparison must measure)."""
    counts = Counter(d.variant for d in registry.devices(model_version=version) if d.variant)
    return counts.most_common(1)[0][0] if counts else None


def _read_image(store: Any, rec: SampleRecord) -> np.ndarray | None:
    from core.sampling import decode_sample

    try:
        return decode_sample(store.read(rec)).image
    except EdgeloopError as exc:
        log.warning("sample %s cannot be decoded (%s); skipped", rec.id, exc)
        return None


def _decode(store_root: Path, recs: Sequence[SampleRecord], labels: Sequence[str]
            ) -> tuple[list[str], list[np.ndarray], list[int]]:
    from .samples import SampleStore

    store = SampleStore(store_root)
    index = {lab: i for i, lab in enumerate(labels)}
    ids, images, ys = [], [], []
    for rec in recs:
        lab = str(rec.label)
        y = index.get(lab, int(lab) if lab.isdigit() and int(lab) < len(labels) else None)
        if y is None:
            log.warning("sample %s: label %r is not a class of the model; skipped", rec.id, lab)
            continue
        img = _read_image(store, rec)
        if img is None:
            continue
        ids.append(rec.id)
        images.append(img)
        ys.append(y)
    return ids, images, ys


def _images(store_root: Path, recs: Sequence[SampleRecord]) -> list[np.ndarray]:
    """The decodable images of ``recs`` (labels not needed: a drift baseline uses none)."""
    from .samples import SampleStore

    store = SampleStore(store_root)
    return [img for img in (_read_image(store, r) for r in recs) if img is not None]


def _conform(images: Sequence[np.ndarray], like: np.ndarray) -> np.ndarray:
    """Stack device images as the dataset's camera images (same size and channels)."""
    from train.data import conform_images

    channels = 1 if like.ndim == 3 else like.shape[3]
    return conform_images(list(images), tuple(like.shape[1:3]), channels)


def _run_dir(settings: RetrainSettings, model: ModelVersion, manifest: Any) -> Path:
    lineage = model.lineage or {}
    candidates = [lineage.get("run_dir"), manifest.lineage.run_id and settings.runs_dir / manifest.lineage.run_id,
                  lineage.get("run_id") and settings.runs_dir / str(lineage["run_id"])]
    for c in candidates:
        if c and (Path(c) / "checkpoint.pt").is_file():
            return Path(c)
    raise FleetError(f"the training run of {model.name} {model.version} ({manifest.lineage.run_id}) is not in "
                     f"{settings.runs_dir}", hint="keep the run directories the fleet trained from under the runs dir",
                     version=model.version)


def _export(run_dir: Path, settings: RetrainSettings, manifest: Any, version: str, parent: str,
            drift_domains: dict[str, np.ndarray] | None = None, clean_images: np.ndarray | None = None) -> Path:
    """Export the candidate with the parent's settings; only the options ``export_run`` knows are passed.

    ``drift_domains``: name -> held-out images (never trained on) of each domain the
    candidate was retrained for, one drift baseline each, so cameras it serves well again
    stop alarming (issue 11 §2); ``clean_images``: the clean held-out images of the default
    baseline (the candidate run's own validation and test splits hold drift samples too).
    """
    from export.pipeline import export_run

    formats = tuple(sorted({v.format for v in manifest.variants}))
    onnx = tuple(sorted({v.precision for v in manifest.variants if v.format == "onnx"} | {"fp32"}))
    settings.bundles_dir.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, Any] = {
        "out": settings.bundles_dir, "max_drop": manifest.accuracy_budget, "sign_key": settings.signing_key,
        "version": version, "parent_version": parent, "name": manifest.name, "formats": formats,
        "onnx_precisions": onnx, "drift_domains": drift_domains, "clean_images": clean_images,
    }
    params = inspect.signature(export_run).parameters
    kwargs = {k: v for k, v in wanted.items() if k in params}
    report = export_run(run_dir, **kwargs)
    return Path(report.bundle)


# --------------------------------------------------------------------------- the job


def run_retrain(registry: Registry, settings: RetrainSettings, name: str, *, trigger: str = "manual",
                clock: Callable[[], float] = time.time) -> RetrainOutcome:
    """Run one retraining job for model ``name``; see the module docstring for the steps."""
    from core.bundle import open_bundle
    from core.signing import load_public_key
    from train.api import TrainConfig, load_run

    from .retrain_domains import adapted_domain
    from .retrain_process import train_isolated

    t0 = time.monotonic()
    timings: dict[str, float] = {}
    gate: GatePolicy = settings.policy.gate
    current = registry.latest_model(name, status="accepted")
    if current is None or not current.bundle_path:
        raise FleetError(f"no accepted model {name} in the registry to retrain from",
                         hint="register the model in service first (`edgeloop fleet models`)")
    pub = load_public_key(settings.public_key)
    manifest = open_bundle(current.bundle_path, trusted_key=pub).manifest
    parent_dir = _run_dir(settings, current, manifest)
    base = {"name": name, "parent_version": current.version, "trigger": trigger}

    recs = registry.samples(labelled=True)
    ids, images, ys = _decode(settings.samples_dir, recs, manifest.labels)
    tr, ho = split_labelled(ids, [str(y) for y in ys], gate.holdout_fraction, gate.seed)
    if len(ho) < gate.min_holdout:
        return RetrainOutcome("skipped", f"only {len(ho)} held-out labelled samples (< {gate.min_holdout})",
                              n_labelled=len(ids), n_train=len(tr), n_holdout=len(ho), **base)
    parent = load_run(parent_dir)
    test_images, test_labels = parent.images("test")
    x_all = _conform(images, test_images)
    y_all = np.asarray(ys, dtype=np.int64)
    timings["prepare"] = time.monotonic() - t0

    t = time.monotonic()
    lr = settings.policy.fine_tune_lr or min(1e-3, float(parent.params.get("config", {}).get("lr", 3e-3)) / 3)
    cfg_kwargs: dict[str, Any] = {"init_from": str(parent_dir), "epochs": settings.policy.fine_tune_epochs,
                                  "out_dir": str(settings.runs_dir), "lr": lr, "warmup_epochs": 0.0,
                                  "threads": settings.threads}
    if settings.batch_size:
        cfg_kwargs["batch_size"] = settings.batch_size
    run_dir = train_isolated(TrainConfig(**cfg_kwargs), extra_images=x_all[tr], extra_labels=y_all[tr])
    timings["train"] = time.monotonic() - t

    t = time.monotonic()
    version = next_version(current.version, [m.version for m in registry.models(name=name)])
    # one drift baseline per domain (issue 11 §2): the parent's clean held-out splits, and the samples captured
    # while their device was drifted that the candidate was not trained on (fleet.retrain_domains)
    clean = np.concatenate([parent.images("val")[0], test_images])
    by_id = {r.id: r for r in recs}
    adapted = adapted_domain(registry, [by_id[i] for i in ids], {ids[i] for i in tr}, [by_id[ids[i]] for i in ho])
    adapted_images = _conform(_images(settings.samples_dir, adapted.records), test_images)
    bundle = _export(run_dir, settings, manifest, version, current.version,
                     drift_domains={"adapted": adapted_images}, clean_images=clean)
    timings["export"] = time.monotonic() - t

    t = time.monotonic()
    variant = _served_variant(registry, current.version)
    hold_cur = evaluate_bundle(Path(current.bundle_path), x_all[ho], y_all[ho], variant_id=variant)
    hold_new = evaluate_bundle(bundle, x_all[ho], y_all[ho], variant_id=variant)
    test_cur = evaluate_bundle(Path(current.bundle_path), test_images, test_labels, variant_id=variant)
    test_new = evaluate_bundle(bundle, test_images, test_labels, variant_id=variant)
    timings["gate"] = time.monotonic() - t

    status, reason = gate_verdict(gate, hold_cur, hold_new, test_cur, test_new)
    failures = status != "accepted"
    gate_metrics = {"gate": {"holdout_current": hold_cur, "holdout_candidate": hold_new, "test_current": test_cur,
                             "test_candidate": test_new, "n_holdout": len(ho), "n_train": len(tr),
                             "variant": variant, "min_improvement": gate.min_improvement,
                             "max_original_drop": gate.max_original_drop, "passed": not failures},
                    "adapted_domain": adapted.to_dict()}
    new_run = load_run(run_dir)
    registry.register_model(
        bundle, trusted_key=pub, status=status, reason=reason if failures else None,
        parent_version=current.version,
        lineage={"run_id": new_run.run_id, "run_dir": str(run_dir), "data_hash": new_run.data_hash,
                 "parent_version": current.version, "parent_run_id": parent.run_id, "trigger": trigger,
                 "samples": {"train": [ids[i] for i in tr], "holdout": [ids[i] for i in ho]},
                 "created": clock()})
    registry.set_model_status(name, version, status, reason=reason, metrics=gate_metrics)
    log.info("retrain %s %s -> %s: %s (%s)", name, current.version, version, status, reason)
    return RetrainOutcome(status, reason, version=version, bundle=bundle, run_dir=run_dir, n_labelled=len(ids),
                          n_train=len(tr), n_holdout=len(ho), holdout_current=hold_cur, holdout_candidate=hold_new,
                          test_current=test_cur, test_candidate=test_new, seconds=time.monotonic() - t0,
                          timings=timings, adapted_domain=adapted.to_dict(), **base)
