"""Drift against several known domains: a window alarms only when it matches none of them.

A retrained model serves more than one domain: the clean images it was first trained for
and the shifted ones it was adapted to (``fleet.retrain``).  One baseline calibrated on a
pool of both fits neither: a real camera's window is pure (all clean or all shifted) and
lies far from the mixture, so every camera alarmed (issue 11 §2: 76-100 % of recovered
windows).  :class:`DomainDriftMonitor` keeps one :class:`core.drift.DriftMonitor` per
domain baseline instead, each calibrated on its own domain, and per window

* ``risk_flag`` = every domain's risk flag (the window matches no known domain), the alarm
  is the hysteresis over that flag; ``input_shift`` and ``class_shift`` likewise;
* the report is the best-matching domain's (the lowest risk relative to its threshold),
  with the AND-ed flags, its ``domain`` name and every domain's risk and threshold; the
  input score and threshold are those of the domain closest on the input tests, so score
  above threshold still means ``input_shift``.

Each domain's false-alarm rate stays within its calibrated budget: AND is never flagged
more often than either flag, and the hysteresis only turns on from flags.  A single
baseline behaves exactly as :class:`DriftMonitor` (the agent then uses that directly).
Cost: one more window statistic per extra domain (milliseconds per window) and one more
input thumbnail and k-NN distance per inference.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .drift import Baseline, DriftFeatures, DriftMonitor, DriftReport, Hysteresis
from .drift_stats import HysteresisState
from .errors import BundleError, InputError
from .manifest import Manifest

__all__ = ["DEFAULT_DOMAIN", "DomainDriftReport", "DomainDriftMonitor", "load_domain_baselines", "drift_monitor",
           "serving_baseline"]

DEFAULT_DOMAIN = "default"  # the name of the manifest's ``baseline`` among the domains

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DomainDriftReport(DriftReport):
    """A :class:`DriftReport` of several domains: ``domain`` matched best; ``domain_risks`` holds
    (name, risk, risk threshold) per domain.  The wire message (``edge_agent.reports``) is unchanged."""

    domain: str = ""
    domain_risks: tuple[tuple[str, float, float], ...] = ()


def combine_reports(names: tuple[str, ...], reports: list[DriftReport], state: HysteresisState) -> DomainDriftReport:
    """One window's reports (one per domain, same window) as one report; steps ``state`` with the AND-ed flag."""
    best = min(range(len(reports)), key=lambda i: reports[i].risk - reports[i].risk_threshold)
    near = min(range(len(reports)), key=lambda i: reports[i].input_score - reports[i].input_threshold)
    r, ri = reports[best], reports[near]
    flag = all(x.risk_flag for x in reports)
    before = state.alarm
    state.step(flag)
    fields = {k: getattr(r, k) for k in DriftReport.__dataclass_fields__}
    fields.update(risk_flag=flag, input_score=ri.input_score, input_threshold=ri.input_threshold,
                  input_shift=all(x.input_shift for x in reports), class_shift=all(x.class_shift for x in reports),
                  alarm=state.alarm, alarm_changed=state.alarm != before)
    return DomainDriftReport(**fields, domain=names[best],
                             domain_risks=tuple((n, float(x.risk), float(x.risk_threshold))
                                                for n, x in zip(names, reports, strict=True)))


