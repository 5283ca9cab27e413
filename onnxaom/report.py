"""The standalone HTML report and chart export.

:func:`write_report` writes ``report.html``: one file that works offline (Vega, Vega-Lite and
Vega-Embed are inlined from vl-convert's bundle; no CDN, no fetch), holding the run's facts,
the model summary as a table, the findings in words and, for each layer, the linked views of
:func:`onnxaom.charts.layer_view`. :func:`render` writes any chart or Vega-Lite spec to PNG,
SVG or PDF through vl-convert.

Page hooks (for tests and for people poking at a report in a browser console):
``window.onnxaom.views[id]`` is the Vega view of the section with that element id,
``window.onnxaom.ready`` a promise that resolves once every view has rendered, and
``window.onnxaom.errors`` the embedding errors, if any.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ModelFileNotFoundError, OutputError, ReportError
from .files import atomic_write
from .progress import over
from .stats import OccurrenceStats

__all__ = ["build_report", "render", "write_report"]

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
_RENDER_SUFFIXES = (".png", ".svg", ".pdf")


# --------------------------------------------------------------------------- vl-convert
def _vl_version() -> str:
    """The Vega-Lite version Altair writes, as vl-convert names it ("6.4")."""
    import altair as alt

    return ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])


@functools.lru_cache(maxsize=1)
def _javascript_bundle() -> str:
    """Vega + Vega-Lite + Vega-Embed as one script (globals vega, vegaLite, vegaEmbed)."""
    import vl_convert as vlc

    snippet = "window.vegaEmbed = vegaEmbed; window.vega = vega; window.vegaLite = vegaLite;"
    return str(vlc.javascript_bundle(snippet, vl_version=_vl_version()))


def _spec(chart_or_spec: Any) -> dict[str, Any]:
    if isinstance(chart_or_spec, Mapping):
        return dict(chart_or_spec)
    to_dict = getattr(chart_or_spec, "to_dict", None)
    if to_dict is None:
        raise TypeError(
            f"expected an Altair chart or a Vega-Lite spec dict, got {type(chart_or_spec).__name__}"
        )
    return dict(to_dict())


def render(chart_or_spec: Any, path: str | os.PathLike[str], *, scale: float = 1.0) -> Path:
    """Write ``chart_or_spec`` (an Altair chart or a Vega-Lite dict) to ``path``.

    The format follows the suffix: ``.png`` (``scale`` x its pixel size), ``.svg`` or ``.pdf``
    (vector: ``scale`` other than 1 is refused).
    Written atomically; returns the path.
    """
    import vl_convert as vlc

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _RENDER_SUFFIXES:
        raise ReportError(
            f"cannot render to {path.name!r}: use a file name ending in "
            f"{', '.join(_RENDER_SUFFIXES)}"
        )
    if not path.parent.is_dir():
        raise ModelFileNotFoundError(f"output folder does not exist: {path.parent}")
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        scale = math.nan
    if not math.isfinite(scale) or scale <= 0:
        raise ReportError(f"scale must be a positive number, got {scale!r}")
    if scale != 1 and suffix != ".png":
        raise ReportError(f"scale applies to PNG only ({suffix[1:].upper()} is vector: it "
                          f"scales without loss), got scale {scale:g} for {path.name}")
    spec = _spec(chart_or_spec)
    version = _vl_version()
    data: bytes
    try:
        if suffix == ".svg":
            data = str(vlc.vegalite_to_svg(spec, vl_version=version)).encode("utf-8")
        elif suffix == ".pdf":
            data = bytes(vlc.vegalite_to_pdf(spec, vl_version=version))
        else:
            if scale > 1:
                _check_pixels(str(vlc.vegalite_to_svg(spec, vl_version=version)), scale, path)
            data = bytes(vlc.vegalite_to_png(spec, vl_version=version, scale=scale))
    except ReportError:
        raise
    except Exception as exc:  # vl-convert raises ValueError with the Rust error inside
        raise ReportError(f"cannot render {path.name}: {' '.join(str(exc).split())[:300]}"
                          ) from exc
    return atomic_write(path, data)


#: The most pixels a scaled PNG may have (about 1 GiB of RGBA while drawing).
MAX_RENDER_PIXELS = 250_000_000


def _check_pixels(svg: str, scale: float, path: Path) -> None:
    """Refuse a ``scale`` that would make the chart (as drawn at scale 1 in ``svg``) larger
    than :data:`MAX_RENDER_PIXELS`: vl-convert aborts the process when it cannot allocate."""
    head = svg[:2000]
    sizes = [re.search(rf'\b{name}="([0-9.]+)', head) for name in ("width", "height")]
    if not all(sizes):
        return
    width, height = (float(m.group(1)) for m in sizes if m is not None)
    pixels = width * height * scale * scale
    if pixels > MAX_RENDER_PIXELS:
        raise ReportError(
            f"cannot render {path.name} at scale {scale:g}: the chart is {width:.0f}x"
            f"{height:.0f} pixels, {pixels / 1e6:,.0f} million scaled, more than "
            f"{MAX_RENDER_PIXELS / 1e6:,.0f} million; use a smaller --scale, or render one "
            f"page of kernels (--page, --page-size) or .svg")




# --------------------------------------------------------------------------- HTML pieces
_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px 32px;
       color: #222; max-width: 1600px; }
h1 { margin: 0 0 4px; font-size: 24px; }
h2 { margin-top: 32px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f5f5f5; }
.facts { color: #555; }
.hint { color: #666; font-size: 13px; }
.view { margin: 12px 0; overflow-x: auto; }
.error { color: #b00; white-space: pre-wrap; }
"""

