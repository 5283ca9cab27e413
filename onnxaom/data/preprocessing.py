"""Preprocessing: layout, scale, mean/std, resize, as :class:`Preprocessing` records and applies
it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..errors import DataError
from .checks import (
    _check_fits,
    _check_numeric,
    _finite_float,
    _float_tuple,
    _size_pair,
    _to_numpy,
)

#: Layouts of the arrays given to :meth:`Preprocessing.apply`.
LAYOUTS = ("NCHW", "NHWC", "NHW")




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
