"""The paper's views as Vega-Altair charts: AOM grid, ODM, CSM grid, selectivity, history.

Every function here is pure: statistics (and findings) in, an Altair chart out. Charts display
inline in Jupyter like any Altair chart, serialise with ``chart.to_dict()`` and render to PNG or
SVG with :func:`onnxaom.report.render`.

* :func:`aom_grid` (Fig. 2): rows are kernels in the cluster order of
  :func:`onnxaom.findings.kernel_order`, columns classes, each cell the kernel's H x W
  occurrence map on an ordinal (10-step) colormap over [0, 1]; redundant groups are framed in
  red, ineffective kernels in grey.
* :func:`odm_heatmap` (Fig. 3): the K x K occurrence difference matrix in the same order on an
  ordinal blue-to-red scale; clicking a row selects its kernel (shift-click adds, double-click
  clears).
* :func:`csm_grid` (Fig. 4): like the AOM grid, on the paper's two-segment scale over [-1, 1]
  (0 -> 1: cyan to purple; 0 -> -1: yellow to red).
* :func:`selectivity_bars` (eq. 4), :func:`selectivity_experiment` (Fig. 8) and
  :func:`tuning_history` (accuracy against parameters, one point per tuning step).
* :func:`layer_view`: all of a layer's views linked in one chart: kernels selected in the ODM
  are highlighted (and always shown) in the AOM and CSM grids and the selectivity bars, and a
  class menu filters the grids' columns.

Scale. A grid cell is not drawn as one rect per pixel: a 512-kernel x 10-class layer of
28 x 28 maps would be four million marks. Each (kernel, class) map is quantised to the colour
scale's bins here and shipped as one small indexed PNG (4-bit palette) drawn by an ``image``
mark, so a grid costs K x C marks, whatever H x W. Maps of 2 ``cell`` pixels a side or more are
average-pooled to fewer (an average of occurrence fractions is still one), so a tile stays
under (2 ``cell``)^2 pixels; small maps are enlarged here, nearest-neighbour, as browsers would
blur them. Grids of more than ``page_size`` kernels are paged (a slider picks the page;
selected kernels stay visible). The ODM is drawn with one rect per cell up to
``ODM_MAX_RECTS`` kernels (tooltips per cell) and as one K x K image above that, with one
transparent rect per row to take clicks, so 1,024 kernels cost one image and 1,024 rects.
Data are inlined as one JSON string per data set: Altair's row limit (``MaxRowsError``) does
not apply to it, and Altair copies it by reference. Colour legends use the very palettes the
PNGs are painted with (an invisible layer carries the colour scale).

Modules: :mod:`.images` (palettes, map PNGs), :mod:`.common` (a layer's data, shared
encodings), :mod:`.grids`, :mod:`.odm`, :mod:`.selectivity`, :mod:`.history` and :mod:`.view`;
everything public imports from ``onnxaom.charts``.
"""

from __future__ import annotations

from .grids import aom_grid, csm_grid
from .history import tuning_history
from .images import AOM_COLORS, CSM_COLORS, MISSING_COLOR, ODM_COLORS, quantize
from .odm import ODM_MAX_RECTS, kernel_selection, odm_heatmap
from .selectivity import selectivity_bars, selectivity_counts, selectivity_experiment
from .view import layer_view

__all__ = [
    "AOM_COLORS",
    "CSM_COLORS",
    "MISSING_COLOR",
    "ODM_COLORS",
    "ODM_MAX_RECTS",
    "aom_grid",
    "csm_grid",
    "kernel_selection",
    "layer_view",
    "odm_heatmap",
    "quantize",
    "selectivity_bars",
    "selectivity_counts",
    "selectivity_experiment",
    "tuning_history",
]
