"""Labelled images in, float32 (N, C, H, W) batches out: loaders, preprocessing, batching.

The first step of the pipeline. Every loader returns a :class:`Dataset`: preprocessed float32
images of shape (N, C, H, W), int64 labels of shape (N,) in 0..C-1, class names, a readable
source and the :class:`Preprocessing` that was applied, so that statistics can record exactly
what the model saw (:meth:`Dataset.metadata`). :func:`iter_batches` is the one normaliser that
collection uses: a Dataset, an array pair or an iterable of ``(images, labels)`` batches (a
torch DataLoader works; torch is never imported here) becomes validated numpy batches.

Sources:

* numpy arrays: :func:`from_arrays`; ``.npz`` archives: :func:`load_npz`;
* IDX files, raw or gzipped (MNIST, Fashion-MNIST): :func:`read_idx`, :func:`load_idx`,
  :func:`load_fashion_mnist` (Debian package ``dataset-fashion-mnist``);
* a folder with one subfolder of images per class: :func:`load_image_folder` (needs Pillow);
* scikit-learn's 8x8 digits: :func:`load_digits` (needs scikit-learn);
* the CLI's ``--data SPEC`` strings: :func:`load_spec`.

Default scaling: 8-bit pixels become [0, 1] wherever images enter onnxaom, as in torchvision's
``ToTensor``: uint8 arrays (:func:`from_arrays`, ``.npz``, IDX, arrays and uint8 batches given
to :func:`iter_batches`) and image files are scaled by 1/255 (16-bit image files are read on
the same 0..255 scale, divided by 257), and scikit-learn's digits (0..16) by 1/16. Other
dtypes are taken as they are. An explicit :class:`Preprocessing` replaces the default; either
way the preprocessing is recorded.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .errors import DataError, ModelFileNotFoundError
from .memory import available_bytes

__all__ = [
    "FASHION_MNIST_CLASSES",
    "MAX_CLASSES",
    "Dataset",
    "Preprocessing",
    "from_arrays",
    "iter_batches",
    "load_digits",
    "load_fashion_mnist",
    "load_idx",
    "load_image_folder",
    "load_npz",
    "load_spec",
    "read_idx",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: Layouts of the arrays given to :meth:`Preprocessing.apply`.
LAYOUTS = ("NCHW", "NHWC", "NHW")
#: Where the Debian package ``dataset-fashion-mnist`` puts its files.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
#: Fashion-MNIST's labels 0..9, as named by its authors (Zalando Research).
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: File suffixes :func:`load_image_folder` reads (case-insensitive).
IMAGE_SUFFIXES = (".bmp", ".gif", ".jfif", ".jpe", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".ppm",
                  ".tif", ".tiff", ".webp")
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
#: The most classes onnxaom counts: a label beyond it is taken for a mistake (an id, a pixel
#: value), refused before the per-class arrays are allocated.
MAX_CLASSES = 100_000
#: Images larger than this side are refused by :func:`load_digits` (1,797 images x side^2).
_MAX_DIGITS_SIDE = 1024
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_FINITE_CHUNK = 8192  # images per chunk when checking a whole array for NaN/inf


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """How raw pixel arrays become model input, applied in order:
    layout -> resize -> scale -> (x - mean) / std.

    Parameters
    ----------
    scale:
        Multiplies every pixel (e.g. 1/255 for uint8 images). Finite and non-zero.
    mean, std:
        Per-channel values, one per channel or a single value for all; ``None`` means 0 and 1.
    layout:
        Layout of the *input* arrays: "NCHW", "NHWC" or "NHW" (grayscale; adds C = 1).
    resize:
        ``(H, W)`` to resize to (bilinear, half-pixel centres as in torch's
        ``interpolate(..., align_corners=False)``), or ``None``.
    """

    scale: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "NCHW"
    resize: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        scale = _finite_float(self.scale, "Preprocessing.scale")
        if scale == 0.0:
            raise DataError("Preprocessing.scale must not be 0")
        mean = _float_tuple(self.mean, "Preprocessing.mean")
        std = _float_tuple(self.std, "Preprocessing.std")
        if std is not None and any(s <= 0.0 for s in std):
            raise DataError(f"Preprocessing.std must be positive, got {std}")
        if mean is not None and std is not None and 1 not in (len(mean), len(std)) \
                and len(mean) != len(std):
            raise DataError(
                f"Preprocessing.mean has {len(mean)} values but std has {len(std)}; give one "
                f"value per channel (or a single value) for both"
            )
        layout = self.layout.upper() if isinstance(self.layout, str) else self.layout
        if layout not in LAYOUTS:
            raise DataError(
                f"Preprocessing.layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}"
            )
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "resize", _size_pair(self.resize, "Preprocessing.resize"))

    def apply(self, images: ArrayLike) -> np.ndarray:
        """Preprocess raw images into a new float32 array.

        Parameters
        ----------
        images:
            Array of shape (N, C, H, W), (N, H, W, C) or (N, H, W), as ``layout`` says; any
            numeric dtype. The input is never modified.

        Returns
        -------
        C-contiguous float32 array of shape (N, C, H', W'), (H', W') being ``resize`` if set.
        """
        array = _to_numpy(images, "images")
        _check_numeric(array, "images")
        expected = 3 if self.layout == "NHW" else 4
        if array.ndim != expected:
            raise DataError(
                f"images: shape {array.shape} does not match Preprocessing.layout={self.layout!r}, "
                f"which expects a {expected}-D array {_LAYOUT_SHAPES[self.layout]}; "
                f"{_suggest_layout(array.shape)}"
            )
        if self.layout == "NHW":
            array = array[:, None, :, :]
        elif self.layout == "NHWC":
            array = array.transpose(0, 3, 1, 2)
        with np.errstate(over="ignore"):  # too large for float32 becomes inf: reported later
            out = array.astype(np.float32, order="C")  # always a fresh copy
        if self.resize is not None and out.shape[2:] != self.resize:
            _check_fits(out.shape[0] * out.shape[1] * self.resize[0] * self.resize[1] * 4 * 3,
                        f"resizing {out.shape[0]} images of {out.shape[1]} channel(s) to "
                        f"{self.resize[0]}x{self.resize[1]}")
            out = _resize_bilinear(out, self.resize)
        if self.scale != 1.0:
            out *= np.float32(self.scale)
        channels = out.shape[1]
        if self.mean is not None:
            out -= _per_channel(self.mean, channels, "mean")
        if self.std is not None:
            out /= _per_channel(self.std, channels, "std")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, inverse of :meth:`from_dict`."""
        return {
            "scale": self.scale,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "layout": self.layout,
            "resize": None if self.resize is None else list(self.resize),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Rebuild from :meth:`to_dict` output (missing keys take their defaults)."""
        if not isinstance(data, Mapping):
            raise DataError(f"preprocessing must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"scale", "mean", "std", "layout", "resize"})
        if unknown:
            raise DataError(
                f"unknown preprocessing keys {unknown}; expected scale, mean, std, layout, resize"
            )
        return cls(**data)


_LAYOUT_SHAPES = {"NCHW": "(N, C, H, W)", "NHWC": "(N, H, W, C)", "NHW": "(N, H, W)"}


def _suggest_layout(shape: tuple[int, ...]) -> str:
    if len(shape) == 3:
        return "for grayscale (N, H, W) images use Preprocessing(layout='NHW')"
    if len(shape) == 4:
        return "use layout='NHWC' if channels come last, 'NCHW' if they come second"
    return "images must be 3-D (N, H, W) or 4-D (N, C, H, W) / (N, H, W, C)"


def _per_channel(values: tuple[float, ...], channels: int, name: str) -> np.ndarray:
    if len(values) not in (1, channels):
        raise DataError(
            f"Preprocessing.{name} has {len(values)} values but the images have {channels} "
            f"channel(s); give one value per channel or a single value"
        )
    return np.asarray(values, dtype=np.float32).reshape(1, -1, 1, 1)


def _resize_bilinear(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of float32 (N, C, H, W) to (N, C, *size), half-pixel centres."""

    def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0.0, n_in - 1)
        lo = np.floor(src).astype(np.intp)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo).astype(np.float32)

    y0, y1, wy = taps(images.shape[2], size[0])
    x0, x1, wx = taps(images.shape[3], size[1])
    wy = wy[:, None]
    rows = images[:, :, y0, :] * (1.0 - wy) + images[:, :, y1, :] * wy
    out = rows[:, :, :, x0] * (1.0 - wx) + rows[:, :, :, x1] * wx
    return np.ascontiguousarray(out, dtype=np.float32)


