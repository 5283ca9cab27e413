"""The paper's views as Vega-Altair charts: AOM grid, ODM, CSM grid, selectivity, history.

Every function here is pure: statistics (and findings) in, an Altair chart out. Charts display
inline in Jupyter like any Altair chart, serialise with ``chart.to_dict()`` and render to PNG or
SVG with :func:`onnxaom.report.render`.

* :func:`aom_grid` (Fig. 2): rows are kernels in the cluster order of
  :func:`onnxaom.findings.kernel_order`, columns classes, each cell the kernel's H x W
  occurrence map on an ordinal (10-step) colormap over [0, 1]; redundant groups are framed in
  red, ineffective kernels in grey.
* :func:`odm_heatmap` (Fig. 3): the K x K occurrence difference matrix in the same order on an
  ordinal blue-to-red scale; clicking a row selects its kernel (shift-click adds, double-click
  clears).
* :func:`csm_grid` (Fig. 4): like the AOM grid, on the paper's two-segment scale over [-1, 1]
  (0 -> 1: cyan to purple; 0 -> -1: yellow to red).
* :func:`selectivity_bars` (eq. 4), :func:`selectivity_experiment` (Fig. 8) and
  :func:`tuning_history` (accuracy against parameters, one point per tuning step).
* :func:`layer_view`: all of a layer's views linked in one chart: kernels selected in the ODM
  are highlighted (and always shown) in the AOM and CSM grids and the selectivity bars, and a
  class menu filters the grids' columns.

Scale. A grid cell is not drawn as one rect per pixel: a 512-kernel x 10-class layer of
28 x 28 maps would be four million marks. Each (kernel, class) map is quantised to the colour
scale's bins here and shipped as one small indexed PNG (4-bit palette) drawn by an ``image``
mark, so a grid costs K x C marks, whatever H x W. Maps of 2 ``cell`` pixels a side or more are
average-pooled to fewer (an average of occurrence fractions is still one), so a tile stays
under (2 ``cell``)^2 pixels; small maps are enlarged here, nearest-neighbour, as browsers would
blur them. Grids of more than ``page_size`` kernels are paged (a slider picks the page;
selected kernels stay visible). The ODM is drawn with one rect per cell up to
``ODM_MAX_RECTS`` kernels (tooltips per cell) and as one K x K image above that, with one
transparent rect per row to take clicks, so 1,024 kernels cost one image and 1,024 rects.
Data are inlined as one JSON string per data set: Altair's row limit (``MaxRowsError``) does
not apply to it, and Altair copies it by reference. Colour legends use the very palettes the
PNGs are painted with (an invisible layer carries the colour scale).
"""

from __future__ import annotations

import base64
import functools
import json
import math
import struct
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import altair as alt
import numpy as np

from .errors import ReportError
from .stats import OccurrenceStats

__all__ = [
    "AOM_COLORS",
    "CSM_COLORS",
    "MISSING_COLOR",
    "ODM_COLORS",
    "ODM_MAX_RECTS",
    "aom_grid",
    "csm_grid",
    "kernel_selection",
    "layer_view",
    "odm_heatmap",
    "quantize",
    "selectivity_bars",
    "selectivity_counts",
    "selectivity_experiment",
    "tuning_history",
]


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
#: The ODM is drawn with one rect per cell up to this many kernels, as one image above it.
ODM_MAX_RECTS = 64

_SELECT_COLOR = "#ff7f0e"
_FRAME_KINDS = ("redundant group", "ineffective")
_FRAME_COLORS = ("#d62728", "#7f7f7f")
_ALL_CLASSES = ""


# --------------------------------------------------------------------------- colour and images
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


def _image_url(index: np.ndarray, palette: Sequence[str], upscale: int) -> str:
    return PNG_URL + base64.b64encode(_map_png(index, palette, upscale)).decode("ascii")


PNG_URL = "data:image/png;base64,"
#: An ancillary, private, safe-to-copy PNG chunk type that decoders skip: it pads the part of
#: a tile's PNG that every tile of a grid shares to a multiple of 3 bytes.
_PAD_CHUNK = b"onPd"


