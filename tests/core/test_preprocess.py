"""core.preprocess: resize against reference implementations, channels, errors, readers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.errors import InputError
from core.manifest import Preprocessing
from core.preprocess import load_image, preprocess, resize

RAW = Preprocessing(size=(8, 8), channels=1, mean=(0.0,), std=(1.0,), scale=1.0)


def _rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _naive_bilinear(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """Loop reference of PIL's BILINEAR: triangle filter at half-pixel centres, widened when shrinking."""
    def axis_weights(n_in: int, n_out: int) -> np.ndarray:
        scale = n_in / n_out
        support = max(scale, 1.0)
        w = np.zeros((n_out, n_in))
        for o in range(n_out):
            centre = (o + 0.5) * scale
            for i in range(n_in):
                w[o, i] = max(0.0, 1.0 - abs(i + 0.5 - centre) / support)
            w[o] /= w[o].sum()
        return w
    return axis_weights(img.shape[0], oh) @ img.astype(np.float64) @ axis_weights(img.shape[1], ow).T


@pytest.mark.parametrize("shape,out", [((8, 8), (32, 32)), ((7, 13), (20, 9)), ((48, 64), (12, 16)), ((5, 5), (5, 9))])
def test_resize_matches_loop_reference(shape: tuple[int, int], out: tuple[int, int]) -> None:
    img = _rng().integers(0, 256, shape).astype(np.float32)
    got = resize(img[None, None], out)[0, 0]
    np.testing.assert_allclose(got, _naive_bilinear(img, *out), atol=1e-3)


def test_resize_matches_torch_and_pil() -> None:
    torch = pytest.importorskip("torch")
    from PIL import Image

    img = _rng().integers(0, 256, (2, 3, 30, 40)).astype(np.float32)
    for size in [(17, 55), (64, 80), (8, 8)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(img), size, mode="bilinear", align_corners=False,
                                              antialias=True).numpy()
        np.testing.assert_allclose(resize(img, size), ref, atol=1e-3)
    # Enlarging: identical to plain half-pixel bilinear (OpenCV INTER_LINEAR).
    ref = torch.nn.functional.interpolate(torch.from_numpy(img), (61, 97), mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(resize(img, (61, 97)), ref, atol=1e-3)
    # PIL rounds to uint8: within one grey level.
    u8 = img[0, 0].astype(np.uint8)
    pil = np.asarray(Image.fromarray(u8).resize((11, 9), Image.BILINEAR), dtype=np.float32)
    assert np.abs(resize(u8[None, None].astype(np.float32), (9, 11))[0, 0] - pil).max() <= 1.0


def test_same_size_is_identity_and_constant_stays_constant() -> None:
    img = _rng().integers(0, 256, (1, 1, 9, 9)).astype(np.float32)
    assert resize(img, (9, 9)) is img
    flat = np.full((1, 1, 13, 7), 77.0, dtype=np.float32)
    np.testing.assert_allclose(resize(flat, (40, 3)), 77.0, atol=1e-4)


def test_rgb_to_gray_uses_luminance_weights() -> None:
    img = np.zeros((4, 4, 3), dtype=np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 100, 200, 50
    out = preprocess(img, Preprocessing(size=(4, 4), channels=1, scale=1.0))
    assert out.shape == (1, 1, 4, 4)
    np.testing.assert_allclose(out, 0.299 * 100 + 0.587 * 200 + 0.114 * 50, rtol=1e-6)


def test_gray_replicated_to_three_channels_and_alpha_dropped() -> None:
    gray = _rng().integers(0, 256, (6, 6), dtype=np.uint8)
    out = preprocess(gray, Preprocessing(size=(6, 6), channels=3, mean=(0, 0, 0), std=(1, 1, 1), scale=1.0))
    assert out.shape == (1, 3, 6, 6)
    for c in range(3):
        np.testing.assert_array_equal(out[0, c], gray.astype(np.float32))
    rgba = np.dstack([np.full((6, 6), v, np.uint8) for v in (10, 20, 30, 255)])
    out = preprocess(rgba, Preprocessing(size=(6, 6), channels=3, mean=(0, 0, 0), std=(1, 1, 1), scale=1.0))
    assert out[0, :, 0, 0].tolist() == [10.0, 20.0, 30.0]


def test_scale_mean_std_layout_and_bgr() -> None:
    img = np.dstack([np.full((2, 2), v, np.uint8) for v in (51, 102, 204)])
    spec = Preprocessing(size=(2, 2), channels=3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.2))
    out = preprocess(img, spec)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0, 0], [(0.2 - 0.1) / 0.5, (0.4 - 0.2) / 0.25, (0.8 - 0.3) / 0.2], rtol=1e-5)
    nhwc = preprocess(img, Preprocessing(size=(2, 2), channels=3, mean=(0, 0, 0), std=(1, 1, 1), layout="NHWC"))
    assert nhwc.shape == (1, 2, 2, 3)
    bgr = preprocess(img, Preprocessing(size=(2, 2), channels=3, mean=(0, 0, 0), std=(1, 1, 1), scale=1.0,
                                        channel_order="BGR"))
    assert bgr[0, :, 0, 0].tolist() == [204.0, 102.0, 51.0]


