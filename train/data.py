"""Datasets: scikit-learn's digits (offline) or an image folder, split and hashed.

An :class:`ImageDataset` holds raw uint8 "camera" images at one size; the model input is
made from them by :func:`core.preprocess.preprocess`, the same function the
device runs.  Errors name the file or folder at fault.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import DataError, InputError
from core.preprocess import IMAGE_SUFFIXES, load_image, resize, to_channels

__all__ = [
    "BUILTIN_DATASETS",
    "ImageDataset",
    "Split",
    "load_dataset",
    "split_dataset",
    "split_labels",
    "data_hash",
    "conform_images",
]

log = logging.getLogger(__name__)
BUILTIN_DATASETS = ("digits",)


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Raw images with integer labels.

    ``images``: uint8 (N, H, W) for gray or (N, H, W, 3) for colour; ``labels``: int64
    (N,) indexing ``class_names``; ``sources``: where each image came from (a path or
    ``digits:<index>``); ``name``: ``"digits"`` or the folder path.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    sources: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "sources", tuple(self.sources))
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
            raise DataError(f"dataset {self.name}: images must be uint8 (N, H, W[, 3]), got "
                            f"{self.images.dtype} {self.images.shape}")
        n = len(self.images)
        if self.labels.shape != (n,) or len(self.sources) != n:
            raise DataError(f"dataset {self.name}: {n} images but {self.labels.shape} labels / {len(self.sources)} sources")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataError(f"dataset {self.name}: labels outside 0..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else int(self.images.shape[3])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, idx: np.ndarray) -> ImageDataset:
        """The images at ``idx``, same classes."""
        return ImageDataset(self.images[idx], self.labels[idx], self.class_names,
                            tuple(self.sources[i] for i in idx), self.name)

    def extended(self, images: np.ndarray, labels: np.ndarray, source: str = "extra") -> ImageDataset:
        """This dataset with ``images`` (conformed to its size and channels) appended."""
        extra = conform_images(images, self.image_size, self.channels)
        return ImageDataset(
            np.concatenate([self.images, extra]), np.concatenate([self.labels, labels.astype(np.int64)]),
            self.class_names, self.sources + tuple(f"{source}:{i}" for i in range(len(extra))), self.name,
        )


@dataclass(frozen=True)
class Split:
    """Stratified train / val / test index arrays (into the dataset), stored as ``split.json``."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]
    seed: int
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        if set(self.train) & set(self.val) or set(self.train) & set(self.test) or set(self.val) & set(self.test):
            raise DataError("split: train, val and test overlap")

    def indices(self, name: str) -> np.ndarray:
        """Index array of one part: ``train``, ``val`` or ``test``."""
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split {name!r}", hint="use train, val or test")
        return np.asarray(getattr(self, name), dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "val_fraction": self.val_fraction, "test_fraction": self.test_fraction,
                "train": list(self.train), "val": list(self.val), "test": list(self.test), "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Split:
        try:
            return cls(train=d["train"], val=d["val"], test=d["test"], seed=int(d["seed"]),
                       val_fraction=float(d.get("val_fraction", 0.15)), test_fraction=float(d.get("test_fraction", 0.15)),
                       extra=dict(d.get("extra", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"invalid split: {exc}") from exc

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> Split:
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read split ({exc})", path=path) from exc


# ---------------------------------------------------------------------------- loading


def conform_images(images: np.ndarray | list[np.ndarray], size: tuple[int, int], channels: int) -> np.ndarray:
    """Bring raw images to one size and channel count as uint8 (N, H, W) or (N, H, W, 3).

    Bilinear (antialiased) resize, rounded back to uint8 as a camera would deliver it.
    """
    items = list(images) if isinstance(images, list) else ([images] if np.asarray(images).ndim == 2 else list(images))
    out = np.empty((len(items), *size, channels) if channels == 3 else (len(items), *size), dtype=np.uint8)
    for i, img in enumerate(items):
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise DataError(f"extra image {i} has shape {arr.shape}", hint="pass (H, W) or (H, W, 3) uint8 images")
        x = to_channels(arr[None], channels).transpose(0, 3, 1, 2)  # (1, C, H, W) float
        x = resize(x, size)[0]
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        out[i] = x[0] if channels == 1 else x.transpose(1, 2, 0)
    return out


def _load_digits(image_size: tuple[int, int]) -> ImageDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 ink levels -> 0..255, then upsampled once, as a camera would see the digit.
    raw = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.float32)
    up = resize(raw[:, None], image_size)[:, 0]
    images = np.clip(np.rint(up), 0, 255).astype(np.uint8)
    return ImageDataset(images, d.target.astype(np.int64), tuple(str(i) for i in range(10)),
                        tuple(f"digits:{i}" for i in range(len(images))), "digits")


def _load_folder(root: Path, image_size: tuple[int, int] | None, channels: int | None) -> ImageDataset:
    if not root.exists():
        raise DataError(f"{root}: no such folder", hint="pass an image folder with one sub-folder per class", path=root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder", hint="pass an image folder with one sub-folder per class", path=root)
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class folder(s), need at least 2",
                        hint="put each class's images in its own sub-folder (ImageFolder layout)", path=root)
    raw: list[np.ndarray] = []
    labels: list[int] = []
    sources: list[str] = []
    for ci, cdir in enumerate(classes):
        files = sorted(p for p in cdir.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{cdir}: class folder has no images",
                            hint=f"add images ({', '.join(IMAGE_SUFFIXES)}) or remove the folder", path=cdir)
        for f in files:
            try:
                raw.append(load_image(f))
            except InputError as exc:
                raise DataError(f"{f}: unreadable image ({exc.message})",
                                hint=exc.hint or "delete or replace the file", path=f) from exc
            labels.append(ci)
            sources.append(str(f))
    if channels is None:
        channels = 3 if any(a.ndim == 3 for a in raw) else 1
    if image_size is None:
        sizes = {a.shape[:2] for a in raw}
        if len(sizes) > 1:
            raise DataError(f"{root}: images have {len(sizes)} different sizes", hint="pass --image-size", path=root)
        image_size = (int(raw[0].shape[0]), int(raw[0].shape[1]))
    images = conform_images(raw, image_size, channels)
    return ImageDataset(images, np.asarray(labels, dtype=np.int64), tuple(c.name for c in classes),
                        tuple(sources), str(root))


def load_dataset(source: str | Path, image_size: int | tuple[int, int] | None = None,
                 channels: int | None = None) -> ImageDataset:
    """Load ``"digits"`` or an ImageFolder-layout folder (one sub-folder per class).

    ``image_size`` (int or (H, W)) is the camera resolution every image is resized to;
    ``channels`` 1 or 3 converts folder images (default: 3 if any is colour).  Digits are
    always gray.  Raises :class:`DataError` naming the file or folder at fault.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else (tuple(image_size) if image_size else None)
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise DataError(f"image size {image_size!r} is invalid", hint="use a positive size such as 32")
    if channels not in (None, 1, 3):
        raise DataError(f"channels {channels} is invalid", hint="use 1 or 3")
    if str(source) in BUILTIN_DATASETS:
        return _load_digits(size or (32, 32))  # type: ignore[arg-type]
    return _load_folder(Path(source), size, channels)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- split, hash


def split_labels(labels: np.ndarray, seed: int, val: float = 0.15, test: float = 0.15, *,
                 at_least_one: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, deterministic (train, val, test) indices into ``labels``.

    With ``at_least_one`` every class with 3+ images gets one in val and in test; without it
    small classes go to train (used for the few extra samples of a fine-tune).
    """
    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        n_test, n_val = int(round(n * test)), int(round(n * val))
        if at_least_one:
            n_test, n_val = max(n_test, 1 if test > 0 else 0), max(n_val, 1 if val > 0 else 0)
        else:
            n_test, n_val = int(n * test), int(n * val)
        parts[2].append(idx[:n_test])
        parts[1].append(idx[n_test:n_test + n_val])
        parts[0].append(idx[n_test + n_val:])
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) for p in parts)  # type: ignore[return-value]


