"""Which kernels to remove: the paper's choice made automatic, for the designer to review.

findings -> **proposal** -> edits. A :class:`Proposal` says, for each layer, which kernels to
keep and which to remove, with the reason for every kernel, and gives the
:class:`~onnxaom.edits.RemoveKernels` edits that carry it out (it is also an iterable of those
edits). The designer reviews it and changes it with :func:`override`.

Every strategy ranks a layer's kernels from most to least worth keeping; the proposal keeps the
first ``n``. ``n`` is the target of ``keep={"layer": n}`` or, without one, the number of kernels
the paper's rule keeps (so that strategies compare at equal size). Scores (K kernels, C classes):
selectivity ``s(k)`` (eq. 4), class selectivity ``s[k, c]`` (average CSM, eq. 3), ODM (eq. 2).

* ``"paper"`` (Sec. V-A): drop the ineffective kernels (dead, always on, class-blind; "not
  selective towards any class"), and from each redundant group keep only its representative, the
  most selective member. Ranking: the survivors (effective kernels outside groups, and the
  representatives) first, then the other group members, then the ineffective kernels; within
  each tier most selective first. So with a target, kernels go in the paper's order: ineffective
  first, then redundant ones, then the least selective survivors.
* ``"selectivity"``: the ``n`` most selective kernels, redundancy ignored.
* ``"coverage"``: greedy, maximising class coverage ``sum over c of max over kept k of
  max(0, s[k, c])`` (each class served by its most selective kept kernel; the function is
  submodular, so greedy is within 1 - 1/e of the best set); a kernel adding no coverage is picked
  by diversity, the largest ODM distance to the nearest kernel already kept. Ineffective
  kernels come last.
* ``"clusters"``: cut the average-linkage tree of the effective kernels (ODM distance, as the
  redundancy finding) into exactly ``n`` clusters and keep the most selective kernel of each;
  ineffective kernels come last.
* ``"partitions"``: as ``"clusters"``, on the ODM with a kernel's complement counted as its
  twin (:func:`onnxaom.stats.mirrored_odm`): a kernel that fires on the garment and one that
  fires on the background split the input alike, and a retrained reader gets one from the
  other, so one of them is enough.
* ``"usage"``: class-specific occurrence that the next layers read. Kernel k scores
  ``sum over c, h, w of |S[k, c, h, w]| * R[k, h, w]``, with S the CSM (eq. 3) and R the read
  mass of :mod:`onnxaom.readers` (the L1 of the next layers' weights that read k, per position
  where a fully-connected layer reads the map flattened and the statistics have its grid, e.g.
  collected with ``probe="pool"`` before a pool -> flatten -> dense head; per kernel
  otherwise). The most scoring kernels are kept. Needs ``model=`` (the model the statistics
  were collected on). Dead and always-on kernels score 0.
* ``"activity"``: how much of each kernel reaches the next layers. Kernel k scores its mean
  occurrence (eq. 1, over classes and positions) times its read mass (per kernel, as for
  ``"usage"``): a kernel that rarely fires, or that the next layers hardly read, passes little
  on. Class-blind by design (an always-on kernel passes its whole linear response on), for a
  layer whose readers are retrained. Needs ``model=``.
* ``"auto"`` (the default): per layer, ``"usage"`` where every layer that reads it is
  fully-connected (Gemm or MatMul: the last conv layer before the classifier), ``"clusters"``
  elsewhere (a layer read by another conv), and ``"clusters"`` everywhere when no ``model`` is
  given. Each :class:`LayerProposal` names the strategy it used. Why: on the paper's MNIST
  network trained on Fashion-MNIST, ``usage`` was the best strategy on conv2 (read by fc1),
  where the other four lose to L1 magnitude, and ``clusters`` the best on conv1 (read by
  conv2). A measured rule, not a law: ``usage`` on conv2 matched or beat L1 magnitude and
  random in 7 of 14 comparisons at 4 and 3 kept kernels (seven base models; always above
  random), ``clusters`` on conv1 in 7 of 14; ``partitions`` and ``activity`` did not beat
  ``clusters`` on held-out base models, so they are not used here (experiments/RESULTS.md,
  section 4).

Ties: lower kernel index first. No strategy removes every kernel of a layer: at least one is
always kept. Which layers: those named in ``layers``, else those in ``keep``, else the conv layers
of the statistics (spatial maps; the paper edits conv layers; fully-connected ones must be named).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from .edits import RemoveKernels
from .errors import EditError, LayerNotFoundError, OnnxaomError, StatsError
from .files import atomic_write_text, read_json
from .findings import (
    Findings,
    IneffectiveKernel,
    LayerFindings,
    Thresholds,
    analyze,
    ineffective_kernels,
)
from .graph import GraphIndex
from .layers import (
    CONSTANT_ARITHMETIC,
    ELEMENTWISE_ACTIVATIONS,
    PASS_THROUGH,
    PER_CHANNEL_NORMS,
    POOLS,
    Layer,
)
from .model import Model
from .readers import ReadMass
from .stats import OccurrenceStats

if TYPE_CHECKING:
    from .surgery.channels import ChannelGraph

__all__ = [
    "STRATEGIES",
    "LayerProposal",
    "Proposal",
    "override",
    "propose",
    "stats_digest",
]

FORMAT = "onnxaom.Proposal"
FORMAT_VERSION = 1
#: The ranking strategies :func:`propose` knows.
STRATEGIES = ("paper", "selectivity", "coverage", "clusters", "partitions", "usage", "activity",
              "auto")
#: The strategies that read the next layers' weights and so need ``model=``.
MODEL_STRATEGIES = ("usage", "activity")
#: The default: ``clusters`` or ``usage`` by what reads the layer, the best measured on each
#: conv layer of the paper's MNIST architecture trained on Fashion-MNIST
#: (experiments/RESULTS.md). The paper's own order is ``"paper"``.
DEFAULT_STRATEGY = "auto"


def stats_digest(stats: OccurrenceStats) -> str:
    """SHA-256 (hex) of the statistics' content: layer names, counts, class sizes and names,
    and the metadata that defines them (model digest, probe, threshold, preprocessing)."""
    h = hashlib.sha256()
    head = {key: stats.metadata.get(key) for key in
            ("model_digest", "probe", "threshold", "preprocessing")}
    head["class_names"] = list(stats.class_names)
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(stats.class_sizes, dtype="<i8").tobytes())
    for name in stats.layer_names:
        counts = stats.counts[name]
        h.update(name.encode() + b"\0" + json.dumps(list(counts.shape)).encode())
        h.update(np.ascontiguousarray(counts, dtype="<i8").tobytes())
    return h.hexdigest()


# ===================================================================================== records
@dataclass(frozen=True)
class LayerProposal:
    """The proposal for one layer.

    kept / removed: kernel indices, ascending; together every kernel 0..K-1 once.
    order: all kernels, most worth keeping first (the strategy's ranking; ``kept`` is its first
        ``len(kept)`` unless overridden).
    reasons: one line per kernel (index k -> ``reasons[k]``) saying why it is kept or removed.
    target: the kernel count asked for (None: the paper's rule decided the count).
    overridden: kernels whose decision the designer changed (:func:`override`).
    """

    layer: str
    num_kernels: int
    strategy: str
    kept: tuple[int, ...]
    removed: tuple[int, ...]
    order: tuple[int, ...]
    reasons: tuple[str, ...]
    target: int | None = None
    overridden: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        k = self.num_kernels
        for name in ("kept", "removed", "order", "overridden"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        object.__setattr__(self, "kept", tuple(sorted(self.kept)))
        object.__setattr__(self, "removed", tuple(sorted(self.removed)))
        object.__setattr__(self, "reasons", tuple(str(r) for r in self.reasons))
        where = f"proposal for layer {self.layer!r}"
        if not self.kept:
            raise StatsError(f"{where} keeps no kernel; at least one must stay")
        if sorted(self.kept + self.removed) != list(range(k)):
            raise StatsError(f"{where}: kept {list(self.kept)} and removed {list(self.removed)} "
                             f"must together name every kernel 0..{k - 1} exactly once")
        if sorted(self.order) != list(range(k)) or len(self.reasons) != k:
            raise StatsError(f"{where}: order and reasons must cover the {k} kernels")

    @property
    def edit(self) -> RemoveKernels | None:
        """The edit that carries out this proposal (None when nothing is removed)."""
        return RemoveKernels(self.layer, self.removed) if self.removed else None

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "num_kernels": self.num_kernels, "strategy": self.strategy,
                "target": self.target, "kept": list(self.kept), "removed": list(self.removed),
                "order": list(self.order), "reasons": list(self.reasons),
                "overridden": list(self.overridden)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerProposal:
        target = data.get("target")
        return cls(str(data["layer"]), int(data["num_kernels"]), str(data["strategy"]),
                   tuple(data["kept"]), tuple(data["removed"]), tuple(data["order"]),
                   tuple(data["reasons"]), None if target is None else int(target),
                   tuple(data.get("overridden", ())))


@dataclass(frozen=True)
class Proposal:
    """Per-layer kernel choices and the edits that carry them out.

    Iterating a proposal yields its edits (one :class:`~onnxaom.edits.RemoveKernels` per layer
    that loses kernels, in layer order), so ``onnxaom.surgery.apply(model, proposal)`` works;
    ``len(proposal)`` counts them, and a proposal that removes nothing is falsy.
    ``stats_digest`` / ``model_digest`` identify the statistics and the model it was made from.
    """

    layers: tuple[LayerProposal, ...]
    strategy: str
    stats_digest: str | None = None
    model_digest: str | None = None
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "notes", tuple(self.notes))
        names = [p.layer for p in self.layers]
        if len(set(names)) != len(names):
            raise StatsError(f"a proposal names each layer once, got {names}")

    @property
    def edits(self) -> tuple[RemoveKernels, ...]:
        """One :class:`RemoveKernels` per layer that loses kernels, in layer order."""
        return tuple(p.edit for p in self.layers if p.edit is not None)

    def __iter__(self) -> Iterator[RemoveKernels]:
        return iter(self.edits)

    def __len__(self) -> int:
        return len(self.edits)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The layers the proposal covers, in order."""
        return tuple(p.layer for p in self.layers)

    def layer(self, name: str) -> LayerProposal:
        """The :class:`LayerProposal` of layer ``name``; :class:`LayerNotFoundError` names the known
        ones."""
        for p in self.layers:
            if p.layer == name:
                return p
        known = ", ".join(self.layer_names) or "(none)"
        raise LayerNotFoundError(f"the proposal has no layer {name!r}; its layers: {known}. "
                                 f"Propose it first: propose(stats, layers=[{name!r}])")

    def summary_lines(self) -> list[str]:
        """The proposal in words, one line per layer, then one per removed kernel."""
        lines: list[str] = []
        for p in self.layers:
            target = "" if p.target is None else f", target {p.target}"
            lines.append(f"{p.layer}: keep {len(p.kept)} of {p.num_kernels} "
                         f"({p.strategy}{target}): {list(p.kept)}")
            for k in p.removed:
                lines.append(f"  remove {k}: {p.reasons[k]}")
        lines.extend(f"note: {n}" for n in self.notes)
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (format, strategy, digests, layers, the derived edits, notes); inverse of
        :meth:`from_dict`."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "strategy": self.strategy,
                "stats_digest": self.stats_digest, "model_digest": self.model_digest,
                "layers": [p.to_dict() for p in self.layers],
                "edits": [e.to_dict() for e in self.edits], "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Proposal:
        """Inverse of :meth:`to_dict` (the ``edits`` entry is derived, not read)."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise StatsError(f"not an onnxaom proposal (expected format {FORMAT!r})")
        version = data.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StatsError(f"proposal format version {version!r} is not supported (this "
                             f"onnxaom reads up to {FORMAT_VERSION}); upgrade onnxaom")
        try:
            return cls(tuple(LayerProposal.from_dict(p) for p in data["layers"]),
                       str(data["strategy"]), data.get("stats_digest"),
                       data.get("model_digest"), tuple(data.get("notes", ())))
        except StatsError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise StatsError(f"malformed proposal: {type(exc).__name__}: {exc}") from exc

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` atomically; returns the path."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Proposal:
        """Read a proposal written by :meth:`to_json` (or ``onnxaom session propose -o``)."""
        return cls.from_dict(read_json(path, "proposal"))


# ===================================================================================== ranking
def _by_selectivity(kernels: Iterable[int], s: np.ndarray) -> list[int]:
    return sorted((int(k) for k in kernels), key=lambda k: (-float(s[k]), k))


def _fmt(value: float) -> str:
    return f"{value:.3g}"


_MEASURE = {"dead": "highest occurrence", "always_on": "lowest occurrence",
            "class_blind": "class spread"}


def _ineffective_reason(f: IneffectiveKernel) -> str:
    return f"ineffective: {f.reason.replace('_', ' ')} ({_MEASURE[f.reason]} {_fmt(f.value)})"


@dataclass
class _Ranking:
    """A strategy's answer: the order and a reason for each kernel when kept / removed."""

    order: list[int]
    kept_reason: dict[int, str]
    removed_reason: dict[int, str]


def _rank_paper(lf: LayerFindings, s: np.ndarray, odm: np.ndarray, cs: np.ndarray) -> _Ranking:
    k = lf.num_kernels
    ineffective = {f.kernel: f for f in lf.ineffective}
    dropped: dict[int, tuple[int, ...]] = {}
    kept_reason: dict[int, str] = {}
    removed_reason: dict[int, str] = {}
    for g in lf.redundant_groups:
        for m in g.members:
            if m != g.representative:
                dropped[m] = g.members
                removed_reason[m] = (f"redundant: group {list(g.members)} (mean ODM "
                                     f"{_fmt(g.mean_distance)}) keeps its most selective kernel "
                                     f"{g.representative} (s={_fmt(s[g.representative])} > "
                                     f"{_fmt(s[m])})")
                kept_reason[m] = (f"redundant with group {list(g.members)}, kept to reach the "
                                  f"target (s={_fmt(s[m])})")
            else:
                kept_reason[m] = (f"representative of redundant group {list(g.members)}: its most "
                                  f"selective kernel (s={_fmt(s[m])})")
                removed_reason[m] = (f"representative of group {list(g.members)}, but less "
                                     f"selective (s={_fmt(s[m])}) than the kernels kept for "
                                     f"the target")
    for kernel, f in ineffective.items():
        removed_reason[kernel] = _ineffective_reason(f)
        kept_reason[kernel] = (f"ineffective ({f.reason.replace('_', ' ')}), kept to reach the "
                               f"target")
    survivors = [i for i in range(k) if i not in ineffective and i not in dropped]
    for i in survivors:
        kept_reason.setdefault(i, f"effective and not redundant (s={_fmt(s[i])})")
        removed_reason.setdefault(i, f"less selective (s={_fmt(s[i])}) than the kernels kept "
                                     f"for the target")
    order = (_by_selectivity(survivors, s) + _by_selectivity(dropped, s)
             + _by_selectivity(ineffective, s))
    return _Ranking(order, kept_reason, removed_reason)


def _rank_selectivity(lf: LayerFindings, s: np.ndarray, odm: np.ndarray,
                      cs: np.ndarray) -> _Ranking:
    order = _by_selectivity(range(lf.num_kernels), s)
    kept = {k: f"selectivity rank {r + 1} (s={_fmt(s[k])})" for r, k in enumerate(order)}
    removed = {k: f"selectivity rank {r + 1} (s={_fmt(s[k])}), below the kernels kept"
               for r, k in enumerate(order)}
    return _Ranking(order, kept, removed)


def _rank_coverage(lf: LayerFindings, s: np.ndarray, odm: np.ndarray,
                   cs: np.ndarray) -> _Ranking:
    k = lf.num_kernels
    ineffective = set(lf.ineffective_kernels)
    pool = [i for i in range(k) if i not in ineffective]
    gain_of = np.clip(np.nan_to_num(cs, nan=0.0), 0.0, None)  # (K, C)
    best = np.zeros(gain_of.shape[1])
    order: list[int] = []
    kept: dict[int, str] = {}
    removed: dict[int, str] = {}
    nearest = np.full(k, np.inf)
    while pool:
        gains = np.array([np.maximum(gain_of[i] - best, 0.0).sum() for i in pool])
        top = gains.max()
        if top > 1e-12:
            candidates = [pool[j] for j in np.flatnonzero(gains >= top - 1e-12)]
            pick = min(candidates, key=lambda i: (-float(s[i]), i))
            why = f"adds class coverage {_fmt(top)}"
        else:
            spread = np.array([nearest[i] for i in pool])
            far = spread.max()
            candidates = [pool[j] for j in np.flatnonzero(spread >= far - 1e-12)]
            pick = min(candidates, key=lambda i: (-float(s[i]), i))
            why = ("adds no coverage; most distinct from the kernels kept (ODM "
                   f"{_fmt(far)})" if np.isfinite(far) else "adds no coverage")
        rank = len(order) + 1
        kept[pick] = f"coverage pick {rank}: {why}"
        removed[pick] = f"coverage pick {rank} ({why}), after the kernels kept"
        order.append(pick)
        pool.remove(pick)
        best = np.maximum(best, gain_of[pick])
        nearest = np.minimum(nearest, odm[pick])
    for i in _by_selectivity(ineffective, s):
        f = next(x for x in lf.ineffective if x.kernel == i)
        kept[i] = f"ineffective ({f.reason.replace('_', ' ')}), kept to reach the target"
        removed[i] = _ineffective_reason(f)
        order.append(i)
    return _Ranking(order, kept, removed)


def _rank_clusters(lf: LayerFindings, s: np.ndarray, odm: np.ndarray, cs: np.ndarray,
                   n: int) -> _Ranking:
    k = lf.num_kernels
    ineffective = set(lf.ineffective_kernels)
    effective = [i for i in range(k) if i not in ineffective]
    kept: dict[int, str] = {}
    removed: dict[int, str] = {}
    chosen: list[int] = []
    if len(effective) > n >= 1:
        from scipy.cluster.hierarchy import fcluster, linkage

        sub = odm[np.ix_(effective, effective)]
        condensed = sub[np.triu_indices(len(effective), 1)]
        labels = fcluster(linkage(condensed, method="average"), t=n, criterion="maxclust")
        for label in np.unique(labels):
            members = [effective[i] for i in np.flatnonzero(labels == label)]
            head = _by_selectivity(members, s)[0]
            chosen.append(head)
            for m in members:
                kept[m] = (f"most selective of cluster {members}" if m == head else
                           f"in cluster {members} with {head}, kept to reach the target")
                removed[m] = (f"most selective of cluster {members}, below the kernels kept"
                              if m == head else f"same cluster as {head} (more selective): "
                              f"{members}")
    rest = [i for i in _by_selectivity(effective, s) if i not in chosen]
    for i in effective:
        kept.setdefault(i, f"effective (s={_fmt(s[i])})")
        removed.setdefault(i, f"less selective (s={_fmt(s[i])}) than the kernels kept")
    for f in lf.ineffective:
        kept[f.kernel] = f"ineffective ({f.reason.replace('_', ' ')}), kept to reach the target"
        removed[f.kernel] = _ineffective_reason(f)
    order = _by_selectivity(chosen, s) + rest + _by_selectivity(ineffective, s)
    return _Ranking(order, kept, removed)


def _paper_count(lf: LayerFindings) -> int:
    """Kernels the paper's rule keeps: all, less the ineffective, less all but one member of
    each redundant group; at least 1."""
    dropped = {m for g in lf.redundant_groups for m in g.members if m != g.representative}
    return max(1, lf.num_kernels - len(set(lf.ineffective_kernels) | dropped))


# ===================================================================================== propose
def _default_layers(stats: OccurrenceStats) -> list[str]:
    ops = {str(entry.get("name")): entry.get("op") for entry in stats.metadata.get("layers", ())
           if isinstance(entry, Mapping)}
    out = []
    for name in stats.layer_names:
        op = ops.get(name)
        spatial = int(np.prod(stats.counts[name].shape[2:])) > 1
        if op == "Conv" or (op is None and spatial):
            out.append(name)
    return out


def _check_target(name: str, value: object, k: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 1 <= value <= k:
        raise StatsError(f"keep[{name!r}] must be a kernel count in 1..{k} (layer {name!r} has "
                         f"{k} kernels), got {value!r}")
    return int(value)


def propose(
    stats: OccurrenceStats,
    findings: Findings | None = None,
    *,
    layers: Sequence[str] | None = None,
    strategy: str = DEFAULT_STRATEGY,
    keep: Mapping[str, int] | None = None,
    model: Model | None = None,
) -> Proposal:
    """Propose which kernels of each layer to keep (see the module docstring).

    Parameters
    ----------
    stats:
        Occurrence statistics of the model to edit.
    findings:
        ``analyze(stats)`` (computed when None); must be of the same statistics.
    layers:
        Layers to propose for, in the statistics' order. Default: the layers of ``keep`` when
        given, else the conv layers of ``stats``.
    strategy:
        One of :data:`STRATEGIES`; default :data:`DEFAULT_STRATEGY` (``"auto"``).
    keep:
        Target kernel counts, layer -> n in 1..K: keep exactly n kernels. Layers without one
        keep as many as the paper's rule does.
    model:
        The model the statistics were collected on (checked by digest); needed by the
        ``"usage"`` strategy, which reads the next layers' weights, and used by ``"auto"``.

    Returns
    -------
    Proposal
        With one :class:`LayerProposal` per layer (also those that lose nothing).
    """
    if not isinstance(stats, OccurrenceStats):
        raise StatsError(f"propose() takes an OccurrenceStats, got {type(stats).__name__}")
    if strategy not in STRATEGIES:
        raise StatsError(f"unknown strategy {strategy!r}; known strategies: "
                         f"{', '.join(STRATEGIES)}")
    targets = dict(keep or {})
    if layers is None:
        chosen = [n for n in stats.layer_names if n in targets] if targets \
            else _default_layers(stats)
    else:
        chosen = [str(n) for n in layers]
    for name in [*chosen, *targets]:
        if name not in stats.counts:
            known = ", ".join(stats.layer_names) or "(none)"
            raise LayerNotFoundError(f"no statistics for layer {name!r}; layers collected: "
                                     f"{known}")
    unknown_targets = [n for n in targets if n not in chosen]
    if unknown_targets:
        raise StatsError(f"keep names layer {unknown_targets[0]!r}, which is not among the "
                         f"layers proposed for ({', '.join(chosen)}); add it to layers")
    if strategy in MODEL_STRATEGIES or (strategy == "auto" and model is not None):
        _check_model(stats, model, strategy)
    if findings is None:
        findings = analyze(stats, layers=chosen) if chosen else Findings((), class_names=())
    elif findings.class_names and tuple(findings.class_names) != tuple(stats.class_names):
        raise StatsError(f"the findings are of classes {list(findings.class_names)[:6]}, the "
                         f"statistics of {list(stats.class_names)[:6]}: pass findings made from "
                         f"these statistics")
    masses: dict[str, ReadMass] = {}
    dense_layers: set[str] = set()
    if (strategy in MODEL_STRATEGIES or strategy == "auto") and model is not None:
        from .readers import read_masses

        masses = read_masses(model, chosen)
        dense_layers = {layer.name for layer in model.layers() if layer.op in ("Gemm", "MatMul")}
    layer_props = []
    for name in chosen:
        lf = findings.layer(name)
        k = int(stats.counts[name].shape[0])
        if lf.num_kernels != k:
            raise StatsError(f"findings for layer {name!r} have {lf.num_kernels} kernels, the "
                             f"statistics {k}: pass findings made from these statistics")
        _check_findings_match(stats, name, lf, findings.thresholds)
        target = _check_target(name, targets[name], k) if name in targets else None
        mass = masses.get(name)
        used = _auto_strategy(mass, dense_layers) if strategy == "auto" else strategy
        layer_props.append(_propose_layer(stats, lf, name, used, target, mass))
    notes: list[str] = []
    if model is not None:
        cg = _channel_graph(model, notes)
        coupled: list[list[str]] = []
        followers: dict[str, str] = {}
        if cg is not None:
            layer_props = _whole_units(cg, layer_props, notes)
            layer_props, coupled, followers = _reconcile_coupled(cg, layer_props, targets,
                                                                 notes)
            layer_props = _whole_units(cg, layer_props, notes)
        layer_props = _balance_groups(model, layer_props, notes, coupled, cg, followers)
        if cg is not None:
            notes.extend(_split_units_notes(cg, layer_props))
            notes.extend(_surgery_notes(model, cg, layer_props))
    return Proposal(tuple(layer_props), strategy, stats_digest(stats),
                    stats.metadata.get("model_digest"), tuple(dict.fromkeys(notes)))


def _channel_graph(model: Model, notes: list[str]) -> ChannelGraph | None:
    """The surgery's channel graph of ``model``, traced once for the checks below; None (with a
    note) for a graph the surgery cannot trace, whose edits it would refuse anyway."""
    from .surgery.channels import build
    from .surgery.gsio import import_graph

    try:
        return build(import_graph(model.proto), model.proto)
    except OnnxaomError as exc:
        notes.append(f"coupled layers not checked: {exc}")
        return None


def _removal_units(cg: ChannelGraph, name: str) -> list[list[int]] | None:
    """``name``'s kernels in the sets the surgery removes together (kernels whose channels
    share a class of the traced graph: the kernels of one input channel of a depthwise conv
    with a channel multiplier); None when every kernel goes alone."""
    ref = cg.layers.get(name)
    if ref is None:
        return None
    by_class: dict[int, list[int]] = {}
    for kernel, slot in enumerate(ref.slots.tolist()):
        by_class.setdefault(cg.slots.find(slot), []).append(kernel)
    units = list(by_class.values())
    return units if any(len(u) > 1 for u in units) else None


def _take_units(order: Iterable[int], unit_of: Mapping[int, Sequence[int]], n: int) -> list[int]:
    """Walking ``order``, each kernel brings its whole unit, until at least ``n`` are taken."""
    taken: list[int] = []
    seen: set[int] = set()
    for kernel in order:
        if len(taken) >= n:
            break
        if kernel not in seen:
            taken.extend(unit_of[kernel])
            seen.update(unit_of[kernel])
    return taken


def _rechosen(p: LayerProposal, kept: Iterable[int], why: str | Sequence[str]) -> LayerProposal:
    """``p`` keeping ``kept``, each kernel's reason prefixed with ``why`` (one for all, or one
    a kernel)."""
    chosen = set(kept)
    whys = [why] * p.num_kernels if isinstance(why, str) else list(why)
    return replace(p, kept=tuple(sorted(chosen)),
                   removed=tuple(i for i in range(p.num_kernels) if i not in chosen),
                   reasons=tuple(f"{'kept' if i in chosen else 'removed'}: {whys[i]} "
                                 f"({p.reasons[i]})" for i in range(p.num_kernels)))


def _whole_units(cg: ChannelGraph, props: list[LayerProposal],
                 notes: list[str]) -> list[LayerProposal]:
    """Keep whole :func:`_removal_units`: walking each layer's ``order``, a kernel brings its
    unit, until at least as many kernels as proposed are kept (a target of 5 with units of 2
    keeps 6). Without this the surgery would remove a kept kernel with a removed one of its
    unit, and the model would keep fewer kernels than the proposal says."""
    out = []
    for p in props:
        units = _removal_units(cg, p.layer)
        if units is None:
            out.append(p)
            continue
        unit_of = {kernel: tuple(u) for u in units for kernel in u}
        kept = _take_units(p.order, unit_of, len(p.kept))
        if sorted(kept) == list(p.kept):
            out.append(p)
            continue
        out.append(_rechosen(p, kept, [f"with its unit {list(unit_of[i])} (the surgery removes "
                                       f"these kernels together)" for i in range(p.num_kernels)]))
        sizes = sorted({len(u) for u in units})
        asked = "" if len(kept) == len(p.kept) else f", {len(p.kept)} asked"
        notes.append(f"layer {p.layer!r}: kept {len(kept)} kernels{asked}, in whole units of "
                     f"{'/'.join(map(str, sizes))}: the surgery removes the kernels of one "
                     f"channel together (a depthwise conv with a channel multiplier)")
    return out


def _split_units_notes(cg: ChannelGraph, props: Sequence[LayerProposal]) -> list[str]:
    """A note for each layer whose kept kernels split one of its :func:`_removal_units`
    (left so only where the units cross the groups of a grouped conv that reads the layer,
    so that no choice of whole units keeps as many from each group)."""
    notes = []
    for p in props:
        units = _removal_units(cg, p.layer)
        kept = set(p.kept)
        split = [u for u in units or () if kept & set(u) and not set(u) <= kept]
        if split:
            notes.append(f"layer {p.layer!r}: kept kernels split the units the surgery removes "
                         f"together ({', '.join(str(list(u)) for u in split[:4])}: the kernels "
                         f"of one channel of a depthwise conv with a channel multiplier), which "
                         f"cross the groups of the grouped conv reading it; the applied model "
                         f"keeps fewer kernels than proposed. Name whole units by hand, as many "
                         f"from each group")
    return notes


def _reconcile_coupled(cg: ChannelGraph, props: list[LayerProposal],
                       targets: Mapping[str, int], notes: list[str]
                       ) -> tuple[list[LayerProposal], list[list[str]], dict[str, str]]:
    """One choice for layers whose channels are merged element-wise (a residual Add) or tied
    (a depthwise conv): the surgery removes a channel from all of them at once, so separate
    choices would remove their union. Each group of such layers keeps the kernels ranked best
    by the sum of the members' positions in their own rankings (``order``), as many as the
    group's target (or its first layer's count). Layers coupled through a different channel
    order (a depthwise conv with a channel multiplier, a concat) follow the first layer's
    choice, as the surgery maps it; a target for one of them is refused. Returns the
    proposals, the groups given one choice, and each follower's lead."""
    from .surgery.remove import plan

    by_name = {p.layer: p for p in props}
    parent = {p.layer: p.layer for p in props}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    follows: dict[tuple[str, str], tuple[int, ...]] = {}  # (a, b): b's kernels a's removal takes
    own: dict[str, tuple[int, ...]] = {}  # a: a's kernels its removal takes
    for p in props:
        try:
            with warnings.catch_warnings():  # a tie may take more of the layer: only probing
                warnings.simplefilter("ignore", UserWarning)
                _, removal = plan(cg, [RemoveKernels(p.layer, p.removed or (0,))])
        except EditError:  # a layer the surgery refuses to edit: nothing to reconcile
            continue
        own[p.layer] = tuple(removal.removed.get(p.layer, ()))  # with the kernels tied to them
        for other, kernels in removal.removed.items():
            if other != p.layer and other in by_name:
                follows[(p.layer, other)] = tuple(kernels)
                parent[root(other)] = root(p.layer)
    groups: dict[str, list[str]] = {}
    for p in props:
        groups.setdefault(root(p.layer), []).append(p.layer)
    out = dict(by_name)
    aligned_groups: list[list[str]] = []
    followers: dict[str, str] = {}
    for members in (m for m in groups.values() if len(m) > 1):
        asked = {targets[m] for m in members if m in targets}
        lead = by_name[members[0]]
        k = lead.num_kernels
        aligned = lead.layer in own and all(by_name[m].num_kernels == k for m in members) \
            and all(follows.get((lead.layer, m)) == own[lead.layer] for m in members[1:])
        if aligned:
            if len(asked) > 1:
                raise StatsError(
                    f"layers {', '.join(map(repr, members))} are coupled (their channels are "
                    f"merged element-wise or tied), so they keep the same kernels; keep asks "
                    f"{', '.join(f'{m}={targets[m]}' for m in members if m in targets)}")
            n = asked.pop() if asked else len(lead.kept)
            position = {m: {kernel: r for r, kernel in enumerate(by_name[m].order)}
                        for m in members}
            order = sorted(range(k), key=lambda i: (sum(position[m][i] for m in members),
                                                    position[lead.layer][i]))
            kept, removed = order[:n], order[n:]
            for m in members:
                others = ", ".join(repr(o) for o in members if o != m)
                reasons = tuple(
                    f"{'kept' if i in kept else 'removed'}: coupled with {others}; rank "
                    f"{order.index(i) + 1} of {k} over their {by_name[m].strategy} rankings "
                    f"combined ({by_name[m].reasons[i]})" for i in range(k))
                out[m] = replace(by_name[m], kept=tuple(kept), removed=tuple(removed),
                                 order=tuple(order), reasons=reasons,
                                 target=by_name[m].target if m in targets else None)
            notes.append(f"layers {', '.join(map(repr, members))} are coupled: one choice for "
                         f"all, {n} kernels ranked by their rankings combined")
            aligned_groups.append(members)
        else:
            for m in members[1:]:
                gone = set(follows.get((lead.layer, m), ())) if lead.removed else set()
                kept_m = tuple(i for i in range(by_name[m].num_kernels) if i not in gone)
                reasons = tuple(f"{'kept' if i in kept_m else 'removed'}: follows coupled "
                                f"layer {lead.layer!r}" for i in range(by_name[m].num_kernels))
                # its own proposal kept its target in whole units: the count to match
                if m in targets and len(kept_m) != len(by_name[m].kept):
                    raise StatsError(
                        f"layer {m!r} is coupled to {lead.layer!r} in another channel order (a "
                        f"depthwise conv with a channel multiplier, or a concat), so its kernels "
                        f"follow {lead.layer!r}'s choice, which leaves it {len(kept_m)}, not "
                        f"{targets[m]}; give the target for {lead.layer!r} instead")
                out[m] = replace(by_name[m], kept=kept_m, removed=tuple(sorted(gone)),
                                 order=tuple(kept_m) + tuple(sorted(gone)), reasons=reasons,
                                 target=None)
                followers[m] = lead.layer
            notes.append(f"layers {', '.join(map(repr, members))} are coupled in another channel "
                         f"order: they follow {lead.layer!r}'s choice")
    return [out[p.layer] for p in props], aligned_groups, followers


def _surgery_notes(model: Model, cg: ChannelGraph,
                   props: Sequence[LayerProposal]) -> list[str]:
    """Notes on what the surgery makes of the proposal's removals: the layers outside the
    proposal that they change too (coupled by a residual merge or tied by a depthwise conv),
    with how many kernels they lose, from the plan on ``cg``; then, from a rehearsal of the
    step as :func:`onnxaom.apply` makes it, why the surgery would refuse them (a channel
    shuffle, a Sigmoid before a padded conv), or its warning where only its fallback applies
    them (:mod:`onnxaom.surgery.remove`: Conv -> ReLU -> BN before a padded conv)."""
    from .surgery.remove import plan, remove_with_fallback

    edits = [RemoveKernels(p.layer, p.removed) for p in props if p.removed]
    if not edits:
        return []
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            removal = plan(cg, edits)[1]
        others = [f"{name} (loses {len(removal.removed[name])})" for name in removal.coupled]
        if others:
            notes.append(f"these edits also change layers coupled to the proposed ones: "
                         f"{', '.join(others)}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            if remove_with_fallback(model.proto, edits)[1].removed_at != "probe":
                notes.extend(str(w.message) for w in caught
                             if "per-channel chains" in str(w.message))
    except OnnxaomError as exc:
        notes.append(f"the surgery refuses these edits: {exc}")
    return notes


def _check_findings_match(stats: OccurrenceStats, name: str, lf: LayerFindings,
                          thresholds: Thresholds) -> None:
    """Refuse findings of ``name`` that these statistics do not give: the ineffective kernels
    and the value each was found with (its highest or lowest occurrence, or its class spread),
    and each redundant group's mean ODM, measured again on ``stats``."""
    aom = stats.aom(name, warn=False)
    m = aom[:, stats.class_sizes > 0]
    k = m.shape[0]
    if m.shape[1]:
        here = {(f.kernel, f.reason): f.value for f in ineffective_kernels(m, thresholds)}
        given = {(f.kernel, f.reason): f.value for f in lf.ineffective}
        if here.keys() != given.keys():
            kernel, reason = min(here.keys() ^ given.keys())
            says = "call" if (kernel, reason) in given else "do not call"
            raise StatsError(
                f"findings for layer {name!r} {says} kernel {kernel} {reason}, unlike these "
                f"statistics: pass findings made from these statistics")
        for (kernel, reason), value in given.items():
            if abs(here[(kernel, reason)] - value) > 1e-6:
                raise StatsError(
                    f"findings for layer {name!r} call kernel {kernel} {reason} with value "
                    f"{value:.4g}, these statistics give {here[(kernel, reason)]:.4g}: pass "
                    f"findings made from these statistics")
    if lf.redundant_groups:
        distance = stats.odm(name)
        for group in lf.redundant_groups:
            members = [i for i in group.members if 0 <= i < k]
            pairs = distance[np.ix_(members, members)][np.triu_indices(len(members), 1)]
            if pairs.size and abs(float(pairs.mean()) - group.mean_distance) > 1e-6:
                raise StatsError(
                    f"findings for layer {name!r} group kernels {list(group.members)} at mean "
                    f"ODM {group.mean_distance:.4g}, these statistics give {pairs.mean():.4g}: "
                    f"pass findings made from these statistics")


#: Element-wise merges: a layer's channels pass through them from any input (a residual Add).
_MERGING = CONSTANT_ARITHMETIC | {"Sum", "Max", "Min"}
#: Ops a layer's channels pass through unchanged on their way to the convs that read them.
_PASSING = (ELEMENTWISE_ACTIVATIONS | PASS_THROUGH | PER_CHANNEL_NORMS | POOLS | _MERGING
            | {"Sigmoid", "HardSigmoid", "Softplus", "Tanh", "Pad", "Resize", "Upsample"})


def _channel_blocks(model: Model, index: GraphIndex, layer: Layer) -> int:
    """Into how many equal blocks the surgery splits ``layer``'s kernels: a grouped (not
    depthwise) conv removes the same number of channels from each of its groups, both from its
    own outputs and from the inputs it reads. The lcm of the group counts of the layer and of
    the grouped convs that read it (through ops that pass channels on); 1 when there is none."""
    nodes = model.proto.graph.node

    def grouped(node: onnx.NodeProto) -> int:
        group = int(index.attribute(node, "group", 1))  # type: ignore[call-overload]
        weight = index.constant_shape(node.input[1]) if len(node.input) > 1 else None
        depthwise = weight is not None and len(weight) > 1 and weight[1] == 1
        return group if group > 1 and not depthwise else 1

    blocks = grouped(nodes[layer.node_index]) if layer.op == "Conv" else 1
    seen, todo = set(), [layer.output]
    while todo:
        tensor = todo.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        for reader in index.consumers.get(tensor, ()):
            node = nodes[reader]
            if node.op_type == "Conv" and node.input[0] == tensor:
                blocks = math.lcm(blocks, grouped(node))
            elif node.op_type in _PASSING and node.input and (
                    node.input[0] == tensor or node.op_type in _MERGING):
                todo.extend(o for o in node.output if o)
    return blocks


def _aligned_partners(cg: ChannelGraph) -> dict[str, list[str]]:
    """Layer -> the other layers whose kernel i the surgery removes with its kernel i (merged
    element-wise with it: a residual Add), kernel for kernel."""
    by_classes: dict[tuple[int, ...], list[str]] = {}
    for name, ref in cg.layers.items():
        by_classes.setdefault(tuple(cg.slots.find(s) for s in ref.slots.tolist()), []).append(name)
    return {name: [other for other in names if other != name]
            for names in by_classes.values() for name in names}


#: Search steps :func:`_balanced_units` takes before giving up, and the most units it takes.
_BALANCE_SEARCH_STEPS = 20_000
_BALANCE_SEARCH_DEPTH = 256


def _balanced_units(units: Sequence[Sequence[int]], rank: Mapping[int, int], blocks: int,
                    size: int, least: int) -> list[int] | None:
    """Whole units, the same number of kernels from each block of ``size`` kernels, at least
    ``least`` a block and as few as can be: for units that cross the blocks (a depthwise conv
    with a channel multiplier read by a grouped conv whose groups cut its channels). A
    depth-first search over the units, best ranked (lowest ``rank`` of a member) first, so
    that the first set found keeps the best kernels it can; None when there is none, or when
    the search takes more than :data:`_BALANCE_SEARCH_STEPS` steps."""
    if len(units) > _BALANCE_SEARCH_DEPTH:  # one level of recursion a unit
        return None
    ordered = sorted((tuple(u) for u in units), key=lambda u: min(rank[i] for i in u))
    counts = np.zeros((len(ordered), blocks), dtype=np.int64)
    for j, unit in enumerate(ordered):
        for i in unit:
            counts[j, i // size] += 1
    left = np.cumsum(counts[::-1], axis=0)[::-1]  # what units j.. can still add per block
    steps = 0

    def search(j: int, have: np.ndarray, target: int, chosen: list[int]) -> list[int] | None:
        nonlocal steps
        steps += 1
        if steps > _BALANCE_SEARCH_STEPS:
            return None
        if (have == target).all():
            return chosen
        if j == len(ordered) or (have + left[j] < target).any():
            return None
        grown = have + counts[j]
        if (grown <= target).all():
            found = search(j + 1, grown, target, [*chosen, j])
            if found is not None:
                return found
        return search(j + 1, have, target, chosen)

    for target in range(least, size + 1):
        found = search(0, np.zeros(blocks, dtype=np.int64), target, [])
        if found is not None:
            return sorted(i for j in found for i in ordered[j])
        if steps > _BALANCE_SEARCH_STEPS:
            return None
    return None


def _balance_follower(cg: ChannelGraph, props: list[LayerProposal],
                      followers: Mapping[str, str], blocks_of: Mapping[str, int],
                      notes: list[str]) -> list[LayerProposal]:
    """For a follower whose grouped reader needs as many kernels from each of its blocks,
    choose its lead's channels so that it has them: the follower's units (one a lead kernel)
    ranked by the lead's order, balanced by :func:`_balanced_units`; the lead keeps the
    kernels of the units kept. Unchanged where no such choice is found (the surgery then
    refuses, and a note says so)."""
    by_name = {p.layer: p for p in props}
    for name, lead_name in followers.items():
        p, lead = by_name.get(name), by_name.get(lead_name)
        blocks = blocks_of.get(name, 1)
        if p is None or lead is None or blocks <= 1 or p.num_kernels % blocks:
            continue
        size = p.num_kernels // blocks
        if len({sum(1 for i in p.kept if i // size == b) for b in range(blocks)}) == 1:
            continue
        lead_of = {cg.slots.find(s): j for j, s in enumerate(cg.layer(lead_name).slots.tolist())}
        slots = cg.layer(name).slots.tolist()
        units = _removal_units(cg, name) or [[i] for i in range(p.num_kernels)]
        roots = [cg.slots.find(slots[u[0]]) for u in units]
        if any(root not in lead_of for root in roots):
            continue
        unit_lead = {tuple(u): lead_of[root] for u, root in zip(units, roots, strict=True)}
        lead_rank = {j: r for r, j in enumerate(lead.order)}
        rank = {i: lead_rank[unit_lead[tuple(u)]] for u in units for i in u}
        found = _balanced_units(units, rank, blocks, size, -(-len(p.kept) // blocks))
        if found is None:
            continue
        mapped = set(unit_lead.values())  # lead kernels that reach the follower; others stay
        kept_lead = sorted({unit_lead[tuple(u)] for u in units if u[0] in found}
                           | (set(lead.kept) - mapped))
        kept_sets: tuple[tuple[str, list[int]], ...] = ((lead_name, kept_lead), (name, found))
        why = f"so that {name!r}, which follows it, keeps as many from each of its {blocks} groups"
        for layer, kept in kept_sets:
            by_name[layer] = _rechosen(by_name[layer], kept, why)
        notes.append(f"layer {lead_name!r}: kept {len(kept_lead)} kernels chosen so that "
                     f"{name!r} (which follows it) keeps {len(found) // blocks} of each of its "
                     f"{blocks} groups")
    return [by_name[p.layer] for p in props]


def _balance_groups(model: Model, props: list[LayerProposal], notes: list[str],
                    coupled: Sequence[Sequence[str]] = (),
                    cg: ChannelGraph | None = None,
                    followers: Mapping[str, str] | None = None) -> list[LayerProposal]:
    """Keep the same number of kernels in each block :func:`_channel_blocks` finds (the
    surgery refuses anything else): the best-ranked of each block by the layer's ``order``,
    the target rounded up to a multiple of the block count. The members of a ``coupled``
    group (one choice, one order) are balanced on the blocks of all of them, so they stay
    one choice. Where the layer's kernels go in :func:`_removal_units` (on ``cg``), each block
    keeps whole units: the count rounded up to the unit where the units lie within the
    blocks, else the fewest whole units that fill every block alike (:func:`_balanced_units`).
    A layer that ``followers`` says follows another's choice (a depthwise conv with a
    multiplier after the conv that feeds it) is not chosen again: the channels of its lead
    are (:func:`_balance_follower`)."""
    from .layers import find_layers

    index = GraphIndex(model.proto)
    layers = {layer.name: layer for layer in find_layers(model.proto, index=index)}
    blocks_of = {p.layer: _channel_blocks(model, index, layers[p.layer]) if p.layer in layers
                 else 1 for p in props}
    if cg is not None:  # layers merged with it kernel for kernel (a residual Add) group it too
        partners = _aligned_partners(cg)
        for p in props:
            for other in partners.get(p.layer, ()):
                if other in layers:
                    blocks_of[p.layer] = math.lcm(blocks_of[p.layer],
                                                  _channel_blocks(model, index, layers[other]))
    for members in coupled:
        common = math.lcm(*(blocks_of.get(m, 1) for m in members))
        blocks_of.update({m: common for m in members})
    if cg is not None and followers:
        props = _balance_follower(cg, props, followers, blocks_of, notes)
    out = []
    for p in props:
        blocks = blocks_of[p.layer]
        if followers and p.layer in followers:  # chosen with its lead
            out.append(p)
            continue
        k = p.num_kernels
        if blocks <= 1 or k % blocks:
            out.append(p)
            continue
        size = k // blocks
        per_block = [sum(1 for i in p.kept if i // size == b) for b in range(blocks)]
        if len(set(per_block)) == 1:
            out.append(p)
            continue
        each = -(-len(p.kept) // blocks)
        rank = {kernel: r for r, kernel in enumerate(p.order)}
        units = _removal_units(cg, p.layer) if cg is not None else None
        unit_of: dict[int, tuple[int, ...]] = {i: (i,) for i in range(k)}
        crossing = units is not None and any(len({i // size for i in u}) > 1 for u in units)
        if units is not None and not crossing:
            unit_of.update((i, tuple(u)) for u in units for i in u)
        kept = [i for b in range(blocks) for i in _take_units(
            sorted(range(b * size, (b + 1) * size), key=rank.__getitem__), unit_of, each)]
        if crossing and units is not None:
            found = _balanced_units(units, rank, blocks, size, each)
            kept = found if found is not None else kept  # else: _split_units_notes says so
        each = len(kept) // blocks
        out.append(_rechosen(p, kept, f"the best {each} of its group of {size} (a grouped conv "
                                      f"takes the same number from each of its {blocks} groups)"))
        wanted = p.target if p.target is not None else len(p.kept)
        asked = "" if each * blocks == wanted else f", {wanted} asked"
        notes.append(f"layer {p.layer!r}: kept {each} of each group of {size} kernels "
                     f"({each * blocks} in all{asked}): a grouped conv removes the same number "
                     f"of channels from each of its groups")
    return out


def _check_model(stats: OccurrenceStats, model: Model | None, strategy: str) -> None:
    if model is None:
        raise StatsError(f"strategy {strategy!r} reads the next layers' weights: pass model= "
                         f"(the model the statistics were collected on)")
    expected = stats.metadata.get("model_digest")
    if expected is not None and expected != model.digest:
        raise StatsError(f"the statistics were collected on model {str(expected)[:12]}..., not "
                         f"on the model given ({model.digest[:12]}...); collect statistics on "
                         f"this model or pass the one they come from")


def _auto_strategy(mass: ReadMass | None, dense_layers: set[str]) -> str:
    """``"usage"`` when every layer reading the layer is fully-connected, else ``"clusters"``
    (also without a model, ``mass`` None)."""
    if mass is None or not mass.readers:
        return "clusters"
    return "usage" if set(mass.readers) <= dense_layers else "clusters"


def _usage_scores(aom: np.ndarray, mass: ReadMass) -> tuple[np.ndarray, str]:
    """Per kernel: sum over classes and positions of |CSM| (of ``aom``, the classes with
    samples) times the read mass; and how the read mass was applied (for the reasons)."""
    from .stats import csm

    k = aom.shape[0]
    if aom.shape[1] < 2:
        return np.zeros(k), "fewer than two classes"
    specific = np.nan_to_num(np.abs(csm(aom)), nan=0.0).sum(axis=1).reshape(k, -1)  # (K, H*W)
    if not mass.per_kernel.any():
        return specific.sum(axis=1), "no layer reads it that onnxaom traces: CSM alone"
    if mass.per_position is not None and mass.per_position.shape[1] == specific.shape[1]:
        return (specific * mass.per_position).sum(axis=1), "read mass per position"
    return specific.sum(axis=1) * mass.per_kernel, "read mass per kernel"


def _rank_by_score(score: np.ndarray, strategy: str, kept_why: Callable[[int], str],
                   removed_why: Callable[[int], str]) -> _Ranking:
    """Highest ``score`` first (ties: lower index); the reasons name the rank."""
    order = sorted(range(len(score)), key=lambda i: (-float(score[i]), i))
    kept = {k: f"{strategy} rank {r + 1}: {kept_why(k)}" for r, k in enumerate(order)}
    removed = {k: f"{strategy} rank {r + 1} ({removed_why(k)}), below the kernels kept"
               for r, k in enumerate(order)}
    return _Ranking(order, kept, removed)


def _rank_activity(aom: np.ndarray, mass: ReadMass) -> _Ranking:
    occurrence = np.nan_to_num(aom.reshape(aom.shape[0], -1).mean(axis=1), nan=0.0)
    if not mass.per_kernel.any():  # as for usage: ranked by index otherwise
        return _rank_by_score(
            occurrence, "activity",
            lambda k: f"mean occurrence {_fmt(occurrence[k])} (no layer reads it that onnxaom "
                      f"traces: occurrence alone)",
            lambda k: f"{_fmt(occurrence[k])}, occurrence alone")
    score = occurrence * mass.per_kernel
    return _rank_by_score(
        score, "activity",
        lambda k: f"mean occurrence {_fmt(occurrence[k])} x read mass "
                  f"{_fmt(mass.per_kernel[k])}",
        lambda k: _fmt(score[k]))


def _rank_usage(usage: tuple[np.ndarray, str]) -> _Ranking:
    score, how = usage
    return _rank_by_score(
        score, "usage",
        lambda k: f"class-specific occurrence read by the next layers {_fmt(score[k])} ({how})",
        lambda k: f"{_fmt(score[k])}, {how}")


def _propose_layer(stats: OccurrenceStats, lf: LayerFindings, name: str, strategy: str,
                   target: int | None, mass: ReadMass | None = None) -> LayerProposal:
    aom = stats.aom(name, warn=False)  # the classes without samples are left out below
    usable = ~np.isnan(aom).all(axis=(0, 2, 3))
    aom = aom[:, usable]
    from .stats import class_selectivity, mirrored_odm, odm, selectivity

    s = selectivity(aom) if aom.shape[1] >= 2 else np.zeros(aom.shape[0])
    cs = class_selectivity(aom) if aom.shape[1] >= 2 else np.zeros((aom.shape[0], 1))
    distances = odm(aom)
    n = target if target is not None else _paper_count(lf)
    if strategy == "paper":
        ranking = _rank_paper(lf, s, distances, cs)
    elif strategy == "selectivity":
        ranking = _rank_selectivity(lf, s, distances, cs)
    elif strategy == "coverage":
        ranking = _rank_coverage(lf, s, distances, cs)
    elif strategy == "partitions":
        ranking = _rank_clusters(lf, s, mirrored_odm(aom), cs, n)
    elif strategy == "activity":
        assert mass is not None
        ranking = _rank_activity(aom, mass)
    elif strategy == "usage":
        assert mass is not None
        ranking = _rank_usage(_usage_scores(aom, mass))
    else:
        ranking = _rank_clusters(lf, s, distances, cs, n)
    kept = ranking.order[:n]
    reasons = []
    for i in range(lf.num_kernels):
        if i in kept:
            reason = ranking.kept_reason[i]
            if strategy == "paper" and target is None and i in lf.ineffective_kernels:
                reason = "every kernel is ineffective or redundant; the most selective stays"
        else:
            reason = ranking.removed_reason[i]
        reasons.append(reason)
    return LayerProposal(name, lf.num_kernels, strategy, tuple(kept),
                         tuple(i for i in range(lf.num_kernels) if i not in kept),
                         tuple(ranking.order), tuple(reasons), target)


# ===================================================================================== override
def _indices(value: Iterable[int], layer: str, k: int, what: str) -> set[int]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise StatsError(f"{what}[{layer!r}] must be a list of kernel indices, got {value!r}")
    out: set[int] = set()
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= int(i) < k:
            raise StatsError(f"{what}[{layer!r}]: kernel {i!r} is not an index of layer "
                             f"{layer!r} (0..{k - 1})")
        out.add(int(i))
    return out


def override(
    proposal: Proposal,
    *,
    keep: Mapping[str, Iterable[int]] | None = None,
    remove: Mapping[str, Iterable[int]] | None = None,
    only: Mapping[str, Iterable[int]] | None = None,
) -> Proposal:
    """The designer's changes to a proposal (a new proposal; ``proposal`` is unchanged).

    ``keep``: kernels to keep in any case; ``remove``: kernels to remove in any case; ``only``:
    keep exactly these kernels of the layer (everything else removed). Each maps a layer of the
    proposal to kernel indices. A kernel both kept and removed, or a layer left without kernels,
    is refused. Changed kernels are listed in :attr:`LayerProposal.overridden` with the reason
    "designer: ...".
    """
    if not isinstance(proposal, Proposal):
        raise StatsError(f"override() takes a Proposal, got {type(proposal).__name__}")
    changes: dict[str, dict[str, set[int]]] = {}
    for what, table in (("keep", keep), ("remove", remove), ("only", only)):
        for layer, value in (table or {}).items():
            lp = proposal.layer(layer)
            changes.setdefault(layer, {})[what] = _indices(value, layer, lp.num_kernels, what)
    layers = []
    for lp in proposal.layers:
        change = changes.get(lp.layer)
        if change is None:
            layers.append(lp)
            continue
        kept = set(lp.kept)
        if "only" in change:
            kept = set(change["only"])
        both = change.get("keep", set()) & change.get("remove", set())
        if both:
            raise StatsError(f"override for layer {lp.layer!r} both keeps and removes kernels "
                             f"{sorted(both)}")
        kept |= change.get("keep", set())
        kept -= change.get("remove", set())
        if not kept:
            raise StatsError(f"override would remove every kernel of layer {lp.layer!r}; keep "
                             f"at least one")
        flipped = {i for i in range(lp.num_kernels) if (i in kept) != (i in lp.kept)}
        reasons = list(lp.reasons)
        for i in flipped:
            reasons[i] = ("designer: keep" if i in kept else "designer: remove") + \
                f" (proposed: {lp.reasons[i]})"
        layers.append(replace(lp, kept=tuple(sorted(kept)),
                              removed=tuple(i for i in range(lp.num_kernels) if i not in kept),
                              reasons=tuple(reasons),
                              overridden=tuple(sorted(set(lp.overridden) | flipped))))
    return replace(proposal, layers=tuple(layers))