def test_single_batch_list_and_float_inputs() -> None:
    rng = _rng()
    batch = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    out = preprocess(batch, RAW)
    assert out.shape == (5, 1, 8, 8)
    np.testing.assert_array_equal(preprocess(batch[2], RAW)[0], out[2])
    np.testing.assert_array_equal(preprocess(batch.astype(np.float64), RAW), out)
    mixed = [rng.integers(0, 256, (8, 8), dtype=np.uint8), rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)]
    assert preprocess(mixed, RAW).shape == (2, 1, 8, 8)
    assert preprocess(rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), RAW).shape == (3, 1, 8, 8)


@pytest.mark.parametrize("bad,words", [
    (np.zeros((2, 4, 4, 5), np.uint8), ["(2, 4, 4, 5)", "expected"]),
    (np.zeros((4,), np.uint8), ["(4,)"]),
    (np.zeros((2, 3, 4, 4, 1), np.uint8), ["(2, 3, 4, 4, 1)"]),
    (np.zeros((4, 4), bool), ["bool"]),
    (np.full((4, 4), 300.0), ["300", "[0, 255]"]),
    (np.full((4, 4), -0.5, np.float32), ["-0.5"]),
    (np.full((4, 4), np.nan, np.float32), ["nan"]),
    ([], ["no images"]),
])
def test_invalid_inputs_raise_input_error_naming_the_problem(bad: object, words: list[str]) -> None:
    with pytest.raises(InputError) as exc:
        preprocess(bad, RAW)  # type: ignore[arg-type]
    for w in words:
        assert w in str(exc.value)


def _write_pnm(path: Path, magic: bytes, img: np.ndarray, maxval: int = 255, comment: bool = True) -> None:
    h, w = img.shape[:2]
    header = magic + b"\n" + (b"# made by a test\n" if comment else b"") + f"{w} {h}\n{maxval}\n".encode()
    raster = img.astype(">u2").tobytes() if maxval > 255 else img.astype(np.uint8).tobytes()
    path.write_bytes(header + raster)


