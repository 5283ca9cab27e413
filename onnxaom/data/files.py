"""Loaders of files: ``.npz`` archives, IDX files (MNIST, Fashion-MNIST), scikit-learn's digits,
and the CLI's ``--data SPEC`` strings."""

from __future__ import annotations

import math
import os
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, ModelFileNotFoundError
from .checks import (
    PathLike,
    _as_labels,
    _existing_file,
    _is_gzip,
    _read_bytes,
    _with_file_context,
    as_class_names,
    default_scale,
)
from .dataset import (
    Dataset,
    from_arrays,
)
from .images import (
    load_image_folder,
)
from .preprocessing import (
    Preprocessing,
)

#: Where the Debian package ``dataset-fashion-mnist`` puts its files.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
#: Fashion-MNIST's labels 0..9, as named by its authors (Zalando Research).
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: Keys :func:`load_npz` tries, in order, when none is given (case-insensitive).
NPZ_IMAGE_KEYS = ("images", "x", "x_train", "image", "data", "x_test")
NPZ_LABEL_KEYS = ("labels", "y", "y_train", "label", "targets", "target", "y_test")
#: The forms :func:`load_spec` accepts.
SPEC_FORMS = (
    "digits", "digits:SIZE", "fashion-mnist:train|test", "npz:PATH", "idx:IMAGES,LABELS",
    "folder:PATH", "PATH.npz", "DIRECTORY",
)
# IDX type codes (the third byte of the magic number); values are stored big-endian.
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
#: Images larger than this side are refused by :func:`load_digits` (1,797 images x side^2).
_MAX_DIGITS_SIDE = 1024




def load_npz(
    path: PathLike,
    *,
    images_key: str | None = None,
    labels_key: str | None = None,
    preprocessing: Preprocessing | None = None,
    class_names: Sequence[str] | None = None,
) -> Dataset:
    """A :class:`Dataset` from a numpy ``.npz`` archive.

    Parameters
    ----------
    path:
        The archive.
    images_key, labels_key:
        Names of the arrays. By default the first present of ``NPZ_IMAGE_KEYS``
        (images, x, x_train, image, data, x_test) and ``NPZ_LABEL_KEYS`` (labels, y, y_train,
        label, targets, target, y_test), compared case-insensitively.
    preprocessing:
        Applied to the images. Default: the layout from the array's shape, (N, H, W) as
        grayscale "NHW" (Keras' ``mnist.npz``), (N, H, W, C) with C in 1, 3, 4 and H not as
        "NHWC" (Keras' CIFAR arrays), else "NCHW"; scaled by 1/255 for uint8 images.
    class_names:
        Default: the archive's ``class_names`` array if it has one (strings or UTF-8 bytes,
        1-D), else "0".."max(label)".
    """
    file = _existing_file(path, "npz file")
    try:
        with file.open("rb") as handle:
            magic = handle.read(6)
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc.strerror or exc})") from exc
    if not magic.startswith((b"PK", b"\x93NUMPY")):  # a zip archive, or a single .npy
        raise DataError(f"{file}: not an .npz archive (an .npz is a zip file, starting with "
                        f"'PK'; this one starts with {magic!r})")
    try:
        loaded = np.load(file, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{file}: a single .npy array, not an .npz archive")
        with loaded as archive:
            keys = list(archive.keys())
            ik = _pick_key(file, keys, images_key, NPZ_IMAGE_KEYS, "images", "images_key")
            lk = _pick_key(file, keys, labels_key, NPZ_LABEL_KEYS, "labels", "labels_key")
            images, labels = archive[ik], archive[lk]
            if class_names is None and "class_names" in keys:
                stored = archive["class_names"]
                if stored.ndim != 1:
                    raise DataError(f"{file}: its class_names array must be 1-D (one name per "
                                    f"class), got shape {stored.shape}")
                class_names = as_class_names(stored.tolist())
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{file}: cannot read as an .npz archive ({exc})") from exc
    except MemoryError as exc:  # a header that declares more than this machine holds
        raise DataError(f"{file}: an array in it does not fit in memory ({exc}); a corrupt "
                        f"header, or split the data into smaller archives") from exc
    if preprocessing is None:
        preprocessing = Preprocessing(scale=default_scale(images.dtype),
                                      layout=_npz_layout(images.shape))
    return _with_file_context(
        file,
        lambda: from_arrays(images, labels, preprocessing=preprocessing, class_names=class_names,
                            source=f"npz {file} [{ik}, {lk}] ({len(labels)} images)"),
    )


def _npz_layout(shape: tuple[int, ...]) -> str:
    """The layout an array of ``shape`` most likely has (see :func:`load_npz`)."""
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4 and shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4):
        return "NHWC"
    return "NCHW"


