"""onnxaom.report and ``onnxaom render``: one offline HTML file; PNG/SVG/PDF export."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from onnxaom.cli import main
from onnxaom.errors import ModelFileNotFoundError, OnnxaomError, OutputError, ReportError
from onnxaom.findings import analyze
from onnxaom.report import build_report, render, write_report
from onnxaom.stats import OccurrenceStats

from .test_charts import make_stats, unit, units, validate

SUMMARY = {
    "model": "tiny",
    "layers": [
        {"name": "conv", "kernels": 12, "params": 1234, "macs": 5_600_000},
        {"name": "conv_b", "kernels": 6, "params": 99, "macs": 1000},
    ],
    "total_params": 1333,
    "total_macs": 5_601_000,
}


class _Page(HTMLParser):
    """Collects script tags (attributes and text) and visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self._script: dict[str, str | None] | None = None
        self._buffer: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._script, self._buffer = dict(attrs), []

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._script is not None:
            self.scripts.append((self._script, "".join(self._buffer)))
            self._script = None

    def handle_data(self, data: str) -> None:
        (self._buffer if self._script is not None else self.text).append(data)


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def specs(page: _Page) -> dict[str, dict[str, Any]]:
    return {
        str(attrs["data-view"]): json.loads(body)
        for attrs, body in page.scripts
        if attrs.get("type") == "application/json"
    }


@pytest.fixture(scope="module")
def two_layer_stats() -> OccurrenceStats:
    a = make_stats(k=12, c=4, h=5, w=5, seed=0)
    b = make_stats(k=6, c=4, h=3, w=3, seed=1)
    return OccurrenceStats(
        {"conv": a.counts["conv"], "conv_b": b.counts["conv"]},
        a.class_sizes,
        a.class_names,
        {"model_name": "tiny.onnx", "threshold": 0.0, "probe": "activation"},
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, two_layer_stats: OccurrenceStats) -> Path:
    out = tmp_path_factory.mktemp("report")
    findings = analyze(two_layer_stats)
    history: list[dict[str, Any]] = [{"step": 0, "params": 1333, "accuracy": 0.9},
               {"step": 1, "params": 1000, "accuracy": 0.91, "label": "conv: remove 3"}]
    return write_report(two_layer_stats, findings, out, model_summary=SUMMARY, title="Tiny",
                        history=history)


def test_report_is_one_offline_file(report: Path) -> None:
    assert report.name == "report.html"
    assert [p.name for p in report.parent.iterdir()] == ["report.html"]  # no temp files left
    text = report.read_text(encoding="utf-8")
    page = parse(text)
    # nothing loaded from elsewhere: no src/href to a file or URL, no stylesheet links
    for tag, attrs in page.tags:
        assert "src" not in attrs, (tag, attrs)
        assert tag != "link", attrs
        href = attrs.get("href")
        assert href is None or href.startswith("#"), href
    assert not re.search(r"""(import|fetch)\(\s*["']https?://""", text)
    # the Vega libraries are inlined
    code = "".join(body for attrs, body in page.scripts if "type" not in attrs)
    assert "window.vegaEmbed" in code and len(code) > 500_000
    assert report.stat().st_mode & 0o444 == 0o444


def test_report_has_summary_findings_and_a_view_per_layer(
    report: Path, two_layer_stats: OccurrenceStats
) -> None:
    page = parse(report.read_text(encoding="utf-8"))
    text = " ".join(page.text)
    assert "Tiny" in text
    for word in ("conv_b", "1,234", "5,600,000", "total_params"):
        assert word in text
    for line in analyze(two_layer_stats).summary_lines():
        assert line in text
    views = specs(page)
    assert set(views) == {"view-0", "view-1", "view-history"}
    for spec in views.values():
        validate(spec)
    for i, layer in enumerate(two_layer_stats.layer_names):
        spec = views[f"view-{i}"]
        assert spec["title"] == f"Layer {layer}"
        names = [str(u.get("name", "")) for u in units(spec)]
        for expected in ("odm_cells", "aom_images", "csm_images", "selectivity_bars"):
            assert any(n.startswith(expected) for n in names), (expected, names)
        unit(spec, "aom_images")
    # every view has a target element
    ids = {attrs.get("id") for _, attrs in page.tags}
    assert set(views) <= ids


def test_report_escapes_text_and_cannot_close_its_scripts(tmp_path: Path) -> None:
    base = make_stats(k=3, c=2, h=2, w=2)
    evil = ("</script><b>x</b>", "a'b\"c<!--")
    stats = OccurrenceStats({"<i>layer</i>": base.counts["conv"]}, base.class_sizes, evil)
    found = {"kernel_order": [0, 1, 2], "redundant_groups": [], "ineffective": []}
    text = build_report(stats, {"layers": {"<i>layer</i>": found}},
                        model_summary={"name": "<script>alert(1)</script>"})
    assert "<script>alert(1)" not in text
    assert "<i>layer</i>" not in text
    page = parse(text)
    (spec,) = specs(page).values()  # the JSON survives the script tag intact
    validate(spec)
    assert json.dumps(spec).count("</script>") >= 1  # the class name, decoded again