_EMBED_JS = """
(function () {
  var state = window.onnxaom = {views: {}, errors: [], ready: null};
  var jobs = [];
  document.querySelectorAll("script[type='application/json'][data-view]").forEach(function (el) {
    var target = document.getElementById(el.getAttribute("data-view"));
    var spec = JSON.parse(el.textContent);
    jobs.push(vegaEmbed(target, spec, {renderer: "canvas", actions: false})
      .then(function (result) {
        state.views[target.id] = result.view;
        return result.view.runAsync();
      })
      .catch(function (error) {
        state.errors.push(String(error));
        target.insertAdjacentHTML("beforeend",
          "<p class='error'>this view could not be drawn: " + String(error) + "</p>");
        console.error(error);
      }));
  });
  state.ready = Promise.all(jobs);
})();
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return _e("" if value is None else value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (Mapping, list)) for v in value):
        return _e(" x ".join(str(v) for v in value)) if all(
            isinstance(v, int) for v in value
        ) else _e(", ".join(str(v) for v in value))
    return _e(value)


def _cell(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"<td>{_table(value)}</td>"
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        return f"<td>{_records_table(value)}</td>"
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"<td class='num'>{_fmt(value)}</td>" if numeric else f"<td>{_fmt(value)}</td>"


def _records_table(records: Sequence[Mapping[str, Any]]) -> str:
    columns: list[str] = []
    for record in records:
        columns.extend(k for k in record if k not in columns)
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in records
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _table(mapping: Mapping[str, Any]) -> str:
    """A dict as HTML: lists of records as tables of their own, the rest as key/value rows."""
    scalars = []
    nested = []
    for key, value in mapping.items():
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            nested.append(f"<h4>{_e(key)}</h4>{_records_table(value)}")
        else:
            scalars.append(f"<tr><th>{_e(key)}</th>{_cell(value)}</tr>")
    table = f"<table><tbody>{''.join(scalars)}</tbody></table>" if scalars else ""
    return table + "".join(nested)


def _json_script(spec: Mapping[str, Any], view_id: str) -> str:
    text = json.dumps(spec, separators=(",", ":"), allow_nan=False)
    # "<" only occurs inside JSON strings, where \u003c means the same: no "</script>" or
    # "<!--" can end or confuse the script element.
    text = text.replace("<", "\\u003c")
    return f"<script type='application/json' data-view='{_e(view_id)}'>{text}</script>"


def _summary_lines(findings: Any) -> list[str]:
    lines = getattr(findings, "summary_lines", None)
    if callable(lines):
        return [str(line) for line in lines()]
    return []


def _task_lines(findings: Any, lines: Sequence[str]) -> list[tuple[int | None, str]]:
    """Each findings line with its task: from :meth:`Findings.task_lines`, or, for other
    findings objects, by the wording :mod:`onnxaom.findings` uses (notes first: a note or a
    class name may hold any word)."""
    tagged = getattr(findings, "task_lines", None)
    if callable(tagged):
        return [(task, str(line)) for task, line in tagged()]
    out: list[tuple[int | None, str]] = []
    for line in lines:
        task = None
        if not line.startswith("note ("):
            task = next((number for number, (_, words) in enumerate(_TASKS, 1)
                         if any(word in line for word in words)), None)
        out.append((task, line))
    return out


def _lines_of(findings: Any, layer: str, lines: Sequence[str]) -> list[str]:
    """The findings lines of ``layer``: :meth:`Findings.layer_lines`, or, for other findings
    objects, the summary lines that start with the layer's name ("conv1: ...", "conv1 (last
    conv layer): ...")."""
    own = getattr(findings, "layer_lines", None)
    if callable(own) and layer in getattr(findings, "layer_names", ()):
        return [str(line) for line in own(layer)]
    return [x for x in lines if x.startswith((f"{layer}:", f"{layer} ("))]