def _pick_key(
    file: Path, keys: list[str], given: str | None, candidates: tuple[str, ...], what: str,
    argument: str,
) -> str:
    if given is not None:
        if given not in keys:
            raise DataError(f"{file}: {argument}={given!r} is not in the archive; keys present: "
                            f"{keys}")
        return given
    lower = {key.lower(): key for key in reversed(keys)}
    for candidate in candidates:
        if candidate in lower:
            return lower[candidate]
    raise DataError(
        f"{file}: no {what} array found (looked for {', '.join(candidates)}); keys present: "
        f"{keys}; rename it to one of those, or pass {argument}= one of them to load_npz"
    )


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), raw or gzip-compressed (detected from its bytes).

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian
    uint32; the big-endian values follow.

    Returns
    -------
    Array of the file's shape (e.g. (N, 28, 28) for MNIST images, (N,) for labels) and dtype,
    in native byte order.
    """
    file = _existing_file(path, "IDX file")
    raw = _read_bytes(file)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(
            f"{file}: not an IDX file (it should start with two zero bytes, starts with "
            f"{raw[:4].hex() or 'nothing'})"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DataError(f"{file}: unknown IDX type code 0x{code:02X}; expected one of {known}")
    if ndim == 0:
        raise DataError(f"{file}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{file}: truncated IDX header: expected {header} bytes for {ndim} dimensions, "
            f"found {len(raw)}"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    count = math.prod(dims)
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "corrupt (trailing bytes)"
        raise DataError(
            f"{file}: {state} IDX file: its header declares shape {dims} of {dtype.name}, "
            f"{expected} bytes in all, but the {'decompressed ' if _is_gzip(file) else ''}"
            f"data has {len(raw)} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def load_idx(
    images_path: PathLike,
    labels_path: PathLike,
    *,
    preprocessing: Preprocessing | None = None,
    class_names: Sequence[str] | None = None,
) -> Dataset:
    """A :class:`Dataset` from an IDX images file and an IDX labels file (raw or .gz).

    Parameters
    ----------
    images_path:
        IDX array of shape (N, H, W) (or 4-D, laid out as ``preprocessing.layout`` says).
    labels_path:
        IDX integer array of shape (N,).
    preprocessing:
        Default: layout "NHW" for a 3-D images file, "NCHW" for a 4-D one; scaled by 1/255 for
        uint8 images (MNIST's and Fashion-MNIST's), as :func:`load_fashion_mnist`.
    class_names:
        Default "0".."max(label)".
    """
    return _idx_dataset(images_path, labels_path, preprocessing, class_names, None)


def _idx_dataset(
    images_path: PathLike,
    labels_path: PathLike,
    preprocessing: Preprocessing | None,
    class_names: Sequence[str] | None,
    label: str | None,
) -> Dataset:
    images, labels = read_idx(images_path), read_idx(labels_path)
    images_file, labels_file = Path(images_path), Path(labels_path)
    if labels.ndim != 1:
        raise DataError(f"{labels_file}: labels must be a 1-D IDX array (N,), got shape "
                        f"{labels.shape}")
    if len(labels) != len(images):
        raise DataError(f"{labels_file} has {len(labels)} labels but {images_file} has "
                        f"{len(images)} images")
    try:
        labels = _as_labels(labels, "labels", len(labels))
    except DataError as exc:
        raise DataError(f"{labels_file}: {exc}") from exc
    if preprocessing is None:
        preprocessing = Preprocessing(scale=default_scale(images.dtype),
                                      layout="NHW" if images.ndim == 3 else "NCHW")
    label = f"IDX {images_file} + {labels_file.name}" if label is None else label
    source = f"{label} ({len(images)} images)"
    return _with_file_context(
        images_file,
        lambda: from_arrays(images, labels, preprocessing=preprocessing, class_names=class_names,
                            source=source),
    )


def load_fashion_mnist(
    split: str = "train",
    *,
    root: PathLike = FASHION_MNIST_ROOT,
    preprocessing: Preprocessing | None = None,
) -> Dataset:
    """Fashion-MNIST (28x28 grayscale, 10 classes) from its IDX files.

    Parameters
    ----------
    split:
        "train" (60,000 images) or "test" (10,000).
    root:
        Folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; by default where the
        Debian package ``dataset-fashion-mnist`` installs them.
    preprocessing:
        Default ``Preprocessing(scale=1/255, layout="NHW")``: pixels in [0, 1]. The raw images
        are (N, 28, 28), so a custom one needs ``layout="NHW"``.

    Returns
    -------
    Dataset with images of shape (N, 1, 28, 28) and :data:`FASHION_MNIST_CLASSES`.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root)
    prefix = "train" if split == "train" else "t10k"
    images = _fashion_file(folder, f"{prefix}-images-idx3-ubyte", split)
    labels = _fashion_file(folder, f"{prefix}-labels-idx1-ubyte", split)
    if preprocessing is None:
        preprocessing = Preprocessing(scale=1 / 255, layout="NHW")
    return _idx_dataset(images, labels, preprocessing, FASHION_MNIST_CLASSES,
                        f"Fashion-MNIST {split}, {folder}")


