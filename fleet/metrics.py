"""The fleet's ``/metrics``: Prometheus text exposition of ingestion and per-device refusals.

Counters of the ingest process serving the API (extra ingest processes, ``ingest.workers``
> 1, count their own bulk kinds and are not summed here), the refusals of
:mod:`fleet.ingest_guard` per rule and, for the most recent offenders, per device, and a
few registry gauges.  Operators see from here what was dropped, malformed or refused.
"""

from __future__ import annotations

from typing import Any

__all__ = ["render_metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MAX_DEVICE_SERIES = 100  # per-device series, most recent offenders (bounded cardinality)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(ingest: Any = None, registry: Any = None) -> str:
    """Prometheus text for an :class:`~fleet.ingest.IngestService` and a registry (either may be None)."""
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    if ingest is not None:
        st = ingest.stats
        for field, help_text in (("received", "device and operator messages received"),
                                 ("processed", "messages processed"),
                                 ("malformed", "messages dropped as malformed"),
                                 ("refused", "messages refused by a per-device rule (see edgeloop_ingest_refusals_total)"),
                                 ("dropped_transfers", "partial sample transfers dropped (corrupt, evicted, expired)"),
                                 ("db_errors", "ingest batches that could not be written"),
                                 ("samples", "samples stored"), ("receipts", "receipt messages sent")):
            metric(f"edgeloop_ingest_{field}_total", "counter", help_text, [("", float(getattr(st, field, 0)))])
        counters = ingest.guard_counters
        metric("edgeloop_ingest_refusals_total", "counter", "refusals per per-device rule",
               [(f'{{rule="{_label(r)}"}}', float(n)) for r, n in sorted(counters.rules().items())])
        per_device = list(counters.devices().items())[-_MAX_DEVICE_SERIES:]
        metric("edgeloop_device_refusals_total", "counter",
               f"refusals per device and rule (the {_MAX_DEVICE_SERIES} most recent offenders)",
               [(f'{{device="{_label(d)}",rule="{_label(r)}"}}', float(n))
                for d, rules in per_device for r, n in sorted(rules.items())])
        metric("edgeloop_ingest_open_transfers", "gauge", "partial sample transfers being reassembled",
               [("", float(len(ingest.reassembler)))])
    if registry is not None:
        status = registry.status()
        metric("edgeloop_devices", "gauge", "devices known to the fleet", [("", float(status.devices))])
        metric("edgeloop_devices_online", "gauge", "devices online", [("", float(status.online))])
        metric("edgeloop_devices_alarming", "gauge", "devices with a drift alarm", [("", float(status.alarming))])
        metric("edgeloop_samples", "gauge", "stored samples", [("", float(status.samples))])
        pending = getattr(getattr(registry, "labels", None), "pending_count", None)
        if callable(pending):
            metric("edgeloop_pending_labels", "gauge", "labels waiting for their sample", [("", float(pending()))])
    return "\n".join(out) + "\n"