def split_dataset(ds: ImageDataset, seed: int, val: float = 0.15, test: float = 0.15) -> Split:
    """Stratified deterministic split; every class needs at least 3 images."""
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise DataError(f"split fractions val={val} test={test} are invalid", hint="use e.g. 0.15 and 0.15")
    counts = np.bincount(ds.labels, minlength=len(ds.class_names))
    for name, n in zip(ds.class_names, counts, strict=True):
        if n < 3:
            where = Path(ds.name) / name if ds.name not in BUILTIN_DATASETS else name
            raise DataError(f"{where}: class {name!r} has {n} image(s), need at least 3 (one each for train, val, test)",
                            hint="add images to that class", path=where)
    tr, va, te = split_labels(ds.labels, seed, val, test)
    return Split(tuple(tr), tuple(va), tuple(te), seed, val, test)


def data_hash(ds: ImageDataset) -> str:
    """sha256 over images, labels and class names: the lineage of a trained model."""
    h = hashlib.sha256()
    h.update(json.dumps({"shape": list(ds.images.shape), "classes": list(ds.class_names)}).encode())
    h.update(np.ascontiguousarray(ds.images).tobytes())
    h.update(np.ascontiguousarray(ds.labels.astype("<i8")).tobytes())
    return h.hexdigest()
