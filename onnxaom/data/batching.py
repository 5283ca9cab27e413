"""Batches for collection: :func:`iter_batches`, the one normaliser of a Dataset, an array pair
or an iterable of ``(images, labels)`` batches (a torch DataLoader works)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..errors import DataError
from .checks import (
    _as_labels,
    _check_4d,
    _check_finite,
    _check_numeric,
    _is_array_like,
    _to_numpy,
    default_scale,
)
from .dataset import (
    Dataset,
)


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
        yield float_pixels(x[start:stop]), y[start:stop]


def float_pixels(x: np.ndarray) -> np.ndarray:
    """float32 C-contiguous; uint8 and uint16 scaled to [0, 1] by :func:`default_scale`."""
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
            raise DataError(f"{name}: {x.dtype} pixels, but batch 0 had {first}; uint8 and "
                            f"uint16 batches are scaled to [0, 1] (by 1/255 and 1/65535) and "
                            f"float ones taken as they are, so a stream must not mix them "
                            f"(convert every batch to one type)")
        if x.shape[0] == 0:
            continue
        with np.errstate(over="ignore"):  # too large for float32 becomes inf: reported below
            x = float_pixels(x)
        _check_finite(x, name)
        yielded += 1
        yield x, y
    if yielded == 0:
        raise DataError("images: the data set is empty: the iterable gave no batch of images")


def array_dtype(images: Any) -> np.dtype[Any] | None:
    """The element type of an array-like of images (numpy, a CPU torch tensor, nested lists),
    None for anything else (a Dataset, an iterable of batches)."""
    if isinstance(images, Dataset) or not (_is_array_like(images) or isinstance(images, list)):
        return None
    try:
        return _to_numpy(images, "images").dtype
    except DataError:
        return None
