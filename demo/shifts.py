"""Realistic camera shifts for the demo: darker, blurred and rotated images (numpy only).

A camera drifts the way physical things do: the lighting dims or the exposure falls,
the lens fogs or goes out of focus, the mount is knocked and the picture tilts.  Each
of those is one small function here; :class:`CameraShift` composes them so a device in
the demo can start seeing the world differently half-way through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from core.errors import ConfigError

__all__ = ["CameraShift", "darken", "gaussian_blur", "rotate", "NO_SHIFT", "DEMO_SHIFT"]


def darken(images: np.ndarray, gain: float, gamma: float = 1.0) -> np.ndarray:
    """Lower exposure: ``255 * gain * (x / 255) ** gamma`` (gamma > 1 crushes the mid-tones)."""
    x = images.astype(np.float32) / 255.0
    return np.clip(255.0 * gain * np.power(x, gamma), 0, 255).astype(np.uint8)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (N, H, W) or (H, W) uint8 images, edges replicated."""
    if sigma <= 0:
        return images
    k = _gaussian_kernel(sigma)
    r = len(k) // 2
    x = images.astype(np.float32)
    squeeze = x.ndim == 2
    if squeeze:
        x = x[None]
    pad = np.pad(x, ((0, 0), (r, r), (r, r)), mode="edge")
    # one 1-D convolution per axis, as sliding-window sums of shifted copies
    h = sum(k[i] * pad[:, i:i + x.shape[1], :] for i in range(len(k)))
    v = sum(k[i] * h[:, :, i:i + x.shape[2]] for i in range(len(k)))
    out = np.clip(np.rint(v), 0, 255).astype(np.uint8)
    return out[0] if squeeze else out


def rotate(images: np.ndarray, degrees: float, fill: int = 0) -> np.ndarray:
    """Rotate (N, H, W) or (H, W) uint8 images about their centre, bilinear, ``fill`` outside."""
    x = images.astype(np.float32)
    squeeze = x.ndim == 2
    if squeeze:
        x = x[None]
    n, h, w = x.shape
    th = math.radians(degrees)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # inverse map: for each output pixel, where it comes from in the input
    sy = math.cos(th) * (yy - cy) - math.sin(th) * (xx - cx) + cy
    sx = math.sin(th) * (yy - cy) + math.cos(th) * (xx - cx) + cx
    y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
    fy, fx = sy - y0, sx - x0
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=float(fill))

    def at(yi: np.ndarray, xi: np.ndarray) -> np.ndarray:
        inside = (yi >= -1) & (yi <= h) & (xi >= -1) & (xi <= w)
        vals = padded[:, np.clip(yi + 1, 0, h + 1), np.clip(xi + 1, 0, w + 1)]
        return np.where(inside, vals, float(fill))

    out = (at(y0, x0) * (1 - fy) * (1 - fx) + at(y0, x0 + 1) * (1 - fy) * fx
           + at(y0 + 1, x0) * fy * (1 - fx) + at(y0 + 1, x0 + 1) * fy * fx)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out[0] if squeeze else out


@dataclass(frozen=True)
class CameraShift:
    """A camera gone wrong: exposure gain/gamma, defocus blur, tilt and sensor noise.

    ``rotate_jitter_deg`` varies the tilt per image (a loose mount), so a model cannot
    learn one fixed angle.  ``apply`` is deterministic given the generator.
    """

    gain: float = 1.0
    gamma: float = 1.0
    blur_sigma: float = 0.0
    rotate_deg: float = 0.0
    rotate_jitter_deg: float = 0.0
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.gain <= 2.0 or self.gamma <= 0.0:
            raise ConfigError(f"shift gain {self.gain} / gamma {self.gamma} out of range",
                              hint="gain in (0, 2], gamma > 0")
        if self.blur_sigma < 0 or self.noise_std < 0 or self.rotate_jitter_deg < 0:
            raise ConfigError("shift blur_sigma, noise_std and rotate_jitter_deg must be >= 0")

    @property
    def identity(self) -> bool:
        return self == NO_SHIFT

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Shift a batch of (N, H, W) uint8 images."""
        if self.identity:
            return images
        x = images
        if self.rotate_deg or self.rotate_jitter_deg:
            angles = self.rotate_deg + rng.uniform(-self.rotate_jitter_deg, self.rotate_jitter_deg, len(x))
            x = np.stack([rotate(img, float(a)) for img, a in zip(x, angles, strict=True)])
        if self.blur_sigma:
            x = gaussian_blur(x, self.blur_sigma)
        if self.gain != 1.0 or self.gamma != 1.0:
            x = darken(x, self.gain, self.gamma)
        if self.noise_std:
            x = np.clip(x.astype(np.float32) + rng.normal(0, self.noise_std, x.shape), 0, 255).astype(np.uint8)
        return x


NO_SHIFT = CameraShift()
# Strong enough to cost the digits model tens of points, mild enough to be learnable.
# Measured on the quick demo's v1 model: 98 % -> about 42 % accuracy on the validation split.
DEMO_SHIFT = CameraShift(gain=0.55, gamma=1.2, blur_sigma=1.2, rotate_deg=20.0, rotate_jitter_deg=5.0, noise_std=2.0)
