"""The report in a real headless Chromium, network off: it loads, draws, and links its views.

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``,
``/usr/bin/chromedriver``) and ``selenium``; nothing is downloaded (selenium-manager is told to
stay offline and given the driver). Skipped when they are missing, except under CI (``CI`` set),
where that is a failure. A screenshot lands in ``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from onnxaom.findings import analyze
from onnxaom.report import write_report
from onnxaom.stats import OccurrenceStats

from .test_charts import make_stats

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

# Vega's scene graph, walked for marks whose name starts with a prefix; returns each item's
# datum and its centre in page (viewport) coordinates, plus its opacity.
_FIND = """
window.onnxaomFind = function (viewId, prefix) {
  var view = window.onnxaom.views[viewId];
  var canvas = document.getElementById(viewId).querySelector("canvas");
  var box = canvas.getBoundingClientRect();
  var origin = view.origin(), pad = view.padding();  // canvas = padding + origin + scene
  var out = [];
  function walk(mark, ox, oy) {
    if (!mark || !mark.items) return;
    mark.items.forEach(function (item) {
      var x = ox + (item.x || 0), y = oy + (item.y || 0);
      if (mark.marktype !== "group" && mark.name && mark.name.indexOf(prefix) === 0) {
        var b = item.bounds;
        out.push({
          datum: item.datum,
          opacity: item.opacity === undefined ? 1 : item.opacity,
          // an image mark's decoded picture (Vega keeps it on the item): 0 wide if broken
          decoded: mark.marktype === "image" ?
            (item.image ? (item.image.naturalWidth || item.image.width || 0) : 0) : null,
          x: box.left + (pad.left || 0) + origin[0] + ox + (b.x1 + b.x2) / 2,
          y: box.top + (pad.top || 0) + origin[1] + oy + (b.y1 + b.y2) / 2
        });
      }
      if (mark.marktype === "group") {
        (item.items || []).forEach(function (child) { walk(child, x, y); });
      }
    });
  }
  walk(view.scenegraph().root, 0, 0);
  return out;
};
"""


def _need_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        message = f"headless browser test needs {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message + " (.ci/run installs them)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    small = make_stats(k=16, c=4, h=6, w=6, seed=0)  # ODM drawn as rects
    large = make_stats(k=80, c=4, h=4, w=4, seed=1)  # ODM as an image; grids in 2 pages
    stats = OccurrenceStats(
        {"small": small.counts["conv"], "large": large.counts["conv"]},
        small.class_sizes,
        small.class_names,
        {"model_name": "browser-test"},
    )
    out = tmp_path_factory.mktemp("browser")
    history = [{"step": 0, "params": 100, "accuracy": 0.9},
               {"step": 1, "params": 80, "accuracy": 0.92}]
    return write_report(stats, analyze(stats), out, history=history)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must not try to download anything
    profile = tempfile.mkdtemp(prefix="onnxaom-chromium-")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
        "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_script_timeout(30)
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd(
            "Network.emulateNetworkConditions",
            {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0},
        )
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page(browser: Any, report: Path) -> Any:
    browser.get(report.as_uri())
    result = browser.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "window.onnxaom.ready.then(function () {"
        "  done({views: Object.keys(window.onnxaom.views), errors: window.onnxaom.errors});"
        "}, function (e) { done({views: [], errors: [String(e)]}); });"
    )
    assert result["errors"] == []
    assert sorted(result["views"]) == ["view-0", "view-1", "view-history"]
    browser.execute_script(_FIND)
    return browser


def _items(driver: Any, view_id: str, prefix: str) -> list[dict[str, Any]]:
    return list(driver.execute_script(f"return window.onnxaomFind({view_id!r}, {prefix!r});"))


def _settle(driver: Any, view_id: str) -> None:
    driver.execute_async_script(
        f"var done = arguments[arguments.length - 1];"
        f"window.onnxaom.views[{view_id!r}].runAsync().then(function () {{ done(true); }});"
    )


def _canvas_digest(driver: Any, view_id: str) -> str:
    return str(driver.execute_script(
        f"return document.getElementById({view_id!r}).querySelector('canvas').toDataURL();"
    ))


def _click(driver: Any, x: float, y: float) -> None:
    """A real mouse click through Chromium's input pipeline, at viewport coordinates."""
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
        driver.execute_cdp_cmd(
            "Input.dispatchMouseEvent",
            {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
        )


def _scroll_to(driver: Any, view_id: str, prefix: str, match: dict[str, Any]) -> dict[str, Any]:
    """Scroll the first item of ``prefix`` whose datum has ``match`` into view; return it."""
    def find() -> dict[str, Any]:
        for item in _items(driver, view_id, prefix):
            if all(item["datum"].get(k) == v for k, v in match.items()):
                return item
        raise AssertionError(f"no {prefix} item with {match} in {view_id}")

    item = find()
    driver.execute_script(f"window.scrollBy(0, {item['y'] - 300});")
    time.sleep(0.05)
    return find()


def test_page_loads_offline_without_errors_and_draws_every_view(page: Any) -> None:
    severe = [e for e in page.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    fetched = []
    for entry in page.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if url.startswith(("http:", "https:", "ws:", "wss:", "ftp:")):
                fetched.append(url)
    assert fetched == []
    views = page.execute_script(
        """
        return Array.from(document.querySelectorAll(".view")).map(function (el) {
          var canvas = el.querySelector("canvas");
          if (!canvas) return {id: el.id, width: 0, height: 0, inked: 0};
          var ctx = canvas.getContext("2d");
          var data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
          var inked = 0;
          for (var i = 0; i < data.length; i += 4 * 7) {
            if (data[i + 3] > 0 && (data[i] < 240 || data[i + 1] < 240 || data[i + 2] < 240)) {
              inked++;
            }
          }
          return {id: el.id, width: canvas.width, height: canvas.height, inked: inked};
        });
        """
    )
    assert [v["id"] for v in views] == ["view-0", "view-1", "view-history"]
    for view in views:
        assert view["width"] > 100 and view["height"] > 100, view
        assert view["inked"] > 200, view
    # every AOM and CSM tile on the first page is drawn as an image, and the images decoded
    for view_id, shown in (("view-0", 16), ("view-1", 64)):
        for prefix in ("aom_images", "csm_images"):
            assert len(_items(page, view_id, prefix)) == shown * 4
            # each tile's PNG (the grid's shared header + its own part) decoded to a picture
            assert all(item["decoded"] > 0 for item in _items(page, view_id, prefix))


@pytest.mark.parametrize("view_id, prefix, rank", [
    ("view-0", "odm_cells", 5),   # rect ODM: click the diagonal cell of the 6th row
    ("view-1", "odm_rows", 70),   # image ODM: click a row on the 2nd page of the grids
])
def test_clicking_a_kernel_in_the_odm_changes_the_aom_grid(
    page: Any, view_id: str, prefix: str, rank: int
) -> None:
    aom_before = _items(page, view_id, "aom_images")
    assert {i["opacity"] for i in aom_before} == {1}
    pixels_before = _canvas_digest(page, view_id)
    rows = sorted({i["datum"]["row"] for i in _items(page, view_id, prefix)})
    row = rows[rank]
    match = {"row": row, "col": row} if prefix == "odm_cells" else {"row": row}
    target = _scroll_to(page, view_id, prefix, match)
    kernel = target["datum"]["kernel"]
    _click(page, target["x"], target["y"])
    _settle(page, view_id)
    store = page.execute_script(
        f"return window.onnxaom.views[{view_id!r}].data('kernels_store');"
    )
    assert [s["values"] for s in store] == [[kernel]]
    aom_after = _items(page, view_id, "aom_images")
    selected = [i for i in aom_after if i["datum"]["kernel"] == kernel]
    assert len(selected) == 4 and all(i["opacity"] == 1 for i in selected)
    others = [i for i in aom_after if i["datum"]["kernel"] != kernel]
    assert others and all(i["opacity"] < 1 for i in others)
    if rank >= 64:  # not on the page shown: its row is added to the grid
        assert len(aom_after) == len(aom_before) + 4
    highlighted = [i for i in _items(page, view_id, "aom_highlight")
                   if i["datum"]["kernel"] == kernel]
    assert len(highlighted) == 1
    assert _canvas_digest(page, view_id) != pixels_before
    ARTIFACTS.mkdir(exist_ok=True)
    page.save_screenshot(str(ARTIFACTS / f"report-{view_id}-selected.png"))
    # double-click clears the selection
    page.execute_cdp_cmd(
        "Input.dispatchMouseEvent",
        {"type": "mousePressed", "x": target["x"], "y": target["y"], "button": "left",
         "clickCount": 2},
    )
    page.execute_cdp_cmd(
        "Input.dispatchMouseEvent",
        {"type": "mouseReleased", "x": target["x"], "y": target["y"], "button": "left",
         "clickCount": 2},
    )
    _settle(page, view_id)
    assert {i["opacity"] for i in _items(page, view_id, "aom_images")} == {1}


def test_class_menu_and_page_slider_filter_the_grids(page: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    view = page.find_element(By.ID, "view-1")
    page.execute_script("arguments[0].scrollIntoView();", view)
    Select(view.find_element(By.CSS_SELECTOR, "select")).select_by_visible_text("class 2")
    _settle(page, "view-1")
    tiles = _items(page, "view-1", "aom_images")
    assert {t["datum"]["class_name"] for t in tiles} == {"class 2"}
    assert len(tiles) == 64
    slider = view.find_element(By.CSS_SELECTOR, "input[type='range']")
    page.execute_script(
        "arguments[0].value = 2; arguments[0].dispatchEvent(new Event('input'));", slider
    )
    _settle(page, "view-1")
    tiles = _items(page, "view-1", "aom_images")
    assert {t["datum"]["page"] for t in tiles} == {2}
    assert len(tiles) == 80 - 64
    ARTIFACTS.mkdir(exist_ok=True)
    page.execute_script("window.scrollTo(0, 0);")
    page.save_screenshot(str(ARTIFACTS / "report.png"))
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
