"""Which kernels of a layer to keep: the proposal (:func:`onnxaom.proposal.propose`, from
onnxaom's statistics), L1 magnitude (torch-pruning, the peer) and random selection.

Every selector returns the kept kernel indices, ascending, exactly ``n`` of them. The proposal's
strategies (``"paper"``, ``"clusters"``, ``"coverage"``, ``"selectivity"``) are documented in
:mod:`onnxaom.proposal`; the statistics come from the training set and the findings from
:func:`onnxaom.analyze` with its default thresholds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import onnxaom
from onnxaom.proposal import STRATEGIES, propose

__all__ = [
    "STRATEGIES",
    "magnitude_keep",
    "natural_size",
    "proposal_keep",
    "random_keep",
]


def proposal_keep(stats: onnxaom.OccurrenceStats, findings: onnxaom.Findings, layer: str, n: int,
                  strategy: str, *, model: onnxaom.Model | None = None,
                  pool_stats: onnxaom.OccurrenceStats | None = None) -> tuple[int, ...]:
    """Kernels of ``layer`` (an ONNX layer name, e.g. "/conv1/Conv") that the proposal keeps
    with the target ``n``.

    Strategy ``"activity"`` reads the next layers' weights from ``model``; ``"usage"`` does too
    and is given ``pool_stats`` (statistics collected with ``probe="pool"``: for conv2 the
    pooled 12 x 12 maps that fc1 reads, so its read mass applies position by position; conv1 has
    no pool and its pool probe is its activation)."""
    if strategy in ("usage", "auto"):
        if model is None or pool_stats is None:
            raise ValueError(f"strategy {strategy!r} needs the model and pool-probe statistics")
        proposal = propose(pool_stats, keep={layer: n}, strategy=strategy, model=model)
    elif strategy == "activity":
        if model is None:
            raise ValueError("strategy 'activity' needs the model")
        proposal = propose(stats, findings, keep={layer: n}, strategy=strategy, model=model)
    else:
        proposal = propose(stats, findings, keep={layer: n}, strategy=strategy)
    kept = proposal.layer(layer).kept
    if len(kept) != n:
        raise RuntimeError(f"onnxaom.proposal kept {len(kept)} kernels of {layer}, asked for {n}")
    return tuple(kept)


def natural_size(stats: onnxaom.OccurrenceStats, findings: onnxaom.Findings, layer: str) -> int:
    """Kernels the paper's rule keeps with no target: all, less the ineffective ones, less all
    but one member of each redundant group."""
    return len(propose(stats, findings, layers=[layer], strategy="paper").layer(layer).kept)


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
    side = round((model.fc1.in_features // k2) ** 0.5) * 2 + 4
    return side, side


def random_keep(k: int, n: int, seed: int, salt: int = 0) -> tuple[int, ...]:
    """``n`` of ``k`` kernels drawn uniformly without replacement from ``(seed, salt)``."""
    rng = np.random.default_rng([seed, salt, k, n])
    return tuple(sorted(int(i) for i in rng.choice(k, size=n, replace=False)))
