"""The drift alarm's hysteresis and its rates: the on/off state machine over per-window flags,
and the exact link between a per-window flag rate and the long-run alarm-on fraction (used to
calibrate thresholds for a target false-alarm rate).  Numpy only; re-exported by
:mod:`core.drift_stats`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

__all__ = ["Hysteresis", "HysteresisState", "alarm_on_fraction", "flag_rate_for_alarm_rate"]


@dataclass(frozen=True)
class Hysteresis:
    """Alarm hysteresis: on when ``on_k`` of the last ``on_m`` windows are flagged, off after
    ``off_j`` consecutive clean windows (the flag history is cleared when it turns off)."""

    on_k: int = 1
    on_m: int = 1
    off_j: int = 2

    def __post_init__(self) -> None:
        if not (1 <= self.on_k <= self.on_m <= 8) or self.off_j < 1:
            raise ConfigError(
                f"invalid hysteresis on_k={self.on_k} on_m={self.on_m} off_j={self.off_j}",
                hint="need 1 <= on_k <= on_m <= 8 and off_j >= 1",
            )


class HysteresisState:
    """The alarm's state machine; O(1) memory (a bit mask of the last ``on_m`` flags)."""

    def __init__(self, hysteresis: Hysteresis) -> None:
        self.h = hysteresis
        self.alarm = False
        self.history = 0  # bit i = flag of the window i steps ago, while the alarm is off
        self.clean = 0  # consecutive clean windows, while the alarm is on

    def step(self, flag: bool) -> bool:
        """Feed one window's flag; returns the new alarm state."""
        if not self.alarm:
            self.history = ((self.history << 1) | int(flag)) & ((1 << self.h.on_m) - 1)
            if bin(self.history).count("1") >= self.h.on_k:
                self.alarm, self.clean, self.history = True, 0, 0
        else:
            self.clean = 0 if flag else self.clean + 1
            if self.clean >= self.h.off_j:
                self.alarm, self.history, self.clean = False, 0, 0
        return self.alarm


def alarm_on_fraction(p: float, hysteresis: Hysteresis) -> float:
    """Long-run fraction of windows with the alarm on when each window is flagged i.i.d. with prob ``p``.

    Exact: the stationary distribution of the (small) Markov chain ``HysteresisState`` runs.
    """
    m, j = hysteresis.on_m, hysteresis.off_j
    states = [(False, hb, 0) for hb in range(1 << m)] + [(True, 0, c) for c in range(j)]
    index = {s: i for i, s in enumerate(states)}
    t = np.zeros((len(states), len(states)))
    for s in states:
        for flag, prob in ((True, p), (False, 1.0 - p)):
            hs = HysteresisState(hysteresis)
            hs.alarm, hs.history, hs.clean = s
            hs.step(flag)
            t[index[s], index[(hs.alarm, hs.history, hs.clean)]] += prob
    # Solve pi (T - I) = 0 with sum(pi) = 1.
    a = np.vstack([(t - np.eye(len(states))).T, np.ones(len(states))])
    rhs = np.zeros(len(states) + 1)
    rhs[-1] = 1.0
    pi = np.linalg.lstsq(a, rhs, rcond=None)[0]
    return float(sum(pi[i] for i, s in enumerate(states) if s[0]))


def flag_rate_for_alarm_rate(target: float, hysteresis: Hysteresis) -> float:
    """The largest per-window flag probability whose alarm-on fraction is <= ``target`` (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if alarm_on_fraction(mid, hysteresis) <= target:
            lo = mid
        else:
            hi = mid
    return lo
