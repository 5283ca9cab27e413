"""The end-to-end job behind ``onnxaom analyze`` and ``onnxaom demo``.

model file + data spec -> statistics -> findings -> files in an output folder:
``stats.npz`` (exact counts + metadata), ``findings.json`` (tasks 1-3) and ``report.html``.
Every file is written atomically, and the three are moved into the folder together once all
exist: a failure or an interrupt leaves the folder's earlier files untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bind import bind_inputs
from .collect import collect
from .data import load_spec
from .errors import ModelFileNotFoundError, OutputError
from .files import same_file
from .findings import Findings, analyze
from .graph import dim_values
from .instrument import image_input
from .model import Model, load
from .stats import OccurrenceStats
from .summary import summary

__all__ = ["AnalysisResult", "run_analysis"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisResult:
    """What one analysis wrote, and its findings in words (one line each)."""

    stats_path: Path
    findings_path: Path
    report_path: Path
    lines: tuple[str, ...]


def run_analysis(
    model_path: str | os.PathLike[str],
    data_spec: str,
    out: str | os.PathLike[str],
    *,
    layers: Sequence[str] | None = None,
    batch_size: int = 256,
    provider: str = "auto",
    threshold: float = 0.0,
    probe: str = "activation",
    progress: bool = True,
    resize: tuple[int, int] | None = None,
    allow_empty_classes: bool = False,
    bind: Mapping[str, Any] | None = None,
) -> AnalysisResult:
    """Analyse ``model_path`` on the data named by ``data_spec``; write the results to ``out``.

    An image folder is read with the model's input channels (1: grayscale, 3: RGB) and resized
    to ``resize`` (H, W) if given (:func:`~onnxaom.data.load_spec`). ``bind``: values for the
    model's inputs besides the images (:func:`~onnxaom.bind.bind_inputs`)."""
    model = load(model_path)
    if bind:
        model = bind_inputs(model, bind)
    dataset = load_spec(data_spec, channels=_input_channels(model), size=resize,
                        allow_empty_classes=allow_empty_classes)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ModelFileNotFoundError(f"--out {out} exists and is not a folder")
    inputs = [model_path, *model.protected, *_spec_files(data_spec)]
    for name in OUTPUT_NAMES:  # the results replace files of these names in --out
        hit = next((given for given in inputs if same_file(out / name, given)), None)
        if hit is not None:
            raise OutputError(f"--out {out} would replace {out / name}, one of this command's "
                              f"inputs ({hit}); choose another folder")
    created = _make_folder(out)  # before the long collection: a bad --out fails now
    try:
        # all three files are made in a scratch folder first and moved in together at the end,
        # so a failure or an interrupt leaves the folder's earlier results whole, not mixed
        # (except for a kill between the three renames, microseconds apart: findings record
        # their statistics' digest, so such a mix is refused when read back); it is made
        # first, so a folder that cannot be written fails before the collection
        with _scratch_folder(out) as scratch:
            stats = collect(
                model,
                dataset,
                batch_size=batch_size,
                layers=layers,
                provider=provider,
                threshold=threshold,
                probe=probe,
                progress=progress,
                allow_empty_classes=allow_empty_classes,
            )
            findings = analyze(stats, progress=progress)
            made = [stats.save(Path(scratch) / "stats.npz"),
                    findings.to_json(Path(scratch) / "findings.json"),
                    _write_report(model, stats, findings, Path(scratch), progress)]
            for path in made:
                target = out / path.name
                if target.is_dir():
                    raise OutputError(f"{target} is a folder; remove it or choose another --out")
            for path in made:
                os.replace(path, out / path.name)
            _warn_if_large(out / made[-1].name)
    except BaseException:
        for folder in reversed(created):  # a failed run leaves no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    stats_path, findings_path, report_path = (out / p.name for p in made)
    lines = [
        f"{model.name}: {_count(len(stats.layer_names), 'layer')}, "
        f"{_count(stats.num_classes, 'class', 'classes')}, "
        f"{stats.num_samples} samples ({dataset.source}) on {stats.metadata['provider']}",
        *findings.summary_lines(),
        f"wrote {stats_path}",
        f"wrote {findings_path}",
    ]
    lines.append(f"wrote {report_path}")
    return AnalysisResult(stats_path, findings_path, report_path, tuple(lines))