# --------------------------------------------------------------------------- the data set


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A labelled, preprocessed image set. Immutable: its arrays are read-only views.

    Loaders hand over fresh arrays. A float32 C-contiguous array passed here directly is not
    copied, so do not modify it afterwards.

    Parameters
    ----------
    images:
        Float32 array of shape (N, C, H, W), already preprocessed, finite; N >= 1.
    labels:
        Int64 array of shape (N,), class indices in 0..len(class_names)-1.
    class_names:
        One name per class.
    source:
        Where the data came from, for people, e.g. "sklearn digits (1797 images, 8x8)".
    preprocessing:
        What was applied to the raw pixels to get ``images``.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def __post_init__(self) -> None:
        images = _to_numpy(self.images, "images")
        _check_numeric(images, "images")
        _check_4d(images, "images")
        if images.shape[0] == 0:
            raise DataError("images: the data set is empty (0 images)")
        images = np.ascontiguousarray(images, dtype=np.float32)
        _check_finite(images, "images")
        labels = _as_labels(self.labels, "labels", images.shape[0])
        names = as_class_names(self.class_names)
        top = int(labels.max())
        if top >= len(names):
            raise DataError(
                f"labels: label {top} needs at least {top + 1} classes, but class_names has "
                f"{len(names)}: {list(names)}"
            )
        if not isinstance(self.preprocessing, Preprocessing):
            raise DataError(
                f"preprocessing must be a Preprocessing, got {type(self.preprocessing).__name__}"
            )
        object.__setattr__(self, "images", _readonly(images))
        object.__setattr__(self, "labels", _readonly(labels))
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "source", str(self.source))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        return (
            f"Dataset({self.source!r}, n={len(self)}, image_shape=({c}, {h}, {w}), "
            f"num_classes={self.num_classes})"
        )

    @property
    def num_classes(self) -> int:
        """C, the number of class names (some classes may have no samples after a split)."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def metadata(self) -> dict[str, Any]:
        """JSON-able description: source, preprocessing, n, class_names, image_shape."""
        return {
            "source": self.source,
            "preprocessing": self.preprocessing.to_dict(),
            "n": len(self),
            "class_names": list(self.class_names),
            "image_shape": list(self.image_shape),
        }

    def resized(self, size: int | tuple[int, int]) -> Dataset:
        """This data set with every image resized to ``size`` (H, W) by the bilinear resize of
        :class:`Preprocessing`, which is recorded as ``preprocessing.resize`` (refused when the
        loader resized them already: two resizes are not one). The images are
        already scaled and normalised; a bilinear resize (weights summing to 1) commutes with
        those per-channel affine steps, so the result is what loading with
        ``Preprocessing(resize=size)`` gives, up to float rounding."""
        pair = _size_pair(size, "size")
        if pair is None:
            raise DataError("size must be (H, W), got None")
        if self.images.shape[2:] == pair:
            return self
        if self.preprocessing.resize is not None:
            raise DataError(
                f"{self.source}: the images were already resized to "
                f"{self.preprocessing.resize[0]}x{self.preprocessing.resize[1]} when loaded; "
                f"resizing them again to {pair[0]}x{pair[1]} would give other pixels than one "
                f"resize of the originals, under the same recorded preprocessing. Load them at "
                f"the size wanted instead (e.g. digits:{pair[0]})")
        n, c = self.images.shape[:2]
        _check_fits(n * c * pair[0] * pair[1] * 4 * 3,
                    f"resizing {n} images of {c} channel(s) to {pair[0]}x{pair[1]}")
        return Dataset(_resize_bilinear(np.asarray(self.images), pair), self.labels,
                       self.class_names, f"{self.source}, resized to {pair[0]}x{pair[1]}",
                       replace(self.preprocessing, resize=pair))

    def split(self, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Stratified random split into two data sets.

        Parameters
        ----------
        fraction:
            Share of the samples in the first part, in (0, 1). Every class is split in this
            proportion (rounded so that the first part has round(fraction * N) samples).
        seed:
            Seed of the random choice; the same seed gives the same split.

        Returns
        -------
        (first, rest): both keep the sample order, class names and preprocessing of ``self``.
        """
        fraction = _finite_float(fraction, "fraction")
        if not 0.0 < fraction < 1.0:
            raise DataError(f"fraction must be strictly between 0 and 1, got {fraction}")
        rng = np.random.default_rng(seed)
        n = len(self)
        classes, inverse = np.unique(self.labels, return_inverse=True)
        sizes = np.bincount(inverse, minlength=len(classes))
        ideal = fraction * sizes
        take = np.floor(ideal).astype(np.int64)
        # largest remainders get the leftover samples, so the total is exactly round(fraction*N)
        leftover = math.floor(fraction * n + 0.5) - int(take.sum())
        take[np.argsort(take - ideal, kind="stable")[:leftover]] += 1
        chosen = np.zeros(n, dtype=bool)
        for k, count in enumerate(take):
            members = np.flatnonzero(inverse == k)
            chosen[rng.permutation(members)[:count]] = True
        first, rest = np.flatnonzero(chosen), np.flatnonzero(~chosen)
        if first.size == 0 or rest.size == 0:
            raise DataError(
                f"split(fraction={fraction}) of {n} images leaves one part empty; "
                f"choose a fraction between {1 / n:.3g} and {1 - 1 / n:.3g}"
            )
        tag = f"split {fraction:g} seed {seed}"
        return (
            Dataset(self.images[first], self.labels[first], self.class_names,
                    f"{self.source} [{tag}: first]", self.preprocessing),
            Dataset(self.images[rest], self.labels[rest], self.class_names,
                    f"{self.source} [{tag}: rest]", self.preprocessing),
        )


