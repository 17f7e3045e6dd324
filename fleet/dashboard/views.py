"""Rendering: the Jinja2 environment (autoescaped), template filters, sample thumbnails."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from . import charts
from .data import DashContext
from .png import encode_png, upscale
from .present import count, gate_value, human_bytes, version

__all__ = ["Views"]


def _ago(ts: float | None) -> str:
    if not ts:
        return "—"
    d = max(0.0, time.time() - float(ts))
    if d < 90:
        return f"{d:.0f} s ago"
    if d < 5400:
        return f"{d / 60:.0f} min ago"
    if d < 2 * 86400:
        return f"{d / 3600:.1f} h ago"
    return f"{d / 86400:.0f} d ago"


def _clock(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts))) if ts else "—"


def _pct(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{100 * float(v):.{digits}f}%"


def _num(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


class Views:
    """Renders the templates in ``templates/`` with the dashboard's helpers in scope."""

    def __init__(self, *, prefix: str, refresh_s: float) -> None:
        self.prefix = prefix
        self.refresh_s = refresh_s
        self.env = Environment(loader=FileSystemLoader(str(Path(__file__).parent / "templates")),
                               autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(ago=_ago, clock=_clock, pct=_pct, num=_num, ver=version, count=count,
                                bytes=human_bytes, gate=gate_value)
        self.env.globals.update(prefix=prefix, refresh_s=refresh_s, line_chart=self.line_chart,
                                bar_chart=self.bar_chart)

    @staticmethod
    def line_chart(*args: Any, **kwargs: Any) -> Markup:
        return Markup(charts.line_chart(*args, **kwargs))  # charts escape their own text

    @staticmethod
    def bar_chart(*args: Any, **kwargs: Any) -> Markup:
        return Markup(charts.bar_chart(*args, **kwargs))

    def render(self, template: str, **context: Any) -> str:
        return self.env.get_template(template).render(**context)

    @staticmethod
    def sample_png(ctx: DashContext, sample_id: str) -> bytes:
        """The sample's image as a PNG, enlarged so 8×8 digits are visible."""
        from core.errors import EdgeloopError
        from core.sampling import decode_sample

        from ..samples import SampleStore

        rec = ctx.registry.sample(sample_id)
        if rec is None or ctx.samples_dir is None:
            raise HTTPException(404, "no such sample")
        try:
            image = decode_sample(SampleStore(ctx.samples_dir).read(rec)).image
        except EdgeloopError as exc:
            raise HTTPException(404, f"sample {sample_id}: {exc}") from exc
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        return encode_png(upscale(np.ascontiguousarray(image), 96))
