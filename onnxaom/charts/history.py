"""A tuning session's history: accuracy against parameters, one point per step."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import altair as alt

from ..errors import ReportError
from .common import (
    inline_data,
)


def tuning_history(steps: Iterable[Mapping[str, Any]]) -> alt.Chart:
    """Accuracy against parameter count, one point per tuning step, joined in step order.

    ``steps``: mappings with ``step`` (int), ``params`` (int), ``accuracy`` (in [0, 1]) and
    optionally ``label`` (what the step did, e.g. "conv1: remove 11 kernels").
    """
    try:
        values = [
            {
                "step": int(s["step"]),
                "params": int(s["params"]),
                "accuracy": float(s["accuracy"]),
                "label": str(s.get("label", "")),
            }
            for s in steps
        ]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ReportError(f"tuning_history takes mappings with 'step', 'params' and 'accuracy' "
                          f"(and optionally 'label'): {type(exc).__name__}: {exc}") from exc
    if not values:
        raise ReportError("tuning_history needs at least one step")
    return (
        alt.Chart(inline_data(values), name="tuning_history")
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
