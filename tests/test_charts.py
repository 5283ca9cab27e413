"""onnxaom.charts: specs valid against the Vega-Lite schema; scales, orders and data asserted."""

from __future__ import annotations

import base64
import bisect
import dataclasses
import json
import struct
import warnings
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import altair as alt
import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxaom import charts
from onnxaom.charts import (
    AOM_COLORS,
    CSM_COLORS,
    MISSING_COLOR,
    ODM_COLORS,
    quantize,
)
from onnxaom.errors import LayerNotFoundError, ReportError
from onnxaom.findings import analyze
from onnxaom.stats import OccurrenceStats, class_selectivity, csm, odm, selectivity


# ----------------------------------------------------------------------------- helpers
def make_stats(
    k: int = 12, c: int = 4, h: int = 5, w: int = 5, n: int = 20, seed: int = 0
) -> OccurrenceStats:
    """Random integer counts: (K, C, H, W) in [0, n], n samples a class."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, n + 1, size=(k, c, h, w), dtype=np.int64)
    names = tuple(f"class {i}" for i in range(c))
    return OccurrenceStats({"conv": counts}, np.full(c, n, np.int64), names)


@lru_cache(maxsize=1)
def vega_lite_schema() -> dict[str, Any]:
    major = alt.SCHEMA_VERSION.split(".")[0]  # "v6"
    path = Path(alt.__file__).parent / "vegalite" / major / "schema" / "vega-lite-schema.json"
    return dict(json.loads(path.read_text()))


def validate(spec: dict[str, Any]) -> None:
    schema = vega_lite_schema()
    jsonschema.validators.validator_for(schema)(schema).validate(spec)


def spec_of(chart: Any) -> dict[str, Any]:
    spec = chart.to_dict()  # Altair validates too
    validate(spec)
    return dict(spec)


def units(spec: Any) -> list[dict[str, Any]]:
    """Every unit (single-mark) spec, depth first."""
    out: list[dict[str, Any]] = []
    if isinstance(spec, dict):
        if "mark" in spec:
            out.append(spec)
        for key in ("layer", "hconcat", "vconcat", "concat"):
            for sub in spec.get(key, []):
                out.extend(units(sub))
        if "spec" in spec:
            out.extend(units(spec["spec"]))
    return out


def unit(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [u for u in units(spec) if str(u.get("name", "")).startswith(name)]
    assert len(found) == 1, [u.get("name") for u in units(spec)]
    return found[0]


def data_of(spec: dict[str, Any], u: dict[str, Any]) -> list[dict[str, Any]]:
    """A unit's records; for a tile grid, each with the ``url`` its calculate transform
    makes (the grid's shared PNG header, a string literal, + the tile's ``png``)."""
    data = u["data"]
    values = spec["datasets"][data["name"]] if "name" in data else data["values"]
    records = list(json.loads(values) if isinstance(values, str) else values)
    for step in u.get("transform", []):
        if step.get("as") == "url":
            head, _, field = step["calculate"].partition("' + datum.")
            assert head.startswith("'") and field == "png", step["calculate"]
            for record in records:
                record["url"] = head[1:] + record["png"]
    return records


def decode_png(url: str) -> tuple[np.ndarray, list[str]]:
    """An indexed PNG data URL -> (pixel indices (h, w), palette hex colours)."""
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    raw = base64.b64decode(url[len(prefix) :])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    idat = b""
    while pos < len(raw):
        (length,) = struct.unpack(">I", raw[pos : pos + 4])
        kind = raw[pos + 4 : pos + 8]
        body = raw[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", raw[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        if kind == b"IDAT":
            idat += body
        else:
            chunks[kind] = body
        pos += 12 + length
    w, h, depth, colour_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert colour_type == 3
    plte = chunks[b"PLTE"]
    palette = [f"#{plte[i]:02x}{plte[i + 1]:02x}{plte[i + 2]:02x}" for i in range(0, len(plte), 3)]
    stride = (w * depth + 7) // 8
    data = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, stride + 1)
    assert (data[:, 0] == 0).all()  # filter type None on every row
    rows = data[:, 1:]
    if depth == 4:
        rows = np.stack([rows >> 4, rows & 15], axis=2).reshape(h, -1)
    return rows[:, :w], palette


def condition_param(channel: dict[str, Any]) -> str:
    condition = channel["condition"]
    condition = condition[0] if isinstance(condition, list) else condition
    return str(condition["param"])


def upscaled(index: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(index, factor, axis=0), factor, axis=1)


@pytest.fixture(scope="module")
def stats() -> OccurrenceStats:
    return make_stats()


@pytest.fixture(scope="module")
def findings(stats: OccurrenceStats) -> Any:
    return analyze(stats)


# ----------------------------------------------------------------------------- colours
def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return (int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16))


def test_palettes_are_ordinal_and_follow_the_paper() -> None:
    assert len(AOM_COLORS) == len(ODM_COLORS) == len(CSM_COLORS) == 10
    # AOM: dark to light (an ordinal, sequential map)
    lum = [sum(_rgb(c)) for c in AOM_COLORS]
    assert lum == sorted(lum)
    # ODM: blue to red
    first, last = _rgb(ODM_COLORS[0]), _rgb(ODM_COLORS[-1])
    assert first[2] > first[0] and last[0] > last[2]
    # CSM: -1 red ... 0- yellow | 0+ cyan ... 1 purple
    red, yellow, cyan, purple = (_rgb(CSM_COLORS[i]) for i in (0, 4, 5, 9))
    assert red[0] > 150 and red[1] < 60 and red[2] < 60
    assert yellow[0] > 200 and yellow[1] > 180 and yellow[2] < 80
    assert cyan[0] < 80 and cyan[1] > 180 and cyan[2] > 200
    assert purple[0] > purple[1] and purple[2] > purple[1]
    assert MISSING_COLOR not in AOM_COLORS + ODM_COLORS + CSM_COLORS


def test_quantize_matches_vega_quantize_bins() -> None:
    values = np.array([0.0, 0.0999, 0.1, 0.55, 0.9999, 1.0, -0.5, 1.5, np.nan])
    assert quantize(values, (0.0, 1.0), 10).tolist() == [0, 0, 1, 5, 9, 9, 0, 9, 10]
    assert quantize(np.array([-1.0, -0.01, 0.0, 0.99, 1.0]), (-1.0, 1.0), 10).tolist() == [
        0, 4, 5, 9, 9,
    ]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-2, 2, allow_nan=False), min_size=1, max_size=30),
    st.sampled_from([(0.0, 1.0), (-1.0, 1.0), (0.0, 0.35)]),
    st.integers(2, 12),
)
def test_quantize_is_d3_scale_quantize(
    values: list[float], domain: tuple[float, float], n: int
) -> None:
    lo, hi = domain
    # d3.scaleQuantize: thresholds lo + (i + 1) (hi - lo) / n, bin = bisectRight(thresholds, x)
    thresholds = [((i + 1) * hi - (i - n + 1) * lo) / n for i in range(n - 1)]
    got = quantize(np.array(values), domain, n).tolist()
    for x, bin_ in zip(values, got, strict=True):
        expected = bisect.bisect_right(thresholds, x)
        near = min(abs(x - t) for t in thresholds) < 1e-9
        assert bin_ == expected or near


# ----------------------------------------------------------------------------- AOM grid
def test_aom_grid_rows_colours_and_pixels(stats: OccurrenceStats, findings: Any) -> None:
    spec = spec_of(charts.aom_grid(stats, "conv", findings, cell=20))
    images = unit(spec, "aom_images")
    assert images["mark"]["type"] == "image"
    records = data_of(spec, images)
    order = list(findings.layer("conv").kernel_order)
    k, c = stats.counts["conv"].shape[:2]
    assert len(records) == k * c
    # rows in cluster order; row strings sort into that order
    assert [r["kernel"] for r in records[::c]] == order
    rows = [r["row"] for r in records[::c]]
    assert rows == sorted(rows)
    assert images["encoding"]["y"]["sort"] == "ascending"
    assert images["encoding"]["x"]["sort"] == list(stats.class_names)
    # every tile: the AOM quantised on the 10 colours, nearest-neighbour upscaled
    aom = stats.aom("conv")
    expected = quantize(aom, (0.0, 1.0), 10)
    for r in records:
        index, palette = decode_png(r["url"])
        assert palette == [*AOM_COLORS, MISSING_COLOR]
        assert np.array_equal(index, upscaled(expected[r["kernel"], stats.class_names.index(
            r["class_name"])], 4))  # ceil(20 / 5)
        assert r["mean"] == pytest.approx(aom[r["kernel"], stats.class_names.index(
            r["class_name"])].mean(), abs=1e-4)
    # the colour legend is the same scale
    key = unit(spec, "aom_key")
    scale = key["encoding"]["color"]["scale"]
    assert scale == {"type": "quantize", "domain": [0.0, 1.0], "range": list(AOM_COLORS)}


def test_aom_grid_frames_redundant_groups_and_ineffective(stats: OccurrenceStats) -> None:
    order = list(range(12))
    groups = [((3, 4, 5), 4), ((8, 10), 10)]  # 8 and 10 are not adjacent in this order
    found = {"kernel_order": order, "redundant_groups": groups, "ineffective": [0]}
    spec = spec_of(charts.aom_grid(stats, "conv", found))
    frames = data_of(spec, unit(spec, "aom_frames"))
    rows = {r["kernel"]: r["row"] for r in data_of(spec, unit(spec, "aom_images"))}
    got = {(f["first"], f["last"], f["kind"]) for f in frames}
    assert got == {
        (rows[3], rows[5], "redundant group"),
        (rows[8], rows[8], "redundant group"),
        (rows[10], rows[10], "redundant group"),
        (rows[0], rows[0], "ineffective"),
    }
    assert any("keep k4" in f["label"] for f in frames)
    stroke = unit(spec, "aom_frames")["encoding"]["stroke"]["scale"]
    assert stroke["domain"] == ["redundant group", "ineffective"]
    assert stroke["range"][0] == "#d62728"


def test_aom_grid_static_page_and_classes(stats: OccurrenceStats) -> None:
    spec = spec_of(
        charts.aom_grid(stats, "conv", order=list(range(12)), page=2, page_size=5,
                        classes=["class 1"])
    )
    images = unit(spec, "aom_images")
    assert {"filter": "datum.page == 2"} in images["transform"]
    assert {"filter": {"field": "class_name", "oneOf": ["class 1"]}} in images["transform"]
    pages = {r["kernel"]: r["page"] for r in data_of(spec, images)}
    assert pages[0] == 1 and pages[5] == 2 and pages[11] == 3


def test_aom_grid_large_maps_are_pooled() -> None:
    big = make_stats(k=2, c=2, h=128, w=64, n=3)
    spec = spec_of(charts.aom_grid(big, "conv", order=[0, 1], cell=32))
    index, _ = decode_png(data_of(spec, unit(spec, "aom_images"))[0]["url"])
    assert index.shape == (32, 16)  # 128 // 32 = 4: 4 x 4 blocks, under 2 pixels a screen pixel
    pooled = big.aom("conv")[0, 0].reshape(32, 4, 16, 4).mean(axis=(1, 3))
    assert np.array_equal(index, quantize(pooled, (0.0, 1.0), 10))
    # a ragged edge pads with NaN, which the mean ignores
    odd = make_stats(k=1, c=2, h=129, w=3, n=3)
    spec = spec_of(charts.aom_grid(odd, "conv", order=[0], cell=32))
    index, _ = decode_png(data_of(spec, unit(spec, "aom_images"))[0]["url"])
    assert index.shape == (33, 1)
    assert index[-1, 0] == quantize(odd.aom("conv")[0, 0, 128:].mean(), (0.0, 1.0), 10)
    # maps under 2 cells a side are not pooled: 40 > 32 but 40 // 32 == 1
    mid = make_stats(k=1, c=2, h=40, w=40, n=3)
    spec = spec_of(charts.aom_grid(mid, "conv", order=[0], cell=32))
    assert decode_png(data_of(spec, unit(spec, "aom_images"))[0]["url"])[0].shape == (40, 40)


def test_empty_class_is_drawn_as_missing() -> None:
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 5, size=(3, 3, 2, 2))
    counts[:, 2] = 0
    s = OccurrenceStats({"conv": counts}, np.array([5, 5, 0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # collect warned already; the view shows blanks
        spec = spec_of(charts.aom_grid(s, "conv", order=[0, 1, 2], cell=4))
    records = data_of(spec, unit(spec, "aom_images"))
    empty = [r for r in records if r["class_name"] == "2"]
    assert all(r["mean"] is None for r in empty)
    assert all((decode_png(r["url"])[0] == 10).all() for r in empty)


def test_an_empty_class_leaves_the_other_views_drawn() -> None:
    """Eqs. 2-4 over the classes with samples, as OccurrenceStats computes them: the ODM
    cells, the selectivity bars and the other classes' CSM tiles have values."""
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 5, size=(3, 3, 2, 2))
    counts[:, 2] = 0
    s = OccurrenceStats({"conv": counts}, np.array([5, 5, 0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        odm_spec = spec_of(charts.odm_heatmap(s, "conv", order=[0, 1, 2]))
        bars = spec_of(charts.selectivity_bars(s, "conv", order=[0, 1, 2]))
        grid = spec_of(charts.csm_grid(s, "conv", order=[0, 1, 2], cell=4))
    cells = data_of(odm_spec, unit(odm_spec, "odm_cells"))
    assert cells and all(c["d"] is not None for c in cells)
    assert all(b["selectivity"] is not None for b in data_of(bars, unit(bars, "selectivity_bars")))
    tiles = data_of(grid, unit(grid, "csm_images"))
    assert all((t["mean"] is None) == (t["class_name"] == "2") for t in tiles)


def test_one_class_draws_the_aom_in_kernel_order() -> None:
    counts = np.random.default_rng(2).integers(0, 5, size=(4, 1, 2, 2))
    s = OccurrenceStats({"conv": counts}, np.array([5]))
    spec = spec_of(charts.aom_grid(s, "conv", cell=4))
    assert len(data_of(spec, unit(spec, "aom_images"))) == 4
    charts.layer_view(s, "conv")  # the views that need 2 classes are left out


def test_bad_arguments_raise(stats: OccurrenceStats) -> None:
    with pytest.raises(ReportError, match="each of its 12 kernels"):
        charts.aom_grid(stats, "conv", order=[0, 0, 1])
    with pytest.raises(ReportError, match="cell"):
        charts.aom_grid(stats, "conv", order=list(range(12)), cell=2)
    with pytest.raises(LayerNotFoundError, match="conv"):
        charts.odm_heatmap(stats, "nope")
    with pytest.raises(ValueError, match="page_size"):
        charts.csm_grid(stats, "conv", page_size=0)


# ----------------------------------------------------------------------------- CSM
def test_csm_grid_two_segment_scale(stats: OccurrenceStats, findings: Any) -> None:
    spec = spec_of(charts.csm_grid(stats, "conv", findings, cell=10))
    scale = unit(spec, "csm_key")["encoding"]["color"]["scale"]
    assert scale == {"type": "quantize", "domain": [-1.0, 1.0], "range": list(CSM_COLORS)}
    records = data_of(spec, unit(spec, "csm_images"))
    expected = quantize(csm(stats.aom("conv")), (-1.0, 1.0), 10)
    assert [r["kernel"] for r in records[:: stats.num_classes]] == list(
        findings.layer("conv").kernel_order
    )
    for r in records:
        index, palette = decode_png(r["url"])
        assert palette == [*CSM_COLORS, MISSING_COLOR]
        c = stats.class_names.index(r["class_name"])
        assert np.array_equal(index, upscaled(expected[r["kernel"], c], 2))


# ----------------------------------------------------------------------------- ODM
def test_odm_rects_values_order_and_scale(stats: OccurrenceStats, findings: Any) -> None:
    spec = spec_of(charts.odm_heatmap(stats, "conv", findings))
    cells = data_of(spec, unit(spec, "odm_cells"))
    d = odm(stats.aom("conv"))
    order = list(findings.layer("conv").kernel_order)
    assert [c["kernel"] for c in cells[:: len(order)]] == order
    assert [c["other"] for c in cells[: len(order)]] == order
    for cell in cells:
        assert cell["d"] == pytest.approx(d[cell["kernel"], cell["other"]], abs=1e-4)
    cells_unit = unit(spec, "odm_cells")
    scale = cells_unit["encoding"]["color"]["scale"]
    assert scale["type"] == "quantize" and scale["range"] == list(ODM_COLORS)
    assert scale["domain"][0] == 0 and d.max() <= scale["domain"][1] <= 1.5 * d.max()
    (param,) = [p for p in spec["params"] if p["name"] == "kernels"]
    assert param["select"] == {"type": "point", "fields": ["kernel"], "on": "click",
                               "clear": "dblclick"}


def test_odm_image_path_for_large_layers() -> None:
    s = make_stats(k=40, c=3, h=2, w=2)
    order = np.random.default_rng(3).permutation(40)
    spec = spec_of(charts.odm_heatmap(s, "conv", order=order, max_rects=16, size=200))
    (image,) = [u for u in units(spec) if u["mark"]["type"] == "image"]
    index, palette = decode_png(data_of(spec, image)[0]["url"])
    assert palette == [*ODM_COLORS, MISSING_COLOR]
    keyed = next(u for u in units(spec) if "color" in u.get("encoding", {}))
    scale = keyed["encoding"]["color"]["scale"]
    d = odm(s.aom("conv"))[np.ix_(order, order)]
    step = 200 // 40
    assert np.array_equal(index, upscaled(quantize(d, tuple(scale["domain"]), 10), step))
    rows = data_of(spec, unit(spec, "odm_rows"))
    assert [r["kernel"] for r in rows] == order.tolist()
    assert spec["params"][0]["views"] == ["odm_rows"]


@pytest.mark.parametrize("k", [1024])
def test_odm_renders_for_1024_kernels(k: int) -> None:
    import vl_convert as vlc

    s = make_stats(k=k, c=3, h=2, w=2, n=4)
    spec = charts.odm_heatmap(s, "conv", order=np.arange(k)).to_dict()
    validate(spec)
    png = vlc.vegalite_to_png(spec)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 640 and height >= 640
    assert len(json.dumps(spec)) < 2_000_000


# ----------------------------------------------------------------------------- selectivity
def test_selectivity_bars_values(stats: OccurrenceStats, findings: Any) -> None:
    spec = spec_of(charts.selectivity_bars(stats, "conv", findings))
    records = data_of(spec, unit(spec, "selectivity_bars"))
    s = selectivity(stats.aom("conv"))
    assert [r["kernel"] for r in records] == list(findings.layer("conv").kernel_order)
    for r in records:
        assert r["selectivity"] == pytest.approx(s[r["kernel"]], abs=1e-4)


def test_selectivity_counts_and_experiment_chart(stats: OccurrenceStats) -> None:
    counts = charts.selectivity_counts(stats, "conv")
    a = class_selectivity(stats.aom("conv"))
    for c, rec in enumerate(counts):
        assert rec["class"] == stats.class_names[c]
        assert rec["selective"] == int((a[:, c] > 0).sum())
        assert rec["selective"] + rec["not_selective"] == 12
    records = [dict(r, accuracy_all=0.8, accuracy_selective=0.9, accuracy_not_selective=0.4)
               for r in counts]
    records[0].pop("accuracy_selective")
    spec = spec_of(charts.selectivity_experiment(records))
    assert spec["mark"]["type"] == "bar"
    enc = spec["encoding"]
    assert enc["color"]["scale"] == {
        "domain": ["all kernels", "not selective", "selective"],
        "range": ["#7f7f7f", "#d62728", "#2ca02c"],
    }
    assert enc["row"]["field"] == "panel"
    values = data_of(spec, spec)
    kept = [v for v in values if v["panel"] == "kernels kept"]
    acc = [v for v in values if v["panel"] == "class accuracy"]
    assert len(kept) == 2 * 4 and len(acc) == 3 * 4 - 1
    with pytest.raises(ReportError):
        charts.selectivity_experiment([])


def test_tuning_history() -> None:
    steps: list[dict[str, Any]] = [
        {"step": 1, "params": 9000, "accuracy": 0.95, "label": "conv1: remove 4 kernels"},
        {"step": 0, "params": 10000, "accuracy": 0.96},
    ]
    spec = spec_of(charts.tuning_history(steps))
    assert spec["mark"] == {"type": "line", "point": True}
    assert spec["encoding"]["order"] == {"field": "step", "type": "quantitative"}
    assert spec["encoding"]["x"]["field"] == "params"
    assert spec["encoding"]["y"]["field"] == "accuracy"
    values = data_of(spec, spec)
    assert values[1] == {"step": 0, "params": 10000, "accuracy": 0.96, "label": ""}
    with pytest.raises(ReportError):
        charts.tuning_history([])


# ----------------------------------------------------------------------------- linked view
def test_layer_view_links_kernels_classes_and_pages() -> None:
    import vl_convert as vlc

    s = make_stats(k=80, c=3, h=3, w=3)
    found = analyze(s)
    spec = spec_of(charts.layer_view(s, "conv", found, page_size=32))
    params = {p["name"]: p for p in spec["params"]}
    assert set(params) == {"kernels", "classes", "page"}
    assert params["classes"]["bind"]["options"] == ["", *s.class_names]
    assert params["page"]["bind"] == {"input": "range", "min": 1, "max": 3, "step": 1,
                                      "name": params["page"]["bind"]["name"]}
    # 80 > 64 kernels: the image ODM; only its row rects take clicks (Altair suffixes "_0")
    (view,) = params["kernels"]["views"]
    assert view.startswith("odm_rows")
    for name in ("aom_images", "csm_images"):
        transforms = unit(spec, name)["transform"]
        assert {"filter": {"or": ["datum.page == page", {"param": "kernels", "empty": False}]}} \
            in transforms
        assert {"filter": "classes == '' || datum.class_name == classes"} in transforms
        assert condition_param(unit(spec, name)["encoding"]["opacity"]) == "kernels"
        highlight = unit(spec, name.replace("images", "highlight"))
        assert condition_param(highlight["encoding"]["stroke"]) == "kernels"
    bars = unit(spec, "selectivity_bars")
    assert condition_param(bars["encoding"]["color"]) == "kernels"
    # Vega compiles and runs it (no duplicate signals, no unknown params)
    svg = vlc.vegalite_to_svg(spec)
    assert svg.count("<image") >= 32 * 3 * 2  # one page of AOM and CSM tiles


def test_no_max_rows_error_for_512_kernels_by_10_classes() -> None:
    s = make_stats(k=512, c=10, h=4, w=4, n=3)
    order = np.arange(512)
    found = {"kernel_order": order, "redundant_groups": [], "ineffective": []}
    with alt.data_transformers.enable("default", max_rows=5000):
        spec = charts.layer_view(s, "conv", found).to_dict()
    images = data_of(spec, unit(spec, "aom_images"))
    assert len(images) == 5120


def test_charts_render_in_jupyter_like_altair(stats: OccurrenceStats, findings: Any) -> None:
    chart = charts.odm_heatmap(stats, "conv", findings)
    with alt.renderers.enable("mimetype"):
        bundle = chart._repr_mimebundle_()
    bundle = bundle[0] if isinstance(bundle, tuple) else bundle
    assert bundle is not None
    assert any(key.startswith("application/vnd.vegalite") for key in bundle)


def test_class_names_vega_cannot_hold_are_shown_changed() -> None:
    """A U+2028 in a class name stopped every view (Vega's expression lexer), and a class named
    "" was the class menu's "all"."""
    base = make_stats(k=3, c=3, h=2, w=2)
    stats = OccurrenceStats(dict(base.counts), base.class_sizes, ("a\u2028b", "", "(unnamed)"))
    spec = spec_of(charts.layer_view(stats, "conv", analyze(stats)))
    params = {p["name"]: p for p in spec["params"]}
    shown = ["a b", "(unnamed) (class 1)", "(unnamed) (class 2)"]
    assert params["classes"]["bind"]["options"] == ["", *shown]
    assert "\u2028" not in json.dumps(spec, ensure_ascii=False)

def test_layer_view_with_one_class_that_has_samples_leaves_out_the_class_comparisons() -> None:
    """Two classes, one of them empty: the view is the AOM grid and the ODM, as for one class
    (it used to fail, saying the statistics had 1 class)."""
    s = make_stats(k=4, c=2, h=3, w=3)
    empty = OccurrenceStats({"conv": s.counts["conv"] * np.array([1, 0])[None, :, None, None]},
                            np.array([s.class_sizes[0], 0]), s.class_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the empty class's AOM is NaN
        spec = spec_of(charts.layer_view(empty, "conv"))
    names = json.dumps(spec)
    assert "aom_images" in names and "csm_images" not in names


def test_findings_of_other_statistics_are_refused(tmp_path: Path) -> None:
    """Findings drawn over other statistics frame the wrong kernels: refused by digest (same
    layer, same kernel count, another run), and by class names for findings files written
    before the digest was recorded; the CLI says so in one line."""
    stats, other = make_stats(seed=0), make_stats(seed=1)
    layer = stats.layer_names[0]
    assert analyze(stats).stats_digest == stats.digest != other.digest
    with pytest.raises(ReportError, match="findings were made from other statistics"):
        charts.layer_view(stats, layer, analyze(other))
    renamed = OccurrenceStats(dict(other.counts), other.class_sizes,
                              tuple(f"c{i}" for i in range(other.num_classes)))
    old_file = dataclasses.replace(analyze(renamed), stats_digest=None)
    with pytest.raises(ReportError, match=r"findings are of classes \['c0'"):
        charts.odm_heatmap(stats, layer, old_file)
    charts.layer_view(stats, layer, analyze(stats))  # its own findings draw
    from onnxaom.cli import main

    stats.save(tmp_path / "s.npz")
    analyze(other).to_json(tmp_path / "f.json")
    assert main(["render", str(tmp_path / "s.npz"), "--layer", layer, "--findings",
                 str(tmp_path / "f.json"), "-o", str(tmp_path / "x.svg")]) == 1
    assert not (tmp_path / "x.svg").exists()