def _tile_parts(index: np.ndarray, palette: Sequence[str], upscale: int) -> tuple[str, str]:
    """A tile's PNG (:func:`_image_url`) in two base64 parts that concatenate to it: the
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


def _pool(maps: np.ndarray, f: int) -> np.ndarray:
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


# --------------------------------------------------------------------------- per-layer data
@dataclass(frozen=True)
class _Group:
    members: tuple[int, ...]
    representative: int | None


@dataclass(frozen=True)
class _Layer:
    """Everything the views of one layer share, computed once."""

    name: str
    classes: tuple[str, ...]
    aom: np.ndarray  # (K, C, H, W)
    order: np.ndarray  # (K,) kernel shown in row r
    rank: np.ndarray  # (K,) row of kernel k
    rows: tuple[str, ...]  # y value of kernel k: zero-padded rank | label (sorts as shown)
    groups: tuple[_Group, ...]
    ineffective: tuple[tuple[int, str], ...]  # (kernel, reason)
    page_size: int

    @property
    def kernels(self) -> int:
        return int(self.aom.shape[0])

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.kernels / self.page_size))

    def page(self, k: int) -> int:
        return int(self.rank[k]) // self.page_size + 1

    def group_label(self, k: int) -> str:
        for i, group in enumerate(self.groups):
            if k in group.members:
                return f"G{i + 1}"
        return ""


def _attr(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if isinstance(obj, Mapping) and name in obj:
            return obj[name]
        if hasattr(obj, name):
            return getattr(obj, name)
    return default


def _layer_findings(findings: Any, layer: str) -> Any:
    """The findings of ``layer`` from a Findings, a LayerFindings, or None."""
    if findings is None:
        return None
    layers = _attr(findings, "layers")
    if layers is None:
        return findings  # already one layer's findings
    if isinstance(layers, Mapping):
        return layers.get(layer)
    for item in layers:
        if _attr(item, "layer", "name") == layer:
            return item
    return None


def _as_groups(groups: Iterable[Any]) -> tuple[_Group, ...]:
    out = []
    for group in groups:
        if isinstance(group, _Group):
            out.append(group)
            continue
        members = _attr(group, "members")
        rep = _attr(group, "representative")
        if members is None:  # a bare sequence of kernels, or (members, representative)
            seq = list(group)
            if len(seq) == 2 and not np.isscalar(seq[0]):
                members, rep = seq
            else:
                members = seq
        out.append(_Group(tuple(int(k) for k in members), None if rep is None else int(rep)))
    return tuple(out)


def _over_present(measure: Callable[[str], np.ndarray], layer: str) -> np.ndarray:
    """``measure(layer)`` (an :class:`OccurrenceStats` method: eqs. 2-4 over the classes with
    samples), without the AOM's warning about classes without samples: collect warned already,
    and the views draw those classes blank."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="classes with no samples",
                                category=RuntimeWarning)
        return measure(layer)


def _prepare(
    stats: OccurrenceStats,
    layer: str,
    findings: Any = None,
    *,
    order: Sequence[int] | np.ndarray | None = None,
    groups: Iterable[Any] | None = None,
    ineffective: Iterable[Any] | None = None,
    page_size: int = 64,
) -> _Layer:
    if page_size < 1:
        raise ReportError(f"page_size must be at least 1, got {page_size}")
    aom = stats.aom(layer, warn=False)  # collect warned; the views draw those classes blank
    k = aom.shape[0]
    found = _layer_findings(findings, layer)
    if order is None and found is not None:
        order = _attr(found, "kernel_order", "order")
    if order is None and (stats.class_sizes > 0).sum() < 2:
        order = np.arange(k)  # nothing to cluster on with one class: kernel index order
    if order is None:
        from .findings import kernel_order  # the one clustering of the project

        order = kernel_order(aom)
    order_arr = np.asarray(order, dtype=np.int64).reshape(-1)
    if sorted(order_arr.tolist()) != list(range(k)):
        raise ReportError(
            f"kernel order for layer {layer!r} must list each of its {k} kernels (0..{k - 1}) "
            f"once; got {order_arr.size} entries: {order_arr.tolist()[:12]}"
            f"{' ...' if order_arr.size > 12 else ''}. Pass the layer's findings or "
            f"onnxaom.findings.kernel_order(stats.aom(layer))"
        )
    if groups is None:
        groups = _attr(found, "redundant_groups", "groups", default=()) if found is not None else ()
    if ineffective is None:
        # IneffectiveKernel records (kernel, reason) or bare kernel indices
        ineffective = _attr(found, "ineffective", default=()) if found is not None else ()
    rank = np.empty(k, dtype=np.int64)
    rank[order_arr] = np.arange(k)
    digits = len(str(max(k - 1, 0)))
    rows = tuple(f"{int(rank[i]):0{digits}d}|k{i}" for i in range(k))
    return _Layer(
        name=layer,
        classes=_shown_class_names(stats.class_names),
        aom=aom,
        order=order_arr,
        rank=rank,
        rows=rows,
        groups=_as_groups(groups),
        ineffective=tuple(
            (int(_attr(i, "kernel", default=i)), str(_attr(i, "reason", default="")))
            for i in ineffective
        ),
        page_size=page_size,
    )


