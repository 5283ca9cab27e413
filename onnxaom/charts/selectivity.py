"""Kernel selectivity (eq. 4) as bars, and the kernel selectivity experiment (Fig. 8)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import altair as alt
import numpy as np

from ..errors import ReportError
from ..stats import OccurrenceStats
from .common import (
    SELECT_COLOR,
    filtered,
    inline_data,
    kernel_row_filter,
    over_present,
    prepare,
    rounded,
    row_y,
    shown_class_names,
)


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
    prepared = prepare(stats, layer, findings, order=order, page_size=page_size)
    s = over_present(stats.selectivity, layer) if (stats.class_sizes > 0).sum() >= 2 \
        else np.zeros(prepared.kernels)
    reps = {g.representative for g in prepared.groups if g.representative is not None}
    records = [
        {
            "row": prepared.rows[k],
            "kernel": k,
            "page": prepared.page(k),
            "selectivity": rounded(float(s[k])),
            "group": prepared.group_label(k),
            "role": "keep (group representative)" if k in reps else "",
        }
        for k in prepared.order.tolist()
    ]
    gap = max(2, cell // 8)
    step = cell + gap
    color: Any = alt.value("#4c78a8")
    if kernels is not None:
        color = alt.when(kernels, empty=False).then(alt.value(SELECT_COLOR)).otherwise(
            alt.value("#4c78a8")
        )
    chart = filtered(
        alt.Chart(inline_data(records), name="selectivity_bars").mark_bar(),
        kernel_row_filter(page, kernels),
    ).encode(
        x=alt.X("selectivity:Q", title="kernel selectivity s(k)", axis=alt.Axis(orient="top")),
        y=row_y(prepared, padding=gap / step),
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
    a = over_present(stats.class_selectivity, layer)  # (K, C); NaN for an empty class
    return [
        {
            "class": name,
            "selective": int((a[:, c] > 0).sum()),
            "not_selective": int((a[:, c] <= 0).sum()),
        }
        for c, name in enumerate(shown_class_names(stats.class_names))
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
        alt.Chart(inline_data(long), name="selectivity_experiment")
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
