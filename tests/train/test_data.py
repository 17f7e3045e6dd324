"""train.data: digits, image folders, errors naming the file/folder, stratified split, hash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.errors import DataError
from train.data import data_hash, load_dataset, split_dataset


def _folder(root: Path, classes: dict[str, int], *, color: bool = False) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for ci, (name, n) in enumerate(classes.items()):
        d = root / name
        d.mkdir(parents=True)
        for i in range(n):
            h, w = 10 + i % 3, 12 + ci  # sizes differ: the loader must resize
            arr = rng.integers(0, 256, (h, w, 3) if color and i % 2 else (h, w), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"img{i}.png")
    return root


def test_digits_are_upsampled_uint8_camera_images() -> None:
    ds = load_dataset("digits", 16)
    assert ds.images.shape == (1797, 16, 16) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and ds.class_names == tuple("0123456789")
    assert ds.images.max() == 255 and ds.images.min() == 0
    assert ds.sources[5] == "digits:5" and ds.channels == 1 and ds.image_size == (16, 16)


def test_image_folder_mixed_sizes_and_modes(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", {"cat": 4, "dog": 5}, color=True)
    (root / "cat" / "notes.txt").write_text("ignored: not an image")
    ds = load_dataset(root, 8)
    assert ds.images.shape == (9, 8, 8, 3) and ds.class_names == ("cat", "dog")
    assert list(ds.labels) == [0] * 4 + [1] * 5
    assert ds.sources[0].endswith("img0.png")
    gray = load_dataset(root, (8, 6), channels=1)
    assert gray.images.shape == (9, 8, 6)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere: no such folder"):
        load_dataset(tmp_path / "nowhere", 8)


def test_single_class_names_the_folder(tmp_path: Path) -> None:
    root = _folder(tmp_path / "one", {"only": 3})
    with pytest.raises(DataError) as exc:
        load_dataset(root, 8)
    assert str(root) in str(exc.value) and "at least 2" in str(exc.value)


def test_empty_class_folder_names_it(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", {"a": 3, "b": 3})
    (root / "c").mkdir()
    with pytest.raises(DataError) as exc:
        load_dataset(root, 8)
    assert str(root / "c") in str(exc.value) and "no images" in str(exc.value)


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", {"a": 3, "b": 3})
    bad = root / "b" / "zz-broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    with pytest.raises(DataError) as exc:
        load_dataset(root, 8)
    assert str(bad) in str(exc.value)
    assert exc.value.path == bad


def test_mixed_sizes_without_image_size(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", {"a": 3, "b": 3})
    with pytest.raises(DataError, match="image-size"):
        load_dataset(root)


def test_class_too_small_to_split_names_it(tmp_path: Path) -> None:
    ds = load_dataset(_folder(tmp_path / "imgs", {"a": 5, "tiny": 2}), 8)
    with pytest.raises(DataError) as exc:
        split_dataset(ds, seed=0)
    assert "tiny" in str(exc.value) and "at least 3" in str(exc.value)


def test_split_is_stratified_deterministic_and_disjoint() -> None:
    ds = load_dataset("digits", 8)
    a, b, c = split_dataset(ds, 0), split_dataset(ds, 0), split_dataset(ds, 1)
    assert a == b and a.test != c.test
    tr, va, te = a.indices("train"), a.indices("val"), a.indices("test")
    assert len(set(tr) | set(va) | set(te)) == len(ds) == len(tr) + len(va) + len(te)
    for part, frac in ((te, 0.15), (va, 0.15)):
        counts = np.bincount(ds.labels[part], minlength=10)
        expected = np.bincount(ds.labels, minlength=10) * frac
        assert np.all(np.abs(counts - expected) <= 1)
    assert type(a).from_dict(a.to_dict()) == a


def test_data_hash_tracks_pixels_and_labels() -> None:
    ds = load_dataset("digits", 8)
    h = data_hash(ds)
    assert h == data_hash(load_dataset("digits", 8)) and len(h) == 64
    images = ds.images.copy()
    images[0, 0, 0] ^= 1
    changed = type(ds)(images, ds.labels, ds.class_names, ds.sources, ds.name)
    assert data_hash(changed) != h
    assert data_hash(load_dataset("digits", 9)) != h