class DomainDriftMonitor:
    """One :class:`DriftMonitor` per named baseline, one verdict per window; the agent's monitor interface.

    ``baselines``: name -> baseline, the default domain first (its baseline is
    :attr:`baseline`, its window the default).  Every domain must be calibrated for the
    window, and all must take the same features of the same input (one model's), or
    ``InputError``.  The other arguments are :class:`DriftMonitor`'s; every domain
    uses the same hysteresis, over the AND-ed flag.  ``background``: each domain closes
    its windows on its own thread; the window's reports are joined and ``on_report`` is
    called once, in window order.
    """

    def __init__(self, baselines: Mapping[str, Baseline], *, window: int | None = None,
                 hysteresis: Hysteresis | None = None, input_budget: float | None = None,
                 alarm_rate: float | None = None, background: bool = False,
                 on_report: Callable[[DriftReport], None] | None = None,
                 scores_to_probs: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        if not baselines:
            raise InputError("a domain drift monitor needs at least one baseline", hint="pass {name: Baseline}")
        self.names = tuple(baselines)
        first = baselines[self.names[0]]
        self.window = first.default_window if not window else int(window)
        self.hysteresis = hysteresis or first.hysteresis
        for name, b in baselines.items():
            if self.window not in b.windows:
                raise InputError(f"drift domain {name!r} is not calibrated for window {self.window} "
                                 f"(it has {list(b.windows)})",
                                 hint="set [drift].window to a size every domain has, or re-export the bundle")
            if b.kinds != first.kinds or tuple(b.input_shape) != tuple(first.input_shape):
                raise InputError(f"drift domain {name!r} takes {list(b.kinds)} of {list(b.input_shape)}; "
                                 f"{self.names[0]!r} takes {list(first.kinds)} of {list(first.input_shape)}",
                                 hint="calibrate every domain's baseline with the same model")
        self.on_report = on_report
        self._lock = threading.Lock()
        self._pending: dict[int, dict[str, DriftReport]] = {}
        self._state = HysteresisState(self.hysteresis)
        kw: dict[str, Any] = dict(window=self.window, hysteresis=self.hysteresis, input_budget=input_budget,
                                  alarm_rate=alarm_rate, background=background, scores_to_probs=scores_to_probs)
        self.monitors = {n: DriftMonitor(b, **kw, on_report=(lambda rep, n=n: self._collect(n, rep))
                                         if background else None) for n, b in baselines.items()}
        self.baseline = first

    @property
    def alarm(self) -> bool:
        """The current alarm state (hysteresis over the AND-ed risk flags)."""
        return self._state.alarm

    @property
    def buffered(self) -> int:
        return self.monitors[self.names[0]].buffered

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.monitors[self.names[0]].kinds

    def buffer_nbytes(self) -> int:
        return sum(m.buffer_nbytes() for m in self.monitors.values())

    def score_samples(self, emb: np.ndarray) -> np.ndarray:
        """Per-sample drift score: the lowest over the domains (a sample typical of any domain is typical)."""
        return np.min([m.score_samples(emb) for m in self.monitors.values()], axis=0)

    def sample_score(self, probs: np.ndarray | None, embedding: np.ndarray | None) -> float | None:
        """One sample's drift score, the lowest over the domains; None when the monitors cannot score it."""
        scores = [m.sample_score(probs, embedding) for m in self.monitors.values()]
        return None if scores[0] is None else min(s for s in scores if s is not None)

    def update(self, features: DriftFeatures | np.ndarray, probs: np.ndarray | None = None,
               emb: np.ndarray | None = None, outputs: np.ndarray | None = None) -> list[DriftReport]:
        """:meth:`DriftMonitor.update` on every domain; the joined reports of the windows completed."""
        return self._join([m.update(features, probs, emb, outputs) for m in self.monitors.values()])

    def append(self, inputs: np.ndarray | None, probs: np.ndarray | None = None, embedding: np.ndarray | None = None,
               outputs: np.ndarray | None = None) -> list[DriftReport]:
        """:meth:`DriftMonitor.append` on every domain (the per-inference call)."""
        return self._join([m.append(inputs, probs, embedding, outputs) for m in self.monitors.values()])

    def stage_inputs(self, inputs: np.ndarray) -> None:
        """:meth:`DriftMonitor.stage_inputs` on every domain (each keeps its own window buffers)."""
        for m in self.monitors.values():
            m.stage_inputs(inputs)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every full window has been closed by every domain and reported; False on timeout."""
        return all([m.flush(timeout) for m in self.monitors.values()])

    def close(self) -> None:
        """Flush and end the domains' background threads."""
        for m in self.monitors.values():
            m.close()

    def _join(self, per_domain: list[list[DriftReport]]) -> list[DriftReport]:
        return [combine_reports(self.names, list(reps), self._state) for reps in zip(*per_domain, strict=True)]

    def _collect(self, name: str, rep: DriftReport) -> None:
        """Background: one domain's report; when the window has all of them, the joined one goes to ``on_report``.

        Each domain reports its windows in order, so windows complete in order; the joined
        report is made and passed on under the lock, so the hysteresis steps in order too.
        """
        with self._lock:
            got = self._pending.setdefault(rep.window_index, {})
            got[name] = rep
            if len(got) < len(self.names):
                return
            for i in [i for i in self._pending if i <= rep.window_index]:  # and any a failed domain never closed
                del self._pending[i]
            joined = combine_reports(self.names, [got[n] for n in self.names], self._state)
            if self.on_report is not None:
                self.on_report(joined)


def serving_baseline(b: Baseline) -> Baseline:
    """``b`` as a device serves it: the (K, K) class kernel, of which a window's statistics read only the
    diagonal (``drift_baseline._window_stats``), held as a read-only broadcast of that diagonal.

    Same values wherever the monitor looks; a 1000-class baseline keeps 8 kB instead of 8 MB
    (issue 12: the agent's resident memory).  Calibration needs the full kernel: never save this one.
    """
    k = b.class_kernel
    if k is None or k.ndim != 2 or k.shape[0] != k.shape[1] or k.strides[1] == 0:
        return b
    # every other element of a 2K buffer: the diagonal stays a strided vector, as it is in the full matrix,
    # so the BLAS products over it take the same kernel and give the same bits
    spaced = np.zeros(2 * k.shape[0], k.dtype)
    spaced[::2] = np.diag(k)
    slim = np.lib.stride_tricks.as_strided(spaced, k.shape, (2 * k.itemsize, 0), writeable=False)
    return dataclasses.replace(b, class_kernel=slim)


def load_domain_baselines(slot_dir: str | Path, manifest: Manifest, default: Baseline) -> dict[str, Baseline]:
    """The default baseline and every ``manifest.drift_domains`` baseline that loads (others are logged, skipped),
    each as :func:`serving_baseline` makes it."""
    out = {DEFAULT_DOMAIN: serving_baseline(default)}
    for name, member in sorted(manifest.drift_domains.items()):
        try:
            out[name] = serving_baseline(Baseline.load(Path(slot_dir) / member))
        except BundleError as exc:
            log.warning("%s %s: drift domain %s left out: %s", manifest.name, manifest.version, name, exc)
    return out


def drift_monitor(baselines: Mapping[str, Baseline], *, window: int | None = None,
                  **kw: Any) -> DriftMonitor | DomainDriftMonitor:
    """A :class:`DriftMonitor` for one baseline, a :class:`DomainDriftMonitor` for several.

    A domain not calibrated for the window (the default domain's default when ``window``
    is None) is left out with a warning, so the default domain always keeps drift
    detection on; the default domain itself raises ``InputError`` as ``DriftMonitor`` does.
    """
    names = list(baselines)
    first = baselines[names[0]]
    w = first.default_window if not window else int(window)
    kept = {names[0]: first}
    for n in names[1:]:
        b = baselines[n]
        if w not in b.windows:
            log.warning("drift domain %s left out: not calibrated for window %d (it has %s)", n, w, list(b.windows))
        elif b.kinds != first.kinds or tuple(b.input_shape) != tuple(first.input_shape):
            log.warning("drift domain %s left out: it takes %s of %s, not %s of %s", n, list(b.kinds),
                        list(b.input_shape), list(first.kinds), list(first.input_shape))
        else:
            kept[n] = b
    if len(kept) == 1:
        return DriftMonitor(first, window=window, **kw)
    return DomainDriftMonitor(kept, window=window, **kw)