_TASKS = (
    ("Task 1: kernels to remove (ineffective or redundant)",
     ("kernels ineffective (", "behave alike (keep")),
    ("Task 2: layers that may be too small", ("; the layer may be too small",)),
    ("Task 3: is the model deep enough?", (" (last conv layer): ",)),
)


def _by_task(tagged: Sequence[tuple[int | None, str]]) -> list[tuple[str, list[str]]]:
    """Findings lines under the paper's three tasks, the rest as notes."""
    groups: dict[int, list[str]] = {number: [] for number in range(1, len(_TASKS) + 1)}
    other: list[str] = []
    for task, line in tagged:
        groups.get(task if task is not None else 0, other).append(line)
    out = [(_TASKS[number - 1][0], found) for number, found in groups.items() if found]
    return out + ([("Other findings and notes", other)] if other else [])


def _layer_lines(
    stats: OccurrenceStats, layer: str, found: Any, summary: Sequence[str]
) -> list[str]:
    """The layer's facts and findings in words, and the G1.. labels of its charts."""
    k, _, h, w = stats.counts[layer].shape
    lines = [f"{k} kernels, {h} x {w} activation maps, {stats.num_classes} classes."]
    lines += list(summary)
    if found is None:
        return lines
    from .charts.common import as_groups

    groups = as_groups(getattr(found, "redundant_groups", ()) or ())
    if groups:
        labels = []
        for i, group in enumerate(groups):
            keep = "" if group.representative is None else f", keep k{group.representative}"
            labels.append(f"G{i + 1} = {' '.join(f'k{m}' for m in group.members)}{keep}")
        lines.append("Redundant groups in the charts: " + "; ".join(labels) + ".")
    return lines


def _layer_findings(findings: Any, layer: str) -> Any:
    from .charts.common import findings_of_layer as pick

    return pick(findings, layer)


# --------------------------------------------------------------------------- the report
#: Above this size ``write_report`` warns that a browser will be slow to draw the report.
LARGE_REPORT_BYTES = 50 * 2**20


def build_report(
    stats: OccurrenceStats,
    findings: Any,
    *,
    model_summary: Mapping[str, Any] | None = None,
    title: str = "onnxaom report",
    history: Iterable[Mapping[str, Any]] | None = None,
    experiment: Iterable[Mapping[str, Any]] | None = None,
    layers: Sequence[str] | None = None,
    page_size: int = 64,
    notes: Sequence[str] = (),
    progress: bool = False,
) -> str:
    """The report as one HTML string (see :func:`write_report`)."""
    from . import charts
    from .findings import Findings, check_findings_match

    if isinstance(findings, Findings):  # each layer's view gets its LayerFindings only
        check_findings_match(findings, stats, ReportError)

    names = list(stats.layer_names if layers is None else layers)
    meta = dict(stats.metadata)
    facts = {
        "model": meta.get("model_name") or meta.get("model") or "",
        "samples": stats.num_samples,
        "classes": ", ".join(stats.class_names),
        "layers": len(stats.layer_names),
        "probe": meta.get("probe", ""),
        "threshold": meta.get("threshold", ""),
        # merged statistics list every run's data under "sources" ("source" is the first's)
        "data": ", ".join(map(str, meta.get("sources") or [])) or meta.get("source"),
        "provider": meta.get("provider", ""),
    }
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style>",
        f"<script>{_javascript_bundle()}</script></head><body>",
        f"<header><h1>{_e(title)}</h1>",
        "<p class='facts'>"
        + " · ".join(f"{_e(k)}: {_fmt(v)}" for k, v in facts.items() if v not in ("", None))
        + "</p></header>",
    ]
    parts.extend(f"<p class='hint'>{_e(note)}</p>" for note in notes)
    contents = ["<a href='#model'>model</a>", "<a href='#findings'>findings</a>"]
    contents += [f"<a href='#layer-{i}'>{_e(n)}</a>" for i, n in enumerate(names)]
    parts.append(f"<nav>{' · '.join(contents)}</nav>")
    parts.append("<section id='model'><h2>Model</h2>")
    parts.append(_table(model_summary) if model_summary else
                 "<p class='hint'>no model summary was given.</p>")
    parts.append("</section><section id='findings'><h2>Findings</h2>")
    lines = _summary_lines(findings)
    if not lines:
        parts.append("<p class='hint'>no findings were given.</p>")
    for heading, task_lines in _by_task(_task_lines(findings, lines)):
        parts.append(f"<h3>{_e(heading)}</h3><ul>")
        parts.extend(f"<li>{_e(x)}</li>" for x in task_lines)
        parts.append("</ul>")
    parts.append("</section>")
    hint = (
        "Click a kernel (row) in the ODM to highlight it in the AOM and CSM grids and the "
        "selectivity bars; shift-click adds kernels, double-click clears. Red frames: redundant "
        "groups (G1, G2, ...); grey: ineffective kernels. The class menu filters the "
        "grids' columns."
    )
    for i, name in enumerate(over(names, total=len(names), desc="report", unit="layer",
                                  enabled=progress)):
        started = time.perf_counter()
        found = _layer_findings(findings, name)
        chart = charts.layer_view(stats, name, found, page_size=page_size)
        spec = chart.to_dict(validate=False)
        view_id = f"view-{i}"
        parts.append(f"<section class='layer' id='layer-{i}'><h2>Layer {_e(name)}</h2><ul>")
        parts.extend(f"<li>{_e(x)}</li>"
                     for x in _layer_lines(stats, name, found, _lines_of(findings, name, lines)))
        parts.append(f"</ul><p class='hint'>{_e(hint)}</p>")
        parts.append(f"<div class='view' id='{view_id}'></div>{_json_script(spec, view_id)}")
        parts.append("</section>")
        log.info("report: layer %s in %.2f s", name, time.perf_counter() - started)
    extras = []
    if experiment is not None:
        extras.append(("experiment", "Kernel selectivity experiment",
                       charts.selectivity_experiment(experiment)))
    if history is not None:
        extras.append(("history", "Tuning session", charts.tuning_history(history)))
    for key, heading, extra in extras:
        view_id = f"view-{key}"
        parts.append(f"<section id='{key}'><h2>{_e(heading)}</h2>"
                     f"<div class='view' id='{view_id}'></div>"
                     f"{_json_script(extra.to_dict(validate=False), view_id)}</section>")
    parts.append(f"<script>{_EMBED_JS}</script></body></html>")
    return "\n".join(parts)


