"""Two runs' statistics side by side: the same network from two frameworks, exporters or
precisions (does the port fire where the original does?), or two trainings of one
architecture (which kernels do the same job?).

Layers are paired in model order (exporters name them differently), or by an explicit
``{layer of a: layer of b}`` mapping. Within a pair, kernels are paired by index
(``match="index"``: one network, two exports) or by the one-to-one assignment with the least
total distance (``match="best"``: two trainings, whose kernels come in any order; the
Hungarian method, ``scipy.optimize.linear_sum_assignment``). The distance of kernel i of a to
kernel j of b is the paper's ODM (eq. 2) taken across the two models:
``mean over (c, h, w) of |M_a[i, c, h, w] - M_b[j, c, h, w]|``, over the classes with samples
in both runs. 0 means the two kernels fire for the same fraction of every class at every
position.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LayerNotFoundError, StatsError
from .files import atomic_write_text
from .frozen import readonly_array, reduce_by_fields
from .stats import OccurrenceStats

__all__ = ["MATCHES", "Comparison", "LayerComparison", "compare", "cross_odm"]

MATCHES = ("index", "best")


def cross_odm(aom_a: np.ndarray, aom_b: np.ndarray) -> np.ndarray:
    """The ODM (eq. 2) between the kernels of two layers, float64 (K_a, K_b).

    ``aom_a`` (K_a, C, H, W) and ``aom_b`` (K_b, C, H, W) must agree on C, H and W.
    """
    if aom_a.shape[1:] != aom_b.shape[1:]:
        raise StatsError(f"AOMs of shapes {aom_a.shape} and {aom_b.shape} cannot be compared: "
                         "classes and positions (C, H, W) must agree")
    a = np.ascontiguousarray(aom_a.reshape(aom_a.shape[0], -1), dtype=np.float64)
    b = np.ascontiguousarray(aom_b.reshape(aom_b.shape[0], -1), dtype=np.float64)
    if a.shape[1] == 0:
        return np.zeros((a.shape[0], b.shape[0]))
    from scipy.spatial.distance import cdist

    return np.asarray(cdist(a, b, metric="cityblock") / a.shape[1])


@dataclass(frozen=True)
class LayerComparison:
    """One pair of layers.

    ``pairs``: int64 (P, 2), kernel of a and kernel of b, sorted by a's kernel.
    ``distances``: float64 (P,), the cross-model ODM of each pair.
    ``unmatched_a``/``unmatched_b``: kernels left without a partner (``match="best"`` with
    unequal kernel counts). ``identical``: the two runs' counts and class sizes are equal
    (``match="index"`` only; the strongest check that a conversion kept the layer's behaviour
    on these data).
    """

    layer_a: str
    layer_b: str
    pairs: np.ndarray
    distances: np.ndarray
    unmatched_a: tuple[int, ...] = ()
    unmatched_b: tuple[int, ...] = ()
    identical: bool = False

    def __post_init__(self) -> None:
        for name in ("pairs", "distances"):
            object.__setattr__(self, name, readonly_array(getattr(self, name)))

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_by_fields(self)

    @property
    def mean_distance(self) -> float:
        return float(self.distances.mean()) if self.distances.size else 0.0

    @property
    def max_distance(self) -> float:
        return float(self.distances.max()) if self.distances.size else 0.0

    @property
    def worst(self) -> tuple[int, int] | None:
        """The pair (kernel of a, kernel of b) farthest apart, or None when nothing is paired."""
        if not self.distances.size:
            return None
        i = int(np.argmax(self.distances))
        return int(self.pairs[i, 0]), int(self.pairs[i, 1])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LayerComparison):
            return NotImplemented
        return (self.layer_a, self.layer_b, self.unmatched_a, self.unmatched_b,
                self.identical) == (other.layer_a, other.layer_b, other.unmatched_a,
                                    other.unmatched_b, other.identical) \
            and np.array_equal(self.pairs, other.pairs) \
            and np.array_equal(self.distances, other.distances)

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer_a": self.layer_a, "layer_b": self.layer_b,
            "pairs": self.pairs.tolist(), "distances": self.distances.tolist(),
            "mean_distance": self.mean_distance, "max_distance": self.max_distance,
            "unmatched_a": list(self.unmatched_a), "unmatched_b": list(self.unmatched_b),
            "identical": self.identical,
        }


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare`: one :class:`LayerComparison` per pair of layers, in a's
    model order. ``classes``: the class names compared (those with samples in both runs).
    ``notes``: settings in which the two runs differ (probe point, threshold), which make
    their maps differ whatever the models do."""

    layers: tuple[LayerComparison, ...]
    match: str
    classes: tuple[str, ...]
    name_a: str = "a"
    name_b: str = "b"
    notes: tuple[str, ...] = ()

    def layer(self, name: str) -> LayerComparison:
        """The comparison of layer ``name``: a's layer of that name, else b's."""
        for side in ("layer_a", "layer_b"):
            for layer in self.layers:
                if getattr(layer, side) == name:
                    return layer
        raise LayerNotFoundError(f"no compared layer {name!r}; compared: "
                                 + ", ".join(f"{x.layer_a} ~ {x.layer_b}" for x in self.layers))

    def to_dict(self) -> dict[str, Any]:
        return {"match": self.match, "classes": list(self.classes), "a": self.name_a,
                "b": self.name_b, "notes": list(self.notes),
                "layers": [layer.to_dict() for layer in self.layers]}

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    def summary_lines(self) -> list[str]:
        """The comparison in words, a line per pair of layers."""
        lines = [f"{self.name_a} vs {self.name_b}: {len(self.layers)} layer pair(s), kernels "
                 f"paired by {self.match}, {len(self.classes)} classes"]
        lines += [f"note: {note}" for note in self.notes]
        for x in self.layers:
            worst = x.worst
            text = (f"{x.layer_a} ~ {x.layer_b}: {len(x.pairs)} kernel pairs, mean distance "
                    f"{x.mean_distance:.4f}")
            if worst is not None and x.max_distance > 0:
                text += f", max {x.max_distance:.4f} (kernel {worst[0]} ~ {worst[1]})"
            if x.unmatched_a or x.unmatched_b:
                text += (f"; unpaired: {len(x.unmatched_a)} of {self.name_a}, "
                         f"{len(x.unmatched_b)} of {self.name_b}")
            if x.identical:
                text += "; counts identical"
            lines.append(text)
        return lines