def from_arrays(
    images: ArrayLike,
    labels: ArrayLike,
    *,
    preprocessing: Preprocessing | None = None,
    class_names: Sequence[str] | None = None,
    source: str = "arrays",
) -> Dataset:
    """A :class:`Dataset` from in-memory arrays.

    Parameters
    ----------
    images:
        Raw images laid out as ``preprocessing.layout`` says (default (N, C, H, W)); any
        numeric dtype; numpy arrays, CPU torch tensors or nested lists.
    labels:
        Integer class indices of shape (N,), >= 0.
    preprocessing:
        Applied to ``images``; default NCHW, scaled by 1/255 for uint8 images (pixels in
        [0, 1]), else not scaled.
    class_names:
        One name per class; default "0".."max(labels)".
    source:
        A readable description of where the arrays came from.
    """
    raw = _to_numpy(images, "images")
    if raw.ndim == 0 or raw.shape[0] == 0:
        raise DataError(f"images: the data set is empty (shape {raw.shape})")
    if preprocessing is None:
        preprocessing = Preprocessing(scale=default_scale(raw.dtype))
    y = _as_labels(labels, "labels", raw.shape[0])
    x = preprocessing.apply(raw)
    names = tuple(str(i) for i in range(int(y.max()) + 1)) if class_names is None \
        else as_class_names(class_names)
    dataset = Dataset(x, y, names, source, preprocessing)
    log.debug("loaded %r", dataset)
    return dataset