def _sections(text: str) -> dict[str, list[str]]:
    findings = text[text.index("<section id='findings'>"):]
    findings = findings[:findings.index("</section>")]
    return {heading: [html.unescape(li) for li in re.findall(r"<li>(.*?)</li>", body)]
            for heading, body in re.findall(r"<h3>(.*?)</h3><ul>(.*?)</ul>", findings, re.S)}


def test_findings_go_under_their_task_not_by_the_words_in_them() -> None:
    """A note mentioning "ineffective" went under Task 1, and with a class named "ineffective
    cat" every Task 2 line did too (the heading vanished)."""
    import numpy as np

    dead = np.zeros((3, 2, 2, 2), np.int64)
    alive = np.random.default_rng(0).integers(0, 11, (4, 2, 2, 2))
    stats = OccurrenceStats({"a": dead, "b": alive}, np.full(2, 10), ("ineffective cat", "dog"))
    found = analyze(stats)
    sections = _sections(build_report(stats, found))
    assert [line.split(":")[0] for line in sections["Task 1: kernels to remove (ineffective or "
                                                     "redundant)"]] == ["a"]
    assert len(sections["Task 2: layers that may be too small"]) == 2
    assert any(line.startswith("note (a): every kernel is ineffective")
               for line in sections["Other findings and notes"])
    tagged = found.task_lines()
    assert [line for _, line in tagged] == found.summary_lines()
    assert {task for task, _ in tagged} == {1, 2, 3, None}

def test_merged_statistics_name_every_data_set() -> None:
    base = make_stats(k=3, c=2, h=2, w=2)
    a = OccurrenceStats(dict(base.counts), base.class_sizes, metadata={"source": "digits"})
    b = OccurrenceStats(dict(base.counts), base.class_sizes, metadata={"source": "npz:x.npz"})
    page = parse(build_report(a + b, None))
    assert "data: digits, npz:x.npz" in " ".join(page.text)

def test_write_report_makes_its_folder_and_refuses_a_file(
    tmp_path: Path, two_layer_stats: OccurrenceStats
) -> None:
    made = write_report(two_layer_stats, None, tmp_path / "new" / "out", layers=["conv_b"])
    assert made == tmp_path / "new" / "out" / "report.html" and made.is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        write_report(two_layer_stats, None, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
    path = write_report(two_layer_stats, None, tmp_path, layers=["conv_b"])  # no findings
    page = parse(path.read_text(encoding="utf-8"))
    assert set(specs(page)) == {"view-0"}
    assert "no findings were given" in " ".join(page.text)


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<svg"),
                                           (".pdf", b"%PDF")])
def test_render_by_suffix(tmp_path: Path, suffix: str, magic: bytes) -> None:
    from onnxaom import charts

    stats = make_stats(k=5, c=3, h=3, w=3)
    chart = charts.odm_heatmap(stats, "conv", order=range(5))
    path = render(chart, tmp_path / f"odm{suffix}")
    assert path.read_bytes().startswith(magic)
    path = render(chart.to_dict(), tmp_path / f"spec{suffix.upper()}")
    assert path.read_bytes().startswith(magic)


@pytest.mark.parametrize("scale, message", [(0, "positive"), (-1, "positive"),
                                            (float("nan"), "positive"),
                                            (1000, "million scaled")])
def test_render_refuses_a_scale_it_cannot_draw(tmp_path: Path, scale: float,
                                               message: str) -> None:
    from onnxaom import charts

    chart = charts.odm_heatmap(make_stats(k=5, c=3, h=3, w=3), "conv", order=range(5))
    with pytest.raises(ReportError, match=message):
        render(chart, tmp_path / "odm.png", scale=scale)  # 1000: it aborted the process
    assert not (tmp_path / "odm.png").exists()


@pytest.mark.parametrize("suffix", [".svg", ".pdf"])
def test_render_refuses_a_scale_for_vector_formats(tmp_path: Path, suffix: str,
                                                   recwarn: pytest.WarningsRecorder) -> None:
    """A scale was ignored for SVG, and for PDF vl-convert printed its own warning and wrote
    scale 1: both formats are vector, so a scale other than 1 is refused, and 1 is quiet."""
    from onnxaom import charts

    chart = charts.odm_heatmap(make_stats(k=5, c=3, h=3, w=3), "conv", order=range(5))
    with pytest.raises(ReportError, match="PNG only"):
        render(chart, tmp_path / f"odm{suffix}", scale=3)
    assert not (tmp_path / f"odm{suffix}").exists()
    render(chart, tmp_path / f"odm{suffix}", scale=1)
    assert not [w for w in recwarn.list if "scale" in str(w.message)]


