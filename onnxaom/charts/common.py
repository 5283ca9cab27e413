"""What every view shares: a layer's data prepared once (order, findings, class names) and the
encodings of kernel rows, class filters and colour keys."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import altair as alt
import numpy as np

from ..errors import ReportError
from ..stats import OccurrenceStats

SELECT_COLOR = "#ff7f0e"
FRAME_KINDS = ("redundant group", "ineffective")
FRAME_COLORS = ("#d62728", "#7f7f7f")
ALL_CLASSES = ""


@dataclass(frozen=True)
class KernelGroup:
    members: tuple[int, ...]
    representative: int | None


@dataclass(frozen=True)
class LayerData:
    """Everything the views of one layer share, computed once."""

    name: str
    classes: tuple[str, ...]
    aom: np.ndarray  # (K, C, H, W)
    order: np.ndarray  # (K,) kernel shown in row r
    rank: np.ndarray  # (K,) row of kernel k
    rows: tuple[str, ...]  # y value of kernel k: zero-padded rank | label (sorts as shown)
    groups: tuple[KernelGroup, ...]
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


def attribute_of(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if isinstance(obj, Mapping) and name in obj:
            return obj[name]
        if hasattr(obj, name):
            return getattr(obj, name)
    return default


def findings_of_layer(findings: Any, layer: str) -> Any:
    """The findings of ``layer`` from a Findings, a LayerFindings, or None."""
    if findings is None:
        return None
    layers = attribute_of(findings, "layers")
    if layers is None:
        return findings  # already one layer's findings
    if isinstance(layers, Mapping):
        return layers.get(layer)
    for item in layers:
        if attribute_of(item, "layer", "name") == layer:
            return item
    return None


def as_groups(groups: Iterable[Any]) -> tuple[KernelGroup, ...]:
    out = []
    for group in groups:
        if isinstance(group, KernelGroup):
            out.append(group)
            continue
        members = attribute_of(group, "members")
        rep = attribute_of(group, "representative")
        if members is None:  # a bare sequence of kernels, or (members, representative)
            seq = list(group)
            if len(seq) == 2 and not np.isscalar(seq[0]):
                members, rep = seq
            else:
                members = seq
        out.append(KernelGroup(tuple(int(k) for k in members), None if rep is None else int(rep)))
    return tuple(out)


def over_present(measure: Callable[[str], np.ndarray], layer: str) -> np.ndarray:
    """``measure(layer)`` (an :class:`OccurrenceStats` method: eqs. 2-4 over the classes with
    samples), without the AOM's warning about classes without samples: collect warned already,
    and the views draw those classes blank."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="classes with no samples",
                                category=RuntimeWarning)
        return measure(layer)


def prepare(
    stats: OccurrenceStats,
    layer: str,
    findings: Any = None,
    *,
    order: Sequence[int] | np.ndarray | None = None,
    groups: Iterable[Any] | None = None,
    ineffective: Iterable[Any] | None = None,
    page_size: int = 64,
) -> LayerData:
    if page_size < 1:
        raise ReportError(f"page_size must be at least 1, got {page_size}")
    from ..findings import Findings, check_findings_match

    if not isinstance(stats, OccurrenceStats):
        raise ReportError(f"the views draw onnxaom.OccurrenceStats, got {type(stats).__name__} "
                          f"(load a saved .npz with OccurrenceStats.load)")

    if isinstance(findings, Findings):
        check_findings_match(findings, stats, ReportError)
    aom = stats.aom(layer, warn=False)  # collect warned; the views draw those classes blank
    k = aom.shape[0]
    found = findings_of_layer(findings, layer)
    if order is None and found is not None:
        order = attribute_of(found, "kernel_order", "order")
    if order is None and (stats.class_sizes > 0).sum() < 2:
        order = np.arange(k)  # nothing to cluster on with one class: kernel index order
    if order is None:
        from ..findings import kernel_order  # the one clustering of the project

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
        groups = (attribute_of(found, "redundant_groups", "groups", default=())
                  if found is not None else ())
    if ineffective is None:
        # IneffectiveKernel records (kernel, reason) or bare kernel indices
        ineffective = attribute_of(found, "ineffective", default=()) if found is not None else ()
    rank = np.empty(k, dtype=np.int64)
    rank[order_arr] = np.arange(k)
    digits = len(str(max(k - 1, 0)))
    rows = tuple(f"{int(rank[i]):0{digits}d}|k{i}" for i in range(k))
    return LayerData(
        name=layer,
        classes=shown_class_names(stats.class_names),
        aom=aom,
        order=order_arr,
        rank=rank,
        rows=rows,
        groups=as_groups(groups),
        ineffective=tuple(
            (int(attribute_of(i, "kernel", default=i)), str(attribute_of(i, "reason", default="")))
            for i in ineffective
        ),
        page_size=page_size,
    )