def compare(a: OccurrenceStats, b: OccurrenceStats, *,
            layers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
            match: str = "index") -> Comparison:
    """Compare the occurrence maps of two runs layer by layer and kernel by kernel.

    Parameters
    ----------
    a, b:
        Statistics of the two models (:func:`onnxaom.collect`), over the same classes; the data
        may differ (AOMs are fractions), and so may the models' layer names.
    layers:
        ``{layer of a: layer of b}`` (or a list of pairs); default: every layer of a with the
        layer of b at the same position, which needs as many layers in both.
    match:
        ``"index"``: kernel k of a with kernel k of b (same kernel counts); ``"best"``: the
        one-to-one pairing with the least total distance.

    Raises :class:`StatsError` naming the layers when classes, map sizes or (for ``"index"``)
    kernel counts do not agree, and :class:`LayerNotFoundError` for an unknown layer.
    """
    for run, what in ((a, "a"), (b, "b")):
        if not isinstance(run, OccurrenceStats):
            raise StatsError(f"compare() takes two OccurrenceStats; {what} is a "
                             f"{type(run).__name__}")
    if match not in MATCHES:
        raise StatsError(f"match must be one of {', '.join(MATCHES)}, got {match!r}")
    if a.class_names != b.class_names:
        hint = ""
        if len(a.class_names) != len(b.class_names):
            hint = (f" ({len(a.class_names)} vs {len(b.class_names)} classes; where a run's "
                    f"data lacks the last classes, collect it with num_classes= or "
                    f"class_names= for all of them, and --allow-empty-classes for a folder: "
                    f"classes without samples are left out of the comparison)")
        raise StatsError(f"the two runs have different classes: {_few(a.class_names)} vs "
                         f"{_few(b.class_names)}{hint}")
    notes = _setting_notes(a, b)
    for note in notes:
        warnings.warn(f"compare(): {note}", UserWarning, stacklevel=2)
    present = (np.asarray(a.class_sizes) > 0) & (np.asarray(b.class_sizes) > 0)
    if not present.any():
        raise StatsError("no class has samples in both runs")
    pairs = _layer_pairs(a, b, layers)
    results = []
    for name_a, name_b in pairs:
        ca, cb = a.counts[name_a], b.counts[name_b]
        if ca.shape[2:] != cb.shape[2:]:
            raise StatsError(f"layers {name_a!r} and {name_b!r} have maps of different sizes "
                             f"({ca.shape[2]}x{ca.shape[3]} vs {cb.shape[2]}x{cb.shape[3]})")
        distance = cross_odm(a.aom(name_a, warn=False)[:, present],
                             b.aom(name_b, warn=False)[:, present])
        if match == "index":
            if ca.shape[0] != cb.shape[0]:
                raise StatsError(f"layers {name_a!r} ({ca.shape[0]} kernels) and {name_b!r} "
                                 f"({cb.shape[0]}) differ in kernels; pair them with "
                                 "match='best' (--match best)")
            kernels = np.arange(ca.shape[0])
            rows, cols = kernels, kernels
            identical = bool(np.array_equal(ca, cb)
                             and np.array_equal(a.class_sizes, b.class_sizes))
        else:
            from scipy.optimize import linear_sum_assignment

            rows, cols = linear_sum_assignment(distance)
            identical = False
        results.append(LayerComparison(
            name_a, name_b, np.stack([rows, cols], axis=1).astype(np.int64),
            distance[rows, cols],
            tuple(sorted(set(range(ca.shape[0])) - {int(r) for r in rows})),
            tuple(sorted(set(range(cb.shape[0])) - {int(c) for c in cols})),
            identical))
    return Comparison(tuple(results), match,
                      tuple(n for n, p in zip(a.class_names, present, strict=True) if p),
                      str(a.metadata.get("model_name", "a")),
                      str(b.metadata.get("model_name", "b")), notes)