def test_a_layer_section_has_only_its_own_findings(tmp_path: Path) -> None:
    """Layers named ``conv``, ``conv (b)`` and ``conv: x``: the section of ``conv`` must not
    take the others' lines for its own (they start with its name)."""
    parts = [make_stats(k=4, c=3, h=3, w=3, seed=i) for i in range(3)]
    stats = OccurrenceStats({name: p.counts["conv"] for name, p in
                             zip(("conv", "conv (b)", "conv: x"), parts, strict=True)},
                            parts[0].class_sizes, parts[0].class_names)
    findings = analyze(stats)
    page = build_report(stats, findings, layers=["conv"])
    section = page[page.index("<h2>Layer conv</h2>"):]
    section = section[:section.index("</ul>")]
    for line in findings.layer_lines("conv (b)") + findings.layer_lines("conv: x"):
        assert html.escape(line) not in section


def test_render_rejects_unknown_suffix_and_missing_folder(tmp_path: Path) -> None:
    spec = {"mark": "point", "data": {"values": [{}]}}
    with pytest.raises(ValueError, match=r"\.png"):
        render(spec, tmp_path / "chart.jpg")
    with pytest.raises(FileNotFoundError):
        render(spec, tmp_path / "no" / "chart.png")
    with pytest.raises(TypeError):
        render(42, tmp_path / "chart.png")


def test_cli_render(tmp_path: Path, two_layer_stats: OccurrenceStats,
                    capsys: pytest.CaptureFixture[str]) -> None:
    stats_path = two_layer_stats.save(tmp_path / "stats.npz")
    for view in ("aom", "odm", "csm", "selectivity"):
        out = tmp_path / f"{view}.svg"
        assert main(["render", str(stats_path), "--layer", "conv_b", "--view", view,
                     "-o", str(out)]) == 0
        assert out.read_bytes().startswith(b"<svg")
    out = tmp_path / "aom-page.png"
    assert main(["render", str(stats_path), "--view", "aom", "--page", "2", "--page-size", "5",
                 "-o", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    assert "wrote" in capsys.readouterr().out
    assert main(["render", str(stats_path), "--layer", "nope", "-o", str(out)]) == 1
    assert "conv_b" in capsys.readouterr().err  # names the layers there are
    assert main(["render", str(stats_path), "-o", str(tmp_path / "x.gif")]) == 1
    assert issubclass(ModelFileNotFoundError, OnnxaomError)


def test_findings_lines_of_other_objects_are_grouped_by_their_wording() -> None:
    from onnxaom.report import _by_task, _task_lines

    lines = [
        "conv: 2 of 8 kernels ineffective (2 dead): kernels 1, 2",
        "conv: kernels 3, 4 behave alike (keep 4, the most selective; mean ODM 0.010)",
        "conv: 1 class pair(s) look alike in every kernel (...): 'a'/'b'; the layer may be too "
        "small",
        "conv (last conv layer): 1 of 8 kernels (12%) fire for ...; no sign of a too-shallow model",
        "fc: 10 kernels, nothing to report",
        "note (fc): every kernel is ineffective; the weak-class check had no kernel to use",
    ]
    grouped = dict(_by_task(_task_lines(None, lines)))
    assert [len(v) for v in grouped.values()] == [2, 1, 1, 2]
    assert [line for group in grouped.values() for line in group] == lines


def test_cli_render_of_the_layer_view_draws_every_kernel_or_the_page_asked(
        tmp_path: Path) -> None:
    """It drew the first 64 kernels (the slider's first page) and ignored --page."""
    stats = make_stats(k=70, c=2, h=2, w=2)
    path = stats.save(tmp_path / "stats.npz")
    drawn = {}
    for name, extra in (("all", []), ("page2", ["--page", "2", "--page-size", "32"])):
        out = tmp_path / f"{name}.svg"
        assert main(["render", str(path), "--view", "layer", *extra, "-o", str(out)]) == 0
        drawn[name] = out.read_text().count("<image")
    assert drawn == {"all": 70 * 2 * 2 + 1, "page2": 32 * 2 * 2 + 1}  # AOM + CSM tiles, ODM
    assert main(["render", str(path), "--view", "odm", "--page", "2", "-o",
                 str(tmp_path / "odm.svg")]) == 1

def test_cli_render_with_a_findings_file(tmp_path: Path,
                                         two_layer_stats: OccurrenceStats) -> None:
    stats_path = two_layer_stats.save(tmp_path / "stats.npz")
    found = analyze(two_layer_stats)
    findings_path = found.to_json(tmp_path / "findings.json")
    out = tmp_path / "layer.svg"
    assert main(["render", str(stats_path), "--layer", "conv", "--view", "layer",
                 "--findings", str(findings_path), "-o", str(out)]) == 0
    assert out.read_bytes().startswith(b"<svg")


def test_the_report_refuses_findings_of_other_statistics(tmp_path) -> None:
    """Each layer's view is given its LayerFindings, which carry no digest: the report checks
    the Findings once, before drawing (it drew another run's groups)."""
    import numpy as np

    from onnxaom import OccurrenceStats, ReportError, analyze
    from onnxaom.report import write_report

    rng = np.random.default_rng(0)
    a, b = (OccurrenceStats({"conv": rng.integers(0, 11, (4, 3, 2, 2))}, np.full(3, 10))
            for _ in range(2))
    with pytest.raises(ReportError, match="findings were made from other statistics"):
        write_report(a, analyze(b), tmp_path)
    assert not (tmp_path / "report.html").exists()