def rank_runs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers in sorted ``ranks``: (first, last) pairs."""
    runs: list[tuple[int, int]] = []
    for r in sorted(ranks):
        if runs and r == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], r)
        else:
            runs.append((r, r))
    return runs


def inline_data(records: list[dict[str, Any]]) -> alt.InlineData:
    """Records inlined as one JSON string.

    Altair deep-copies list-of-dict data on every chart operation (seconds for the 5,120
    tiles of a 512-kernel layer) and its row limit (``MaxRowsError``) applies to data frames;
    a string is copied by reference and passes through as is. Vega parses it on load.
    """
    text = json.dumps(records, separators=(",", ":"), allow_nan=False)
    return alt.InlineData(values=text, format=alt.JsonDataFormat(type="json"))


def rounded(x: float) -> float | None:
    return None if not math.isfinite(x) else round(float(x), 4)


def row_axis(title: str | None = "kernel (cluster order)", labels: bool = True) -> alt.Axis:
    return alt.Axis(
        title=title,
        labels=labels,
        ticks=False,
        domain=False,
        labelExpr="split(datum.label, '|')[1]",
    )


def row_y(layer: LayerData, *, padding: float = 0.08, labels: bool = True) -> alt.Y:
    return alt.Y(
        "row:N",
        sort="ascending",
        scale=alt.Scale(type="band", paddingInner=padding, paddingOuter=padding / 2),
        axis=row_axis(labels=labels),
    )


def kernel_row_filter(
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


def shown_class_names(names: Sequence[str]) -> tuple[str, ...]:
    """Class names as the charts show them: Vega's expressions (a class sort, the class menu)
    cannot hold a line or paragraph separator (U+2028, U+2029), and the menu's "all" is the
    empty string, so those become a space and ``"(unnamed)"``; a name that then repeats gets its
    class index."""
    shown = [str(n).replace("\u2028", " ").replace("\u2029", " ") or "(unnamed)" for n in names]
    return tuple(f"{n} (class {i})" if shown.count(n) > 1 else n for i, n in enumerate(shown))


def class_filter(classes: alt.Parameter | Sequence[str] | None) -> Any | None:
    if classes is None:
        return None
    if isinstance(classes, alt.Parameter):
        return f"{classes.name} == '' || datum.class_name == {classes.name}"
    return alt.FieldOneOfPredicate(field="class_name", oneOf=[str(c) for c in classes])


def filtered(chart: alt.Chart, *predicates: Any) -> alt.Chart:
    for predicate in predicates:
        if predicate is not None:
            chart = chart.transform_filter(predicate)
    return chart


def key_layer(
    title: str, palette: Sequence[str], domain: tuple[float, float], name: str | None = None
) -> alt.Chart:
    """An invisible layer that carries the colour scale the images were painted with."""
    n = len(palette)
    lo, hi = domain
    values = [{"value": lo + (i + 0.5) * (hi - lo) / n} for i in range(n)]
    return (
        (alt.Chart(inline_data(values), name=name) if name else
         alt.Chart(inline_data(values)))
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
