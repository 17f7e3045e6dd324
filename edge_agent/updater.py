"""Model updates: download (HTTP with Range resume), verify, unpack into a slot, health check, switch.

Every step is reported through a ``report(step, ok, detail, progress)`` callback (the
agent turns it into ``JobStatus`` messages on the outbox).  Nothing touches the
serving model until the very last step, the pointer switch (:mod:`edge_agent.slots`),
so every refusal -- bad signature, wrong hash, incompatible input, downgrade, full
disk, failing health check -- leaves the old model serving.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.agent_config import AgentConfig
from core.bundle import open_bundle
from core.errors import BundleError, EdgeloopError, HealthCheckError, UpdateError
from core.manifest import Manifest

from .inference import LoadedModel, read_reference
from .select import VariantChoice, select_variant
from .slots import SlotStore, fsync_dir

__all__ = ["Reporter", "HealthResult", "InstallResult", "download_http", "health_check", "compare_versions",
           "Installer", "disk_error"]

log = logging.getLogger(__name__)

Reporter = Callable[[str, bool, str, "float | None"], None]


def _no_report(step: str, ok: bool, detail: str, progress: float | None) -> None:
    log.info("update step %s ok=%s %s", step, ok, detail)


def disk_error(exc: OSError, what: str, path: Path) -> UpdateError:
    """An OSError while writing -> a one-line UpdateError (full disk named as such)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return UpdateError(f"not enough disk space to {what} ({path.parent})",
                           hint="free space on the device; the current model keeps serving", path=str(path))
    return UpdateError(f"cannot {what}: {exc.strerror or exc}", path=str(path))


# --------------------------------------------------------------------------- download
class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib would also follow one to ftp://)."""

    def http_error_302(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
        target = urllib.parse.urljoin(req.full_url, headers.get("location") or headers.get("uri") or "")
        if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
            raise UpdateError(f"download redirected to {target[:200]!r}: only http(s) URLs are followed",
                              url=req.full_url)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


# Only http(s): no file://, ftp:// or data: handlers (a deploy command must not read local files).
_OPENER = urllib.request.OpenerDirector()
for _handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                 urllib.request.HTTPDefaultErrorHandler(), _HttpOnlyRedirects(), urllib.request.HTTPErrorProcessor()):
    _OPENER.add_handler(_handler)


