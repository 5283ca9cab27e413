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
the same 0..255 scale, divided by 257), uint16 arrays by 1/65535, and scikit-learn's digits
(0..16) by 1/16. Other dtypes are taken as they are. An explicit :class:`Preprocessing`
replaces the default; either way the preprocessing is recorded.

Modules: :mod:`.dataset` (the data set), :mod:`.preprocessing`, :mod:`.files` (``.npz``, IDX,
digits, specs), :mod:`.images` (image folders), :mod:`.batching`, and :mod:`.checks` (validation
at this boundary). Everything public is importable from ``onnxaom.data``.
"""

from __future__ import annotations

from .batching import array_dtype, float_pixels, iter_batches
from .checks import MAX_CLASSES, PathLike, as_class_names, default_scale
from .dataset import Dataset, from_arrays
from .files import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    NPZ_IMAGE_KEYS,
    NPZ_LABEL_KEYS,
    SPEC_FORMS,
    load_digits,
    load_fashion_mnist,
    load_idx,
    load_npz,
    load_spec,
    read_idx,
)
from .images import IMAGE_SUFFIXES, load_image_folder
from .preprocessing import LAYOUTS, Preprocessing

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "IMAGE_SUFFIXES",
    "LAYOUTS",
    "MAX_CLASSES",
    "NPZ_IMAGE_KEYS",
    "NPZ_LABEL_KEYS",
    "SPEC_FORMS",
    "Dataset",
    "PathLike",
    "Preprocessing",
    "array_dtype",
    "as_class_names",
    "default_scale",
    "float_pixels",
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