def write_report(
    stats: OccurrenceStats,
    findings: Any,
    out_dir: str | os.PathLike[str],
    *,
    model_summary: Mapping[str, Any] | None = None,
    title: str = "onnxaom report",
    history: Iterable[Mapping[str, Any]] | None = None,
    experiment: Iterable[Mapping[str, Any]] | None = None,
    layers: Sequence[str] | None = None,
    page_size: int = 64,
    notes: Sequence[str] = (),
    warn_large: bool = True,
    progress: bool = False,
) -> Path:
    """Write ``out_dir/report.html`` atomically (the folder is made if needed) and return its
    path.

    ``findings``: the :class:`onnxaom.findings.Findings` of ``stats`` (kernel order, redundant
    groups, ineffective kernels, findings in words), or None. ``model_summary``: any JSON-like
    dict (e.g. ``onnxaom.summary.summary(model).to_dict()``), shown as tables. ``history``:
    tuning steps for :func:`onnxaom.charts.tuning_history`; ``experiment``: records for
    :func:`onnxaom.charts.selectivity_experiment`. ``layers``: which layers get views (default
    all). ``notes``: lines shown under the title. ``warn_large``: log a warning for a file
    over :data:`LARGE_REPORT_BYTES` (a caller that moves the file elsewhere warns itself).
    ``progress``: a progress bar over the layers (tqdm) on stderr.
    The file needs no network: the Vega libraries are inlined.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"report folder {out} is a file; give a folder for report.html")
    text = build_report(
        stats,
        findings,
        model_summary=model_summary,
        title=title,
        history=history,
        experiment=experiment,
        layers=layers,
        page_size=page_size,
        notes=notes,
        progress=progress,
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create report folder {out}: {exc.strerror or exc}") from exc
    data = text.encode("utf-8")
    if warn_large:
        warn_if_large(out / REPORT_NAME, len(data))
    return atomic_write(out / REPORT_NAME, data)


def warn_if_large(path: Path, size: int) -> None:
    """Log a warning when the report at ``path`` is over :data:`LARGE_REPORT_BYTES`."""
    if size > LARGE_REPORT_BYTES:
        log.warning("%s is %.0f MB (every kernel x class tile of its layers is inlined): a "
                    "browser takes long to draw it; give layers=[...] (on the command line, "
                    "render single views with `onnxaom render`) for a smaller one",
                    path, size / 2**20)
