"""Report build time and size for one layer of 64, 256 and 512 kernels x 10 classes.

Prints a Markdown table (copy it into benchmarks/RESULTS.md). Run from the repository root:

    .venv/bin/python benchmarks/report.py [--kernels 64 256 512] [--sizes 14 28 56] [--browser]

Statistics are random integer counts, made here (no model, no data set): ``random`` draws every
count uniformly in [0, n] (n = 100 samples a class), the worst case for the PNG tiles'
compression; ``smooth`` draws binomial counts around smooth per-kernel maps, closer to what real
layers give. The target is 512 kernels in < 10 s and < 15 MB.

Columns: ``findings`` is :func:`onnxaom.findings.analyze` (clustering, not part of the report);
``build`` is :func:`onnxaom.report.write_report` (charts, PNG tiles, JSON, HTML, with the Vega
bundle already loaded once; its one-time cost is printed below the table); ``load`` (with
``--browser``) is the time for headless Chromium to open the file and finish drawing every view.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxaom.findings import analyze  # noqa: E402
from onnxaom.report import _javascript_bundle, write_report  # noqa: E402
from onnxaom.stats import OccurrenceStats  # noqa: E402

SAMPLES = 100


def make_stats(k: int, c: int, hw: int, pattern: str, seed: int = 0) -> OccurrenceStats:
    rng = np.random.default_rng(seed)
    if pattern == "random":
        counts = rng.integers(0, SAMPLES + 1, size=(k, c, hw, hw), dtype=np.int64)
    else:
        yy, xx = np.mgrid[0:hw, 0:hw] / hw
        phase = rng.random((k, 1, 1, 1)) * 6.0
        level = rng.random((k, 1, 1, 1))
        bump = 0.5 + 0.5 * np.sin(4 * xx + phase) * np.cos(3 * yy + phase)
        shift = rng.random((k, c, 1, 1)) * 0.3
        p = np.clip(level * bump + shift, 0.0, 1.0)
        counts = rng.binomial(SAMPLES, np.broadcast_to(p, (k, c, hw, hw))).astype(np.int64)
    names = tuple(f"class{i}" for i in range(c))
    return OccurrenceStats({"conv": counts}, np.full(c, SAMPLES, np.int64), names)


def browser_load_seconds(path: Path) -> float | None:
    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--no-first-run", "--window-size=1400,1000",
                f"--user-data-dir={tempfile.mkdtemp(prefix='onnxaom-bench-')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.set_script_timeout(120)
        started = time.perf_counter()
        driver.get(path.as_uri())
        errors = driver.execute_async_script(
            "var done = arguments[arguments.length - 1];"
            "window.onnxaom.ready.then(function () { done(window.onnxaom.errors); });"
        )
        seconds = time.perf_counter() - started
        if errors:
            raise RuntimeError(f"the report did not draw: {errors}")
        return seconds
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[14, 28, 56],
                        help="activation map sizes H = W")
    parser.add_argument("--patterns", nargs="+", default=["random", "smooth"],
                        choices=["random", "smooth"])
    parser.add_argument("--browser", action="store_true", help="also time headless Chromium")
    args = parser.parse_args()

    started = time.perf_counter()
    _javascript_bundle()
    bundle_s = time.perf_counter() - started
    header = "| kernels | classes | H x W | counts | findings (s) | build (s) | size (MB) |"
    rule = "|---:|---:|---|---|---:|---:|---:|"
    if args.browser:
        header += " load (s) |"
        rule += "---:|"
    print(header)
    print(rule)
    for hw in args.sizes:
        for pattern in args.patterns:
            for k in args.kernels:
                stats = make_stats(k, args.classes, hw, pattern)
                t0 = time.perf_counter()
                findings = analyze(stats)
                t1 = time.perf_counter()
                with tempfile.TemporaryDirectory() as out:
                    path = write_report(stats, findings, out)
                    t2 = time.perf_counter()
                    size = path.stat().st_size / 1e6
                    row = (f"| {k} | {args.classes} | {hw} x {hw} | {pattern} | {t1 - t0:.2f} "
                           f"| {t2 - t1:.2f} | {size:.2f} |")
                    if args.browser:
                        load = browser_load_seconds(path)
                        row += " n/a |" if load is None else f" {load:.2f} |"
                print(row, flush=True)
    print(f"\nVega bundle (vl-convert, once a process): {bundle_s:.2f} s; "
          f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
