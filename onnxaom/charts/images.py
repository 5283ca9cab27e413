"""Colour scales and map images: the paper's palettes, quantisation to their bins, and the
indexed PNGs (whole maps and tiles sharing one header) that grid cells are drawn with."""

from __future__ import annotations

import base64
import functools
import math
import struct
import warnings
import zlib
from collections.abc import Sequence

import numpy as np


def _ramp(anchors: Sequence[str], n: int) -> tuple[str, ...]:
    """``n`` colours at the bin centres of a piecewise-linear RGB ramp through ``anchors``."""
    rgb = np.array([[int(a[i : i + 2], 16) for i in (1, 3, 5)] for a in anchors], dtype=float)
    stops = np.linspace(0.0, 1.0, len(anchors))
    centres = (np.arange(n) + 0.5) / n
    channels = [np.interp(centres, stops, rgb[:, j]) for j in range(3)]
    return tuple(
        "#" + "".join(f"{round(float(c[i])):02x}" for c in channels) for i in range(n)
    )


#: AOM (Fig. 2): 10 ordinal steps over [0, 1], never -> always (viridis anchors).
AOM_COLORS: tuple[str, ...] = _ramp(("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"), 10)
#: ODM (Fig. 3): 10 ordinal steps from dark blue (identical AOMs) to dark red (most different).
ODM_COLORS: tuple[str, ...] = (
    "#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0",
    "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f",
)  # fmt: skip
#: CSM (Fig. 4): two segments over [-1, 1]: -1 -> 0 red to yellow, 0 -> 1 cyan to purple.
CSM_COLORS: tuple[str, ...] = _ramp(("#c80000", "#ffe600"), 5) + _ramp(("#00e6ff", "#6e00aa"), 5)
#: Undefined values (a class with no samples gives NaN occurrences).
MISSING_COLOR = "#d9d9d9"


def quantize(values: np.ndarray, domain: tuple[float, float], n: int) -> np.ndarray:
    """Bin index of every value on a Vega ``quantize`` scale, uint8 of ``values``' shape.

    ``n`` equal bins over ``domain``; values outside are clamped to the end bins, as Vega does;
    NaN gets index ``n`` (drawn in :data:`MISSING_COLOR`).
    """
    lo, hi = domain
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        index = np.floor((values - lo) / (hi - lo) * n)
    index = np.where(np.isnan(values), n, np.clip(np.nan_to_num(index), 0, n - 1))
    return np.asarray(index, dtype=np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=16)
def _plte(palette: tuple[str, ...]) -> bytes:
    return bytes(int(c[i : i + 2], 16) for c in palette for i in (1, 3, 5))


def _palette_png(index: np.ndarray, palette: Sequence[str]) -> bytes:
    """An indexed-colour PNG of ``index`` (uint8 (h, w)) painted with ``palette`` (hex)."""
    h, w = index.shape
    if len(palette) <= 16:  # two pixels a byte
        depth = 4
        padded = index if w % 2 == 0 else np.pad(index, ((0, 0), (0, 1)))
        rows = (padded[:, 0::2] << 4) | padded[:, 1::2]
    else:
        depth, rows = 8, index
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows.astype(np.uint8)], axis=1)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, 3, 0, 0, 0)),
            _chunk(b"PLTE", _plte(tuple(palette))),
            _chunk(b"IDAT", zlib.compress(raw.tobytes(), 9)),
            _chunk(b"IEND", b""),
        )
    )


def _map_png(index: np.ndarray, palette: Sequence[str], upscale: int) -> bytes:
    """The PNG of a map of palette indices, each pixel ``upscale`` x ``upscale``."""
    if upscale > 1:  # nearest-neighbour here: browsers smooth an image they enlarge
        index = np.repeat(np.repeat(index, upscale, axis=0), upscale, axis=1)
    return _palette_png(index, (*palette, MISSING_COLOR))


def image_url(index: np.ndarray, palette: Sequence[str], upscale: int) -> str:
    return PNG_URL + base64.b64encode(_map_png(index, palette, upscale)).decode("ascii")


PNG_URL = "data:image/png;base64,"
#: An ancillary, private, safe-to-copy PNG chunk type that decoders skip: it pads the part of
#: a tile's PNG that every tile of a grid shares to a multiple of 3 bytes.
_PAD_CHUNK = b"onPd"


def tile_parts(index: np.ndarray, palette: Sequence[str], upscale: int) -> tuple[str, str]:
    """A tile's PNG (:func:`image_url`) in two base64 parts that concatenate to it: the
    header (signature, IHDR, PLTE and a padding chunk), the same for every tile of one size
    and palette, and the rest (IDAT and IEND). The header is padded to a multiple of 3
    bytes, so its base64 ends on a whole group and the tail's starts one. A grid stores the
    header once and each tile's tail (a third of the bytes of a whole small tile)."""
    png = _map_png(index, palette, upscale)
    body = png.index(b"IDAT") - 4  # the IDAT chunk's length field
    head = png[:body]
    pad = -(len(head) + 12) % 3
    head += _chunk(_PAD_CHUNK, bytes(pad))
    return (base64.b64encode(head).decode("ascii"),
            base64.b64encode(png[body:]).decode("ascii"))


def pool_maps(maps: np.ndarray, f: int) -> np.ndarray:
    """Average-pool the last two axes in f x f blocks (NaN-aware; ragged edges padded)."""
    h, w = maps.shape[-2:]
    if f <= 1:
        return maps
    ph, pw = math.ceil(h / f) * f, math.ceil(w / f) * f
    padded = np.asarray(maps, dtype=np.float64)
    if (ph, pw) != (h, w):
        pad = [(0, 0)] * (maps.ndim - 2) + [(0, ph - h), (0, pw - w)]
        padded = np.pad(padded, pad, constant_values=np.nan)
    blocks = padded.reshape(*maps.shape[:-2], ph // f, f, pw // f, f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks: NaN, on purpose
        return np.asarray(np.nanmean(blocks, axis=(-3, -1)))
