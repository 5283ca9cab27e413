"""``onnxaom render`` and ``onnxaom compare``, reading statistics files (registered by
:mod:`onnxaom.cli`).

    onnxaom render STATS.npz --layer NAME --view aom|odm|csm|selectivity|layer -o OUT.png
    onnxaom compare A.npz B.npz [--match index|best] [--layers A=B ...] [--json OUT.json]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cli_types import float_from, int_at_least

__all__ = ["VIEWS", "add_parsers"]

VIEWS = ("aom", "odm", "csm", "selectivity", "layer")


def _cmd_render(args: argparse.Namespace) -> int:
    from . import charts
    from .errors import LayerNotFoundError, ReportError
    from .files import refuse_inputs
    from .findings import Findings, analyze, check_findings_match
    from .report import render
    from .stats import OccurrenceStats

    refuse_inputs(args.output, [args.stats, args.findings])
    stats = OccurrenceStats.load(args.stats)
    layer = args.layer if args.layer is not None else stats.layer_names[0]
    if layer not in stats.layer_names:
        raise LayerNotFoundError(
            f"no statistics for layer {layer!r} in {args.stats}; layers: "
            f"{', '.join(stats.layer_names)}"
        )
    found: Any
    if args.findings is not None:
        findings = Findings.from_json(args.findings)
        check_findings_match(findings, stats, ReportError,
                             what=f"the findings in {args.findings}")
        found = findings.layer(layer)
    else:
        found = analyze(stats, layers=[layer]).layer(layer)
    kw: dict[str, Any] = {}
    kernels = int(stats.counts[layer].shape[0])
    pages = max(1, -(-kernels // max(args.page_size, 1)))
    if args.page is not None and not 1 <= args.page <= pages:
        raise ReportError(f"--page {args.page}: layer {layer!r} has {kernels} kernels, "
                          f"{pages} page(s) of {args.page_size}; choose 1..{pages}")
    if args.view in ("aom", "csm", "selectivity"):
        kw = {"page": args.page, "page_size": args.page_size}
    elif args.view == "layer":  # a static image shows the slider's page: all kernels, or N
        kw = ({"page_size": max(kernels, 1)} if args.page is None
              else {"page_size": args.page_size, "first_page": args.page})
    elif args.page is not None:
        raise ReportError(f"--page does not apply to --view {args.view}: it shows every kernel")
    makers: dict[str, Callable[..., Any]] = {
        "aom": charts.aom_grid,
        "odm": charts.odm_heatmap,
        "csm": charts.csm_grid,
        "selectivity": charts.selectivity_bars,
        "layer": charts.layer_view,
    }
    make = makers[args.view]
    chart = make(stats, layer, found, **kw)
    path = render(chart, Path(args.output), scale=args.scale)
    print(f"wrote {path}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare
    from .files import refuse_inputs
    from .stats import OccurrenceStats

    if args.json is not None:
        refuse_inputs(args.json, [args.stats_a, args.stats_b], option="--json")
    a, b = OccurrenceStats.load(args.stats_a), OccurrenceStats.load(args.stats_b)
    pairs = [_layer_pair(text, a, b) for text in args.layers or ()]
    result = compare(a, b, layers=pairs or None, match=args.match)
    for line in result.summary_lines():
        print(line)
    if args.json is not None:
        print(f"wrote {result.to_json(args.json)}")
    return 0


def _layer_pair(text: str, a: Any, b: Any) -> tuple[str, str]:
    """``A=B`` split at the ``=`` where A is a layer of run a and B one of run b (layer names
    may hold ``=`` themselves); the first ``=`` when no split names two layers."""
    from .errors import StatsError

    cuts = [i for i, char in enumerate(text) if char == "="]
    if not cuts or any(not part for part in (text[:cuts[0]], text[cuts[-1] + 1:])):
        raise StatsError(f"--layers expects A=B (a layer of the first run = a layer of the "
                         f"second), got {text!r}")
    for i in cuts:
        if text[:i] in a.counts and text[i + 1:] in b.counts:
            return text[:i], text[i + 1:]
    return text[:cuts[0]], text[cuts[0] + 1:]  # compare() names the unknown layer


def add_parsers(subparsers: Any) -> None:
    """Register ``render`` and ``compare`` on the ``onnxaom`` command's subparsers."""
    p = subparsers.add_parser(
        "render",
        help="export one chart of a layer (AOM, ODM, CSM, selectivity) to PNG, SVG or PDF",
        description="Draw one view of one layer from a statistics file and write it to OUT; "
        "the format follows OUT's suffix (.png, .svg, .pdf).",
    )
    p.add_argument("stats", help="statistics file (stats.npz written by `onnxaom analyze`)")
    p.add_argument("--layer", metavar="NAME", help="layer to draw (default: the first)")
    p.add_argument("--view", choices=VIEWS, default="aom",
                   help="aom (Fig. 2), odm (Fig. 3), csm (Fig. 4), selectivity (eq. 4), or "
                   "layer (all of them, linked); default aom")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output file: OUT.png, OUT.svg or OUT.pdf")
    p.add_argument("--findings", metavar="JSON",
                   help="findings.json for the kernel order and groups (default: computed)")
    p.add_argument("--page", type=int_at_least(1), default=None, metavar="N",
                   help="aom/csm/selectivity/layer: draw only kernels page N (default: all "
                        "kernels)")
    p.add_argument("--page-size", type=int_at_least(1), default=64, metavar="K",
                   help="kernels a page (default 64)")
    p.add_argument("--scale", type=float_from(0, strict=True), default=1.0,
                   help="PNG scale factor (default 1; SVG and PDF are vector)")
    p.set_defaults(func=_cmd_render)

    p = subparsers.add_parser(
        "compare",
        help="compare two runs' occurrence maps (two exports, frameworks or trainings)",
        description="Pair the layers of two statistics files (in model order, or by --layers) "
        "and their kernels (by index, or the closest one-to-one pairing), and print the "
        "distance of each pair: the paper's ODM across the two models.",
    )
    p.add_argument("stats_a", metavar="A.npz", help="statistics of the first model")
    p.add_argument("stats_b", metavar="B.npz", help="statistics of the second model")
    p.add_argument("--match", choices=("index", "best"), default="index",
                   help="index: kernel k with kernel k (one network, two exports; default); "
                   "best: the pairing with the least total distance (two trainings)")
    p.add_argument("--layers", nargs="+", metavar="A=B",
                   help="pairs of layers to compare (default: all, paired by position)")
    p.add_argument("--json", metavar="OUT", help="also write the comparison as JSON")
    p.set_defaults(func=_cmd_compare)
