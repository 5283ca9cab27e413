"""Validation at the data boundary: arrays, labels, class names, sizes, files; each error
names the argument or file at fault."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError, ModelFileNotFoundError
from ..memory import available_bytes

if TYPE_CHECKING:
    from .dataset import Dataset

#: The most classes onnxaom counts: a label beyond it is taken for a mistake (an id, a pixel
#: value), refused before the per-class arrays are allocated.
MAX_CLASSES = 100_000
_FINITE_CHUNK = 8192  # images per chunk when checking a whole array for NaN/inf
PathLike = str | os.PathLike[str]




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
    """The default :attr:`Preprocessing.scale` for images of ``dtype``: 1/255 for uint8 and
    1/65535 for uint16 (8- and 16-bit pixels in [0, 1], as image files of either depth
    become), else 1 (floats, and other integers, are taken as they are)."""
    dtype = np.dtype(dtype)
    return 1 / 255 if dtype == np.uint8 else 1 / 65535 if dtype == np.uint16 else 1.0


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