def download_http(url: str, dest: Path, *, size: int, sha256: str, timeout: float = 30.0,
                  progress: Callable[[int, int], None] | None = None, chunk: int = 256 * 1024) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` with an HTTP Range request.

    The server must send 206 for a resume; a 200 means it ignored the range and the
    download restarts from zero.  The result is checked against ``size`` and ``sha256``
    (a mismatch deletes the partial file: resuming a corrupt prefix would never succeed).
    """
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise UpdateError(f"refusing to download {url[:200]!r}: only http(s) URLs", url=url,
                          hint="the fleet serves bundles over http(s) or its MQTT transfer")
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have < size:
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with _OPENER.open(req, timeout=timeout) as resp:  # http(s) only, checked above
                status = resp.status
                mode = "ab" if (have and status == 206) else "wb"
                if mode == "wb":
                    have = 0
                with part.open(mode) as fh:
                    while True:
                        block = resp.read(chunk)
                        if not block:
                            break
                        fh.write(block)
                        have += len(block)
                        if have > size:
                            break
                        if progress is not None:
                            progress(have, size)
                    fh.flush()
                    os.fsync(fh.fileno())
        except urllib.error.HTTPError as exc:
            raise UpdateError(f"download failed: HTTP {exc.code} for {url}", url=url) from exc
        except (OSError, http.client.HTTPException) as exc:  # resets, timeouts, short reads: keep the .part
            if isinstance(exc, urllib.error.URLError) and not isinstance(exc.reason, OSError):
                raise UpdateError(f"download failed: {exc.reason}", url=url) from exc
            if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                part.unlink(missing_ok=True)
                raise disk_error(exc, "download the bundle", part) from exc
            raise UpdateError(f"download interrupted at {have} of {size} bytes: {exc}",
                              hint="retry; the download resumes where it stopped", url=url, received=have) from exc
    got = part.stat().st_size
    if got != size:
        if got > size:
            part.unlink()
        raise UpdateError(f"download incomplete: {got} of {size} bytes", hint="retry; it resumes", url=url,
                          received=got)
    digest = _sha256(part)
    if digest != sha256:
        part.unlink()
        raise UpdateError(f"downloaded bundle sha256 {digest[:12]}... does not match the deploy command's "
                          f"{sha256[:12]}...", hint="the file on the server is not the one announced", url=url)
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- versions
def _version_key(v: str) -> tuple[Any, ...]:
    parts = re.findall(r"\d+|[A-Za-z]+", v)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version ``a`` is older than, equal to or newer than ``b`` (numeric-aware)."""
    ka, kb = _version_key(a), _version_key(b)
    return (ka > kb) - (ka < kb)


# --------------------------------------------------------------------------- health check
@dataclass(frozen=True)
class HealthResult:
    ok: bool
    variant: str
    max_abs_diff: float | None = None
    agreement: float | None = None
    latency_ms: float | None = None
    n: int = 0
    detail: str = ""


def _expected_logits(ref: dict[str, np.ndarray], variant_id: str) -> np.ndarray | None:
    for key in (f"logits/{variant_id}", f"logits_{variant_id}", f"{variant_id}/logits", "logits", "expected"):
        if key in ref:
            return np.asarray(ref[key], dtype=np.float32)
    return None


def _reference_inputs(ref: dict[str, np.ndarray], manifest: Manifest) -> np.ndarray | None:
    for key in ("x", "inputs", "input"):
        if key in ref:
            return np.asarray(ref[key], dtype=np.float32)
    if "images" in ref:  # raw images: preprocess here, which checks preprocessing too
        from core.preprocess import preprocess

        return preprocess(np.asarray(ref["images"]), manifest.preprocessing)
    return None


def health_check(model: LoadedModel, config: AgentConfig, *, runs: int = 3) -> HealthResult:
    """Run the bundle's reference inputs through ``model`` and compare with the expected outputs.

    Float variants must match the expected logits within ``[health].atol``, quantized
    ones within ``quantized_atol``; all must agree on the predicted class for at least
    ``min_agreement`` of the inputs; batch-1 latency must stay under ``max_latency_ms``.
    A bundle without ``reference.npz`` passes on latency and finite outputs alone.
    """
    h = config.health
    ref = read_reference(model.slot_dir, model.manifest)
    vid = model.variant.id
    if ref is None:
        x = np.zeros((1, *model.backend.input_shape[1:]), np.float32)
        expected = None
    else:
        x_ref = _reference_inputs(ref, model.manifest)
        if x_ref is None:
            return HealthResult(False, vid, detail="reference.npz has no inputs ('x')")
        x, expected = x_ref, _expected_logits(ref, vid)
    try:
        out = model.backend.run(x)
        t = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model.backend.run(x[:1])
            t.append((time.perf_counter() - t0) * 1000.0)
    except EdgeloopError as exc:
        return HealthResult(False, vid, n=len(x), detail=f"model fails on reference inputs: {exc}")
    latency = float(np.median(t))
    logits = out.logits
    if not np.all(np.isfinite(logits)):
        return HealthResult(False, vid, latency_ms=latency, n=len(x), detail="non-finite outputs")
    if latency > h.max_latency_ms:
        return HealthResult(False, vid, latency_ms=latency, n=len(x),
                            detail=f"batch-1 latency {latency:.1f} ms over the {h.max_latency_ms} ms limit")
    if expected is None:
        return HealthResult(True, vid, latency_ms=latency, n=len(x), detail="no expected outputs; ran cleanly")
    if expected.shape != logits.shape:
        return HealthResult(False, vid, latency_ms=latency, n=len(x),
                            detail=f"outputs {logits.shape} do not match the reference {expected.shape}")
    diff = float(np.max(np.abs(logits - expected)))
    agree = float(np.mean(np.argmax(logits, 1) == np.argmax(expected, 1)))
    quantized = model.variant.precision.startswith("int8")
    atol = h.quantized_atol if quantized else h.atol
    # Expected logits of the FP32 model say little about an int8 variant's exact values:
    # without its own reference the classes must agree and the logits stay loosely close.
    own = any(k in ref for k in (f"logits/{vid}", f"logits_{vid}", f"{vid}/logits"))  # type: ignore[operator]
    if quantized and not own:
        atol = max(atol, 0.1 * float(np.max(np.abs(expected))) + h.quantized_atol)
    ok = agree >= h.min_agreement and diff <= atol
    detail = (f"max |diff| {diff:.2e} (atol {atol:g}), class agreement {agree:.3f} (min {h.min_agreement}), "
              f"{latency:.2f} ms")
    return HealthResult(ok, vid, max_abs_diff=diff, agreement=agree, latency_ms=latency, n=len(x), detail=detail)


# --------------------------------------------------------------------------- install
@dataclass(frozen=True)
class InstallResult:
    version: str
    slot: str
    choice: VariantChoice
    health: HealthResult
    previous_version: str | None = None
    removed_slots: tuple[str, ...] = field(default_factory=tuple)


class Installer:
    """Verifies a bundle file and installs it into a new slot; switching is the caller's last step."""

    def __init__(self, config: AgentConfig, slots: SlotStore, *, trusted_key: Any = None) -> None:
        self.config = config
        self.slots = slots
        self.trusted_key = trusted_key

    def check_disk(self, need_bytes: int, where: Path) -> None:
        """Refuse when ``need_bytes`` plus the configured margin does not fit on ``where``'s filesystem."""
        where.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(where).free
        margin = int(self.config.update.min_free_mb * 1024 * 1024)
        if free < need_bytes + margin:
            raise UpdateError(f"not enough disk space: need {(need_bytes + margin) / 1e6:.1f} MB, "
                              f"{free / 1e6:.1f} MB free in {where}",
                              hint="free space on the device; the current model keeps serving", path=str(where))

    def _check_compatible(self, manifest: Manifest) -> None:
        m = self.config.model
        spec = manifest.preprocessing
        if m.input_channels and spec.channels != m.input_channels:
            raise UpdateError(f"bundle {manifest.version} expects {spec.channels}-channel input; this device is "
                              f"configured for {m.input_channels}", hint="[model].input_channels",
                              version=manifest.version)
        if m.input_size and tuple(spec.size) != tuple(m.input_size):
            raise UpdateError(f"bundle {manifest.version} expects {spec.size[0]}x{spec.size[1]} input; this device is "
                              f"configured for {m.input_size[0]}x{m.input_size[1]}", hint="[model].input_size",
                              version=manifest.version)

    def _check_version(self, manifest: Manifest, current: Manifest | None, force: bool) -> None:
        if current is None or force or self.config.update.allow_downgrade:
            return
        if current.name != manifest.name:  # renaming a model must not be a way around downgrade protection
            raise UpdateError(f"bundle is model {manifest.name!r} {manifest.version}, the device serves "
                              f"{current.name!r} {current.version}",
                              hint="pass --force (or [update].allow_downgrade = true) to replace the model",
                              version=manifest.version)
        if compare_versions(manifest.version, current.version) < 0:
            raise UpdateError(f"bundle {manifest.version} is older than the installed {current.version}",
                              hint="pass --force (or [update].allow_downgrade = true) to downgrade",
                              version=manifest.version)

    def install(self, bundle_path: Path, *, current: Manifest | None = None, force: bool = False,
                report: Reporter = _no_report) -> InstallResult:
        """Verify, unpack, choose a variant and health-check; the slot is left ready to switch to.

        Raises :class:`UpdateError` / :class:`BundleError` with the serving model untouched.
        """
        report("verifying", True, f"checking hashes and signature of {bundle_path.name}", None)
        require = not self.config.agent.allow_unsigned
        bundle = open_bundle(bundle_path, trusted_key=self.trusted_key if self.trusted_key else None,
                             require_signature=require)
        manifest = bundle.manifest
        self._check_compatible(manifest)
        self._check_version(manifest, current, force)
        unpacked = sum(manifest.variant(v.id).size for v in manifest.variants) + bundle_path.stat().st_size
        self.check_disk(unpacked, self.slots.slots_dir)
        name = self.slots.new_slot_name(manifest.version, _sha256(bundle_path))
        target = self.slots.slot_path(name)
        report("installing", True, f"unpacking into slot {name}", None)
        try:
            bundle.extract_to(target)
        except OSError as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise disk_error(exc, "unpack the bundle", target) from exc
        try:
            return self._finish(name, target, manifest, report)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise

    def _finish(self, name: str, target: Path, manifest: Manifest, report: Reporter) -> InstallResult:
        m = self.config.model
        ref = read_reference(target, manifest)
        x1 = None
        if ref is not None:
            x_ref = _reference_inputs(ref, manifest)
            x1 = x_ref[:1] if x_ref is not None and len(x_ref) else None
        if x1 is None:
            x1 = np.zeros((1, *manifest.input.shape[1:]), np.float32)
        choice = select_variant(manifest, target, m.variant, x1, threads=m.threads, runs=m.benchmark_runs)
        report("health_check", True, f"variant {choice.variant} ({choice.reason})", None)
        try:
            model = LoadedModel(target, choice.variant, threads=m.threads, drift=True, accelerator=choice.accelerator,
                                drift_window=self.config.drift.window, drift_budgets=self.config.drift.budgets)
        except EdgeloopError as exc:
            raise HealthCheckError(f"health check failed: cannot load {choice.variant}: {exc}",
                                   version=manifest.version) from exc
        try:
            health = health_check(model, self.config)
        finally:
            model.close()
        if not health.ok:
            raise HealthCheckError(f"health check failed for {manifest.version} ({choice.variant}): {health.detail}",
                                   version=manifest.version)
        info = {"version": manifest.version, "name": manifest.name, "variant": choice.variant,
                "choice": {"mode": choice.mode, "latency_ms": choice.latency_ms, "eligible": list(choice.eligible),
                           "skipped": choice.skipped, "reason": choice.reason, "accelerator": choice.accelerator},
                "health": {"max_abs_diff": health.max_abs_diff, "agreement": health.agreement,
                           "latency_ms": health.latency_ms, "detail": health.detail},
                "installed_at": time.time()}
        try:
            self.slots.write_info(name, info)
        except OSError as exc:
            raise disk_error(exc, "write the slot record", target) from exc
        return InstallResult(version=manifest.version, slot=name, choice=choice, health=health)


def slot_choice(slots: SlotStore, name: str) -> VariantChoice | None:
    """The variant choice recorded in a slot's ``slot.json``."""
    info = slots.read_info(name)
    c = info.get("choice")
    if not isinstance(c, dict) or "variant" not in info:
        return None
    return VariantChoice(variant=info["variant"], mode=c.get("mode", "fixed"), latency_ms=c.get("latency_ms", {}),
                         eligible=tuple(c.get("eligible", ())), skipped=c.get("skipped", {}),
                         reason=c.get("reason", ""), accelerator=c.get("accelerator", "cpu"))


def read_slot_manifest(slots: SlotStore, name: str) -> Manifest | None:
    try:
        return Manifest.from_dict(json.loads((slots.slot_path(name) / "manifest.json").read_text()))
    except (OSError, ValueError, BundleError):
        return None
