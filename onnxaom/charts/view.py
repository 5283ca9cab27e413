"""All of a layer's views linked in one chart (:func:`layer_view`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import altair as alt
import numpy as np

from ..errors import ReportError
from ..stats import OccurrenceStats
from .common import (
    ALL_CLASSES,
    findings_of_layer,
    prepare,
)
from .grids import (
    aom_grid,
    csm_grid,
)
from .odm import (
    kernel_selection,
    odm_heatmap,
)
from .selectivity import (
    selectivity_bars,
)


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
    prepared = prepare(stats, layer, findings, order=order, page_size=page_size)
    if isinstance(first_page, bool) or not isinstance(first_page, int | np.integer) \
            or not 1 <= first_page <= prepared.pages:
        raise ReportError(f"first_page must be a page of layer {layer!r}: 1..{prepared.pages} "
                          f"({page_size} kernels a page), got {first_page!r}")
    kw: dict[str, Any] = {"order": prepared.order, "page_size": page_size}
    kernels = kernel_selection()
    classes = alt.param(
        name="classes",
        value=ALL_CLASSES,
        bind=alt.binding_select(
            options=[ALL_CLASSES, *prepared.classes],
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
    found = findings_of_layer(findings, layer)
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
