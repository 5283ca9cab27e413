"""Tests for onnxaom.data: loaders on small real files, preprocessing, batching, bad input."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import os
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxaom.data import (
    FASHION_MNIST_CLASSES,
    SPEC_FORMS,
    Dataset,
    Preprocessing,
    from_arrays,
    iter_batches,
    load_digits,
    load_fashion_mnist,
    load_idx,
    load_image_folder,
    load_npz,
    load_spec,
    read_idx,
)
from onnxaom.errors import DataError, ModelFileNotFoundError

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
IDX_CODES = {"uint8": 0x08, "int8": 0x09, "int16": 0x0B, "int32": 0x0C, "float32": 0x0D,
             "float64": 0x0E}


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> Path:
    """Write ``array`` as IDX: 0, 0, type code, ndim, big-endian dims, big-endian data."""
    header = bytes([0, 0, IDX_CODES[array.dtype.name], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def small_arrays(n: int = 12, c: int = 1, h: int = 5, w: int = 4, classes: int = 3, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)
    labels = np.arange(n) % classes
    return images, labels


def gather(batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    pairs = list(batches)
    for x, y in pairs:
        assert x.dtype == np.float32 and x.flags.c_contiguous and x.ndim == 4
        assert y.dtype == np.int64 and y.shape == (x.shape[0],)
    return np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs])


# --------------------------------------------------------------------------- Preprocessing


def test_preprocessing_round_trips_through_json() -> None:
    pre = Preprocessing(scale=1 / 255, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.25), layout="NHWC",
                        resize=(32, 30))
    data = json.loads(json.dumps(pre.to_dict()))
    assert data == {"scale": 1 / 255, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25],
                    "layout": "NHWC", "resize": [32, 30]}
    assert Preprocessing.from_dict(data) == pre
    assert Preprocessing.from_dict(Preprocessing().to_dict()) == Preprocessing()
    assert Preprocessing.from_dict({}) == Preprocessing()


def test_preprocessing_normalises_its_fields() -> None:
    pre = Preprocessing(scale=2, mean=[1], std=3, layout="nhw", resize=7)  # type: ignore[arg-type]
    assert pre == Preprocessing(scale=2.0, mean=(1.0,), std=(3.0,), layout="NHW", resize=(7, 7))
    assert hash(pre) == hash(Preprocessing(scale=2.0, mean=(1.0,), std=(3.0,), layout="NHW",
                                           resize=(7, 7)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": 0}, "scale must not be 0"),
        ({"scale": float("nan")}, "scale must be finite"),
        ({"scale": "big"}, "scale must be a number"),
        ({"std": (1.0, 0.0)}, "std must be positive"),
        ({"mean": (1.0, 2.0), "std": (1.0, 2.0, 3.0)}, "mean has 2 values but std has 3"),
        ({"mean": ()}, "mean is empty"),
        ({"mean": "abc"}, "mean must be a sequence"),
        ({"layout": "CHW"}, "layout must be one of NCHW, NHWC, NHW"),
        ({"resize": (0, 4)}, "resize must be two positive integers"),
        ({"resize": (1, 2, 3)}, r"resize must be \(H, W\)"),
    ],
)
def test_preprocessing_rejects_bad_fields(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(DataError, match=message):
        Preprocessing(**kwargs)  # type: ignore[arg-type]


def test_preprocessing_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(DataError, match=r"unknown preprocessing keys \['scaling'\]"):
        Preprocessing.from_dict({"scaling": 2})
    with pytest.raises(DataError, match="must be a mapping"):
        Preprocessing.from_dict([("scale", 2)])  # type: ignore[arg-type]


def test_preprocessing_applies_layout_scale_mean_std_in_order() -> None:
    rng = np.random.default_rng(1)
    nhwc = rng.integers(0, 256, size=(4, 5, 6, 3), dtype=np.uint8)
    before = nhwc.copy()
    pre = Preprocessing(scale=1 / 255, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0), layout="NHWC")
    out = pre.apply(nhwc)
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == (4, 3, 5, 6)
    expected = (nhwc.transpose(0, 3, 1, 2) / 255 - np.array([0.1, 0.2, 0.3])[:, None, None]) \
        / np.array([0.5, 0.25, 2.0])[:, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(nhwc, before)  # input untouched
    nchw = Preprocessing(scale=1 / 255, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0)).apply(
        nhwc.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(out, nchw)


def test_preprocessing_nhw_adds_a_channel_and_copies_float32() -> None:
    images = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    out = Preprocessing(layout="NHW").apply(images)
    assert out.shape == (2, 1, 3, 4)
    out[0, 0, 0, 0] = 99.0
    assert images[0, 0, 0] == 0.0  # a copy even when no conversion is needed


def test_preprocessing_single_mean_value_broadcasts_to_all_channels() -> None:
    images = np.ones((1, 3, 2, 2))
    out = Preprocessing(mean=(1.0,), std=(2.0,)).apply(images)
    np.testing.assert_array_equal(out, np.zeros((1, 3, 2, 2), np.float32))


def test_preprocessing_apply_rejects_mismatched_shapes() -> None:
    with pytest.raises(DataError,
                       match=r"images: shape \(2, 3, 4\) does not match .*'NCHW'.*'NHW'"):
        Preprocessing().apply(np.zeros((2, 3, 4)))
    with pytest.raises(DataError, match="mean has 2 values but the images have 3 channel"):
        Preprocessing(mean=(0.0, 0.0)).apply(np.zeros((1, 3, 2, 2)))
    with pytest.raises(DataError, match="images: expected numbers, got dtype <U1"):
        Preprocessing(layout="NHW").apply(np.array([[["a"]]]))


def test_resize_same_size_is_identity_and_constant_stays_constant() -> None:
    images = np.random.default_rng(2).random((3, 2, 7, 5)).astype(np.float32)
    np.testing.assert_array_equal(Preprocessing(resize=(7, 5)).apply(images), images)
    up = Preprocessing(resize=(19, 3)).apply(np.full((1, 1, 4, 6), 0.25))
    assert up.shape == (1, 1, 19, 3)
    np.testing.assert_allclose(up, 0.25, rtol=1e-6)


def test_resize_matches_torch_bilinear() -> None:
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(3).random((2, 3, 8, 6)).astype(np.float32)
    for size in [(28, 28), (5, 9), (8, 6), (3, 2)]:
        ours = Preprocessing(resize=size).apply(images)
        theirs = torch.nn.functional.interpolate(
            torch.from_numpy(images), size=size, mode="bilinear", align_corners=False,
            antialias=False,
        ).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- Dataset


def test_from_arrays_makes_an_immutable_dataset() -> None:
    images, labels = small_arrays()
    ds = from_arrays(images, labels, preprocessing=Preprocessing(scale=1 / 255))
    assert len(ds) == 12 and ds.num_classes == 3 and ds.image_shape == (1, 5, 4)
    assert ds.class_names == ("0", "1", "2") and ds.source == "arrays"
    assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int64
    np.testing.assert_allclose(ds.images, images / 255, rtol=1e-6)
    for array in (ds.images, ds.labels):
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 0
    with pytest.raises(AttributeError):
        ds.source = "other"  # type: ignore[misc]
    assert "n=12" in repr(ds) and "(1, 5, 4)" in repr(ds)


def test_dataset_metadata_is_json() -> None:
    images, labels = small_arrays()
    ds = from_arrays(images, labels, class_names=["a", "b", "c"], source="tiny")
    meta = json.loads(json.dumps(ds.metadata()))
    # uint8 pixels: scaled by 1/255 by default
    assert meta == {"source": "tiny", "preprocessing": Preprocessing(scale=1 / 255).to_dict(),
                    "n": 12,
                    "class_names": ["a", "b", "c"], "image_shape": [1, 5, 4]}


def test_dataset_validates_direct_construction() -> None:
    images = np.zeros((2, 1, 3, 3), np.float32)
    ok = Dataset(images.astype(np.float64), np.array([0, 1]), ["x", "y"], "direct")  # type: ignore[arg-type]
    assert ok.images.dtype == np.float32 and ok.class_names == ("x", "y")
    with pytest.raises(DataError, match=r"label 2 needs at least 3 classes"):
        Dataset(images, np.array([0, 2]), ("x", "y"), "direct")
    with pytest.raises(DataError, match="duplicates"):
        Dataset(images, np.array([0, 1]), ("x", "x"), "direct")
    with pytest.raises(DataError, match="class_names must be a sequence"):
        Dataset(images, np.array([0, 1]), "xy", "direct")  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"images: expected a 4-D array .* got shape \(2, 3, 3\)"):
        Dataset(images[:, 0], np.array([0, 1]), ("x", "y"), "direct")
    with pytest.raises(DataError, match="empty"):
        Dataset(images[:0], np.array([], np.int64), ("x", "y"), "direct")
    with pytest.raises(DataError, match="preprocessing must be a Preprocessing"):
        Dataset(images, np.array([0, 1]), ("x", "y"), "direct", {})  # type: ignore[arg-type]


def test_split_is_stratified_disjoint_and_reproducible() -> None:
    images = np.arange(100, dtype=np.float32).reshape(100, 1, 1, 1)
    labels = np.repeat([0, 1, 2, 3], [10, 20, 30, 40])
    ds = from_arrays(images, labels)
    first, rest = ds.split(0.75, seed=4)
    assert (len(first), len(rest)) == (75, 25)
    np.testing.assert_array_equal(np.bincount(first.labels), [8, 15, 22, 30])  # 7.5->8, 22.5->22
    ids = np.concatenate([first.images.ravel(), rest.images.ravel()])
    np.testing.assert_array_equal(np.sort(ids), np.arange(100))
    assert np.all(np.diff(first.images.ravel()) > 0)  # original order kept
    again, _ = ds.split(0.75, seed=4)
    np.testing.assert_array_equal(again.images, first.images)
    other, _ = ds.split(0.75, seed=5)
    assert not np.array_equal(other.images, first.images)
    assert first.class_names == ds.class_names and first.preprocessing == ds.preprocessing
    assert "split 0.75 seed 4: first" in first.source


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, float("nan"), 0.01])
def test_split_rejects_fractions_that_leave_a_part_empty(fraction: float) -> None:
    ds = from_arrays(*small_arrays())
    with pytest.raises(DataError, match="fraction"):
        ds.split(fraction)


def test_from_arrays_accepts_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    images = torch.rand(6, 2, 3, 3, requires_grad=True)
    ds = from_arrays(images, torch.tensor([0, 1, 0, 1, 0, 1]))
    np.testing.assert_array_equal(ds.images, images.detach().numpy())


def test_from_arrays_rejects_empty_data() -> None:
    with pytest.raises(DataError, match="empty"):
        from_arrays(np.zeros((0, 1, 2, 2)), np.zeros(0, np.int64))


# --------------------------------------------------------------------------- npz


@pytest.mark.parametrize(("image_key", "label_key"),
                         [("x", "y"), ("images", "labels"), ("x_train", "y_train"), ("X", "Y")])
def test_load_npz_detects_keys(tmp_path: Path, image_key: str, label_key: str) -> None:
    images, labels = small_arrays()
    path = tmp_path / "data.npz"
    arrays: dict[str, Any] = {image_key: images, label_key: labels, "other": np.zeros(3)}
    np.savez(path, **arrays)
    ds = load_npz(path, preprocessing=Preprocessing(scale=0.5))
    np.testing.assert_allclose(ds.images, images * 0.5)
    np.testing.assert_array_equal(ds.labels, labels)
    assert f"[{image_key}, {label_key}]" in ds.source


def test_load_npz_explicit_keys_layout_and_class_names(tmp_path: Path) -> None:
    images, labels = small_arrays(c=3)
    path = tmp_path / "data.npz"
    np.savez_compressed(path, pixels=images.transpose(0, 2, 3, 1), target=labels,
                        class_names=np.array(["cat", "dog", "emu"]))
    ds = load_npz(path, images_key="pixels", labels_key="target",
                  preprocessing=Preprocessing(layout="NHWC"))
    np.testing.assert_array_equal(ds.images, images)
    assert ds.class_names == ("cat", "dog", "emu")


def test_load_npz_errors_list_the_keys_present(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, pixels=np.zeros((2, 1, 2, 2)), target=np.array([0, 1]))
    with pytest.raises(DataError, match=r"no images array found .* keys present: "
                                        r"\['pixels', 'target'\]; rename it to one of those, "
                                        r"or pass images_key="):
        load_npz(path)
    with pytest.raises(DataError, match=r"labels_key='y' is not in the archive; keys present"):
        load_npz(path, images_key="pixels", labels_key="y")
    with pytest.raises(DataError, match=r"data\.npz: images: shape \(2, 1, 2, 2\) does not match"):
        load_npz(path, images_key="pixels", labels_key="target",
                 preprocessing=Preprocessing(layout="NHW"))


def test_load_npz_bad_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.npz"
    with pytest.raises(ModelFileNotFoundError, match=r"npz file not found: .*missing\.npz"):
        load_npz(missing)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(DataError, match=r"garbage\.npz: not an \.npz archive .*starts with "
                       r"b'this i'"):
        load_npz(garbage)
    single = tmp_path / "single.npz"
    with single.open("wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(DataError, match=r"single\.npz: a single \.npy array"):
        load_npz(single)
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (1125899906842624,), }"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"  # 1 PiB declared, 100 bytes stored
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(100)
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.writestr("x.npy", npy)
        archive.writestr("y.npy", npy)
    with pytest.raises(DataError, match=r"huge\.npz: "):  # numpy's MemoryError escaped
        load_npz(tmp_path / "huge.npz")


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("dtype", list(IDX_CODES))
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trips_every_type(tmp_path: Path, dtype: str, compress: bool) -> None:
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    if dtype == "uint8":
        array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    out = read_idx(write_idx(tmp_path / "a.idx", array, compress=compress))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative and out.flags.writeable
    np.testing.assert_array_equal(out, array)


def test_load_idx_raw_and_gz(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(9, 6, 7), dtype=np.uint8)
    labels = (np.arange(9) % 4).astype(np.uint8)
    raw = load_idx(write_idx(tmp_path / "img-idx3-ubyte", images),
                   write_idx(tmp_path / "lab-idx1-ubyte", labels),
                   class_names=["a", "b", "c", "d"])
    gz = load_idx(write_idx(tmp_path / "img.gz", images, compress=True),
                  write_idx(tmp_path / "lab.gz", labels, compress=True),
                  preprocessing=Preprocessing(scale=1 / 255, layout="NHW"))
    assert raw.images.shape == (9, 1, 6, 7) and raw.preprocessing.layout == "NHW"
    # uint8 IDX images are scaled to [0, 1] by default, as load_fashion_mnist does
    assert raw.preprocessing == Preprocessing(scale=1 / 255, layout="NHW")
    np.testing.assert_allclose(raw.images[:, 0], images / 255, rtol=1e-6)
    np.testing.assert_array_equal(gz.images, raw.images)
    unscaled = load_idx(write_idx(tmp_path / "img2", images), write_idx(tmp_path / "lab2", labels),
                        preprocessing=Preprocessing(layout="NHW"))
    np.testing.assert_array_equal(unscaled.images[:, 0], images)
    np.testing.assert_array_equal(gz.labels, labels)
    assert raw.class_names == ("a", "b", "c", "d") and gz.class_names == ("0", "1", "2", "3")
    assert "(9 images)" in raw.source


def test_read_idx_truncated_names_file_and_sizes(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "images-idx3-ubyte", np.zeros((4, 3, 3), np.uint8))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"images-idx3-ubyte: truncated IDX file: .*\(4, 3, 3\) of "
                                        r"uint8, 52 bytes in all, but the data has 47 bytes"):
        read_idx(path)
    longer = write_idx(tmp_path / "long.idx", np.zeros(3, np.int32))
    longer.write_bytes(longer.read_bytes() + b"\0")
    with pytest.raises(DataError, match=r"long\.idx: corrupt \(trailing bytes\) IDX file"):
        read_idx(longer)


def test_read_idx_rejects_corrupt_headers_and_gzip(tmp_path: Path) -> None:
    cases = {
        "magic": (b"\x01\x02\x08\x01\0\0\0\x01\x05", "not an IDX file"),
        "empty": (b"", "not an IDX file .*starts with nothing"),
        "type": (b"\0\0\x07\x01\0\0\0\x01\x05", "unknown IDX type code 0x07"),
        "nodims": (b"\0\0\x08\0", "IDX header declares 0 dimensions"),
        "header": (b"\0\0\x08\x03\0\0\0\x02", "truncated IDX header: expected 16 bytes"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match=f"{name}: {message}"):
            read_idx(path)
    gz = write_idx(tmp_path / "cut.gz", np.zeros((50, 10), np.uint8), compress=True)
    gz.write_bytes(gz.read_bytes()[:20])
    with pytest.raises(DataError, match=r"cut\.gz: cannot read"):
        read_idx(gz)


def test_load_idx_rejects_missing_and_mismatched_files(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "img", np.zeros((3, 2, 2), np.uint8))
    with pytest.raises(ModelFileNotFoundError, match=r"IDX file not found: .*nolabels"):
        load_idx(images, tmp_path / "nolabels")
    with pytest.raises(DataError, match=r"is a folder"):
        read_idx(tmp_path)
    two = write_idx(tmp_path / "two", np.array([0, 1], np.uint8))
    with pytest.raises(DataError, match=r"two has 2 labels but .*img has 3 images"):
        load_idx(images, two)
    flat = write_idx(tmp_path / "flat", np.zeros((3, 1), np.uint8))
    with pytest.raises(DataError, match=r"flat: labels must be a 1-D IDX array"):
        load_idx(images, flat)
    floats = write_idx(tmp_path / "floats", np.zeros(3, np.float32))
    # the labels file is named, not the images file
    with pytest.raises(DataError, match=r"floats: labels: class indices must be integers"):
        load_idx(images, floats)


# --------------------------------------------------------------------------- image folder


def make_folder(root: Path, spec: dict[str, list[tuple[str, tuple[int, int]]]]) -> Path:
    """One subfolder per class with PNGs of the given mode and (W, H) size."""
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(6)
    for cls, items in spec.items():
        (root / cls).mkdir(parents=True)
        for i, (mode, (w, h)) in enumerate(items):
            shape = (h, w) if mode == "L" else (h, w, 3)
            pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
            image_module.fromarray(pixels, mode=mode).save(root / cls / f"{i:03d}.png")
    return root


def test_load_image_folder_grayscale(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "set", {"zebra": [("L", (5, 4))] * 2, "ant": [("L", (5, 4))] * 3})
    (root / "zebra" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    ds = load_image_folder(root)
    assert ds.class_names == ("ant", "zebra")
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1])
    assert ds.images.shape == (5, 1, 4, 5)
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0
    image_module = pytest.importorskip("PIL.Image")
    first = np.asarray(image_module.open(root / "ant" / "000.png"))
    np.testing.assert_allclose(ds.images[0, 0], first / 255, rtol=1e-6)
    assert ds.preprocessing == Preprocessing(scale=1 / 255)


def test_load_image_folder_rgb_mixed_sizes_and_resize(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "set", {"a": [("RGB", (6, 4)), ("L", (3, 3))],
                                          "b": [("RGB", (8, 8))]})
    with pytest.raises(DataError, match=r"images differ in size: .*with size=\(H, W\) \(on the "
                       r"command line: --resize H,W\)"):
        load_image_folder(root)
    ds = load_image_folder(root, size=(5, 7))
    assert ds.images.shape == (3, 3, 5, 7)
    assert ds.preprocessing.resize == (5, 7)
    assert json.loads(json.dumps(ds.metadata()))["preprocessing"]["resize"] == [5, 7]
    gray = load_image_folder(root, size=4, grayscale=True)
    assert gray.images.shape == (3, 1, 4, 4)
    same = load_image_folder(root, preprocessing=Preprocessing(scale=1 / 255, resize=(5, 7)))
    np.testing.assert_array_equal(same.images, ds.images)


def test_load_image_folder_errors(tmp_path: Path) -> None:
    pytest.importorskip("PIL.Image")
    with pytest.raises(ModelFileNotFoundError, match=r"image folder not found: .*nowhere"):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file"):
        load_image_folder(tmp_path / "file.png")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_image_folder(tmp_path / "flat")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match=r"cls: class folder with no images"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "broken" / "cls").mkdir(parents=True)
    (tmp_path / "broken" / "cls" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"bad\.png: cannot read image"):
        load_image_folder(tmp_path / "broken")
    good = make_folder(tmp_path / "good", {"a": [("L", (2, 2))]})
    with pytest.raises(DataError, match=r"leave preprocessing\.layout at 'NCHW'"):
        load_image_folder(good, preprocessing=Preprocessing(layout="NHWC"))
    with pytest.raises(DataError, match=r"size=\(3, 3\) conflicts with preprocessing.resize"):
        load_image_folder(good, size=3, preprocessing=Preprocessing(resize=(2, 2)))


# --------------------------------------------------------------------------- sklearn digits


def test_load_digits() -> None:
    pytest.importorskip("sklearn")
    ds = load_digits()
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == np.float32
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    assert ds.labels.dtype == np.int64 and set(ds.labels.tolist()) == set(range(10))
    assert ds.class_names == tuple("0123456789")
    assert ds.preprocessing == Preprocessing(scale=1 / 16, layout="NHW")
    assert ds.source == "sklearn digits (1797 images, 8x8)"
    big = load_digits(size=28)
    assert big.images.shape == (1797, 1, 28, 28) and big.preprocessing.resize == (28, 28)
    assert big.images.min() >= 0.0 and big.images.max() <= 1.0
    custom = load_digits(size=16, preprocessing=Preprocessing(scale=1.0, layout="NHW"))
    assert custom.preprocessing.resize == (16, 16) and custom.images.max() == pytest.approx(16.0)


def test_load_digits_rejects_bad_sizes() -> None:
    for size in (0, -3, 2.5, True):
        with pytest.raises(DataError, match="size must be a positive integer"):
            load_digits(size=size)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"conflicts with preprocessing\.resize"):
        load_digits(size=28, preprocessing=Preprocessing(layout="NHW", resize=(16, 16)))


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fashion() -> dict[str, Dataset]:
    if not (FASHION_ROOT / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
    return {split: load_fashion_mnist(split) for split in ("train", "test")}


@pytest.mark.parametrize(("split", "n"), [("train", 60000), ("test", 10000)])
def test_fashion_mnist_from_debian_files(fashion: dict[str, Dataset], split: str, n: int) -> None:
    ds = fashion[split]
    assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == np.float32
    assert ds.class_names == FASHION_MNIST_CLASSES and ds.num_classes == 10
    np.testing.assert_array_equal(np.bincount(ds.labels), [n // 10] * 10)
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    assert ds.source == f"Fashion-MNIST {split}, {FASHION_ROOT} ({n} images)"
    assert ds.metadata()["preprocessing"] == {"scale": 1 / 255, "mean": None, "std": None,
                                              "layout": "NHW", "resize": None}


def test_fashion_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="split must be 'train' or 'test'"):
        load_fashion_mnist("valid")
    with pytest.raises(ModelFileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)


def test_fashion_mnist_from_uncompressed_files(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.full((10, 28, 28), 255, np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10, dtype=np.uint8))
    ds = load_fashion_mnist("test", root=tmp_path)
    assert ds.images.shape == (10, 1, 28, 28) and np.all(ds.images == 1.0)


# --------------------------------------------------------------------------- load_spec


def test_load_spec_forms(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    assert load_spec("digits").images.shape == (1797, 1, 8, 8)
    assert load_spec(" Digits:12 ").images.shape == (1797, 1, 12, 12)
    images, labels = small_arrays()
    np.savez(tmp_path / "d.npz", x=images, y=labels)
    assert len(load_spec(f"npz:{tmp_path / 'd.npz'}")) == 12
    assert len(load_spec(str(tmp_path / "d.npz"))) == 12
    scaled = load_spec(f"npz:{tmp_path / 'd.npz'}", preprocessing=Preprocessing(scale=0.5))
    assert scaled.preprocessing.scale == 0.5
    write_idx(tmp_path / "i.gz", images[:, 0], compress=True)
    write_idx(tmp_path / "l", labels.astype(np.uint8))
    assert load_spec(f"idx:{tmp_path / 'i.gz'}, {tmp_path / 'l'}").images.shape == (12, 1, 5, 4)
    folder = make_folder(tmp_path / "imgs", {"a": [("L", (3, 3))], "b": [("L", (3, 3))]})
    assert load_spec(f"folder:{folder}").class_names == ("a", "b")
    assert load_spec(str(folder)).class_names == ("a", "b")


def test_load_spec_fashion_mnist(fashion: dict[str, Dataset]) -> None:
    ds = load_spec("fashion-mnist:test")
    np.testing.assert_array_equal(ds.labels, fashion["test"].labels)


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("cifar10", DataError, r"unknown data spec 'cifar10' \(no such file or folder either\); "
                               r"accepted forms: digits, digits:SIZE, fashion-mnist:train\|test"),
        ("", DataError, "empty data spec"),
        ("digits:big", DataError, "SIZE in digits:SIZE must be an integer"),
        ("digits:0", DataError, "size must be a positive integer"),
        ("fashion-mnist:val", DataError, "split must be 'train' or 'test'"),
        ("idx:only-one", DataError, r"expected idx:IMAGES,LABELS"),
        ("npz:", DataError, "names no path"),
        ("npz:/no/such.npz", ModelFileNotFoundError, r"npz file not found: /no/such\.npz"),
        ("/no/such.npz", ModelFileNotFoundError, "npz file not found"),
        ("folder:/no/such/folder", ModelFileNotFoundError, "image folder not found"),
    ],
)
def test_load_spec_errors(spec: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        load_spec(spec)


def test_load_spec_error_lists_every_form(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DataError) as info:
        load_spec(str(tmp_path / "x.csv"))
    assert all(form in str(info.value) for form in SPEC_FORMS)
    assert "no such file" not in str(info.value)


# --------------------------------------------------------------------------- iter_batches


def test_iter_batches_dataset_last_batch_smaller() -> None:
    ds = from_arrays(*small_arrays(n=10))
    batches = list(iter_batches(ds, batch_size=4))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]
    x, y = gather(iter(batches))
    np.testing.assert_array_equal(x, ds.images)
    np.testing.assert_array_equal(y, ds.labels)


def test_iter_batches_arrays_convert_float64_and_integers() -> None:
    images = np.random.default_rng(7).random((7, 2, 3, 3))
    labels = np.array([0, 1, 2, 0, 1, 2, 0], dtype=np.uint8)
    x, y = gather(iter_batches(images, labels, batch_size=3))
    np.testing.assert_array_equal(x, images.astype(np.float32))
    np.testing.assert_array_equal(y, labels)
    x, _ = gather(iter_batches(np.ones((2, 1, 2, 2), np.int16), [0, 1], batch_size=5))
    assert x.shape == (2, 1, 2, 2) and np.all(x == 1.0)
    # uint8 pixels are scaled to [0, 1], as every loader does
    x, _ = gather(iter_batches(np.full((2, 1, 2, 2), 255, np.uint8), [0, 1], batch_size=5))
    assert x.dtype == np.float32 and np.all(x == 1.0)
    fortran = np.asfortranarray(images)
    x, _ = gather(iter_batches(fortran, labels, batch_size=2))
    np.testing.assert_array_equal(x, images.astype(np.float32))


def test_iter_batches_generator_keeps_its_batches() -> None:
    images, labels = small_arrays(n=11, c=2)

    def batches() -> Iterator[tuple[np.ndarray, list[int]]]:
        yield images[:5], labels[:5].tolist()
        yield images[5:5], []  # empty batches are skipped
        yield images[5:], labels[5:].tolist()

    out = list(iter_batches(batches(), batch_size=4))
    assert [x.shape[0] for x, _ in out] == [5, 6]
    x, y = gather(iter(out))
    np.testing.assert_allclose(x, images / 255, rtol=1e-6)  # uint8 batches: [0, 1]
    np.testing.assert_array_equal(y, labels)


def test_iter_batches_torch_dataloader() -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    images = torch.rand(23, 3, 4, 4)
    labels = torch.randint(0, 5, (23,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=False)
    out = list(iter_batches(loader, batch_size=100))
    assert [x.shape[0] for x, _ in out] == [8, 8, 7]
    x, y = gather(iter(out))
    np.testing.assert_array_equal(x, images.numpy())
    np.testing.assert_array_equal(y, labels.numpy())
    x, y = gather(iter_batches(images.double(), labels, batch_size=10))
    np.testing.assert_array_equal(x, images.numpy())


def test_iter_batches_checks_arrays_before_iterating() -> None:
    images, labels = small_arrays()
    with pytest.raises(DataError, match="labels: missing"):
        iter_batches(images, batch_size=4)
    with pytest.raises(DataError, match="labels: 11 labels for 12 images"):
        iter_batches(images, labels[:-1], batch_size=4)
    with pytest.raises(DataError, match=r"labels: class indices must be integers, got dtype "
                                        r"float64; convert with labels\.astype"):
        iter_batches(images, labels.astype(float), batch_size=4)
    with pytest.raises(DataError, match="labels: class indices must be integers, got dtype bool"):
        iter_batches(images, labels > 0, batch_size=4)
    with pytest.raises(DataError, match="labels: negative label -1 at index 3"):
        iter_batches(images, np.where(np.arange(12) == 3, -1, labels), batch_size=4)
    with pytest.raises(DataError, match=r"labels: expected a 1-D array of shape \(N,\), got shape "
                                        r"\(12, 3\); one-hot"):
        iter_batches(images, np.eye(3, dtype=int)[labels], batch_size=4)
    with pytest.raises(DataError, match=r"images: expected a 4-D array of shape \(N, C, H, W\), "
                                        r"got shape \(12, 5, 4\); .*layout='NHW'"):
        iter_batches(images[:, 0], labels, batch_size=4)
    with pytest.raises(DataError, match="images: expected numbers, got dtype complex128"):
        iter_batches(images.astype(complex), labels, batch_size=4)
    with pytest.raises(DataError, match="images: expected numbers, got dtype object"):
        iter_batches(images.astype(object), labels, batch_size=4)
    with pytest.raises(DataError, match="images: the data set is empty"):
        iter_batches(images[:0], labels[:0], batch_size=4)
    with pytest.raises(DataError, match="labels: a Dataset carries its own labels"):
        iter_batches(from_arrays(images, labels), labels, batch_size=4)
    with pytest.raises(DataError, match=r"images: expected a Dataset, an array .* got int"):
        iter_batches(3, batch_size=4)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e39])
def test_iter_batches_rejects_non_finite_images(bad: float) -> None:
    images = np.zeros((20, 1, 2, 2))
    images[13, 0, 1, 0] = bad
    with pytest.raises(DataError, match="images: image 13 contains NaN or infinity"):
        iter_batches(images, np.zeros(20, np.int64), batch_size=4)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True, None])
def test_iter_batches_rejects_bad_batch_size(batch_size: object) -> None:
    images, labels = small_arrays()
    with pytest.raises(DataError, match="batch_size must be a positive integer"):
        iter_batches(images, labels, batch_size=batch_size)  # type: ignore[arg-type]


def test_iter_batches_checks_each_streamed_batch() -> None:
    good = (np.zeros((2, 1, 3, 3)), np.array([0, 1]))
    cases: list[tuple[list[Any], str]] = [
        ([], "images: the data set is empty: the iterable gave no batch"),
        ([(np.zeros((0, 1, 3, 3)), np.zeros(0, int))], "the iterable gave no batch"),
        ([good, np.zeros((2, 1, 3, 3))], "item 1 of the iterable is a ndarray; expected an "
                                          r"\(images, labels\) pair"),
        ([good, (np.zeros((2, 1, 3, 3)),)], "item 1 of the iterable is a tuple"),
        ([good, (np.zeros((2, 3, 3)), np.array([0, 1]))],
         r"images \(batch 1\): expected a 4-D array .* got shape \(2, 3, 3\)"),
        ([good, (np.zeros((2, 1, 4, 3)), np.array([0, 1]))],
         r"images \(batch 1\): images of shape \(C, H, W\) = \(1, 4, 3\), but earlier"),
        ([good, (np.zeros((2, 1, 3, 3)), np.array([0]))], r"labels \(batch 1\): 1 labels for 2"),
        ([good, (np.zeros((2, 1, 3, 3)), np.array([0, -2]))], r"labels \(batch 1\): negative"),
        ([good, (np.full((2, 1, 3, 3), np.nan), np.array([0, 1]))],
         r"images \(batch 1\): image 0 contains NaN"),
        ([(np.array([[[["a"]]]]), np.array([0]))], r"images \(batch 0\): expected numbers"),
    ]
    for batches, message in cases:
        stream = iter_batches(batches, batch_size=4)
        with pytest.raises(DataError, match=message):
            list(stream)


# --------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), batch_size=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_iter_batches_concatenation_equals_input(n: int, batch_size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 2, 3, 2))
    labels = rng.integers(0, 5, size=n)
    batches = list(iter_batches(images, labels, batch_size=batch_size))
    assert len(batches) == -(-n // batch_size)
    assert all(x.shape[0] == batch_size for x, _ in batches[:-1])
    x, y = gather(iter(batches))
    np.testing.assert_array_equal(x, images.astype(np.float32))
    np.testing.assert_array_equal(y, labels)


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, 30), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_streamed_batches_concatenate_to_the_input(cuts: list[int], seed: int) -> None:
    bounds = np.cumsum([0, *cuts])
    if bounds[-1] == 0:
        return  # an all-empty stream is an error, tested above
    rng = np.random.default_rng(seed)
    images = rng.random((int(bounds[-1]), 1, 2, 2)).astype(np.float32)
    labels = rng.integers(0, 3, size=len(images))
    stream = ((images[a:b], labels[a:b]) for a, b in itertools.pairwise(bounds))
    batches = list(iter_batches(stream, batch_size=1))
    assert [x.shape[0] for x, _ in batches] == [c for c in cuts if c]
    x, y = gather(iter(batches))
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), oh=st.integers(1, 20), ow=st.integers(1, 20),
       seed=st.integers(0, 2**16))
def test_resize_stays_within_the_input_range(h: int, w: int, oh: int, ow: int, seed: int) -> None:
    images = np.random.default_rng(seed).random((2, 1, h, w))
    out = Preprocessing(resize=(oh, ow)).apply(images)
    assert out.shape == (2, 1, oh, ow)
    assert out.min() >= images.min() - 1e-6 and out.max() <= images.max() + 1e-6


# --------------------------------------------------------------------------- robustness sweep
# Each case below came from an adversarial sweep of the input side (2026-11-24).


def test_a_huge_label_is_refused_before_anything_is_allocated() -> None:
    images = np.zeros((4, 1, 2, 2), np.float32)
    labels = np.array([0, 1, 1_000_000_000, 2])
    with pytest.raises(DataError, match=r"labels: label 1000000000 at index 2 is beyond 99,999"):
        from_arrays(images, labels)
    with pytest.raises(DataError, match=r"label 1000000000 at index 2"):
        next(iter_batches(images, labels, batch_size=2))

    def stream() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield images, labels

    with pytest.raises(DataError, match=r"labels \(batch 0\): label 1000000000"):
        list(iter_batches(stream(), batch_size=2))


def test_sixteen_bit_images_keep_their_range(tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        image_module.fromarray(ramp).save(tmp_path / cls / "0.png")
    assert image_module.open(tmp_path / "a" / "0.png").mode in ("I;16", "I")
    ds = load_image_folder(tmp_path)
    assert ds.image_shape == (1, 8, 8)
    # not clipped at 255 (Pillow's 8-bit conversion): 0..65535 becomes 0..1
    np.testing.assert_allclose(ds.images[0, 0], ramp / 65535, atol=1e-6)
    # read as RGB (a colour image beside it, or a 3-channel model): the same values, three times
    image_module.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / "b" / "1.png")
    rgb = load_image_folder(tmp_path)
    assert rgb.image_shape == (3, 8, 8)
    for channel in range(3):
        np.testing.assert_allclose(rgb.images[0, channel], ramp / 65535, atol=1e-6)
    np.testing.assert_allclose(rgb.images[-1], 128 / 255, atol=1e-6)


def test_npz_layout_follows_the_array_shape(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    keras_mnist = rng.integers(0, 256, size=(6, 5, 5), dtype=np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=keras_mnist, y_train=np.arange(6) % 2)
    ds = load_npz(tmp_path / "mnist.npz")
    assert ds.image_shape == (1, 5, 5) and ds.preprocessing.layout == "NHW"
    np.testing.assert_allclose(ds.images[:, 0], keras_mnist / 255, rtol=1e-6)
    keras_cifar = rng.random((6, 7, 7, 3)).astype(np.float32)
    np.savez(tmp_path / "cifar.npz", x=keras_cifar, y=np.arange(6) % 2)
    ds = load_npz(tmp_path / "cifar.npz")
    assert ds.image_shape == (3, 7, 7) and ds.preprocessing.layout == "NHWC"
    np.testing.assert_array_equal(ds.images, keras_cifar.transpose(0, 3, 1, 2))
    nchw = rng.random((6, 3, 7, 7)).astype(np.float32)
    np.savez(tmp_path / "nchw.npz", x=nchw, y=np.arange(6) % 2)
    assert load_npz(tmp_path / "nchw.npz").preprocessing == Preprocessing()


def test_class_names_are_strings_never_split_nor_repeated(tmp_path: Path) -> None:
    images, labels = small_arrays()
    np.savez(tmp_path / "bytes.npz", x=images, y=labels,
             class_names=np.array([b"cat", b"dog", b"eel"]))
    assert load_npz(tmp_path / "bytes.npz").class_names == ("cat", "dog", "eel")
    np.savez(tmp_path / "scalar.npz", x=images, y=labels, class_names=np.array("cat"))
    with pytest.raises(DataError, match=r"scalar\.npz: its class_names array must be 1-D"):
        load_npz(tmp_path / "scalar.npz")
    with pytest.raises(DataError, match=r"class_names must be a sequence of names"):
        from_arrays(images, labels, class_names="abc")  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"class_names has duplicates: \['a'\]"):
        from_arrays(images, labels, class_names=["a", "a", "b"])


def test_an_unreadable_folder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_folder(tmp_path / "set", {"a": [("L", (3, 3))], "b": [("L", (3, 3))]})
    (root / "b" / "deeper").mkdir()
    real_iterdir, real_scandir = Path.iterdir, os.scandir

    def iterdir(self: Path) -> Iterator[Path]:
        if self.name == "set":  # root ignores chmod 000, so the OS refusal is simulated
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    def denying(name: str) -> Any:
        def scandir(path: Any = ".") -> Any:
            if Path(path).name == name:
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)
        return scandir

    with monkeypatch.context() as patch:
        patch.setattr(Path, "iterdir", iterdir)
        with pytest.raises(DataError, match=r"set: cannot list the folder \(Permission denied"):
            load_image_folder(root)
    for name, where in (("b", "set/b"), ("deeper", "b/deeper")):  # a class, a folder below one
        monkeypatch.setattr(os, "scandir", denying(name))
        with pytest.raises(DataError, match=where + r": cannot list the folder \(Permission"):
            load_image_folder(root)


def test_a_class_folder_is_read_with_the_folders_below_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As torchvision's ImageFolder: images in sub-folders of a class belong to it (they were
    left out silently), .jfif/.jpe files are JPEGs, hidden names are left out, and files that
    are not images are skipped with a warning that counts them."""
    image_module = pytest.importorskip("PIL.Image")
    root = make_folder(tmp_path / "set", {"a": [("L", (3, 3))], "b": [("L", (3, 3))]})
    (root / "a" / "indoor").mkdir()
    image_module.fromarray(np.full((3, 3), 200, np.uint8)).save(root / "a" / "indoor" / "x.png")
    image_module.fromarray(np.full((3, 3), 9, np.uint8)).save(root / "b" / "y.JFIF",
                                                              format="JPEG")
    (root / "b" / ".cache").mkdir()
    image_module.fromarray(np.zeros((3, 3), np.uint8)).save(root / "b" / ".cache" / "z.png")
    (root / "b" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="onnxaom.data"):
        ds = load_image_folder(root)
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1])
    assert ds.images[1, 0, 0, 0] == pytest.approx(200 / 255)  # a/indoor/x.png, after a/000.png
    assert abs(ds.images[3, 0, 0, 0] * 255 - 9) <= 2  # b/y.JFIF (JPEG), after b/000.png
    assert "skipped 1 file(s) that are not images" in caplog.text and "notes.txt" in caplog.text


