"""Which kernels of a layer to keep: the proposal (from onnxaom's statistics), L1 magnitude
(torch-pruning, the peer) and random selection.

Every selector returns the kept kernel indices, ascending, exactly ``n`` of them.

Proposal strategies (statistics from the training set; ``findings`` from :func:`onnxaom.analyze`
with its default thresholds):

* ``"paper"``: the order of Sec. V-A. Drop the ineffective kernels (dead, always on, class-blind:
  "not selective towards any class"), then keep one representative per redundant group (the most
  selective, eq. 4). The survivors are kept first, most selective first; when they are more than
  ``n`` the least selective go; when fewer, the dropped group members come back (most selective
  first), then the ineffective kernels.
* ``"clusters"`` (ours): cut the same average-linkage tree on the ODM (eq. 2) of the effective
  kernels into exactly ``n`` clusters and keep the most selective kernel of each: one kernel per
  distinct behaviour at the size asked for, instead of a redundancy cut fixed in advance.
* ``"selectivity"`` (ablation): the ``n`` most selective kernels (eq. 4), redundancy ignored.

When :mod:`onnxaom.proposal` is importable its ``propose`` is used for the strategies it knows
(:func:`proposal_keep` reports which implementation answered); the local versions above are the
fallback and the reference.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import onnxaom

__all__ = [
    "LOCAL_STRATEGIES",
    "magnitude_keep",
    "natural_size",
    "proposal_keep",
    "random_keep",
]


def _order_by_selectivity(kernels: Sequence[int], s: np.ndarray) -> list[int]:
    """``kernels`` most selective first (ties: lower index first)."""
    return sorted((int(k) for k in kernels), key=lambda k: (-float(s[k]), k))


def _paper(stats: onnxaom.OccurrenceStats, lf: onnxaom.LayerFindings, layer: str,
           n: int) -> list[int]:
    s = stats.selectivity(layer)
    ineffective = set(lf.ineffective_kernels)
    dropped = {m for g in lf.redundant_groups for m in g.members if m != g.representative}
    survivors = [k for k in range(lf.num_kernels) if k not in ineffective | dropped]
    order = (_order_by_selectivity(survivors, s) + _order_by_selectivity(sorted(dropped), s)
             + _order_by_selectivity(sorted(ineffective), s))
    return order[:n]


def _clusters(stats: onnxaom.OccurrenceStats, lf: onnxaom.LayerFindings, layer: str,
              n: int) -> list[int]:
    from scipy.cluster.hierarchy import fcluster, linkage

    s = stats.selectivity(layer)
    ineffective = set(lf.ineffective_kernels)
    effective = [k for k in range(lf.num_kernels) if k not in ineffective]
    if len(effective) <= n:
        return (_order_by_selectivity(effective, s)
                + _order_by_selectivity(sorted(ineffective), s))[:n]
    dist = stats.odm(layer)[np.ix_(effective, effective)]
    condensed = dist[np.triu_indices(len(effective), 1)]
    labels = fcluster(linkage(condensed, method="average"), t=n, criterion="maxclust")
    chosen = [_order_by_selectivity([effective[i] for i in np.flatnonzero(labels == lab)], s)[0]
              for lab in np.unique(labels)]
    # maxclust can return fewer clusters than asked (tied merge heights): fill by selectivity
    rest = [k for k in _order_by_selectivity(effective, s) if k not in chosen]
    return (_order_by_selectivity(chosen, s) + rest)[:n]


def _selectivity(stats: onnxaom.OccurrenceStats, lf: onnxaom.LayerFindings, layer: str,
                 n: int) -> list[int]:
    return _order_by_selectivity(range(lf.num_kernels), stats.selectivity(layer))[:n]


LOCAL_STRATEGIES: dict[str, Callable[..., list[int]]] = {
    "paper": _paper,
    "clusters": _clusters,
    "selectivity": _selectivity,
}


def _library_propose() -> Any | None:
    try:
        module = importlib.import_module("onnxaom.proposal")
    except ImportError:
        return None
    return getattr(module, "propose", None)


def _kept_from_edits(edits: Sequence[Any], layer: str, k: int) -> list[int]:
    removed: set[int] = set()
    for edit in edits:
        if getattr(edit, "layer", None) == layer and hasattr(edit, "kernels"):
            removed |= {int(i) for i in edit.kernels}
    return [i for i in range(k) if i not in removed]


def proposal_keep(stats: onnxaom.OccurrenceStats, findings: onnxaom.Findings, layer: str, n: int,
                  strategy: str, *, use_library: bool = True) -> tuple[tuple[int, ...], str]:
    """Kernels of ``layer`` (an ONNX layer name, e.g. "/conv1/Conv") to keep, and which
    implementation chose them: ``"onnxaom.proposal"`` or ``"local"``."""
    lf = findings.layer(layer)
    if not 1 <= n <= lf.num_kernels:
        raise ValueError(f"n must be in 1..{lf.num_kernels}, got {n}")
    propose = _library_propose() if use_library else None
    if propose is not None:
        try:
            edits = propose(stats, findings, keep={layer: n}, strategy=strategy)
        except (ValueError, KeyError) as exc:
            if strategy in LOCAL_STRATEGIES and "strateg" in str(exc):
                propose = None  # a strategy the library does not know: use ours
            else:
                raise
        else:
            kept = _kept_from_edits(edits, layer, lf.num_kernels)
            if len(kept) != n:
                raise RuntimeError(f"onnxaom.proposal kept {len(kept)} kernels of {layer}, "
                                   f"asked for {n}")
            return tuple(kept), "onnxaom.proposal"
    if strategy not in LOCAL_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {sorted(LOCAL_STRATEGIES)}")
    kept = LOCAL_STRATEGIES[strategy](stats, lf, layer, n)
    return tuple(sorted(kept)), "local"


def natural_size(findings: onnxaom.Findings, layer: str) -> int:
    """Kernels left by the paper's rule with no target size: all, less the ineffective ones,
    less all but one member of each redundant group."""
    lf = findings.layer(layer)
    dropped = {m for g in lf.redundant_groups for m in g.members if m != g.representative}
    return lf.num_kernels - len(set(lf.ineffective_kernels) | dropped)


def magnitude_keep(model: Any, layer: str, n: int) -> tuple[int, ...]:
    """The ``n`` kernels of ``model.<layer>`` with the largest L1 group magnitude.

    torch-pruning's ``MagnitudeImportance(p=1)`` with its defaults (group_reduction="mean",
    normalizer="mean") on the pruning group of the layer's out-channels, as its
    ``MagnitudePruner`` would rank them: the L1 norm of each kernel's filter and of the slices of
    the next layer that read it, averaged over the group. Ties: lower index.
    """
    import torch
    import torch_pruning as tp

    module = getattr(model, layer)
    k = module.out_channels
    example = torch.zeros(1, model.conv1.in_channels, *_input_side(model))
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    group = graph.get_pruning_group(module, tp.prune_conv_out_channels, idxs=list(range(k)))
    with torch.no_grad():
        scores = tp.importance.MagnitudeImportance(p=1)(group).detach().numpy()
    order = sorted(range(k), key=lambda i: (-float(scores[i]), i))
    return tuple(sorted(order[:n]))


def _input_side(model: Any) -> tuple[int, int]:
    k2 = model.conv2.out_channels
    side = int(round((model.fc1.in_features // k2) ** 0.5)) * 2 + 4
    return side, side


def random_keep(k: int, n: int, seed: int, salt: int = 0) -> tuple[int, ...]:
    """``n`` of ``k`` kernels drawn uniformly without replacement from ``(seed, salt)``."""
    rng = np.random.default_rng([seed, salt, k, n])
    return tuple(sorted(int(i) for i in rng.choice(k, size=n, replace=False)))
