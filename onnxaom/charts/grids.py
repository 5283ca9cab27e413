"""The AOM grid (Fig. 2) and the CSM grid (Fig. 4): kernels x classes, one map image a cell."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import altair as alt
import numpy as np

from ..errors import ReportError
from ..stats import OccurrenceStats
from .common import (
    FRAME_COLORS,
    FRAME_KINDS,
    SELECT_COLOR,
    LayerData,
    class_filter,
    filtered,
    inline_data,
    kernel_row_filter,
    key_layer,
    over_present,
    prepare,
    rank_runs,
    rounded,
    row_y,
)
from .images import (
    AOM_COLORS,
    CSM_COLORS,
    PNG_URL,
    pool_maps,
    quantize,
    tile_parts,
)


def _tile_grid(
    layer: LayerData,
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
    if page is not None and not isinstance(page, alt.Parameter):
        pages = layer.pages
        if isinstance(page, bool) or not isinstance(page, int | np.integer) \
                or not 1 <= page <= pages:
            raise ReportError(f"page must be a page number from 1 to {pages} ({layer.page_size} "
                              f"kernels a page), a parameter or None, got {page!r}")
    # A tile never carries 2 x 2 or more map pixels per screen pixel: the browser would
    # shrink them anyway, and the file would grow with H x W (a mean of occurrence fractions
    # is still an occurrence fraction).
    pooled = pool_maps(maps, max(maps.shape[-2:]) // cell)
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
            head, tail = tile_parts(index[k, c], palette, upscale)
            heads.add(head)
            records.append(
                {
                    "row": row,
                    "kernel": k,
                    "page": page_k,
                    "class_name": name,
                    "mean": rounded(float(means[k, c])),
                    "group": group,
                    "png": tail,
                }
            )
    if len(heads) > 1:  # pragma: no cover - one size and palette a grid
        raise ReportError(f"internal: the tiles of {view!r} do not share one PNG header")
    url = f"'{PNG_URL}{heads.pop()}' + datum.png" if heads else "''"
    row_filter = kernel_row_filter(page, kernels)
    gap = max(2, cell // 8)
    step = cell + gap
    y = row_y(layer, padding=gap / step)
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
    images = filtered(
        alt.Chart(inline_data(records), name=f"{view}_images").mark_image(
            width=cell, height=cell, aspect=True
        ),
        row_filter,
        class_filter(classes),
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
            filtered(
                alt.Chart(inline_data(rows), name=f"{view}_highlight").mark_rect(
                    fillOpacity=0.15, strokeWidth=2
                ),
                row_filter,
            ).encode(
                y=y,
                fill=alt.when(kernels, empty=False)
                .then(alt.value(SELECT_COLOR))
                .otherwise(alt.value("transparent")),
                stroke=alt.when(kernels, empty=False)
                .then(alt.value(SELECT_COLOR))
                .otherwise(alt.value("transparent")),
            )
        )
    layers.append(images)
    frames = _frames(layer, page)
    if frames:
        frame_chart = alt.Chart(inline_data(frames), name=f"{view}_frames")
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
                    scale=alt.Scale(domain=list(FRAME_KINDS), range=list(FRAME_COLORS)),
                ),
                tooltip=[alt.Tooltip("label:N", title="marked")],
            )
        )
    layers.append(key_layer(legend_title, palette, domain, f"{view}_key"))
    return alt.LayerChart(layer=layers, title=title, width=alt.Step(step), height=alt.Step(step))


def _frames(layer: LayerData, page: int | alt.Parameter | None) -> list[dict[str, Any]]:
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
            for first, last in rank_runs(page_ranks):
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
    prepared = prepare(stats, layer, findings, order=order, page_size=page_size)
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
    prepared = prepare(stats, layer, findings, order=order, page_size=page_size)
    return _tile_grid(
        prepared,
        over_present(stats.csm, layer),
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
