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
  random in 7 of 16 comparisons at 4 and 3 kept kernels (eight base models; always above
  random), ``clusters`` on conv1 in 7 of 16; ``partitions`` and ``activity`` did not beat
  ``clusters`` on held-out base models, so they are not used here (experiments/RESULTS.md,
  sections 4 and 5).

Ties: lower kernel index first. No strategy removes every kernel of a layer: at least one is
always kept. Which layers: those named in ``layers``, else those in ``keep``, else the conv layers
of the statistics (spatial maps; the paper edits conv layers; fully-connected ones must be named).

With ``model=``, the choice is then fitted to what the surgery removes together (whole channels
of a depthwise conv with a multiplier, as many from each group of a grouped conv, one choice for
coupled layers): :mod:`onnxaom.proposal_fit`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .edits import RemoveKernels
from .errors import LayerNotFoundError, OnnxaomError, StatsError
from .files import atomic_write_text, read_json
from .findings import (
    Findings,
    IneffectiveKernel,
    LayerFindings,
    Thresholds,
    analyze,
    check_findings_match,
    ineffective_kernels,
)
from .model import Model
from .proposal_fit import fit_to_model
from .readers import ReadMass
from .stats import OccurrenceStats

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
    """SHA-256 (hex) of the statistics' content: :attr:`OccurrenceStats.digest` (kept for
    callers of this older name)."""
    return stats.digest


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
        if not isinstance(data, Mapping):
            raise StatsError(f"malformed proposal: a layer entry must be an object, got "
                             f"{type(data).__name__} {str(data)[:60]}")
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
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
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
        chosen = [layers] if isinstance(layers, str) else [str(n) for n in layers]
    for name in [*chosen, *targets]:
        if name not in stats.counts:
            known = ", ".join(stats.layer_names) or "(none)"
            raise LayerNotFoundError(f"no statistics for layer {name!r}; layers collected: "
                                     f"{known}")
    unknown_targets = [n for n in targets if n not in chosen]
    if unknown_targets:
        raise StatsError(f"keep names layer {unknown_targets[0]!r}, which is not among the "
                         f"layers proposed for ({', '.join(chosen)}); add it to layers")
    if model is not None and not isinstance(model, Model):
        from .model import load

        model = load(model)  # a path (or an onnx.ModelProto)
    if strategy in MODEL_STRATEGIES or (strategy == "auto" and model is not None):
        _check_model(stats, model, strategy)
    left_out: list[str] = []
    if model is not None and layers is None and not targets:
        chosen, left_out = _editable(model, chosen)
    if findings is None:
        findings = analyze(stats, layers=chosen) if chosen else Findings((), class_names=())
    else:
        check_findings_match(findings, stats, StatsError)
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
    notes: list[str] = list(left_out)
    if model is not None:  # what the surgery removes together, per group, coupled
        layer_props, fitted = fit_to_model(model, layer_props, targets)
        notes += fitted
    return Proposal(tuple(layer_props), strategy, stats.digest,
                    stats.metadata.get("model_digest"), tuple(dict.fromkeys(notes)))


def _editable(model: Model, names: list[str]) -> tuple[list[str], list[str]]:
    """``names`` less the layers whose kernels the surgery can remove none of (every channel
    blocked: a segmentation head whose channels are the graph's output), and a note for each
    left out. All of ``names`` where the graph cannot be traced (its notes say so later)."""
    from .surgery.channels import build
    from .surgery.gsio import import_graph

    try:
        cg = build(import_graph(model.proto), model.proto)
    except OnnxaomError:
        return names, []
    kept, notes = [], []
    for name in names:
        ref = cg.layers.get(name)
        reasons = [cg.slots.blocked(int(s)) for s in ref.slots] if ref is not None else [[]]
        if all(reasons):
            kept_reason = reasons[0][0] if reasons[0] else "its channels cannot change"
            notes.append(f"layer {name!r} left out of the default layers: the surgery can "
                         f"remove none of its kernels ({kept_reason})")
        else:
            kept.append(name)
    return kept, notes


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


def _check_model(stats: OccurrenceStats, model: Model | None, strategy: str) -> None:
    if model is None:
        raise StatsError(f"strategy {strategy!r} reads the next layers' weights: pass model= "
                         f"(the model the statistics were collected on)")
    expected = stats.metadata.get("model_digest")
    if expected is not None and expected != model.source_digest:
        raise StatsError(f"the statistics were collected on model {str(expected)[:12]}..., not "
                         f"on the model given ({model.source_digest[:12]}...); collect "
                         f"statistics on this model or pass the one they come from")


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
    model: Model | None = None,
) -> Proposal:
    """The designer's changes to a proposal (a new proposal; ``proposal`` is unchanged).

    ``keep``: kernels to keep in any case; ``remove``: kernels to remove in any case; ``only``:
    keep exactly these kernels of the layer (everything else removed). Each maps a layer of the
    proposal to kernel indices. A kernel both kept and removed, or a layer left without kernels,
    is refused. Changed kernels are listed in :attr:`LayerProposal.overridden` with the reason
    "designer: ...".

    The designer's choice is kept as given, even where the surgery removes more (the other
    kernels of a depthwise conv's channel) or refuses (a grouped conv losing unequal numbers
    per group). Notes: without ``model`` the proposal's notes are kept as they are (they
    describe the choice before the changes). With ``model`` (the model the proposal is for),
    they are replaced by a rehearsal of the surgery on the changed proposal: its warnings, or
    why it refuses, each prefixed "after the override"; none when it applies cleanly.
    """
    if not isinstance(proposal, Proposal):
        raise StatsError(f"override() takes a Proposal, got {type(proposal).__name__}")
    if model is not None and proposal.model_digest not in (None, model.source_digest):
        raise StatsError(f"the proposal is for model {str(proposal.model_digest)[:12]}..., not "
                         f"for the model given ({model.source_digest[:12]}...); pass the model "
                         f"it was made for")
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
    notes = proposal.notes
    if model is not None:  # the choice as it now stands, checked again
        from .proposal_fit import rehearsal_notes

        notes = tuple(f"after the override: {n}" for n in rehearsal_notes(model, layers))
    return replace(proposal, layers=tuple(layers), notes=notes)