def _fashion_file(folder: Path, name: str, split: str) -> Path:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    raise ModelFileNotFoundError(
        f"Fashion-MNIST {split} file not found: {folder / name}.gz (or without .gz); install "
        f"the Debian package (apt-get install dataset-fashion-mnist) or pass root= the folder "
        f"that holds the IDX files"
    )


def load_digits(*, size: int = 8, preprocessing: Preprocessing | None = None) -> Dataset:
    """scikit-learn's handwritten digits: 1,797 images of 8x8 pixels in 0..16, classes 0..9.

    Parameters
    ----------
    size:
        Side of the returned images; other than 8 resizes (bilinear) to ``size`` x ``size``,
        recorded as ``preprocessing.resize``.
    preprocessing:
        Default ``Preprocessing(scale=1/16, layout="NHW")``: pixels in [0, 1]. The raw images
        are (N, 8, 8), so a custom one needs ``layout="NHW"``.

    Returns
    -------
    Dataset with images of shape (1797, 1, size, size) and class names "0".."9".
    """
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise DataError(f"size must be a positive integer, got {size!r}")
    if size > _MAX_DIGITS_SIDE:
        raise DataError(f"size={size} is larger than {_MAX_DIGITS_SIDE}: the 8x8 digits "
                        f"upsampled that far only fill memory")
    resize = None if size == 8 else (int(size), int(size))
    if preprocessing is None:
        preprocessing = Preprocessing(scale=1 / 16, layout="NHW", resize=resize)
    elif resize is not None:
        if preprocessing.resize not in (None, resize):
            raise DataError(f"size={size} conflicts with preprocessing.resize="
                            f"{preprocessing.resize}; give one of them")
        preprocessing = replace(preprocessing, resize=resize)
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from exc
    bunch = sklearn_digits()
    side = preprocessing.resize or (8, 8)
    return from_arrays(
        bunch.images, bunch.target, preprocessing=preprocessing,
        class_names=[str(name) for name in bunch.target_names],
        source=f"sklearn digits ({len(bunch.target)} images, {side[0]}x{side[1]})",
    )