def _runs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers in sorted ``ranks``: (first, last) pairs."""
    runs: list[tuple[int, int]] = []
    for r in sorted(ranks):
        if runs and r == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], r)
        else:
            runs.append((r, r))
    return runs


def _data(records: list[dict[str, Any]]) -> alt.InlineData:
    """Records inlined as one JSON string.

    Altair deep-copies list-of-dict data on every chart operation (seconds for the 5,120
    tiles of a 512-kernel layer) and its row limit (``MaxRowsError``) applies to data frames;
    a string is copied by reference and passes through as is. Vega parses it on load.
    """
    text = json.dumps(records, separators=(",", ":"), allow_nan=False)
    return alt.InlineData(values=text, format=alt.JsonDataFormat(type="json"))


def _r(x: float) -> float | None:
    return None if not math.isfinite(x) else round(float(x), 4)


# --------------------------------------------------------------------------- shared encodings
def _row_axis(title: str | None = "kernel (cluster order)", labels: bool = True) -> alt.Axis:
    return alt.Axis(
        title=title,
        labels=labels,
        ticks=False,
        domain=False,
        labelExpr="split(datum.label, '|')[1]",
    )


def _row_y(layer: _Layer, *, padding: float = 0.08, labels: bool = True) -> alt.Y:
    return alt.Y(
        "row:N",
        sort="ascending",
        scale=alt.Scale(type="band", paddingInner=padding, paddingOuter=padding / 2),
        axis=_row_axis(labels=labels),
    )


def _row_filter(
    page: int | alt.Parameter | None, kernels: alt.Parameter | None
) -> Any | None:
    """Rows shown: the current page, plus (when linked) every selected kernel."""
    if page is None:
        return None
    on_page = f"datum.page == {page.name}" if isinstance(page, alt.Parameter) else (
        f"datum.page == {int(page)}"
    )
    if kernels is None:
        return on_page
    return {"or": [on_page, {"param": kernels.name, "empty": False}]}


def _shown_class_names(names: Sequence[str]) -> tuple[str, ...]:
    """Class names as the charts show them: Vega's expressions (a class sort, the class menu)
    cannot hold a line or paragraph separator (U+2028, U+2029), and the menu's "all" is the
    empty string, so those become a space and ``"(unnamed)"``; a name that then repeats gets its
    class index."""
    shown = [str(n).replace("\u2028", " ").replace("\u2029", " ") or "(unnamed)" for n in names]
    return tuple(f"{n} (class {i})" if shown.count(n) > 1 else n for i, n in enumerate(shown))


def _class_filter(classes: alt.Parameter | Sequence[str] | None) -> Any | None:
    if classes is None:
        return None
    if isinstance(classes, alt.Parameter):
        return f"{classes.name} == '' || datum.class_name == {classes.name}"
    return alt.FieldOneOfPredicate(field="class_name", oneOf=[str(c) for c in classes])


def _filtered(chart: alt.Chart, *predicates: Any) -> alt.Chart:
    for predicate in predicates:
        if predicate is not None:
            chart = chart.transform_filter(predicate)
    return chart


def _key_layer(
    title: str, palette: Sequence[str], domain: tuple[float, float], name: str | None = None
) -> alt.Chart:
    """An invisible layer that carries the colour scale the images were painted with."""
    n = len(palette)
    lo, hi = domain
    values = [{"value": lo + (i + 0.5) * (hi - lo) / n} for i in range(n)]
    return (
        (alt.Chart(_data(values), name=name) if name else
         alt.Chart(_data(values)))
        .mark_point(opacity=0, size=0, filled=True)
        .encode(
            color=alt.Color(
                "value:Q",
                title=title,
                scale=alt.Scale(type="quantize", domain=list(domain), range=list(palette)),
                legend=alt.Legend(symbolOpacity=1, format=".2~f"),
            )
        )
    )


# --------------------------------------------------------------------------- AOM / CSM grids
def _tile_grid(
    layer: _Layer,
    maps: np.ndarray,
    *,
    view: str,
    palette: Sequence[str],
    domain: tuple[float, float],
    legend_title: str,
    kernels: alt.Parameter | None,
    classes: alt.Parameter | Sequence[str] | None,
    page: int | alt.Parameter | None,
    cell: int,
    title: str,
) -> alt.LayerChart:
    if cell < 4:
        raise ReportError(f"cell must be at least 4 pixels, got {cell}")
    # A tile never carries 2 x 2 or more map pixels per screen pixel: the browser would
    # shrink them anyway, and the file would grow with H x W (a mean of occurrence fractions
    # is still an occurrence fraction).
    pooled = _pool(maps, max(maps.shape[-2:]) // cell)
    h, w = pooled.shape[-2:]
    upscale = max(1, math.ceil(cell / max(h, w)))
    index = quantize(pooled, domain, len(palette))
    with warnings.catch_warnings():  # a class without samples: all-NaN maps, a NaN mean
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(maps.reshape(*maps.shape[:2], -1), axis=2) if maps.size else maps
    records = []
    heads = set()
    for k in layer.order.tolist():
        row, page_k, group = layer.rows[k], layer.page(k), layer.group_label(k)
        for c, name in enumerate(layer.classes):
            head, tail = _tile_parts(index[k, c], palette, upscale)
            heads.add(head)
            records.append(
                {
                    "row": row,
                    "kernel": k,
                    "page": page_k,
                    "class_name": name,
                    "mean": _r(float(means[k, c])),
                    "group": group,
                    "png": tail,
                }
            )
    if len(heads) > 1:  # pragma: no cover - one size and palette a grid
        raise ReportError(f"internal: the tiles of {view!r} do not share one PNG header")
    url = f"'{PNG_URL}{heads.pop()}' + datum.png" if heads else "''"
    row_filter = _row_filter(page, kernels)
    gap = max(2, cell // 8)
    step = cell + gap
    y = _row_y(layer, padding=gap / step)
    x = alt.X(
        "class_name:N",
        sort=list(layer.classes),
        title="class",
        scale=alt.Scale(type="band", paddingInner=gap / step, paddingOuter=gap / step / 2),
        axis=alt.Axis(orient="top", labelAngle=-45, ticks=False, domain=False),
    )
    opacity: Any = alt.value(1.0)
    if kernels is not None:
        opacity = alt.when(kernels, empty=True).then(alt.value(1.0)).otherwise(alt.value(0.3))
    images = _filtered(
        alt.Chart(_data(records), name=f"{view}_images").mark_image(
            width=cell, height=cell, aspect=True
        ),
        row_filter,
        _class_filter(classes),
    ).transform_calculate(url=url).encode(  # the shared PNG header + the tile's own part
        x=x,
        y=y,
        url=alt.Url("url:N"),
        opacity=opacity,
        tooltip=[
            alt.Tooltip("kernel:O", title="kernel"),
            alt.Tooltip("class_name:N", title="class"),
            alt.Tooltip("mean:Q", title=f"mean {legend_title}", format=".3f"),
            alt.Tooltip("group:N", title="redundant group"),
        ],
    )
    layers: list[alt.Chart] = []
    if kernels is not None:  # selected rows get an orange frame, drawn under the tiles
        rows = [
            {"row": layer.rows[k], "kernel": k, "page": layer.page(k)}
            for k in layer.order.tolist()
        ]
        layers.append(
            _filtered(
                alt.Chart(_data(rows), name=f"{view}_highlight").mark_rect(
                    fillOpacity=0.15, strokeWidth=2
                ),
                row_filter,
            ).encode(
                y=y,
                fill=alt.when(kernels, empty=False)
                .then(alt.value(_SELECT_COLOR))
                .otherwise(alt.value("transparent")),
                stroke=alt.when(kernels, empty=False)
                .then(alt.value(_SELECT_COLOR))
                .otherwise(alt.value("transparent")),
            )
        )
    layers.append(images)
    frames = _frames(layer, page)
    if frames:
        frame_chart = alt.Chart(_data(frames), name=f"{view}_frames")
        if isinstance(page, alt.Parameter):
            frame_chart = frame_chart.transform_filter(f"datum.page == {page.name}")
        layers.append(
            frame_chart.mark_rect(filled=False, strokeWidth=2)
            .encode(
                y=alt.Y("first:N", bandPosition=0),
                y2=alt.Y2("last:N", bandPosition=1),
                stroke=alt.Stroke(
                    "kind:N",
                    title="marked",
                    scale=alt.Scale(domain=list(_FRAME_KINDS), range=list(_FRAME_COLORS)),
                ),
                tooltip=[alt.Tooltip("label:N", title="marked")],
            )
        )
    layers.append(_key_layer(legend_title, palette, domain, f"{view}_key"))
    return alt.LayerChart(layer=layers, title=title, width=alt.Step(step), height=alt.Step(step))


def _frames(layer: _Layer, page: int | alt.Parameter | None) -> list[dict[str, Any]]:
    """One rect per run of consecutive rows of a group (split at page breaks)."""
    marked: list[tuple[str, tuple[int, ...], str]] = []  # (kind, members, tooltip)
    for i, group in enumerate(layer.groups):
        keep = "" if group.representative is None else f"; keep k{group.representative}"
        names = ", ".join(f"k{m}" for m in group.members)
        marked.append(("redundant group", group.members, f"G{i + 1}: kernels {names}{keep}"))
    for k, reason in layer.ineffective:
        why = f" ({reason.replace('_', ' ')})" if reason else ""
        marked.append(("ineffective", (k,), f"k{k}: ineffective{why}"))
    frames = []
    for kind, members, text in marked:
        by_page: dict[int, list[int]] = {}
        for m in members:
            if 0 <= m < layer.kernels:
                r = int(layer.rank[m])
                by_page.setdefault(r // layer.page_size + 1, []).append(r)
        for page_no, page_ranks in sorted(by_page.items()):
            for first, last in _runs(page_ranks):
                frames.append(
                    {
                        "first": layer.rows[int(layer.order[first])],
                        "last": layer.rows[int(layer.order[last])],
                        "kind": kind,
                        "label": text,
                        "page": page_no,
                    }
                )
    if isinstance(page, int):
        frames = [f for f in frames if f["page"] == page]
    return frames


def aom_grid(
    stats: OccurrenceStats,
    layer: str,
    findings: Any = None,
    *,
    order: Sequence[int] | np.ndarray | None = None,
    kernels: alt.Parameter | None = None,
    classes: alt.Parameter | Sequence[str] | None = None,
    page: int | alt.Parameter | None = None,
    page_size: int = 64,
    cell: int = 36,
) -> alt.LayerChart:
    """Fig. 2: the AOM of every (kernel, class) pair of ``layer``, one image per cell.

    Rows are kernels in ``order`` (default: the findings' order, else
    :func:`onnxaom.findings.kernel_order`), columns are classes. Colours: :data:`AOM_COLORS`
    on a quantize scale over [0, 1]. Redundant groups and ineffective kernels of ``findings``
    are framed.

    ``kernels``: a kernel selection (defined in another view, e.g. :func:`odm_heatmap`) whose
    rows are highlighted. ``classes``: a parameter holding one class name ('' for all), or a
    fixed list of class names to show. ``page``: a page number (1-based, ``page_size`` kernels
    a page) or a parameter holding one; ``None`` shows every kernel. ``cell``: pixels a tile.
    """
    prepared = _prepare(stats, layer, findings, order=order, page_size=page_size)
    return _tile_grid(
        prepared,
        prepared.aom,
        view="aom",
        palette=AOM_COLORS,
        domain=(0.0, 1.0),
        legend_title="occurrence",
        kernels=kernels,
        classes=classes,
        page=page,
        cell=cell,
        title=f"AOM: {layer}",
    )


def csm_grid(
    stats: OccurrenceStats,
    layer: str,
    findings: Any = None,
    *,
    order: Sequence[int] | np.ndarray | None = None,
    kernels: alt.Parameter | None = None,
    classes: alt.Parameter | Sequence[str] | None = None,
    page: int | alt.Parameter | None = None,
    page_size: int = 64,
    cell: int = 36,
) -> alt.LayerChart:
    """Fig. 4: the CSM of every (kernel, class) pair, on :data:`CSM_COLORS` over [-1, 1].

    Same rows, columns and arguments as :func:`aom_grid`. Needs at least 2 classes.
    """
    prepared = _prepare(stats, layer, findings, order=order, page_size=page_size)
    return _tile_grid(
        prepared,
        _over_present(stats.csm, layer),
        view="csm",
        palette=CSM_COLORS,
        domain=(-1.0, 1.0),
        legend_title="selectivity",
        kernels=kernels,
        classes=classes,
        page=page,
        cell=cell,
        title=f"CSM: {layer}",
    )


# --------------------------------------------------------------------------- ODM
def _odm_domain(d: np.ndarray) -> tuple[float, float]:
    """[0, max] rounded up to a tidy value, so that the 10 bins spread over the data."""
    top = float(np.nanmax(d)) if d.size and np.isfinite(d).any() else 0.0
    if top <= 0.0:
        return (0.0, 1.0)
    magnitude = 10.0 ** math.floor(math.log10(top))
    return (0.0, math.ceil(top / magnitude * 2) / 2 * magnitude)


def kernel_selection(name: str = "kernels") -> alt.Parameter:
    """The point selection of kernels the ODM defines (click, shift-click adds, dblclick clears)."""
    return alt.selection_point(name=name, fields=["kernel"], on="click", clear="dblclick")


def odm_heatmap(
    stats: OccurrenceStats,
    layer: str,
    findings: Any = None,
    *,
    order: Sequence[int] | np.ndarray | None = None,
    kernels: alt.Parameter | None = None,
    size: int = 640,
    max_rects: int = ODM_MAX_RECTS,
) -> alt.Chart | alt.LayerChart:
    """Fig. 3: the K x K occurrence difference matrix in the kernel order of the grids.

    Colours: :data:`ODM_COLORS` on a quantize scale over [0, max D] (tidy-rounded). The chart
    defines the kernel selection ``kernels`` (default: :func:`kernel_selection`): clicking a
    row selects its kernel. Up to ``max_rects`` kernels each cell is a rect with a tooltip
    (an ``alt.Chart``); above, the matrix is one image plus one clickable rect per row (an
    ``alt.LayerChart``). ``size``: pixels a side, at most (at least 1 pixel a kernel).
    """
    prepared = _prepare(stats, layer, findings, order=order)
    kernels = kernels if kernels is not None else kernel_selection()
    d = _over_present(stats.odm, layer)
    domain = _odm_domain(d)
    k = prepared.kernels
    step = max(1, min(16, size // max(k, 1)))
    order_list = prepared.order.tolist()
    selected_opacity = alt.when(kernels, empty=True).then(alt.value(1.0)).otherwise(alt.value(0.5))
    title = f"ODM: {layer}"
    if k <= max_rects:
        cells = [
            {
                "row": prepared.rows[i],
                "col": prepared.rows[j],
                "kernel": i,
                "other": j,
                "d": _r(float(d[i, j])),
            }
            for i in order_list
            for j in order_list
        ]
        return (
            alt.Chart(_data(cells), name="odm_cells")
            .mark_rect()
            .encode(
                x=alt.X(
                    "col:N",
                    sort="ascending",
                    scale=alt.Scale(type="band", paddingInner=0, paddingOuter=0),
                    axis=_row_axis(title="kernel"),
                ),
                y=alt.Y(
                    "row:N",
                    sort="ascending",
                    scale=alt.Scale(type="band", paddingInner=0, paddingOuter=0),
                    axis=_row_axis(),
                ),
                color=alt.Color(
                    "d:Q",
                    title="mean |ΔAOM|",
                    scale=alt.Scale(type="quantize", domain=list(domain), range=list(ODM_COLORS)),
                    legend=alt.Legend(format=".3~f"),
                ),
                opacity=selected_opacity,
                tooltip=[
                    alt.Tooltip("kernel:O", title="row kernel"),
                    alt.Tooltip("other:O", title="column kernel"),
                    alt.Tooltip("d:Q", title="D", format=".4f"),
                ],
            )
            .add_params(kernels)
            .properties(title=title, width=alt.Step(step), height=alt.Step(step))
        )
    # Image path: the matrix in display order as one PNG, then one transparent rect per row.
    shown = d[np.ix_(prepared.order, prepared.order)]
    index = quantize(shown, domain, len(ODM_COLORS))
    side = k * step
    image = (
        alt.Chart(
            # unnamed, like the key layer: Altair lists every *named* layer of a layer chart
            # in a concat as a view of the selection, which gives duplicate Vega signals
            _data([{"url": _image_url(index, ODM_COLORS, step)}]),
        )
        .mark_image(width=side, height=side, aspect=False, align="left", baseline="top")
        .encode(x=alt.value(0), y=alt.value(0), url=alt.Url("url:N"))
    )
    rows = [
        {
            "row": prepared.rows[i],
            "kernel": i,
            "group": prepared.group_label(i),
        }
        for i in order_list
    ]
    hits = (
        alt.Chart(_data(rows), name="odm_rows")
        .mark_rect(fill="black", strokeWidth=0)
        .encode(
            y=alt.Y(
                "row:N",
                sort="ascending",
                scale=alt.Scale(type="band", paddingInner=0, paddingOuter=0),
                axis=_row_axis(labels=step >= 10),  # unreadable when rows are thinner
            ),
            fillOpacity=alt.when(kernels, empty=False).then(alt.value(0.25)).otherwise(
                alt.value(0.0)
            ),
            tooltip=[
                alt.Tooltip("kernel:O", title="kernel"),
                alt.Tooltip("group:N", title="redundant group"),
            ],
        )
        .add_params(kernels)
    )
    key = _key_layer("mean |ΔAOM|", ODM_COLORS, domain)
    return alt.LayerChart(
        layer=[image, hits, key], title=title, width=side, height=alt.Step(step)
    )


# --------------------------------------------------------------------------- selectivity
def selectivity_bars(
    stats: OccurrenceStats,
    layer: str,
    findings: Any = None,
    *,
    order: Sequence[int] | np.ndarray | None = None,
    kernels: alt.Parameter | None = None,
    page: int | alt.Parameter | None = None,
    page_size: int = 64,
    cell: int = 36,
    width: int = 160,
) -> alt.Chart:
    """Eq. 4: kernel selectivity s(k), one bar a kernel, rows in the grids' order.

    Representatives of redundant groups (the kernel to keep) are drawn darker; selected
    kernels orange. Arguments as :func:`aom_grid`.
    """
    prepared = _prepare(stats, layer, findings, order=order, page_size=page_size)
    s = _over_present(stats.selectivity, layer) if (stats.class_sizes > 0).sum() >= 2 \
        else np.zeros(prepared.kernels)
    reps = {g.representative for g in prepared.groups if g.representative is not None}
    records = [
        {
            "row": prepared.rows[k],
            "kernel": k,
            "page": prepared.page(k),
            "selectivity": _r(float(s[k])),
            "group": prepared.group_label(k),
            "role": "keep (group representative)" if k in reps else "",
        }
        for k in prepared.order.tolist()
    ]
    gap = max(2, cell // 8)
    step = cell + gap
    color: Any = alt.value("#4c78a8")
    if kernels is not None:
        color = alt.when(kernels, empty=False).then(alt.value(_SELECT_COLOR)).otherwise(
            alt.value("#4c78a8")
        )
    chart = _filtered(
        alt.Chart(_data(records), name="selectivity_bars").mark_bar(),
        _row_filter(page, kernels),
    ).encode(
        x=alt.X("selectivity:Q", title="kernel selectivity s(k)", axis=alt.Axis(orient="top")),
        y=_row_y(prepared, padding=gap / step),
        color=color,
        tooltip=[
            alt.Tooltip("kernel:O", title="kernel"),
            alt.Tooltip("selectivity:Q", format=".3f"),
            alt.Tooltip("group:N", title="redundant group"),
            alt.Tooltip("role:N"),
        ],
    )
    return chart.properties(title=f"Selectivity: {layer}", width=width, height=alt.Step(step))


def selectivity_counts(stats: OccurrenceStats, layer: str) -> list[dict[str, Any]]:
    """Fig. 8 (top) from statistics: per class, kernels with s^{k,c} > 0 and with <= 0.

    Returns one record a class: ``{"class": name, "selective": n, "not_selective": m}``,
    ready for :func:`selectivity_experiment` (add the accuracies measured with each set).
    """
    a = _over_present(stats.class_selectivity, layer)  # (K, C); NaN for an empty class
    return [
        {
            "class": name,
            "selective": int((a[:, c] > 0).sum()),
            "not_selective": int((a[:, c] <= 0).sum()),
        }
        for c, name in enumerate(_shown_class_names(stats.class_names))
    ]


_EXPERIMENT_SETS = (
    ("all kernels", "all", "#7f7f7f"),
    ("not selective", "not_selective", "#d62728"),
    ("selective", "selective", "#2ca02c"),
)


def selectivity_experiment(records: Iterable[Mapping[str, Any]]) -> alt.Chart:
    """Fig. 8: kernels kept (top) and class accuracy (bottom), per class and kernel set.

    ``records``: one mapping a class with ``class``; kernel counts ``selective`` and
    ``not_selective`` (s^{k,c} > 0 and <= 0; see :func:`selectivity_counts`); and optionally
    accuracies in [0, 1] ``accuracy_all``, ``accuracy_selective`` and
    ``accuracy_not_selective`` (test accuracy on that class keeping only that set of kernels).
    Missing accuracies leave their bars out. Selective is green, not selective red (as Fig. 8).
    """
    long = []
    classes = []
    for rec in records:
        name = str(rec["class"])
        classes.append(name)
        for label, key, _ in _EXPERIMENT_SETS:
            if key != "all" and rec.get(key) is not None:
                long.append({"class": name, "set": label, "panel": "kernels kept",
                             "value": int(rec[key])})
            acc = rec.get(f"accuracy_{key}")
            if acc is not None:
                long.append({"class": name, "set": label, "panel": "class accuracy",
                             "value": float(acc)})
    if not long:
        raise ReportError("selectivity_experiment needs at least one record with counts")
    return (
        alt.Chart(_data(long), name="selectivity_experiment")
        .mark_bar()
        .encode(
            x=alt.X("class:N", sort=classes, title="class"),
            xOffset=alt.XOffset("set:N", sort=[s[0] for s in _EXPERIMENT_SETS]),
            y=alt.Y("value:Q", title=None),
            color=alt.Color(
                "set:N",
                title="kernels",
                scale=alt.Scale(
                    domain=[s[0] for s in _EXPERIMENT_SETS], range=[s[2] for s in _EXPERIMENT_SETS]
                ),
            ),
            row=alt.Row("panel:N", sort=["kernels kept", "class accuracy"], title=None),
            tooltip=["class:N", "set:N", alt.Tooltip("value:Q", format=".3~f")],
        )
        .resolve_scale(y="independent")
        .properties(title="Kernel selectivity experiment", width=alt.Step(12), height=160)
    )


# --------------------------------------------------------------------------- tuning history
def tuning_history(steps: Iterable[Mapping[str, Any]]) -> alt.Chart:
    """Accuracy against parameter count, one point per tuning step, joined in step order.

    ``steps``: mappings with ``step`` (int), ``params`` (int), ``accuracy`` (in [0, 1]) and
    optionally ``label`` (what the step did, e.g. "conv1: remove 11 kernels").
    """
    values = [
        {
            "step": int(s["step"]),
            "params": int(s["params"]),
            "accuracy": float(s["accuracy"]),
            "label": str(s.get("label", "")),
        }
        for s in steps
    ]
    if not values:
        raise ReportError("tuning_history needs at least one step")
    return (
        alt.Chart(_data(values), name="tuning_history")
        .mark_line(point=True)
        .encode(
            x=alt.X("params:Q", title="parameters", scale=alt.Scale(zero=False)),
            y=alt.Y("accuracy:Q", title="accuracy", scale=alt.Scale(zero=False),
                    axis=alt.Axis(format="%")),
            order=alt.Order("step:Q"),
            tooltip=["step:Q", alt.Tooltip("params:Q", format=","),
                     alt.Tooltip("accuracy:Q", format=".2%"), "label:N"],
        )
        .properties(title="Tuning session", width=420, height=240)
    )


# --------------------------------------------------------------------------- linked layer view
def layer_view(
    stats: OccurrenceStats,
    layer: str,
    findings: Any = None,
    *,
    order: Sequence[int] | np.ndarray | None = None,
    page_size: int = 64,
    cell: int = 28,
    odm_size: int = 640,
    first_page: int = 1,
) -> alt.VConcatChart:
    """All views of ``layer``, linked: ODM on top; AOM grid, CSM grid and selectivity below.

    Clicking a kernel (row) in the ODM selects it (shift-click adds, double-click clears):
    its rows are framed in orange and always shown in the grids and bars, other rows fade.
    A class menu (``classes``) filters the grids' columns; layers with more than
    ``page_size`` kernels get a page slider (``page``), which starts at ``first_page`` (the
    page a static image shows). With fewer than 2 classes there is no CSM or selectivity.
    """
    prepared = _prepare(stats, layer, findings, order=order, page_size=page_size)
    if isinstance(first_page, bool) or not isinstance(first_page, int | np.integer) \
            or not 1 <= first_page <= prepared.pages:
        raise ReportError(f"first_page must be a page of layer {layer!r}: 1..{prepared.pages} "
                          f"({page_size} kernels a page), got {first_page!r}")
    kw: dict[str, Any] = {"order": prepared.order, "page_size": page_size}
    kernels = kernel_selection()
    classes = alt.param(
        name="classes",
        value=_ALL_CLASSES,
        bind=alt.binding_select(
            options=[_ALL_CLASSES, *prepared.classes],
            labels=["all", *prepared.classes],
            name="class ",
        ),
    )
    params: list[alt.Parameter] = [classes]
    page: alt.Parameter | None = None
    if prepared.pages > 1:
        page = alt.param(
            name="page",
            value=int(first_page),
            bind=alt.binding_range(
                min=1, max=prepared.pages, step=1, name=f"kernels page (of {prepared.pages}, "
                f"{page_size} a page) "
            ),
        )
        params.append(page)
    found = _layer_findings(findings, layer)
    odm_chart = odm_heatmap(
        stats, layer, found, order=prepared.order, kernels=kernels, size=odm_size
    )
    grids: list[Any] = [
        aom_grid(stats, layer, found, kernels=kernels, classes=classes, page=page, cell=cell, **kw)
    ]
    if int((stats.class_sizes > 0).sum()) >= 2:  # the CSM compares classes with samples
        grids.append(
            csm_grid(stats, layer, found, kernels=kernels, classes=classes, page=page, cell=cell,
                     **kw)
        )
        grids.append(
            selectivity_bars(stats, layer, found, kernels=kernels, page=page, cell=cell, **kw)
        )
    bottom = alt.hconcat(*grids, spacing=24).resolve_scale(
        color="independent", stroke="independent"
    )
    chart = alt.vconcat(odm_chart, bottom, spacing=24).resolve_scale(
        color="independent", stroke="independent"
    )
    return chart.add_params(*params).properties(title=f"Layer {layer}")
