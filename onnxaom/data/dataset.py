"""The labelled data set every loader returns: :class:`Dataset`, and :func:`from_arrays`."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..errors import DataError
from .checks import (
    _as_labels,
    _check_4d,
    _check_finite,
    _check_fits,
    _check_numeric,
    _finite_float,
    _readonly,
    _size_pair,
    _to_numpy,
    as_class_names,
    default_scale,
)
from .preprocessing import (
    Preprocessing,
    _resize_bilinear,
)

log = logging.getLogger(__name__)




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

    def split(self, fraction: float, seed: int | None = 0) -> tuple[Dataset, Dataset]:
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
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int | np.integer)
                                 or seed < 0):
            raise DataError(f"seed must be an integer >= 0 (or None: a fresh draw), got "
                            f"{seed!r}")
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