def load_spec(
    spec: str | os.PathLike[str],
    *,
    preprocessing: Preprocessing | None = None,
    channels: int | None = None,
    size: int | tuple[int, int] | None = None,
    allow_empty_classes: bool = False,
) -> Dataset:
    """The data set a CLI ``--data SPEC`` names.

    Parameters
    ----------
    spec:
        One of ``digits``, ``digits:SIZE``, ``fashion-mnist:train|test`` (bare
        ``fashion-mnist`` is the training set), ``npz:PATH``, ``idx:IMAGES,LABELS``,
        ``folder:PATH``, or a bare path to an ``.npz`` file or a folder.
    preprocessing:
        Passed to the loader; default: the loader's own.
    channels:
        For an image folder: read every image with 1 (grayscale) or 3 (RGB) channels, e.g. the
        model's input channels; default: grayscale if every image is. Ignored by the other
        sources, whose arrays have the channels they have.
    size:
        Resize every image to ``(H, W)`` (``--resize`` on the command line): an image folder's
        files as they are read, the other sources' arrays after loading
        (:meth:`Dataset.resized`).
    allow_empty_classes:
        For an image folder: keep a class subfolder with no images (see
        :func:`load_image_folder`).
    """
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3 (or None), got {channels!r}")
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)  # a bare path: an .npz file or a folder
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec {spec!r}; accepted forms: {', '.join(SPEC_FORMS)}")
    text = spec.strip()
    kind, colon, arg = text.partition(":")
    kind = kind.lower()
    folder = arg if kind == "folder" and colon else text if Path(text).is_dir() \
        and not text.lower().endswith(".npz") else None
    if folder is not None:
        if not folder:
            raise DataError(f"data spec {spec!r} names no path; e.g. folder:data/train")
        return load_image_folder(folder, preprocessing=preprocessing, size=size,
                                 grayscale=None if channels is None else channels == 1,
                                 allow_empty_classes=allow_empty_classes)
    data = _load_arrays_spec(spec, text, kind, colon, arg, preprocessing)
    return data if size is None else data.resized(size)


def _load_arrays_spec(spec: str, text: str, kind: str, colon: str, arg: str,
                      preprocessing: Preprocessing | None) -> Dataset:
    """:func:`load_spec` for the sources that are arrays (everything but an image folder)."""
    if kind == "digits":
        side = 8
        if colon:
            try:
                side = int(arg)
            except ValueError:
                raise DataError(f"data spec {spec!r}: SIZE in digits:SIZE must be an integer, "
                                f"e.g. digits:28") from None
        try:
            return load_digits(size=side, preprocessing=preprocessing)
        except DataError as exc:
            raise DataError(f"data spec {spec!r}: {exc}") from exc
    if kind in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return load_fashion_mnist(arg or "train", preprocessing=preprocessing)
    if kind in ("npz", "idx") and colon:
        if not arg:
            raise DataError(f"data spec {spec!r} names no path; e.g. {kind}:data/train."
                            f"{'npz' if kind == 'npz' else 'gz'}")
        if kind == "npz":
            return load_npz(arg, preprocessing=preprocessing)
        parts = [part.strip() for part in arg.split(",")]
        if len(parts) != 2 or not all(parts):
            raise DataError(f"data spec {spec!r}: expected idx:IMAGES,LABELS (two paths "
                            f"separated by a comma)")
        return load_idx(parts[0], parts[1], preprocessing=preprocessing)
    path = Path(text)
    if text.lower().endswith(".npz"):
        return load_npz(path, preprocessing=preprocessing)
    hint = "" if path.exists() else " (no such file or folder either)"
    raise DataError(f"unknown data spec {spec!r}{hint}; accepted forms: {', '.join(SPEC_FORMS)}")