def test_load_image_formats(tmp_path: Path) -> None:
    from PIL import Image

    rng = _rng()
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", rgb)
    _write_pnm(tmp_path / "g.pgm", b"P5", gray)
    _write_pnm(tmp_path / "c.ppm", b"P6", rgb, comment=False)
    _write_pnm(tmp_path / "g16.pgm", b"P5", gray.astype(np.uint16) * 257, maxval=65535)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(np.dstack([rgb, np.full((5, 7), 9, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(gray).save(tmp_path / "g.bmp")
    np.testing.assert_array_equal(load_image(tmp_path / "a.npy"), rgb)
    np.testing.assert_array_equal(load_image(tmp_path / "g.pgm"), gray)
    np.testing.assert_array_equal(load_image(tmp_path / "c.ppm"), rgb)
    np.testing.assert_array_equal(load_image(tmp_path / "g16.pgm"), gray)
    np.testing.assert_array_equal(load_image(tmp_path / "c.png"), rgb)
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgb)
    np.testing.assert_array_equal(load_image(tmp_path / "g.bmp"), gray)


def test_load_image_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "short.pgm").write_bytes(b"P5\n4 4\n255\n\x00\x01")
    (tmp_path / "ascii.pgm").write_bytes(b"P2\n1 1\n255\n0\n")
    np.save(tmp_path / "bad.npy", np.zeros((3, 3, 7), np.uint8))
    for name in ("broken.png", "short.pgm", "ascii.pgm", "bad.npy", "missing.png"):
        with pytest.raises(InputError) as exc:
            load_image(tmp_path / name)
        assert name in str(exc.value)


def test_preprocess_does_not_import_torch_or_pillow() -> None:
    code = ("import sys, numpy as np, core.preprocess as p, core.manifest as m;"
            "p.preprocess(np.zeros((9, 9), np.uint8), m.Preprocessing(size=(4, 4)));"
            "assert 'torch' not in sys.modules and 'PIL' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- resize modes vs the libraries they reproduce

def _photo() -> np.ndarray:
    """A real photo when the shared models are present (smooth areas and edges), else noise."""
    p = Path(__file__).resolve().parents[2] / ".." / "shared" / "models" / "03_mobilenet_v1_0.25_224_float_tflite"
    if (p / "burger.jpg").is_file():
        from PIL import Image

        return np.asarray(Image.open(p / "burger.jpg").convert("RGB"))
    return _rng().integers(0, 256, (120, 160, 3), dtype=np.uint8)


def _ours(img: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    spec = Preprocessing(size=size, channels=3, mean=(0.0,) * 3, std=(1.0,) * 3, scale=1.0, resize=mode, layout="NHWC")
    return preprocess([img], spec)[0]


@pytest.mark.parametrize("size", [(224, 224), (61, 97), (400, 300)])
def test_bilinear_and_area_match_pillow_within_one_level(size: tuple[int, int]) -> None:
    from PIL import Image

    img = _photo()
    ref = np.asarray(Image.fromarray(img).resize(size[::-1], Image.BILINEAR), np.float32)
    assert np.abs(_ours(img, size, "bilinear") - ref).max() <= 1.0 + 1e-4  # PIL rounds to integers; ours is float32
    # NEAREST: PIL computes sample positions in fixed point, so some samples take the neighbouring pixel
    ref = np.asarray(Image.fromarray(img).resize(size[::-1], Image.NEAREST), np.float32)
    assert np.mean(np.abs(_ours(img, size, "nearest") - ref) > 0) < 0.12
    # PIL BOX is the area average for integer factors (fractional factors: PIL samples at pixel centres)
    h, w = img.shape[:2]
    small = (h // 4, w // 5)
    crop = img[:small[0] * 4, :small[1] * 5]
    ref = np.asarray(Image.fromarray(crop).resize(small[::-1], Image.BOX), np.float32)
    assert np.abs(_ours(crop, small, "area") - ref).max() <= 1.0


@pytest.mark.parametrize("size", [(224, 224), (61, 97), (48, 192), (500, 700)])
def test_bilinear_cv_and_area_match_opencv_within_one_level(size: tuple[int, int]) -> None:
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is a test dependency ([dev])")
    img = _photo()
    ref = cv2.resize(img, size[::-1], interpolation=cv2.INTER_LINEAR).astype(np.float32)
    assert np.abs(_ours(img, size, "bilinear-cv") - ref).max() <= 1.0
    if size[0] < img.shape[0] and size[1] < img.shape[1]:
        ref = cv2.resize(img, size[::-1], interpolation=cv2.INTER_AREA).astype(np.float32)
        assert np.abs(_ours(img, size, "area") - ref).max() <= 1.0


def test_fit_modes_and_geometry() -> None:
    from core.preprocess import prepare_images

    img = np.full((100, 200, 3), 200, np.uint8)
    base = dict(channels=3, mean=(0.0,) * 3, std=(1.0,) * 3, scale=1.0, layout="NHWC", resize="bilinear-cv")
    x, (geo,) = prepare_images([img], Preprocessing(size=(64, 64), fit="letterbox", anchor="top-left", pad_value=114,
                                                    **base))
    assert x.shape == (1, 64, 64, 3) and geo.scale == (0.32, 0.32) and geo.offset == (0.0, 0.0)
    assert (x[0, :32] == 200).all() and (x[0, 32:] == 114).all()  # YOLOX: image top-left, 114 below
    np.testing.assert_allclose(geo.to_image(np.array([0, 0, 64, 32])), [0, 0, 200, 100])
    x, (geo,) = prepare_images([img], Preprocessing(size=(64, 64), fit="letterbox", **base))
    assert geo.offset == (16.0, 0.0) and (x[0, :16] == 0).all() and (x[0, 16:48] == 200).all()
    x, (geo,) = prepare_images([img], Preprocessing(size=(32, 32), fit="center-crop", crop_fraction=0.5, **base))
    assert x.shape == (1, 32, 32, 3) and geo.scale == (0.64, 0.64) and geo.offset == (-16.0, -48.0)
    x, (geo,) = prepare_images([img[:, :120]], Preprocessing(size=(48, 192), fit="height", pad_value=127.5, **base))
    assert np.allclose(x[0, :, :58], 200, atol=1e-3) and (x[0, :, 58:] == 127.5).all()  # ceil(48 * 120 / 100) = 58, pad right


def test_model_dtypes_from_the_float_batch() -> None:
    from core.manifest import TensorSpec
    from core.preprocess import to_model_dtype

    x = np.array([[0.0, 127.4, 127.6, 255.0]], np.float32)
    raw = Preprocessing(size=(1, 4), scale=1.0)
    assert to_model_dtype(x, TensorSpec("x", (1, 4), "uint8", 0.0078125, 128), raw).tolist() == [[0, 127, 128, 255]]
    q = to_model_dtype(np.array([[-1.0, 0.25, 2.0]], np.float32), TensorSpec("x", (1, 3), "int8", 0.5, -10))
    assert q.tolist() == [[-12, -9, -6]] and q.dtype == np.int8  # round half away from zero: 0.5 -> 1
    assert to_model_dtype(x, TensorSpec("x", (1, 4), "float16")).dtype == np.float16


def test_pixel_budget_refuses_before_decoding(tmp_path: Path) -> None:
    from PIL import Image

    from core.errors import ImageTooLargeError
    from core.imageio import decode_image_bytes, load_image

    Image.new("L", (3000, 3000)).save(tmp_path / "big.png")
    data = (tmp_path / "big.png").read_bytes()
    with pytest.raises(ImageTooLargeError, match="9,000,000 pixels"):
        decode_image_bytes(data, max_pixels=1_000_000)
    with pytest.raises(ImageTooLargeError):
        load_image(tmp_path / "big.png", max_pixels=1_000_000)
    with pytest.raises(ImageTooLargeError):
        decode_image_bytes(b"P5\n5000 5000\n255\n", max_pixels=1_000_000)
    assert decode_image_bytes(data).shape == (3000, 3000)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NHW"])
@pytest.mark.parametrize("fit", ["stretch", "center-crop", "letterbox"])
def test_preprocessor_is_prepare_images_bit_for_bit(layout: str, fit: str) -> None:
    """The agent's one-pass path (model-size uint8 images) and its fallback give prepare_images' exact values."""
    from core.preprocess import Preprocessor, prepare_images

    rng = _rng()
    for channels in ((1,) if layout == "NHW" else (1, 3)):
        for order in ("RGB", "BGR"):
            for mean, std, scale in (((0.5,), (0.5,), 1 / 255), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255),
                                     ((0.0,), (1.0,), 1.0), ((127.5,), (127.5,), 1.0)):
                spec = Preprocessing(size=(8, 6), channels=channels, mean=(mean * 3)[:channels],
                                     std=(std * 3)[:channels], scale=scale, layout=layout, channel_order=order, fit=fit)
                pre = Preprocessor(spec)
                for shape in ((8, 6), (8, 6, 1), (8, 6, 3), (8, 6, 4), (10, 7, 3)):
                    for dtype in (np.uint8, np.float32):
                        img = rng.integers(0, 256, shape).astype(dtype)
                        want, geos = prepare_images([img], spec)
                        got, geo = pre(img)
                        assert got.dtype == want.dtype and np.array_equal(got, want), (spec, shape, dtype)
                        assert geo == geos[0]


def test_preprocessor_reuses_its_buffer() -> None:
    from core.preprocess import Preprocessor

    spec = Preprocessing(size=(4, 4), channels=1)
    pre = Preprocessor(spec)
    a, _ = pre(np.zeros((4, 4), np.uint8))
    b, _ = pre(np.full((4, 4), 255, np.uint8))
    assert a is b and float(a.max()) == 1.0  # the same buffer: callers use it before the next call
    c, _ = pre(np.zeros((8, 8), np.uint8))  # a resize: a fresh array, the buffer untouched
    assert c is not a and float(a.max()) == 1.0


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_preprocessor_plane_by_plane_is_prepare_images_bit_for_bit(order: str) -> None:
    from core.preprocess import Preprocessor, prepare_images

    spec = Preprocessing(size=(80, 64), channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                         channel_order=order)
    pre = Preprocessor(spec)
    for shape in ((80, 64), (80, 64, 3), (80, 64, 4)):
        img = _rng().integers(0, 256, shape).astype(np.uint8)
        assert np.array_equal(pre(img)[0], prepare_images([img], spec)[0])


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NHW"])
def test_preprocessor_feed_is_to_model_dtype_bit_for_bit(layout: str) -> None:
    """An integer model's feed from the preprocessor's table is to_model_dtype of its float values exactly;
    None where the table does not apply (a resize, float pixels, a float model)."""
    from core.manifest import TensorSpec
    from core.preprocess import Preprocessor, to_model_dtype

    rng = _rng()
    inputs = (TensorSpec("x", (1, 1), "int8", 0.0078125, -1), TensorSpec("x", (1, 1), "uint8", 0.0123, 7),
              TensorSpec("x", (1, 1), "uint8"), TensorSpec("x", (1, 1), "int16", 0.001, 0))
    for channels in ((1,) if layout == "NHW" else (1, 3)):
        for order in ("RGB", "BGR"):
            for mean, std, scale in (((0.5,), (0.5,), 1 / 255), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255),
                                     ((0.0,), (1.0,), 1.0), ((127.5,), (127.5,), 1.0)):
                spec = Preprocessing(size=(8, 6), channels=channels, mean=(mean * 3)[:channels],
                                     std=(std * 3)[:channels], scale=scale, layout=layout, channel_order=order)
                for model_input in inputs:
                    pre = Preprocessor(spec, model_input=model_input)
                    for shape in ((8, 6), (8, 6, 1), (8, 6, 3), (8, 6, 4)):
                        img = rng.integers(0, 256, shape).astype(np.uint8)
                        want = to_model_dtype(pre(img)[0], model_input, spec)
                        got = pre.feed(img)
                        if channels == 1 and len(shape) == 3 and shape[2] > 1:
                            assert got is None  # luminance: not the one-pass path
                            continue
                        assert got is not None and got.dtype == want.dtype and np.array_equal(got, want), \
                            (spec, model_input, shape)
                    assert pre.feed(rng.integers(0, 256, (10, 7, channels)).astype(np.uint8)) is None  # a resize
                    assert pre.feed(rng.integers(0, 256, (8, 6)).astype(np.float32)) is None
    assert Preprocessor(Preprocessing(size=(8, 6), channels=1)).feed(np.zeros((8, 6), np.uint8)) is None