def test_links_below_a_class_folder_are_followed_once(tmp_path: Path) -> None:
    """As torchvision's ImageFolder (it was left out silently); a link back up does not loop."""
    root = make_folder(tmp_path / "set", {"cat": [("L", (3, 3))]})
    batch = make_folder(tmp_path / "elsewhere", {"batch2": [("L", (3, 3))] * 3})
    (root / "cat" / "batch2").symlink_to(batch / "batch2", target_is_directory=True)
    (root / "cat" / "loop").symlink_to(root / "cat", target_is_directory=True)
    assert len(load_image_folder(root)) == 4


def test_a_file_that_cannot_be_examined_is_named(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """In a folder that can be listed but not entered, is_file() raised PermissionError."""
    root = make_folder(tmp_path / "set", {"cat": [("L", (3, 3))]})
    real = Path.is_file

    def is_file(self: Path) -> bool:
        if self.name == "000.png":  # root ignores chmod, so the OS refusal is simulated
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    with pytest.raises(DataError, match=r"cat/000\.png: cannot read \(Permission denied\)"):
        load_image_folder(root)

def test_image_files_without_a_known_scale_are_refused(tmp_path: Path) -> None:
    """A float TIFF was read as all zeros (truncated to 8 bits); a 32-bit integer one beyond
    16 bits was divided by 257 as if it were 16-bit."""
    image_module = pytest.importorskip("PIL.Image")
    (tmp_path / "f" / "a").mkdir(parents=True)
    image_module.fromarray(np.full((3, 3), 0.5, np.float32), mode="F").save(
        tmp_path / "f" / "a" / "x.tif")
    with pytest.raises(DataError, match=r"x\.tif: a floating-point image \(Pillow mode F\)"):
        load_image_folder(tmp_path / "f")
    (tmp_path / "i" / "a").mkdir(parents=True)
    image_module.fromarray(np.full((3, 3), 1_000_000, np.int32), mode="I").save(
        tmp_path / "i" / "a" / "x.tif")
    with pytest.raises(DataError, match=r"x\.tif: a 32-bit integer image with values from "
                                        r"1000000 to 1000000, beyond 16 bits"):
        load_image_folder(tmp_path / "i")
    (tmp_path / "j" / "a").mkdir(parents=True)
    image_module.fromarray(np.full((3, 3), 514, np.int32), mode="I").save(
        tmp_path / "j" / "a" / "x.tif")
    assert load_image_folder(tmp_path / "j").images.max() == pytest.approx(2 / 255)


def test_an_image_above_pillows_size_limit_is_refused_by_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image_module = pytest.importorskip("PIL.Image")
    root = make_folder(tmp_path / "set", {"a": [("L", (40, 40))]})
    monkeypatch.setattr(image_module, "MAX_IMAGE_PIXELS", 100)  # 1,600 pixels > 2 x 100
    with pytest.raises(DataError, match=r"000\.png: cannot read image \(.*exceeds limit"):
        load_image_folder(root)


def test_labels_and_samples_get_the_right_advice() -> None:
    """(N, 1) labels: ravel, not argmax (which gives one class); single samples from an
    iterable: batch them, not layout='NHW'."""
    images = np.zeros((4, 1, 3, 3), np.float32)
    with pytest.raises(DataError, match=r"shape \(4, 1\); one column of class indices\? pass "
                                        r"labels\.ravel\(\)"):
        from_arrays(images, np.zeros((4, 1), np.int64))
    with pytest.raises(DataError, match=r"one-hot labels\? pass labels\.argmax"):
        from_arrays(images, np.eye(4, dtype=np.int64))
    with pytest.raises(DataError, match=r"yields single samples, not batches; batch them"):
        list(iter_batches(zip(images, np.arange(4), strict=True), batch_size=2))


def test_oversized_inputs_are_refused_with_the_spec_named() -> None:
    with pytest.raises(DataError, match=r"data spec 'digits:3000': size=3000 is larger than 1024"):
        load_spec("digits:3000")
    with pytest.raises(DataError, match=r"resizing 2 images of 1 channel\(s\) to "
                                        r"1000000x1000000 needs about"):
        Preprocessing(resize=(1_000_000, 1_000_000)).apply(np.zeros((2, 1, 3, 3), np.float32))


def test_idx_label_errors_name_the_labels_file(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "img", np.zeros((2, 3, 3), np.uint8))
    negative = write_idx(tmp_path / "neg", np.array([-1, 0], np.int8))
    with pytest.raises(DataError, match=r"neg: labels: negative label -1 at index 0"):
        load_idx(images, negative)


def test_folder_spec_takes_the_models_channels_and_a_resize(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "set", {"a": [("RGB", (4, 4)), ("L", (6, 6))],
                                          "b": [("L", (4, 4))]})
    ds = load_spec(f"folder:{root}", channels=1, size=(5, 5))
    assert ds.image_shape == (1, 5, 5) and ds.preprocessing.resize == (5, 5)
    assert load_spec(str(root), channels=3, size=5).image_shape == (3, 5, 5)
    with pytest.raises(DataError, match=r"channels must be 1 or 3"):
        load_spec(str(root), channels=2)


def test_array_specs_are_resized_as_the_preprocessing_would() -> None:
    resized = load_spec("digits", size=(28, 28))
    direct = load_digits(size=28)  # resize in the Preprocessing, before the scale
    assert resized.image_shape == (1, 28, 28) and resized.preprocessing == direct.preprocessing
    np.testing.assert_allclose(resized.images, direct.images, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(resized.labels, direct.labels)
    assert resized.resized(28) is resized  # already that size
    with pytest.raises(DataError, match="size must be two positive integers"):
        resized.resized((0, 3))
    assert resized.source.endswith("resized to 28x28")
    with pytest.raises(DataError, match="already resized to 14x14 when loaded"):
        load_spec("digits:14", size=(28, 28))  # two resizes are not one


def test_values_too_large_for_float32_are_one_error_without_a_warning() -> None:
    import warnings

    images = np.full((2, 1, 2, 2), 1e300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow RuntimeWarning would fail here
        with pytest.raises(DataError, match=r"image 0 contains NaN or infinity"):
            from_arrays(images, [0, 1])

        def stream() -> Iterator[tuple[np.ndarray, list[int]]]:
            yield images, [0, 1]

        with pytest.raises(DataError, match=r"images \(batch 0\): image 0 contains NaN"):
            list(iter_batches(stream(), batch_size=2))


def test_a_batch_iterable_with_labels_is_a_clear_mistake() -> None:
    images, labels = small_arrays()

    class Loader:
        def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            yield images, labels

    with pytest.raises(DataError, match=r"labels: a Loader of \(images, labels\) batches carries "
                                        r"its own labels; pass labels=None"):
        next(iter_batches(Loader(), labels, batch_size=4))


def test_uint16_arrays_are_16_bit_pixels(tmp_path: Path) -> None:
    """A uint16 array is scaled to [0, 1] by 1/65535, as 16-bit image files are (it was fed
    unscaled, up to 65535); the same pixels at 8 bits load to the same images."""
    rng = np.random.default_rng(0)
    x8 = rng.integers(0, 256, (6, 1, 4, 4)).astype(np.uint8)
    y = np.arange(6) % 2
    np.savez(tmp_path / "d16.npz", x=x8.astype(np.uint16) * 257, y=y)
    wide = load_npz(tmp_path / "d16.npz")
    narrow = from_arrays(x8, y)
    assert wide.preprocessing.scale == pytest.approx(1 / 65535)
    np.testing.assert_allclose(wide.images, narrow.images, rtol=0, atol=1e-7)


def test_an_empty_class_folder_is_kept_on_request(tmp_path: Path) -> None:
    """allow_empty_classes keeps a class folder without images as a class without samples
    (it was refused whatever --allow-empty-classes said); a folder of only empty classes is
    still refused."""
    pytest.importorskip("PIL.Image")
    folder = make_folder(tmp_path / "d", {"a": [("L", (2, 2))] * 2, "c": [("L", (2, 2))]})
    (folder / "b").mkdir()
    with pytest.raises(DataError, match=r"b: class folder with no images .*--allow-empty-classes"):
        load_image_folder(folder)
    data = load_spec(f"folder:{folder}", allow_empty_classes=True)
    assert data.class_names == ("a", "b", "c") and data.labels.tolist() == [0, 0, 2]
    (tmp_path / "none" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in any class folder"):
        load_image_folder(tmp_path / "none", allow_empty_classes=True)
