"""Findings for the paper's three tasks (Sec. III), read off the AOMs of each layer.

matrices (AOM, ODM, selectivity) -> **findings** -> proposal / report. This module knows AOMs
(float arrays of shape (K, C, H, W), kernels first, values in [0, 1]) and
:class:`~onnxaom.stats.OccurrenceStats`; it knows nothing of models, edits or charts.

The paper leaves every decision to the engineer looking at the maps (Sec. IV, "rather than
using automatically computed thresholds"). Here each visual judgement becomes a measured number
and a threshold in :class:`Thresholds`, so that a report can point the engineer at the cases
worth looking at:

* **Kernel order** (:func:`kernel_order`): agglomerative clustering of the kernels' flattened
  AOMs, average linkage on the ODM distance (eq. 2), optimal leaf ordering. This is the row order
  of the charts (Fig. 2: "rows are ordered using groups of kernels with similar AOMs").
* **Task 1, ineffective kernels** (:class:`IneffectiveKernel`): dead, always on, or class-blind.
* **Task 1, redundant groups** (:class:`RedundantGroup`): the same tree cut at an ODM distance;
  the representative to keep is the most selective kernel (eq. 4).
* **Task 2, too-small layer** (:class:`TooSmallSigns`): class pairs alike in every kernel, and
  classes that no effective kernel covers well.
* **Task 3, too-shallow model** (:class:`ShallowSign`), last conv layer only: the fraction of
  kernels that fire for many classes.

Classes without samples (their AOM is NaN, eq. 1 divides by 0) are left out of every measure of
a layer, with a note in :attr:`LayerFindings.notes`; a layer needs at least two classes with
samples. Any other NaN is an error.

Everything here is a frozen dataclass that serialises to plain JSON types and back
(``to_dict`` / ``from_dict``); :meth:`Findings.to_json` writes a file atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from .errors import LayerNotFoundError, StatsError
from .files import atomic_write_text, read_json
from .progress import over
from .stats import OccurrenceStats
from .stats import selectivity as kernel_selectivity

__all__ = [
    "Findings",
    "IneffectiveKernel",
    "LayerFindings",
    "RedundantGroup",
    "ShallowSign",
    "SimilarClassPair",
    "Thresholds",
    "TooSmallSigns",
    "WeakClass",
    "analyze",
    "analyze_layer",
    "ineffective_kernels",
    "kernel_order",
]

logger = logging.getLogger(__name__)

FORMAT = "onnxaom.Findings"
FORMAT_VERSION = 1

Reason = Literal["dead", "always_on", "class_blind"]
REASONS: tuple[Reason, ...] = ("dead", "always_on", "class_blind")

#: Relative tolerance under which two kernel selectivities count as a tie (lowest index wins).
SELECTIVITY_TIE_RTOL = 1e-9
#: A measured value within this of a threshold counts as equal to it: occurrence fractions are
#: ratios of counts (0.60 - 0.55 is 0.04999999999999993 in floating point), and a value on a
#: threshold must fall on the side its rule says (``<`` or ``<=``), not on rounding's.
ROUNDING_MARGIN = 1e-9
#: Longest list of kernels or classes that :meth:`Findings.summary_lines` spells out in one line.
SUMMARY_MAX_ITEMS = 12


# ===================================================================================== thresholds
@dataclass(frozen=True)
class Thresholds:
    """Every threshold the findings use. All are occurrence fractions or fractions in [0, 1].

    Occurrences are AOM values (eq. 1): the fraction of a class's samples with a positive
    activation at a position. "Mean over positions" of an AOM is the fraction of (sample,
    position) pairs that fire.

    Parameters
    ----------
    dead_below:
        Task 1. A kernel is **dead** when its highest occurrence, over every class and position,
        is ``<= dead_below``. Default 0.01: at most 1 sample in 100 of any class fires anywhere
        (the paper's row 14 in Fig. 2, "rarely activate for any class").
    always_above:
        Task 1. A kernel is **always on** when its lowest occurrence, over every class and
        position, is ``>= always_above``. Default 0.99, the mirror image of ``dead_below``.
    class_blind_below:
        Task 1. A kernel is **class-blind** ("similar AOMs for all classes", Sec. IV-A) when its
        *class spread* is ``< class_blind_below``. The class spread of kernel k is
        ``max over c of mean over positions |M[k, c] - mean over classes M[k, :]|``: how far the
        most distinct class's AOM lies from the class-average AOM. Unlike kernel selectivity
        (eq. 4), which averages each CSM over positions first, it is position-aware: a kernel that
        fires at the top for one class and at the bottom for another is not class-blind.
        Its range is [0, 1 - 1/C]. Default 0.05: no class's AOM differs from the average AOM by
        more than 5 percentage points on average. Sampling noise of a truly class-blind kernel is
        about 0.4/sqrt(samples per class), so with fewer than ~100 samples per class noise alone
        can lift the spread above 0.05 and the check errs on the side of not flagging.
    redundancy_distance:
        Task 1. Kernels whose average-linkage tree (ODM distance, eq. 2) joins below or at this
        height form a **redundant group**. With average linkage, the mean ODM over all pairs of
        a group is at most this value. ODM is the mean absolute AOM difference, in [0, 1];
        two independent uniformly random AOMs are 1/3 apart, so the default 0.05 asks for maps
        that agree to within 5 percentage points on average: "too similar maps for every class"
        (Sec. IV-A) without needing identical ones.
    class_pair_below:
        Task 2. Classes c0, c1 **look alike in every kernel** when
        ``max over k of mean over positions |M[k, c0] - M[k, c1]|`` is ``< class_pair_below``:
        even the kernel that separates them best differs by less than this on average.
        Default 0.05, the same scale as ``redundancy_distance``. The two classes are different
        samples, so sampling noise (about 0.56/sqrt(samples per class)) must stay below it:
        the check only fires with a few hundred samples per class or more.
    weak_class_below:
        Task 2. A class is **weakly covered** when its best occurrence, the maximum over
        *effective* kernels (not ineffective by Task 1) and positions of M[k, c], is
        ``< weak_class_below``. The paper reads this off layer 6 of CIFAR10: "cat and deer do
        not achieve an occurrence close to 100% in any kernel" (Sec. V-B). The maximum over
        positions, not the mean, because a class-specific feature fires where it appears, and
        the AOM's best position is the closest it gets to "fires somewhere for this sample"
        (still a lower bound, as the feature moves between samples). Ineffective kernels are left
        out because an always-on kernel would otherwise cover every class. Default 0.75: fewer
        than three in four samples, leaving room for that position jitter below "close to 100%".
    fires_above:
        Task 3. Kernel k **fires for class c** when the mean over positions of M[k, c] is
        ``>= fires_above``. Default 0.5: most (sample, position) pairs of the class fire.
    many_classes:
        Task 3. A kernel is **unspecific** when it fires for at least
        ``max(2, ceil(many_classes * C))`` classes; a fraction of the C classes (with samples)
        so that one setting fits any data set. Default 0.5: half the classes or more.
    unspecific_fraction:
        Task 3. The **too-shallow sign** is raised for the last conv layer when the fraction of
        its kernels that are unspecific is ``>= unspecific_fraction`` ("many neurons activate
        for multiple classes", Sec. III). Default 0.5: at least half of the kernels.
    """

    dead_below: float = 0.01
    always_above: float = 0.99
    class_blind_below: float = 0.05
    redundancy_distance: float = 0.05
    class_pair_below: float = 0.05
    weak_class_below: float = 0.75
    fires_above: float = 0.5
    many_classes: float = 0.5
    unspecific_fraction: float = 0.5

    def __post_init__(self) -> None:
        # (low, high, low inclusive, high inclusive) for every parameter
        ranges = {
            "dead_below": (0.0, 1.0, True, False),
            "always_above": (0.0, 1.0, False, True),
            "class_blind_below": (0.0, 1.0, True, True),
            "redundancy_distance": (0.0, 1.0, True, True),
            "class_pair_below": (0.0, 1.0, True, True),
            "weak_class_below": (0.0, 1.0, True, True),
            "fires_above": (0.0, 1.0, False, True),
            "many_classes": (0.0, 1.0, False, True),
            "unspecific_fraction": (0.0, 1.0, False, True),
        }
        for name, (low, high, low_in, high_in) in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
                raise StatsError(
                    f"threshold {name} must be a number in [0, 1], got {type(value).__name__} "
                    f"{value!r}"
                )
            value = float(value)
            ok = math.isfinite(value)
            ok = ok and (low <= value if low_in else low < value)
            ok = ok and (value <= high if high_in else value < high)
            if not ok:
                interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
                raise StatsError(f"threshold {name} must lie in {interval}, got {value!r}")
            object.__setattr__(self, name, value)
        if self.dead_below >= self.always_above:
            raise StatsError(
                f"threshold dead_below ({self.dead_below}) must be below always_above "
                f"({self.always_above}); otherwise a kernel could be both dead and always on"
            )

    def to_dict(self) -> dict[str, float]:
        """The thresholds by name; inverse of :meth:`from_dict`."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Thresholds:
        """Inverse of :meth:`to_dict`; unknown names raise :class:`StatsError`, missing ones take
        their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise StatsError(
                f"unknown threshold(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**dict(data))


# ===================================================================================== records
@dataclass(frozen=True)
class IneffectiveKernel:
    """Task 1: a kernel that does not help tell classes apart.

    ``reason`` is the first that applies of ``"dead"`` (``value`` = highest occurrence),
    ``"always_on"`` (``value`` = lowest occurrence) and ``"class_blind"`` (``value`` = class
    spread, see :attr:`Thresholds.class_blind_below`).
    """

    kernel: int
    reason: Reason
    value: float

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "reason": self.reason, "value": self.value}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IneffectiveKernel:
        reason = data["reason"]
        if reason not in REASONS:
            raise StatsError(f"unknown ineffective-kernel reason {reason!r}; known: {REASONS}")
        return cls(int(data["kernel"]), cast(Reason, reason), float(data["value"]))


@dataclass(frozen=True)
class RedundantGroup:
    """Task 1: kernels with near-identical AOMs (one cluster of the average-linkage tree).

    ``members`` are listed in kernel order (the charts' row order); ``selectivities`` are their
    kernel selectivities (eq. 4), aligned with ``members``; ``representative`` is the most
    selective member (ties: lowest index), the one to keep; ``mean_distance`` is the mean ODM
    over all pairs of members.
    """

    members: tuple[int, ...]
    representative: int
    mean_distance: float
    selectivities: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "members": list(self.members),
            "representative": self.representative,
            "mean_distance": self.mean_distance,
            "selectivities": list(self.selectivities),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RedundantGroup:
        return cls(
            tuple(int(m) for m in data["members"]),
            int(data["representative"]),
            float(data["mean_distance"]),
            tuple(float(s) for s in data["selectivities"]),
        )


@dataclass(frozen=True)
class SimilarClassPair:
    """Task 2: two classes whose AOMs are alike in every kernel of the layer.

    ``value`` = max over kernels of the mean over positions of |M[k, c0] - M[k, c1]|, reached by
    ``kernel`` (the kernel that separates the pair best). ``classes`` are class indices.
    """

    classes: tuple[int, int]
    names: tuple[str, str]
    value: float
    kernel: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "names": list(self.names),
            "value": self.value,
            "kernel": self.kernel,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimilarClassPair:
        c0, c1 = (int(c) for c in data["classes"])
        n0, n1 = (str(n) for n in data["names"])
        return cls((c0, c1), (n0, n1), float(data["value"]), int(data["kernel"]))


@dataclass(frozen=True)
class WeakClass:
    """Task 2: a class that no effective kernel of the layer covers well.

    ``value`` = max over effective kernels and positions of M[k, c], reached by ``kernel``
    (None when every kernel of the layer is ineffective; ``value`` is then 0).
    """

    class_index: int
    name: str
    value: float
    kernel: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "class_index": self.class_index,
            "name": self.name,
            "value": self.value,
            "kernel": self.kernel,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WeakClass:
        kernel = data["kernel"]
        return cls(
            int(data["class_index"]),
            str(data["name"]),
            float(data["value"]),
            None if kernel is None else int(kernel),
        )


@dataclass(frozen=True)
class TooSmallSigns:
    """Task 2: signs that a layer has too few kernels (either list may be empty)."""

    similar_pairs: tuple[SimilarClassPair, ...] = ()
    weak_classes: tuple[WeakClass, ...] = ()

    @property
    def raised(self) -> bool:
        return bool(self.similar_pairs or self.weak_classes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "similar_pairs": [p.to_dict() for p in self.similar_pairs],
            "weak_classes": [w.to_dict() for w in self.weak_classes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TooSmallSigns:
        return cls(
            tuple(SimilarClassPair.from_dict(p) for p in data["similar_pairs"]),
            tuple(WeakClass.from_dict(w) for w in data["weak_classes"]),
        )


@dataclass(frozen=True)
class ShallowSign:
    """Task 3, measured on the last conv layer: how many kernels fire for many classes.

    ``unspecific`` lists the kernels (by index) that fire for at least ``min_classes`` of the
    ``num_classes`` classes; ``fraction`` = len(unspecific) / ``num_kernels``; ``raised`` says
    whether ``fraction`` reached :attr:`Thresholds.unspecific_fraction`.
    """

    num_kernels: int
    num_classes: int
    min_classes: int
    unspecific: tuple[int, ...]
    fraction: float
    raised: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_kernels": self.num_kernels,
            "num_classes": self.num_classes,
            "min_classes": self.min_classes,
            "unspecific": list(self.unspecific),
            "fraction": self.fraction,
            "raised": self.raised,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShallowSign:
        return cls(
            int(data["num_kernels"]),
            int(data["num_classes"]),
            int(data["min_classes"]),
            tuple(int(k) for k in data["unspecific"]),
            float(data["fraction"]),
            bool(data["raised"]),
        )


@dataclass(frozen=True)
class LayerFindings:
    """Everything found in one layer.

    ``kernel_order`` is the charts' row order (:func:`kernel_order`); ``ineffective`` is sorted
    by kernel index; ``redundant_groups`` follow kernel order; ``shallow`` is None except for
    the last conv layer; ``skipped_classes`` names classes left out for having no samples.
    """

    name: str
    num_kernels: int
    kernel_order: tuple[int, ...]
    ineffective: tuple[IneffectiveKernel, ...]
    redundant_groups: tuple[RedundantGroup, ...]
    too_small: TooSmallSigns
    shallow: ShallowSign | None = None
    skipped_classes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def ineffective_kernels(self) -> tuple[int, ...]:
        """Indices of the ineffective kernels, ascending."""
        return tuple(f.kernel for f in self.ineffective)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form of this layer's findings; inverse of :meth:`from_dict`."""
        return {
            "name": self.name,
            "num_kernels": self.num_kernels,
            "kernel_order": list(self.kernel_order),
            "ineffective": [f.to_dict() for f in self.ineffective],
            "redundant_groups": [g.to_dict() for g in self.redundant_groups],
            "too_small": self.too_small.to_dict(),
            "shallow": None if self.shallow is None else self.shallow.to_dict(),
            "skipped_classes": list(self.skipped_classes),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerFindings:
        """Inverse of :meth:`to_dict`."""
        shallow = data.get("shallow")
        return cls(
            name=str(data["name"]),
            num_kernels=int(data["num_kernels"]),
            kernel_order=tuple(int(k) for k in data["kernel_order"]),
            ineffective=tuple(IneffectiveKernel.from_dict(f) for f in data["ineffective"]),
            redundant_groups=tuple(RedundantGroup.from_dict(g) for g in data["redundant_groups"]),
            too_small=TooSmallSigns.from_dict(data["too_small"]),
            shallow=None if shallow is None else ShallowSign.from_dict(shallow),
            skipped_classes=tuple(str(c) for c in data.get("skipped_classes", ())),
            notes=tuple(str(n) for n in data.get("notes", ())),
        )


@dataclass(frozen=True)
class Findings:
    """The findings of a model: one :class:`LayerFindings` per analysed layer, in model order.

    ``thresholds`` are the ones used; ``class_names`` are those of the statistics, and
    ``stats_digest`` their :attr:`~onnxaom.OccurrenceStats.digest` (None in files written
    before it was recorded): charts and proposals refuse findings of other statistics.
    """

    layers: tuple[LayerFindings, ...]
    thresholds: Thresholds = field(default_factory=Thresholds)
    class_names: tuple[str, ...] = ()
    stats_digest: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "class_names", tuple(self.class_names))

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Names of the analysed layers, in model order."""
        return tuple(layer.name for layer in self.layers)

    def layer(self, name: str) -> LayerFindings:
        """The findings of layer ``name``."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        known = ", ".join(self.layer_names) or "(none)"
        raise LayerNotFoundError(f"no findings for layer {name!r}; layers analysed: {known}")

    # ------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (format, version, class names, thresholds, layers); inverse of
        :meth:`from_dict`."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "class_names": list(self.class_names),
            "stats_digest": self.stats_digest,
            "thresholds": self.thresholds.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Findings:
        """Inverse of :meth:`to_dict`; a malformed dictionary raises :class:`StatsError`."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise StatsError(f"not an onnxaom findings dictionary (expected format {FORMAT!r})")
        version = data.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StatsError(
                f"findings format version {version!r} is not supported (this onnxaom reads up to "
                f"{FORMAT_VERSION}); upgrade onnxaom"
            )
        try:
            return cls(
                layers=tuple(LayerFindings.from_dict(layer) for layer in data["layers"]),
                thresholds=Thresholds.from_dict(data["thresholds"]),
                class_names=tuple(str(c) for c in data["class_names"]),
                stats_digest=_digest_of(data.get("stats_digest")),
            )
        except StatsError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise StatsError(f"malformed findings dictionary: {type(exc).__name__}: {exc}") from exc

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` atomically; returns the path."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        return atomic_write_text(path, text)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Findings:
        """Read findings written by :meth:`to_json`."""
        return cls.from_dict(read_json(path, "findings"))

    # ------------------------------------------------------------------------- in words
    def layer_lines(self, name: str) -> list[str]:
        """The :meth:`summary_lines` of layer ``name`` alone."""
        return _layer_lines(self.layer(name), self.thresholds)

    def summary_lines(self) -> list[str]:
        """The findings in plain words, one line each, for a report or the command line."""
        return [line for _, line in self.task_lines()]

    def task_lines(self) -> list[tuple[int | None, str]]:
        """:meth:`summary_lines`, each with the paper's task it answers: 1 (kernels to remove),
        2 (a layer too small), 3 (a model too shallow), or None (nothing to report, notes)."""
        lines: list[tuple[int | None, str]] = []
        for layer in self.layers:
            lines.extend(_tagged_lines(layer, self.thresholds))
        notes: dict[str, list[str]] = {}
        for layer in self.layers:
            for note in layer.notes:
                notes.setdefault(note, []).append(layer.name)
        for note, names in notes.items():
            lines.append((None, f"note ({_join(names)}): {note}"))
        return lines


# ===================================================================================== analysis
def kernel_order(aom: np.ndarray) -> np.ndarray:
    """Display order of the kernels: similar AOMs next to each other. int64 array of shape (K,).

    ``aom`` has shape (K, C, H, W). Each kernel's AOM is flattened over C*H*W; the kernels are
    clustered agglomeratively with average linkage on the ODM distance (eq. 2, the mean absolute
    difference) and the leaves put in scipy's optimal leaf ordering. The result is deterministic:
    runs of identical rows are listed by ascending index, and of the two mirror-image orders
    (equally optimal) the lexicographically smaller one is returned, so identical rows everywhere
    give ``0, 1, ..., K-1``. Classes with no samples (all NaN) are left out, as in
    :func:`analyze_layer`.
    """
    aom = _check_aom(aom)
    flat = _flatten(aom[:, _usable_classes(aom, "kernel_order")])
    return _kernel_order(flat, _tree(flat))


def analyze_layer(
    name: str,
    aom: np.ndarray,
    *,
    class_names: Sequence[str],
    thresholds: Thresholds = Thresholds(),
    last_conv: bool = False,
) -> LayerFindings:
    """Findings of one layer from its AOM, float array of shape (K, C, H, W), values in [0, 1].

    ``class_names`` has C names. ``last_conv`` asks for the too-shallow measure (Task 3), which
    the paper applies to the last hidden conv layer only. Classes whose AOM is all NaN (no
    samples) are left out with a note; at least two classes must remain.
    """
    if not isinstance(thresholds, Thresholds):
        raise StatsError(
            f"thresholds must be an onnxaom Thresholds, got {type(thresholds).__name__}"
        )
    aom = _check_aom(aom, layer=name)
    names = tuple(str(c) for c in class_names)
    if len(names) != aom.shape[1]:
        raise StatsError(
            f"layer {name!r}: {len(names)} class names given for an AOM with {aom.shape[1]} classes"
        )
    usable = _usable_classes(aom, f"layer {name!r}")
    class_index = np.flatnonzero(usable)
    skipped = tuple(names[i] for i in np.flatnonzero(~usable))
    notes: list[str] = []
    if skipped:
        notes.append(f"classes with no samples (NaN AOM) were left out: {_join(skipped)}")
    m = aom[:, usable]
    k = m.shape[0]
    flat = _flatten(m)
    tree = _tree(flat)

    ineffective = ineffective_kernels(m, thresholds)
    effective = np.ones(k, dtype=bool)
    effective[[f.kernel for f in ineffective]] = False
    if not effective.any():
        notes.append("every kernel is ineffective; the weak-class check had no kernel to use")
    order = _kernel_order(flat, tree)
    groups = _redundant_groups(order, flat, kernel_selectivity(m), effective, thresholds)
    too_small = TooSmallSigns(
        _similar_pairs(m, class_index, names, thresholds),
        _weak_classes(m, effective, class_index, names, thresholds),
    )
    shallow = _shallow(m, thresholds) if last_conv else None
    logger.debug(
        "layer %s: %d ineffective, %d redundant groups, too small: %s, shallow: %s",
        name,
        len(ineffective),
        len(groups),
        too_small.raised,
        shallow and shallow.raised,
    )
    return LayerFindings(
        name=str(name),
        num_kernels=k,
        kernel_order=tuple(int(i) for i in order),
        ineffective=ineffective,
        redundant_groups=groups,
        too_small=too_small,
        shallow=shallow,
        skipped_classes=skipped,
        notes=tuple(notes),
    )


def analyze(
    stats: OccurrenceStats,
    *,
    layers: Iterable[str] | None = None,
    thresholds: Thresholds = Thresholds(),
    progress: bool = False,
) -> Findings:
    """Findings of every layer of ``stats`` (or of ``layers``, in the order of ``stats``).

    The too-shallow measure (Task 3) goes to the *last conv layer*: the last layer of ``stats``
    (all of its layers, in model order, not only those asked for) whose activation map has more
    than one position, or the last layer when every map is 1x1. It is measured only when that
    layer is among those analysed, and only when the model's last Conv was collected
    (``stats.metadata["last_conv"]``, recorded by :func:`onnxaom.collect`): statistics of the
    first layers alone say nothing about the model's depth. Classes with no samples are left
    out of every layer with a note (``OccurrenceStats.aom``'s warning about them is silenced
    here: the note replaces it).

    Parameters
    ----------
    stats:
        The counts of :func:`onnxaom.collect` (or :meth:`OccurrenceStats.load`).
    layers:
        Names of the layers to analyse (``stats.layer_names`` lists them); default every one.
    thresholds:
        The cut-offs of the paper's tasks (dead, always on, class-blind, redundancy, ...);
        :class:`Thresholds` documents each and its default.
    progress:
        Show a progress bar over the layers (tqdm) on stderr.

    Returns
    -------
    Findings: one :class:`LayerFindings` a layer (ineffective kernels, redundant groups,
    too-small and too-shallow signs, kernel order), with ``summary_lines()`` in words.
    """
    if not isinstance(stats, OccurrenceStats):
        raise StatsError(f"analyze() takes an OccurrenceStats, got {type(stats).__name__}")
    all_names = stats.layer_names
    if layers is None:
        chosen = all_names
    else:
        wanted = [layers] if isinstance(layers, str) else [str(n) for n in layers]
        for n in wanted:
            if n not in stats.counts:
                raise LayerNotFoundError(
                    f"no statistics for layer {n!r}; layers collected: {_join(all_names)}"
                )
        chosen = tuple(n for n in all_names if n in wanted)
    last = _last_conv(stats)
    results = []
    for n in over(chosen, total=len(chosen), desc="analysing", unit="layer", enabled=progress):
        aom = stats.aom(n, warn=False)  # the note of analyze_layer replaces the warning
        results.append(
            analyze_layer(
                n, aom, class_names=stats.class_names, thresholds=thresholds, last_conv=n == last
            )
        )
    return Findings(tuple(results), thresholds, stats.class_names, stats.digest)


def _digest_of(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise StatsError(f"stats_digest must be a string or null, got {type(value).__name__}")


def check_findings_match(findings: Findings, stats: OccurrenceStats, error: type[Exception],
                         what: str = "the findings") -> None:
    """Raise ``error`` when ``findings`` were not made from ``stats``: another digest where
    both are known, else other class names."""
    if findings.stats_digest is not None and findings.stats_digest != stats.digest:
        raise error(f"{what} were made from other statistics ({findings.stats_digest[:12]}...) "
                    f"than these ({stats.digest[:12]}...): pass the findings of these statistics "
                    f"(onnxaom.analyze(stats), or the findings.json beside their stats.npz)")
    if findings.class_names and tuple(findings.class_names) != tuple(stats.class_names):
        raise error(f"{what} are of classes {list(findings.class_names)[:6]}, the statistics "
                    f"of {list(stats.class_names)[:6]}: pass the findings of these statistics")


# ===================================================================================== helpers
def _check_aom(aom: np.ndarray, layer: str | None = None) -> np.ndarray:
    where = f"layer {layer!r}: " if layer is not None else ""
    array = np.asarray(aom)
    if array.ndim != 4:
        raise StatsError(f"{where}the AOM must have shape (K, C, H, W), got shape {array.shape}")
    if 0 in array.shape:
        raise StatsError(f"{where}the AOM is empty, shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise StatsError(f"{where}the AOM must be a float array, got {array.dtype}")
    array = array.astype(np.float64, copy=False)
    if np.isinf(array).any():
        raise StatsError(
            f"{where}the AOM has infinite values; occurrence counts of a class with no samples "
            "must be 0 (check the class sizes of the statistics)"
        )
    finite = array[np.isfinite(array)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
        raise StatsError(
            f"{where}AOM values must be occurrence fractions in [0, 1], got "
            f"[{finite.min():g}, {finite.max():g}]; pass stats.aom(layer), not counts or CSMs"
        )
    return array


def _usable_classes(aom: np.ndarray, where: str) -> np.ndarray:
    """Boolean mask (C,) of classes with samples; raises for stray NaNs or < 2 classes left."""
    nan = np.isnan(aom)
    empty = nan.all(axis=(0, 2, 3))
    if (nan.any(axis=(0, 2, 3)) & ~empty).any():
        raise StatsError(
            f"{where}: the AOM has NaN values outside whole classes; only a class with no "
            "samples may be NaN (eq. 1 divides by its size)"
        )
    usable = ~empty
    if usable.sum() < 2:
        raise StatsError(
            f"{where}: findings need at least 2 classes with samples, got {int(usable.sum())}; "
            "collect statistics over data with samples of at least two classes"
        )
    return np.asarray(usable)


def _flatten(aom: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(aom.reshape(aom.shape[0], -1), dtype=np.float64)


#: Layers with more kernels keep the clustering's own leaf order: optimal leaf ordering costs
#: about the cube of the kernel count (1.5 s at 1,024 kernels, 15 s at 2,048, minutes at 4,096).
OPTIMAL_ORDER_MAX_KERNELS = 1024


def _tree(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(linkage matrix, after optimal leaf ordering up to :data:`OPTIMAL_ORDER_MAX_KERNELS`
    kernels, condensed ODM), or None for one kernel."""
    if flat.shape[0] < 2:
        return None
    from scipy.cluster.hierarchy import linkage, optimal_leaf_ordering
    from scipy.spatial.distance import pdist

    dist = pdist(flat, metric="cityblock") / flat.shape[1]  # eq. 2, same as stats.odm
    z = linkage(dist, method="average")
    if flat.shape[0] > OPTIMAL_ORDER_MAX_KERNELS:
        return z, dist
    return optimal_leaf_ordering(z, dist), dist


def _kernel_order(flat: np.ndarray, tree: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    if tree is None:
        return np.arange(flat.shape[0], dtype=np.int64)
    from scipy.cluster.hierarchy import leaves_list

    leaves = np.asarray(leaves_list(tree[0]), dtype=np.int64)
    forward = _sort_identical_runs(leaves, flat)
    backward = _sort_identical_runs(leaves[::-1], flat)
    return forward if tuple(forward) <= tuple(backward) else backward


def _sort_identical_runs(order: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Within each run of consecutive kernels with identical AOMs, ascending index.

    Identical rows have identical distances to every kernel, so this keeps the ordering's cost
    and its clusters contiguous while making ties independent of scipy's internal choices.
    """
    out: list[int] = []
    run = [int(order[0])]
    for i in order[1:]:
        if np.array_equal(flat[i], flat[run[-1]]):
            run.append(int(i))
        else:
            out.extend(sorted(run))
            run = [int(i)]
    out.extend(sorted(run))
    return np.asarray(out, dtype=np.int64)


def ineffective_kernels(m: np.ndarray, t: Thresholds) -> tuple[IneffectiveKernel, ...]:
    """Task 1's ineffective kernels of an AOM ``m`` (K, C, H, W) over classes with samples,
    by kernel index, as :func:`analyze_layer` finds them with thresholds ``t``."""
    k = m.shape[0]
    flat = m.reshape(k, -1)
    high, low = flat.max(axis=1), flat.min(axis=1)
    spread = _class_spread(m)
    found = []
    for i in range(k):
        if high[i] <= t.dead_below + ROUNDING_MARGIN:
            found.append(IneffectiveKernel(i, "dead", float(high[i])))
        elif low[i] >= t.always_above - ROUNDING_MARGIN:
            found.append(IneffectiveKernel(i, "always_on", float(low[i])))
        elif spread[i] < t.class_blind_below - ROUNDING_MARGIN:
            found.append(IneffectiveKernel(i, "class_blind", float(spread[i])))
    return tuple(found)


def _class_spread(m: np.ndarray) -> np.ndarray:
    """max over c of mean over positions |M[k, c] - mean over classes M[k]|, float64 (K,)."""
    deviation = np.abs(m - m.mean(axis=1, keepdims=True))
    return np.asarray(deviation.mean(axis=(2, 3)).max(axis=1))


def _redundant_groups(
    order: np.ndarray,
    flat: np.ndarray,
    selectivity: np.ndarray,
    effective: np.ndarray,
    t: Thresholds,
) -> tuple[RedundantGroup, ...]:
    """Groups of effective kernels with alike AOMs, from a tree over the effective kernels only.

    Ineffective kernels are reported as such and left out: a cluster of dead kernels is not a
    redundancy worth a designer's look, and clustering without them keeps the average-linkage
    guarantee (a group's mean pair distance is at most the cut).
    """
    kept = np.flatnonzero(effective)
    if len(kept) < 2:
        return ()
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist, squareform

    dist = pdist(flat[kept], metric="cityblock") / flat.shape[1]  # eq. 2, same as stats.odm
    z = linkage(dist, method="average")  # the cut needs no leaf ordering

    labels = np.full(len(flat), -1, dtype=np.int64)
    labels[kept] = fcluster(z, t=t.redundancy_distance + ROUNDING_MARGIN, criterion="distance")
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    square = np.zeros((len(flat), len(flat)))
    square[np.ix_(kept, kept)] = squareform(dist)
    groups = []
    for label in np.unique(labels[kept]):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        members = members[np.argsort(position[members], kind="stable")]
        s = selectivity[members]
        best = s.max()
        tied = s >= best - SELECTIVITY_TIE_RTOL * max(1.0, abs(best))
        representative = int(members[tied].min())
        pairs = square[np.ix_(members, members)][np.triu_indices(len(members), 1)]
        groups.append(
            RedundantGroup(
                tuple(int(i) for i in members),
                representative,
                float(pairs.mean()),
                tuple(float(v) for v in s),
            )
        )
    groups.sort(key=lambda g: int(position[g.members[0]]))
    return tuple(groups)


#: Differences of occurrence means closer than this are a tie (the same sum rounded in
#: another order).
TIE_ATOL = 1e-12


def _similar_pairs(
    m: np.ndarray, class_index: np.ndarray, names: tuple[str, ...], t: Thresholds
) -> tuple[SimilarClassPair, ...]:
    """Class pairs (a < b) that no kernel tells apart: for every pair, the kernel with the
    largest mean over positions of |M[k, a] - M[k, b]| (the lowest such kernel on a tie), kept
    where that largest difference is below ``t.class_pair_below``. One scipy ``pdist`` a
    kernel, O(K C^2 H W) in C: numpy broadcasting over 1,000 classes took 50 s a layer."""
    from scipy.spatial.distance import pdist

    k, c = m.shape[:2]
    if c < 2:
        return ()
    flat = np.ascontiguousarray(m.reshape(k, c, -1), dtype=np.float64)
    positions = flat.shape[2]
    best = np.full(c * (c - 1) // 2, -np.inf)  # condensed order: (0, 1), (0, 2), ..., (1, 2)
    best_kernel = np.zeros(best.shape, dtype=np.int64)
    for kernel in range(k):
        diff = pdist(flat[kernel], "cityblock") / positions
        better = diff > best + TIE_ATOL  # a tie (to rounding) keeps the lower kernel
        best[better] = diff[better]
        best_kernel[better] = kernel
    a, b = np.triu_indices(c, 1)  # the same condensed order
    found = []
    for j in np.flatnonzero(best < t.class_pair_below - ROUNDING_MARGIN):
        c0, c1 = int(class_index[a[j]]), int(class_index[b[j]])
        found.append(SimilarClassPair((c0, c1), (names[c0], names[c1]), float(best[j]),
                                      int(best_kernel[j])))
    return tuple(found)


def _weak_classes(
    m: np.ndarray,
    effective: np.ndarray,
    class_index: np.ndarray,
    names: tuple[str, ...],
    t: Thresholds,
) -> tuple[WeakClass, ...]:
    kernels = np.flatnonzero(effective)
    found = []
    for a, ci in enumerate(class_index):
        ci = int(ci)
        if kernels.size:
            per_kernel = m[kernels, a].reshape(kernels.size, -1).max(axis=1)
            j = int(per_kernel.argmax())  # first maximum: lowest kernel index
            value, kernel = float(per_kernel[j]), int(kernels[j])
        else:
            value, kernel = 0.0, None
        if value < t.weak_class_below - ROUNDING_MARGIN:
            found.append(WeakClass(ci, names[ci], value, kernel))
    return tuple(found)


def _shallow(m: np.ndarray, t: Thresholds) -> ShallowSign:
    k, c = m.shape[:2]
    fires = m.mean(axis=(2, 3)) >= t.fires_above - ROUNDING_MARGIN  # (K, C)
    # the small epsilon keeps e.g. 0.3 * 10 = 3.0000000000000004 from rounding up to 4
    min_classes = min(c, max(2, math.ceil(t.many_classes * c - 1e-9)))
    unspecific = np.flatnonzero(fires.sum(axis=1) >= min_classes)
    fraction = len(unspecific) / k
    return ShallowSign(
        num_kernels=k,
        num_classes=c,
        min_classes=min_classes,
        unspecific=tuple(int(i) for i in unspecific),
        fraction=float(fraction),
        raised=bool(fraction >= t.unspecific_fraction - ROUNDING_MARGIN),
    )


def _last_conv(stats: OccurrenceStats) -> str | None:
    """The layer the too-shallow sign is measured on: the model's last Conv as ``collect``
    records it (whatever its map size: a 1x1 pooled map too), None when that layer was not
    collected; for statistics without the record, the last layer with more than one
    position."""
    names = stats.layer_names
    if "last_conv" in stats.metadata:
        recorded = stats.metadata["last_conv"]
        return recorded if recorded in names else None
    if not names:
        return None
    spatial = [n for n in names if int(np.prod(stats.counts[n].shape[2:])) > 1]
    return spatial[-1] if spatial else names[-1]


# ===================================================================================== in words
def _join(items: Iterable[object], limit: int = SUMMARY_MAX_ITEMS) -> str:
    text = [str(i) for i in items]
    if len(text) > limit:
        return ", ".join(text[:limit]) + f", ... ({len(text) - limit} more)"
    return ", ".join(text)


def _layer_lines(layer: LayerFindings, t: Thresholds) -> list[str]:
    return [line for _, line in _tagged_lines(layer, t)]


def _tagged_lines(layer: LayerFindings, t: Thresholds) -> list[tuple[int | None, str]]:
    """The layer's findings in words, each with its task (see :meth:`Findings.task_lines`)."""
    name, k = layer.name, layer.num_kernels
    lines: list[tuple[int | None, str]] = []
    if layer.ineffective:
        counts = {r: sum(f.reason == r for f in layer.ineffective) for r in REASONS}
        words = {"dead": "dead", "always_on": "always on", "class_blind": "class-blind"}
        parts = ", ".join(f"{counts[r]} {words[r]}" for r in REASONS if counts[r])
        lines.append((1,
            f"{name}: {len(layer.ineffective)} of {k} kernels ineffective ({parts}): "
            f"kernels {_join(layer.ineffective_kernels)}"
        ))
    for g in layer.redundant_groups:
        lines.append((1,
            f"{name}: kernels {_join(g.members)} behave alike (keep {g.representative}, the most "
            f"selective; mean ODM {g.mean_distance:.3f})"
        ))
    pairs = layer.too_small.similar_pairs
    if pairs:
        listed = _join(f"{p.names[0]!r}/{p.names[1]!r} ({p.value:.3f})" for p in pairs)
        lines.append((2,
            f"{name}: {len(pairs)} class pair(s) look alike in every kernel (largest mean "
            f"difference < {t.class_pair_below:g}): {listed}; the layer may be too small"
        ))
    weak = layer.too_small.weak_classes
    if weak:
        listed = _join(f"{w.name!r} (best {w.value:.2f})" if w.kernel is not None
                       else f"{w.name!r} (no effective kernel)" for w in weak)
        lines.append((2,
            f"{name}: {len(weak)} class(es) reach less than {t.weak_class_below:.0%} occurrence "
            f"in every effective kernel: {listed}; the layer may be too small"
        ))
    s = layer.shallow
    if s is not None:
        measured = (
            f"{len(s.unspecific)} of {s.num_kernels} kernels ({s.fraction:.0%}) fire for at "
            f"least {s.min_classes} of {s.num_classes} classes"
        )
        verdict = "the model may be too shallow" if s.raised else "no sign of a too-shallow model"
        lines.append((3, f"{name} (last conv layer): {measured}; {verdict}"))
    if not lines:
        lines.append((None, f"{name}: {k} kernels, nothing to report"))
    return lines