# --------------------------------------------------------------------------- file loaders


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


def load_image_folder(
    path: PathLike,
    *,
    size: int | tuple[int, int] | None = None,
    grayscale: bool | None = None,
    preprocessing: Preprocessing | None = None,
) -> Dataset:
    """A :class:`Dataset` from a folder with one subfolder of images per class (needs Pillow).

    Class names are the sorted subfolder names; a class's images are every image file in its
    subfolder and the folders below it (as torchvision's ``ImageFolder`` reads them; names
    starting with "." are left out), read in sorted order. Pixels are read on the 8-bit scale
    0..255 (16-bit grayscale images, and 32-bit integer ones whose values fit 16 bits, are
    divided by 257, so the default scaling maps both to [0, 1]; Pillow reads 16-bit colour
    images as 8-bit). Floating-point images (Pillow mode ``F``) have no known scale and are
    refused. The stored orientation is read, as torchvision reads it: an EXIF orientation
    tag is not applied.

    Parameters
    ----------
    path:
        The folder, e.g. ``data/cat/*.png``, ``data/dog/*.png``.
    size:
        ``(H, W)`` (or one int for a square) to resize every image to (bilinear), recorded as
        ``preprocessing.resize``. Required when the images differ in size.
    grayscale:
        One channel (True) or RGB (False). Default: grayscale if every image is.
    preprocessing:
        Default ``Preprocessing(scale=1/255)``: pixels in [0, 1]. The loader arranges pixels as
        NCHW itself, so its layout must stay "NCHW".

    Returns
    -------
    Dataset with images of shape (N, 1 or 3, H, W).
    """
    folder = Path(path)
    if not folder.exists():
        raise ModelFileNotFoundError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise DataError(f"{folder} is a file; expected a folder with one subfolder per class")
    preprocessing = Preprocessing(scale=1 / 255) if preprocessing is None else preprocessing
    if preprocessing.layout != "NCHW":
        raise DataError(
            f"load_image_folder arranges pixels as NCHW itself; leave preprocessing.layout at "
            f"'NCHW' (got {preprocessing.layout!r})"
        )
    target = _size_pair(size, "size")
    if target is not None and preprocessing.resize not in (None, target):
        raise DataError(f"size={target} conflicts with preprocessing.resize="
                        f"{preprocessing.resize}; give one of them")
    target = target or preprocessing.resize
    Image = _import_pillow()

    classes = sorted(d.name for d in _folder_entries(folder)
                     if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{folder}: no class subfolders; expected one subfolder of images per "
                        f"class, e.g. {folder / 'cat' / '0001.png'}")
    files: list[Path] = []
    labels: list[int] = []
    skipped: list[Path] = []
    for index, name in enumerate(classes):
        found, others = _class_files(folder / name)
        if not found:
            raise DataError(f"{folder / name}: class folder with no images (looked for "
                            f"{', '.join(IMAGE_SUFFIXES)}, in it and the folders below it)")
        files += found
        labels += [index] * len(found)
        skipped += others
    if skipped:
        log.warning("%s: skipped %d file(s) that are not images by their suffix (%s%s)", folder,
                    len(skipped), skipped[0], ", ..." if len(skipped) > 1 else "")

    if grayscale is None:
        colour = next((f for f in files if _image_mode(Image, f) not in _GRAY_MODES), None)
        grayscale = colour is None
        if colour is not None:
            log.info("%s: reading every image as RGB (%s is in colour); pass grayscale=True "
                     "for one channel", folder, colour)
    mode = "L" if grayscale else "RGB"
    pixels: list[np.ndarray] = []
    for f in files:
        array = _read_image(Image, f, mode)
        if target is not None and array.shape[1:] != target:
            array = _resize_bilinear(array[None].astype(np.float32), target)[0]
        elif pixels and array.shape != pixels[0].shape:
            raise DataError(
                f"images differ in size: {files[0]} is {pixels[0].shape[1:]} (H, W) but {f} is "
                f"{array.shape[1:]}; resize them all with size=(H, W) (on the command line: "
                f"--resize H,W)"
            )
        pixels.append(array)
    stacked = np.stack(pixels)
    images = replace(preprocessing, resize=None).apply(stacked)  # resized per image above
    dataset = Dataset(
        images, np.asarray(labels, dtype=np.int64), tuple(classes),
        f"image folder {folder} ({len(files)} images, {len(classes)} classes)",
        replace(preprocessing, resize=target),
    )
    log.debug("loaded %r", dataset)
    return dataset