#: The files :func:`run_analysis` writes into its folder.
OUTPUT_NAMES = ("stats.npz", "findings.json", "report.html")


def _count(n: int, one: str, many: str | None = None) -> str:
    """``1 layer``, ``2 layers``."""
    return f"{n} {one if n == 1 else many or one + 's'}"


@contextlib.contextmanager
def _scratch_folder(out: Path) -> Iterator[str]:
    """A temporary folder in ``out`` (removed afterwards); an ``out`` that cannot be written
    is an :class:`OutputError` naming it."""
    try:
        folder = tempfile.TemporaryDirectory(dir=out, prefix=".onnxaom-")
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot write in this folder "
                          f"({exc.strerror or exc})") from exc
    with folder as scratch:
        yield scratch


def _spec_files(spec: str) -> list[str]:
    """The files a data spec reads (an npz archive, two IDX files); none for the others."""
    if spec.startswith("npz:"):
        return [spec[len("npz:"):]]
    if spec.startswith("idx:"):
        return [part.strip() for part in spec[len("idx:"):].split(",")]
    return [spec] if spec.lower().endswith(".npz") else []


def _make_folder(out: Path) -> list[Path]:
    """Make ``out`` and its missing parents; returns the folders made, outermost first."""
    missing = [p for p in (out, *out.parents) if not p.exists()][::-1]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out {out}: the folder cannot be made ({exc.strerror or exc})"
                          ) from exc
    return missing


def _input_channels(model: Model) -> int | None:
    """C of an (N, C, H, W) image input, or of an (N, H, W, C) one (a Keras model converted
    by tf2onnx), when it is 1 or 3; None when the model does not say."""
    dims = dim_values(image_input(model.proto).type)
    if dims is None or len(dims) != 4:
        return None
    if dims[1] in (1, 3):
        return dims[1]
    # channels last only where axis 1 looks like a height (an (N, 4, H, 3) input is NCHW)
    return dims[3] if dims[3] in (1, 3) and (dims[1] is None or dims[1] > 4) else None


#: The most (kernel, class) map tiles the job's report draws, about 450 bytes each, so about
#: the 50 MB above which a report warns: layers past it, in model order, get no views (their
#: findings are still in the report). 12 layers of 256 kernels x 100 classes made a 179 MB
#: file that browsers take minutes to open; one 2,048-kernel layer of a 1,000-class model
#: would be about 1 GB.
REPORT_MAX_TILES = 110_000


def report_layers(stats: OccurrenceStats, budget: int | None = None
                  ) -> tuple[list[str], list[str]]:
    """The layers whose views fit in ``budget`` tiles (default :data:`REPORT_MAX_TILES`; K x C
    each, in model order, up to the first that does not fit), and those left out."""
    budget = REPORT_MAX_TILES if budget is None else budget
    shown: list[str] = []
    left: list[str] = []
    used = 0
    for name in stats.layer_names:
        tiles = int(stats.counts[name].shape[0]) * stats.num_classes
        if left or used + tiles > budget:
            left.append(name)
            continue
        shown.append(name)
        used += tiles
    return shown, left


def _write_report(model: Model, stats: OccurrenceStats, findings: Findings, out: Path,
                  progress: bool) -> Path:
    """The offline HTML report with the model summary, findings in words and the layers' views
    (as many as :data:`REPORT_MAX_TILES` allows)."""
    from .report import write_report  # altair and vl-convert load only when a report is made

    shown, left = report_layers(stats)
    notes = []
    if left:
        notes.append(f"{len(left)} of {len(stats.layer_names)} layers have no views here "
                     f"({', '.join(left[:5])}{', ...' if len(left) > 5 else ''}): their "
                     f"{stats.num_classes}-class maps would pass {REPORT_MAX_TILES:,} tiles. "
                     f"Their findings are in the findings section; draw one with `onnxaom "
                     f"render STATS.npz --layer NAME`, or report it with "
                     f"onnxaom.report.write_report(..., layers=[...])")
        log.warning("report: %s", notes[-1])
    return write_report(stats, findings, out, model_summary=summary(model).to_dict(),
                        layers=shown, notes=notes, warn_large=False,  # warned once in place
                        progress=progress)


def _warn_if_large(report: Path) -> None:
    from .report import warn_if_large

    warn_if_large(report, report.stat().st_size)