def _setting_notes(a: OccurrenceStats, b: OccurrenceStats) -> tuple[str, ...]:
    """The collection settings in which ``a`` and ``b`` differ (probe point, threshold): with
    them the maps differ whatever the models compute. Noted, not refused: comparing a probe
    or a threshold with another is a question of its own."""
    notes = []
    for key, what in (("probe", "probe point"), ("threshold", "threshold")):
        va, vb = a.metadata.get(key), b.metadata.get(key)
        if va is not None and vb is not None and va != vb:
            notes.append(f"the runs were collected with another {what} ({key}={va!r} vs "
                         f"{vb!r}): their maps differ by that as well as by the models")
    return tuple(notes)


def _layer_pairs(a: OccurrenceStats, b: OccurrenceStats,
                 layers: Mapping[str, str] | Sequence[tuple[str, str]] | None
                 ) -> list[tuple[str, str]]:
    if layers is None:
        if len(a.layer_names) != len(b.layer_names):
            raise StatsError(
                f"the runs have {len(a.layer_names)} and {len(b.layer_names)} layers, so they "
                f"cannot be paired by position; name the pairs (layers={{a: b}}, --layers A=B): "
                f"a has {_few(a.layer_names)}; b has {_few(b.layer_names)}")
        return list(zip(a.layer_names, b.layer_names, strict=True))
    pairs: list[tuple[str, str]] = []
    for item in list(layers.items()) if isinstance(layers, Mapping) else list(layers):
        if isinstance(item, str) or len(item) != 2:
            raise StatsError(f"layers: each pair is (layer of a, layer of b), got {item!r}")
        pairs.append((str(item[0]), str(item[1])))
    if not pairs:
        raise StatsError("layers is empty: name at least one pair, or pass None for all")
    for name_a, name_b in pairs:
        for run, name, what in ((a, name_a, "a"), (b, name_b, "b")):
            if name not in run.counts:
                raise LayerNotFoundError(f"run {what} has no layer {name!r}; its layers: "
                                         f"{_few(run.layer_names)}")
    order = {name: i for i, name in enumerate(a.layer_names)}
    return sorted(pairs, key=lambda pair: order[pair[0]])


def _few(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
