"""A folder with one subfolder of images per class: :func:`load_image_folder` (needs Pillow)."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, ModelFileNotFoundError
from .checks import (
    PathLike,
    _size_pair,
)
from .dataset import (
    Dataset,
)
from .preprocessing import (
    Preprocessing,
    _resize_bilinear,
)

log = logging.getLogger(__name__)

#: File suffixes :func:`load_image_folder` reads (case-insensitive).
IMAGE_SUFFIXES = (".bmp", ".gif", ".jfif", ".jpe", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".ppm",
                  ".tif", ".tiff", ".webp")
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})




def load_image_folder(
    path: PathLike,
    *,
    size: int | tuple[int, int] | None = None,
    grayscale: bool | None = None,
    preprocessing: Preprocessing | None = None,
    allow_empty_classes: bool = False,
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
    allow_empty_classes:
        Keep a class subfolder with no images as a class without samples (with a warning),
        for ``collect(..., allow_empty_classes=True)``; by default it is refused.

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
    empty: list[str] = []
    for index, name in enumerate(classes):
        found, others = _class_files(folder / name)
        if not found and not allow_empty_classes:
            raise DataError(f"{folder / name}: class folder with no images (looked for "
                            f"{', '.join(IMAGE_SUFFIXES)}, in it and the folders below it); "
                            f"remove it, or keep it as a class without samples with "
                            f"allow_empty_classes=True (--allow-empty-classes)")
        if not found:
            empty.append(name)
        files += found
        labels += [index] * len(found)
        skipped += others
    if skipped:
        log.warning("%s: skipped %d file(s) that are not images by their suffix (%s%s)", folder,
                    len(skipped), skipped[0], ", ..." if len(skipped) > 1 else "")
    if empty and not files:
        raise DataError(f"{folder}: no images in any class folder (looked for "
                        f"{', '.join(IMAGE_SUFFIXES)})")
    if empty:
        log.warning("%s: class folder(s) with no images kept as classes without samples: %s",
                    folder, ", ".join(empty))

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
