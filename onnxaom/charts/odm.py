"""The occurrence difference matrix (Fig. 3) as a heatmap whose rows select kernels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import altair as alt
import numpy as np

from ..stats import OccurrenceStats
from .common import (
    inline_data,
    key_layer,
    over_present,
    prepare,
    rounded,
    row_axis,
)
from .images import (
    ODM_COLORS,
    image_url,
    quantize,
)

#: The ODM is drawn with one rect per cell up to this many kernels, as one image above it.
ODM_MAX_RECTS = 64


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
    prepared = prepare(stats, layer, findings, order=order)
    kernels = kernels if kernels is not None else kernel_selection()
    d = over_present(stats.odm, layer)
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
                "d": rounded(float(d[i, j])),
            }
            for i in order_list
            for j in order_list
        ]
        return (
            alt.Chart(inline_data(cells), name="odm_cells")
            .mark_rect()
            .encode(
                x=alt.X(
                    "col:N",
                    sort="ascending",
                    scale=alt.Scale(type="band", paddingInner=0, paddingOuter=0),
                    axis=row_axis(title="kernel"),
                ),
                y=alt.Y(
                    "row:N",
                    sort="ascending",
                    scale=alt.Scale(type="band", paddingInner=0, paddingOuter=0),
                    axis=row_axis(),
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
            inline_data([{"url": image_url(index, ODM_COLORS, step)}]),
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
        alt.Chart(inline_data(rows), name="odm_rows")
        .mark_rect(fill="black", strokeWidth=0)
        .encode(
            y=alt.Y(
                "row:N",
                sort="ascending",
                scale=alt.Scale(type="band", paddingInner=0, paddingOuter=0),
                axis=row_axis(labels=step >= 10),  # unreadable when rows are thinner
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
    key = key_layer("mean |ΔAOM|", ODM_COLORS, domain)
    return alt.LayerChart(
        layer=[image, hits, key], title=title, width=side, height=alt.Step(step)
    )
