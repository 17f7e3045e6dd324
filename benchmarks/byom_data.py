"""Calibration / evaluation sets for ``edgeloop optimize`` made from the few reference images of
``../shared/models`` by small augmentations (the shared set has one or two images per model).

* ``ppocr``: the PP-OCR text-line orientation classifier (labels ``0`` / ``180``).  Its two
  reference lines -- ``text_cls.jpg`` (upside down: ``180``) and the stored input of
  ``text_cls_v2022.jpg`` (upright: ``0``) -- and their 180-degree rotations (the other class)
  are cropped, rescaled, brightness/contrast-jittered, blurred and noised: each file's label
  is known by construction.
* ``yolox``: ``cats_and_dogs.jpg`` shifted, cropped, rescaled, flipped and jittered (no labels:
  mAP is taken against the FP32 model's own detections).

``python -m benchmarks.byom_data ppocr|yolox OUT [--n N]`` writes ``OUT/calib`` and ``OUT/eval``
(classifiers: one sub-folder per label) as PNG files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

__all__ = ["augment", "ppocr_sets", "yolox_sets", "MODELS_DIR"]

MODELS_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "models"


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))


def augment(img: np.ndarray, rng: np.random.Generator, *, crop: float = 0.06, scale: tuple[float, float] = (0.85, 1.2),
            flip: bool = False) -> np.ndarray:
    """One mild random variant of an RGB uint8 image: crop, rescale, flip, contrast/brightness, blur, noise."""
    h, w = img.shape[:2]
    top, bottom = rng.integers(0, max(1, int(crop * h)) + 1, 2)
    left, right = rng.integers(0, max(1, int(crop * w)) + 1, 2)
    out = img[top:h - bottom or h, left:w - right or w]
    s = rng.uniform(*scale)
    out = _resize(out, max(8, int(out.shape[0] * s)), max(8, int(out.shape[1] * s * rng.uniform(0.9, 1.1))))
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    x = out.astype(np.float32)
    x = (x - 128.0) * rng.uniform(0.75, 1.25) + 128.0 + rng.uniform(-25, 25)
    if rng.random() < 0.5:  # a 3-tap blur along both axes
        x = (np.roll(x, 1, 0) + 2 * x + np.roll(x, -1, 0)) / 4
        x = (np.roll(x, 1, 1) + 2 * x + np.roll(x, -1, 1)) / 4
    x = x + rng.normal(0, rng.uniform(1, 8), x.shape)
    return np.ascontiguousarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def _save(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def ppocr_sets(out: Path, *, n_calib: int = 48, n_eval: int = 200, seed: int = 0,
               models: Path = MODELS_DIR) -> tuple[Path, Path]:
    """``out/calib`` (unlabelled) and ``out/eval/{0,180}`` for the PP-OCR classifier; returns both dirs."""
    from PIL import Image

    d = models / "04_ppocr_textline_cls_onnx"
    upside = np.asarray(Image.open(d / "text_cls.jpg").convert("RGB"))  # upstream: "180"
    upright = np.ascontiguousarray(np.load(d / "ref_input_text_cls_v2022_48x192x3_uint8_bgr.npy")[..., ::-1])  # "0"
    bases = {"180": [upside, upright[::-1, ::-1]], "0": [upright, upside[::-1, ::-1]]}
    rng = np.random.default_rng(seed)
    for i in range(n_calib):
        label = ("0", "180")[i % 2]
        _save(augment(bases[label][(i // 2) % 2], rng), out / "calib" / f"c{i:04d}.png")
    for i in range(n_eval):
        label = ("0", "180")[i % 2]
        _save(augment(bases[label][(i // 2) % 2], rng), out / "eval" / label / f"e{i:04d}.png")
    return out / "calib", out / "eval"


def yolox_sets(out: Path, *, n_calib: int = 24, n_eval: int = 40, seed: int = 0,
               models: Path = MODELS_DIR) -> tuple[Path, Path]:
    """``out/calib`` and ``out/eval`` of augmented ``cats_and_dogs.jpg`` (no labels)."""
    from PIL import Image

    img = np.asarray(Image.open(models / "01_ssd_mobilenet_v1_coco_quant_tflite" / "cats_and_dogs.jpg").convert("RGB"))
    rng = np.random.default_rng(seed)
    for part, n in (("calib", n_calib), ("eval", n_eval)):
        for i in range(n):
            _save(augment(img, rng, crop=0.15, scale=(0.4, 0.7), flip=True), out / part / f"{part[0]}{i:04d}.png")
    return out / "calib", out / "eval"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=("ppocr", "yolox"))
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    calib, ev = (ppocr_sets if args.model == "ppocr" else yolox_sets)(args.out, seed=args.seed)
    print(f"{calib}\n{ev}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
