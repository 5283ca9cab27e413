"""What a model's image input accepts: its name, shape (batch fixed or symbolic) and element
type, and the check that turns a batch of images into what it takes (:class:`ModelInput`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import DataError, ModelError
from .graph import dim_values
from .instrument import image_input

log = logging.getLogger(__name__)


@dataclass
class ModelInput:
    name: str
    dims: tuple[int | None, ...] | None  # None: the model declares no shape; anything goes
    dtype: np.dtype[Any]
    channels_last: bool = False  # set once a batch had to be transposed to fit

    @property
    def fixed_batch(self) -> int | None:
        return self.dims[0] if self.dims else None

    def check(self, images: np.ndarray) -> np.ndarray:
        """``images`` (N, C, H, W) as the model input takes them: its dtype, and channels
        last (N, H, W, C) for a model whose input is (Keras models converted by tf2onnx keep
        theirs): when the batch does not fit the input as it is but does once transposed."""
        if self.dims is None:
            return self._typed(images)
        if images.ndim != len(self.dims):
            raise DataError(
                f"images have shape {images.shape} per batch but model input {self.name!r} "
                f"expects rank {len(self.dims)} {self.expected()}"
            )
        differs = self._first_difference(images.shape)
        if differs is not None and images.ndim == 4 and \
                self._first_difference(images.transpose(0, 2, 3, 1).shape) is None:
            if not self.channels_last:
                log.info("model input %r is channels last %s: feeding the images as "
                         "(N, H, W, C)", self.name, self.expected())
                self.channels_last = True
            images = images.transpose(0, 2, 3, 1)
        elif differs is not None:
            raise DataError(
                f"images have shape {images.shape} per batch but model input {self.name!r} "
                f"expects {self.expected()} (axis {differs} differs); check the image size "
                f"(Preprocessing(resize=...), or --resize on the command line) and channels "
                f"(images are fed as (N, C, H, W), or as (N, H, W, C) to a channels-last input)"
            )
        return self._typed(images)

    def _typed(self, images: np.ndarray) -> np.ndarray:
        """``images`` in the input's element type. A uint8 input (a deployment model that
        takes raw pixels and scales them itself) gets 8-bit pixels back: onnxaom scales 8-bit
        images to [0, 1] (k / 255), so 255 times the images must be whole numbers in
        0..255; anything else (normalised or 16-bit images) is refused, not rounded."""
        if self.dtype != np.uint8 or images.dtype == np.uint8:
            return np.ascontiguousarray(images, dtype=self.dtype)
        pixels = np.asarray(images, dtype=np.float64) * 255.0
        whole = np.rint(pixels)
        if pixels.size and (whole.min() < 0 or whole.max() > 255
                            or np.abs(pixels - whole).max() > 1e-3):
            raise DataError(
                f"model input {self.name!r} takes 8-bit pixels (uint8); these images are not "
                f"8-bit images scaled to [0, 1] (values from {float(images.min()):.4g} to "
                f"{float(images.max()):.4g}, not all multiples of 1/255): give 8-bit images "
                f"(uint8 arrays, image files, IDX) without normalisation and without resizing "
                f"(a bilinear resize, --resize, gives pixels between the 8-bit levels: resize "
                f"the images to the model's size beforehand)")
        return np.ascontiguousarray(whole, dtype=np.uint8)

    def _first_difference(self, shape: tuple[int, ...]) -> int | None:
        """The first axis after the batch where ``shape`` differs from the input's known
        dims; None when it fits."""
        assert self.dims is not None
        for axis, (got, want) in enumerate(zip(shape[1:], self.dims[1:], strict=True)):
            if want is not None and got != want:
                return axis + 1
        return None

    def expected(self) -> str:
        if self.dims is None:
            return "(any shape)"
        return (
            "("
            + ", ".join("N" if i == 0 else (str(d) if d else "?") for i, d in enumerate(self.dims))
            + ")"
        )


def read_model_input(model: onnx.ModelProto) -> ModelInput:
    value = image_input(model)
    dims = dim_values(value.type)
    if dims is not None and len(dims) < 2:
        raise ModelError(
            f"model input {value.name!r} has shape {dims}; onnxaom needs a batch of images "
            f"(N, C, H, W)"
        )
    elem = value.type.tensor_type.elem_type
    if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE,
                    TensorProto.UINT8):
        raise ModelError(
            f"model input {value.name!r} has element type {TensorProto.DataType.Name(elem)}; "
            f"onnxaom feeds float images, or 8-bit pixels to a uint8 input"
        )
    return ModelInput(value.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(elem)))