def _import_pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("load_image_folder needs Pillow: pip install Pillow") from exc
    return Image


def _class_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """A class folder's image files, in it and below it, sorted, and the other files (names
    starting with "." left out of both). Links to folders are followed, as torchvision's
    ``ImageFolder`` follows them, each real folder once (a link may loop)."""
    images: list[Path] = []
    others: list[Path] = []
    seen: set[str] = set()

    def fail(exc: OSError) -> None:
        raise DataError(f"{exc.filename or folder}: cannot list the folder "
                        f"({exc.strerror or exc})") from exc

    for root, dirs, names in os.walk(folder, onerror=fail, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # reached again through a link: its files are counted already
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = Path(root) / name
            try:
                regular = path.is_file()
            except OSError as exc:  # a folder that can be listed but not entered
                raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
            if name.startswith(".") or not regular:  # hidden, or a broken link
                continue
            (images if path.suffix.lower() in IMAGE_SUFFIXES else others).append(path)
    return sorted(images), others


def _image_errors(image_module: Any) -> tuple[type[BaseException], ...]:
    """What Pillow raises for a file it cannot read: OSError (UnidentifiedImageError too),
    ValueError, and DecompressionBombError for an image above ``Image.MAX_IMAGE_PIXELS``."""
    bomb = getattr(image_module, "DecompressionBombError", None)
    return (OSError, ValueError) + ((bomb,) if isinstance(bomb, type) else ())


def _image_mode(image_module: Any, file: Path) -> str:
    try:
        with image_module.open(file) as image:
            return str(image.mode)
    except _image_errors(image_module) as exc:
        raise DataError(f"{file}: cannot read image ({exc})") from exc


def _read_image(image_module: Any, file: Path, mode: str) -> np.ndarray:
    """Pixels of one image, (C, H, W) on the 8-bit scale: uint8, or float32 for a 16-bit
    grayscale image (its values / 257, so 65535 becomes 255; read as RGB, the one channel
    three times: Pillow's own conversion would clip every value above 255 to white)."""
    try:
        with image_module.open(file) as image:
            if image.mode == "F":
                raise DataError(
                    f"{file}: a floating-point image (Pillow mode F) has no known pixel scale; "
                    f"convert it to 8 or 16 bits, or read the pixels yourself and pass them "
                    f"with onnxaom.from_arrays")
            if image.mode in _SIXTEEN_BIT_MODES:
                array = np.asarray(image, dtype=np.float32)
                if array.size and (array.min() < 0 or array.max() > 65535):
                    raise DataError(
                        f"{file}: a 32-bit integer image with values from {array.min():.0f} "
                        f"to {array.max():.0f}, beyond 16 bits, has no known pixel scale; "
                        f"read the pixels yourself and pass them with onnxaom.from_arrays")
                array /= np.float32(257.0)
                if mode == "RGB":
                    array = np.repeat(array[:, :, None], 3, axis=2)
            else:
                array = np.asarray(image.convert(mode), dtype=np.uint8)
    except DataError:
        raise
    except _image_errors(image_module) as exc:
        raise DataError(f"{file}: cannot read image ({exc})") from exc
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _folder_entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as exc:  # permission denied, a folder removed while reading
        raise DataError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from exc


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
    spec: str,
    *,
    preprocessing: Preprocessing | None = None,
    channels: int | None = None,
    size: int | tuple[int, int] | None = None,
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
    """
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3 (or None), got {channels!r}")
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
                                 grayscale=None if channels is None else channels == 1)
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


# --------------------------------------------------------------------------- batching


def iter_batches(
    images: Dataset | ArrayLike | Iterable[Any],
    labels: ArrayLike | None = None,
    *,
    batch_size: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Validated numpy batches from any accepted form of labelled data.

    Parameters
    ----------
    images:
        A :class:`Dataset`; or an array of shape (N, C, H, W) (numeric, finite; a CPU torch
        tensor works) with ``labels``; or an iterable of ``(images, labels)`` batches of shapes
        (n, C, H, W) and (n,), such as a torch DataLoader, with ``labels`` left as None.
    labels:
        Integer class indices of shape (N,), >= 0; only with an array of images.
    batch_size:
        Samples per batch for a Dataset or arrays (the last batch may be smaller). An iterable's
        batches keep their own sizes (empty ones are skipped).

    Yields
    ------
    (images, labels): C-contiguous float32 of shape (n, C, H, W) and int64 of shape (n,).
    uint8 images are scaled by 1/255 (see the module docstring); others are only converted.
    Batches may be read-only views: do not modify them.

    Raises
    ------
    DataError
        Naming the argument at fault. Arrays and Datasets are checked before this returns; an
        iterable's batches are checked as they arrive, and an iterable without any batch raises
        at its end.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) \
            or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    if isinstance(images, Dataset):
        if labels is not None:
            raise DataError("labels: a Dataset carries its own labels; pass labels=None")
        return _slices(images.images, images.labels, batch_size)
    if labels is not None and not _is_array_like(images) and isinstance(images, Iterable) \
            and not isinstance(images, str | bytes | list | tuple):
        raise DataError(
            f"labels: a {type(images).__name__} of (images, labels) batches carries its own "
            f"labels; pass labels=None (or give an images array with labels=)"
        )
    if labels is not None or _is_array_like(images):
        if labels is None:
            raise DataError(
                "labels: missing; pass labels= an integer array of shape (N,) with the images "
                "array, or give a Dataset or an iterable of (images, labels) batches"
            )
        x = _to_numpy(images, "images")
        _check_numeric(x, "images")
        _check_4d(x, "images")
        y = _as_labels(labels, "labels", x.shape[0])
        if x.shape[0] == 0:
            raise DataError("images: the data set is empty (0 images)")
        _check_finite(x, "images")
        return _slices(x, y, batch_size)
    if isinstance(images, str | bytes) or not isinstance(images, Iterable):
        raise DataError(
            f"images: expected a Dataset, an array of shape (N, C, H, W) with labels, or an "
            f"iterable of (images, labels) batches; got {type(images).__name__}"
        )
    return _stream(images)


def _slices(
    x: np.ndarray, y: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, x.shape[0], batch_size):
        stop = start + batch_size
        yield _float_pixels(x[start:stop]), y[start:stop]


def _float_pixels(x: np.ndarray) -> np.ndarray:
    """float32 C-contiguous; uint8 scaled to [0, 1] by :func:`default_scale`."""
    out = np.ascontiguousarray(x, dtype=np.float32)
    scale = default_scale(x.dtype)
    return out * np.float32(scale) if scale != 1.0 else out


def _stream(batches: Iterable[Any]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    shape: tuple[int, ...] | None = None
    yielded = 0
    for index, item in enumerate(batches):
        if isinstance(item, str | bytes | Mapping) or not isinstance(item, Sequence) \
                or len(item) != 2:
            raise DataError(
                f"images: item {index} of the iterable is a {type(item).__name__}; expected an "
                f"(images, labels) pair such as a DataLoader yields"
            )
        name = f"images (batch {index})"
        x = _to_numpy(item[0], name)
        _check_numeric(x, name)
        if x.ndim == 3 and np.ndim(_to_numpy(item[1], f"labels (batch {index})")) == 0:
            raise DataError(
                f"{name}: one image of shape {x.shape} with one label: the iterable yields "
                f"single samples, not batches; batch them (e.g. torch.utils.data.DataLoader("
                f"dataset, batch_size=256)) or give arrays of shape (N, C, H, W) with labels=")
        _check_4d(x, name)
        y = _as_labels(item[1], f"labels (batch {index})", x.shape[0])
        if shape is None:
            shape, first = x.shape[1:], x.dtype
        elif x.shape[1:] != shape:
            raise DataError(f"{name}: images of shape (C, H, W) = {x.shape[1:]}, but earlier "
                            f"batches had {shape}")
        elif default_scale(x.dtype) != default_scale(first):
            raise DataError(f"{name}: {x.dtype} pixels, but batch 0 had {first}; uint8 batches "
                            f"are scaled to [0, 1] and float ones taken as they are, so a stream "
                            f"must not mix them (convert every batch to one type)")
        if x.shape[0] == 0:
            continue
        with np.errstate(over="ignore"):  # too large for float32 becomes inf: reported below
            x = _float_pixels(x)
        _check_finite(x, name)
        yielded += 1
        yield x, y
    if yielded == 0:
        raise DataError("images: the data set is empty: the iterable gave no batch of images")


# --------------------------------------------------------------------------- validation


def _is_array_like(value: object) -> bool:
    return isinstance(value, np.ndarray) or any(
        hasattr(value, attribute) for attribute in ("__array__", "__array_interface__", "detach")
    )


def _to_numpy(value: Any, name: str) -> np.ndarray:
    """``value`` as a numpy array, without importing torch (``.detach().cpu().numpy()``)."""
    if isinstance(value, np.ndarray):
        return value
    try:
        if callable(getattr(value, "detach", None)):
            return np.asarray(value.detach().cpu().numpy())
        return np.asarray(value)
    except Exception as exc:  # ragged lists, foreign tensor types: report, whatever they raise
        raise DataError(f"{name}: cannot be converted to a numpy array ({exc})") from exc


def _check_numeric(array: np.ndarray, name: str) -> None:
    if array.dtype.kind not in "biuf":
        raise DataError(f"{name}: expected numbers, got dtype {array.dtype}")


def _check_4d(array: np.ndarray, name: str) -> None:
    if array.ndim != 4:
        raise DataError(
            f"{name}: expected a 4-D array of shape (N, C, H, W), got shape {array.shape}; "
            f"convert (N, H, W) or (N, H, W, C) arrays with from_arrays(images, labels, "
            f"preprocessing=Preprocessing(layout='NHW' or 'NHWC'))"
        )


def _check_finite(array: np.ndarray, name: str) -> None:
    """No NaN/inf in ``array`` (N, ...), also after a conversion to float32."""
    if array.dtype.kind not in "f":
        return
    for start in range(0, array.shape[0], _FINITE_CHUNK):
        with np.errstate(over="ignore"):  # too large for float32 becomes inf: reported below
            chunk = array[start:start + _FINITE_CHUNK].astype(np.float32, copy=False)
        finite = np.isfinite(chunk)
        if not finite.all():
            bad = start + int(np.flatnonzero(~finite.reshape(finite.shape[0], -1).all(axis=1))[0])
            raise DataError(f"{name}: image {bad} contains NaN or infinity (or a value too large "
                            f"for float32)")


def _as_labels(value: Any, name: str, n: int) -> np.ndarray:
    """Int64 labels of shape (n,), all >= 0 (a new array)."""
    labels = _to_numpy(value, name)
    if labels.ndim != 1:
        hint = ""
        if labels.ndim == 2:
            hint = ("; one column of class indices? pass labels.ravel()" if labels.shape[1] == 1
                    else "; one-hot labels? pass labels.argmax(axis=1)")
        raise DataError(f"{name}: expected a 1-D array of shape (N,), got shape "
                        f"{labels.shape}{hint}")
    if labels.dtype.kind not in "iu" and labels.size:  # an empty list is float64: allow it
        hint = "; convert with labels.astype(int)" if labels.dtype.kind == "f" else ""
        raise DataError(f"{name}: class indices must be integers, got dtype {labels.dtype}{hint}")
    if labels.shape[0] != n:
        raise DataError(f"{name}: {labels.shape[0]} labels for {n} images; need one per image")
    if labels.size and labels.min() < 0:
        at = int(np.argmin(labels))
        raise DataError(f"{name}: negative label {int(labels[at])} at index {at}; labels are "
                        f"class indices 0..C-1")
    if labels.size and labels.max() >= MAX_CLASSES:
        at = int(np.argmax(labels))
        raise DataError(f"{name}: label {int(labels[at])} at index {at} is beyond "
                        f"{MAX_CLASSES - 1:,}; labels are class indices 0..C-1 (C <= "
                        f"{MAX_CLASSES:,}): map ids to indices first, e.g. "
                        f"np.unique(labels, return_inverse=True)")
    return labels.astype(np.int64)


def default_scale(dtype: np.dtype[Any]) -> float:
    """The default :attr:`Preprocessing.scale` for images of ``dtype``: 1/255 for uint8 (pixels
    in [0, 1]), else 1."""
    return 1 / 255 if np.dtype(dtype) == np.uint8 else 1.0


def array_dtype(images: Any) -> np.dtype[Any] | None:
    """The element type of an array-like of images (numpy, a CPU torch tensor, nested lists),
    None for anything else (a Dataset, an iterable of batches)."""
    if isinstance(images, Dataset) or not (_is_array_like(images) or isinstance(images, list)):
        return None
    try:
        return _to_numpy(images, "images").dtype
    except DataError:
        return None


def as_class_names(value: Any) -> tuple[str, ...]:
    """Class names as a tuple of distinct strings; UTF-8 bytes are decoded, and a bare string is
    refused (not split into letters)."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable) \
            or (isinstance(value, np.ndarray) and value.ndim != 1):
        raise DataError(f"class_names must be a sequence of names (one per class), got "
                        f"{type(value).__name__} {value!r:.60}")
    names = tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n)
                  for n in value)
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"class_names has duplicates: {repeated}")
    return names


def _check_fits(need: int, what: str) -> None:
    """Refuse an allocation of ``need`` bytes that the memory available now cannot hold."""
    memory = available_bytes()
    if memory is not None and need > memory:
        raise DataError(f"{what} needs about {need / 2**30:.1f} GiB, more than the "
                        f"{memory / 2**30:.1f} GiB of memory available")


def _finite_float(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise DataError(f"{name} must be finite, got {value!r}")
    return number


def _float_tuple(values: Any, name: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    if isinstance(values, int | float | np.number):
        values = (values,)
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise DataError(f"{name} must be a sequence of numbers (one per channel), got {values!r}")
    numbers = tuple(_finite_float(v, name) for v in values)
    if not numbers:
        raise DataError(f"{name} is empty; give one value per channel or None")
    return numbers


def _size_pair(value: Any, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int | np.integer) else value
    try:
        h, w = pair
    except (TypeError, ValueError):
        raise DataError(f"{name} must be (H, W), got {value!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise DataError(f"{name} must be two positive integers (H, W), got {value!r}")
    return int(h), int(w)


def _readonly(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.setflags(write=False)
    return view


def _existing_file(path: Any, what: str) -> Path:
    try:
        file = Path(path)
    except TypeError:
        raise DataError(f"{what} path must be a str or os.PathLike, got {path!r}") from None
    if not file.exists():
        raise ModelFileNotFoundError(f"{what} not found: {file}")
    if file.is_dir():
        raise DataError(f"{file} is a folder; expected an {what}")
    return file


def _is_gzip(file: Path) -> bool:
    with file.open("rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _read_bytes(file: Path) -> bytes:
    """The file's bytes, decompressed if it is gzip (whatever its name)."""
    try:
        if _is_gzip(file):
            with gzip.open(file, "rb") as handle:
                return handle.read()
        return file.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{file}: cannot read ({exc}); is the file complete?") from exc


def _with_file_context(file: Path, make: Callable[[], Dataset]) -> Dataset:
    """Run ``make()``, prefixing a DataError's message with ``file``."""
    try:
        return make()
    except DataError as exc:
        raise DataError(f"{file}: {exc}") from exc
