"""Removing kernels (task 1): plan over the channel graph, then rewrite every node involved.

Removal is exact in this sense: the edited model computes what the original computes with the
removed channels forced to zero at their layers' probe points (for coupled layers, in every
coupled layer). Nodes between a layer and its probe lose the channel with it; after the probe,
consumers drop the channel's weights. A node after the probe that turns the zero into a
constant (a batch norm after the ReLU, Conv -> ReLU -> BN; a Sigmoid; an added constant;
DenseNet's BN-ReLU-Conv after a concat) is followed, and the layers that read the constant
take it into their biases where that is exact (a conv without padding, a Gemm, a MatMul), so
that removing a dead kernel changes nothing; anything else the zero becomes, or a constant
read by a padded conv, makes the removal refuse rather than change the function silently.

One fallback: where only the per-channel ops after a layer's activation (its chain, up to
:attr:`~onnxaom.layers.Layer.channel_end`) stand in the way (Conv -> ReLU -> BN -> a padded
conv), the channels are removed at the end of that chain instead, as structured-pruning tools
remove them, with a ``UserWarning`` that the constant the chain adds is dropped;
:attr:`RemovalPlan.removed_at` says ``"chain end"`` and :attr:`RemovalPlan.chain_end` names
the layers. The fallback is per layer: every layer of the step that can still be removed at
its probe point is (tried one layer at a time, in layer order, with the others at their chain
ends).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..edits import RemoveKernels
from ..errors import EditError
from ..frozen import FrozenMap
from ..layers import find_layers
from ..warn import user_stacklevel
from .channels import ChannelGraph, LayerSlots, RemovePlan, Rewriter, build, rewrite

__all__ = ["RemovalPlan", "check_blocked", "plan", "refuse_coupled", "remove_step",
           "remove_with_fallback"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemovalPlan:
    """What one removal step does.

    requested: layer -> kernels asked for. removed: layer -> kernels that go, for every layer
    that changes (requested ones and the ones that follow: coupled by a residual merge or tied
    by a depthwise conv), in layer order. coupled: layers that lose kernels only because they
    are coupled to requested ones, in layer order. folds: node name -> what was added to its
    bias for removed channels that reach it as constants, one value per output channel of
    the node before the step (filled by :func:`remove_step`; empty in a plan not applied).
    removed_at: where the removed channels are zero in the edit's oracle, ``"probe"`` (for
    every layer) or ``"chain end"`` (for the layers in ``chain_end``, the fallback in the
    module's doc; the others at their probes); None in a plan not applied (only the rewrite
    finds whether the fallback is needed). chain_end: the layers removed at the end of their
    per-channel chains, in layer order.
    """

    requested: Mapping[str, tuple[int, ...]]
    removed: Mapping[str, tuple[int, ...]]
    coupled: tuple[str, ...]
    folds: Mapping[str, np.ndarray] = field(default_factory=FrozenMap)
    removed_at: str | None = None
    chain_end: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {"requested": {k: list(v) for k, v in self.requested.items()},
                "removed": {k: list(v) for k, v in self.removed.items()},
                "coupled": list(self.coupled), "removed_at": self.removed_at,
                "chain_end": list(self.chain_end)}


def plan(cg: ChannelGraph, edits: Sequence[RemoveKernels]) -> tuple[RemovePlan, RemovalPlan]:
    """Check a removal step against the traced graph and resolve its coupled channels."""
    requested: dict[str, tuple[int, ...]] = {}
    for edit in edits:
        if edit.layer in requested:
            raise EditError(f"layer {edit.layer!r} is named by two RemoveKernels edits in one "
                            f"step (their indices would both refer to the unedited layer); "
                            f"merge them into one edit")
        requested[edit.layer] = edit.kernels
    asked: set[tuple[str, int]] = set()
    all_classes: set[int] = set()
    for edit in edits:
        ref = cg.layer(edit.layer)
        k = len(ref.slots)
        bad = [i for i in edit.kernels if i >= k]
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more"
                                                      if len(bad) > 10 else "")
            raise EditError(f"layer {edit.layer!r} has {k} kernels (indices 0..{k - 1}); "
                            f"{shown} out of range")
        asked.update((edit.layer, i) for i in edit.kernels)
        classes = cg.classes(ref.slots[list(edit.kernels)])
        check_blocked(cg, edit.layer, classes)
        if edit.coupled == "refuse":
            refuse_coupled(cg, edit.layer, classes, asked_by_step=set(requested))
        all_classes |= classes
    removed = cg.layers_in(all_classes)
    for name, kernels in removed.items():
        total = len(cg.layers[name].slots)
        if len(kernels) == total:
            if name not in requested:
                why = " (it is coupled to the layers named)"
            elif len(requested[name]) < total:
                why = " (with the kernels named for the layers it is coupled to)"
            else:
                why = ""
            raise EditError(f"removing these kernels would remove all {total} kernels of layer "
                            f"{name!r}{why}; keep at least one")
    for name, named in requested.items():
        extra = sorted(set(removed.get(name, ())) - set(named))
        if extra:
            warnings.warn(
                f"layer {name!r} loses kernels {extra} besides the {len(named)} named for it: "
                f"it is coupled (residual merge or depthwise tie) to other layers of this step, "
                f"whose removals go with it; name the same kernels for coupled layers "
                f"(onnxaom.propose(..., model=model) does)", UserWarning,
                stacklevel=user_stacklevel())
    coupled = tuple(name for name, kernels in removed.items()
                    if any((name, k) not in asked for k in kernels) and name not in requested)
    if coupled:
        logger.info("removal also changes coupled layers: %s", ", ".join(coupled))
    result = RemovalPlan(requested, {n: tuple(k) for n, k in removed.items()}, coupled)
    return RemovePlan(cg, all_classes), result


def check_blocked(cg: ChannelGraph, layer: str, classes: set[int]) -> None:
    reasons: list[str] = []
    for root in sorted(classes):
        for reason in cg.slots.blocked(root):
            if reason not in reasons:
                reasons.append(reason)
    if reasons:
        more = f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else ""
        raise EditError(f"cannot edit kernels of layer {layer!r}: " + "; ".join(reasons[:3])
                        + more)


def refuse_coupled(cg: ChannelGraph, layer: str, classes: set[int],
                   asked_by_step: set[str]) -> None:
    """Raise when ``classes`` reach other layers by coupling (not by depthwise ties), unless
    those layers are named in the same step. A layer whose kernels are tied to ``layer``'s
    channels is tied, not coupled; so is a depthwise conv whose kernels follow the channels of
    a layer named in the step (after a residual Add of two named layers)."""
    named = {layer, *asked_by_step}
    find_tie = cg.slots.find_tie
    own_roots = {find_tie(int(s)) for s in cg.layers[layer].slots}
    owners_by_tie: dict[int, set[str]] = {}
    for slot, owner in enumerate(cg.slots.owner):
        if owner is not None:
            owners_by_tie.setdefault(find_tie(slot), set()).add(owner[0])
    others: list[str] = []
    for name, kernels in cg.layers_in(classes).items():
        if name in named:
            continue
        ref = cg.layers[name]
        depthwise = int(ref.node.attrs.get("group", 1)) > 1

        def tied(kernel: int, ref: LayerSlots = ref, name: str = name,
                 depthwise: bool = depthwise) -> bool:
            root = find_tie(int(ref.slots[kernel]))
            return root in own_roots or (depthwise and bool(
                (owners_by_tie.get(root, set()) - {name}) & named))

        if not all(tied(k) for k in kernels):
            others.append(name)
    if not others:
        return
    couplers: list[str] = []
    for root in classes:
        for c in cg.slots.couplers(root):
            if c not in couplers:
                couplers.append(c)
    via = f" (their channels are merged by node {', '.join(couplers[:3])})" if couplers else ""
    raise EditError(
        f"editing layer {layer!r} with coupled='refuse': its channels are coupled to layer(s) "
        f"{', '.join(repr(o) for o in others)}{via}; use coupled='propagate' to edit every "
        f"coupled layer the same way, or name those layers in the same step"
    )


def remove_step(graph: gs.Graph, proto: onnx.ModelProto, edits: Sequence[RemoveKernels],
                chain_end: Sequence[str] = ()) -> RemovalPlan:
    """Remove the kernels of ``edits`` (one step) from ``graph`` in place, zeroed at the
    layers' probe points, or, for the layers in ``chain_end``, at the end of their chains
    (:func:`~onnxaom.surgery.channels.build`)."""
    cg = build(graph, proto, chain_end=chain_end)
    remove_plan, result = plan(cg, edits)
    rewriter = Rewriter(cg, remove_plan, init="zeros", rng=np.random.default_rng(0))
    rewrite(cg, rewriter, check_zero=True)
    at_end = tuple(name for name in result.removed if name in set(chain_end))
    return replace(result, folds=FrozenMap(rewriter.folds),
                   removed_at="chain end" if at_end else "probe", chain_end=at_end)


def remove_with_fallback(proto: onnx.ModelProto,
                         removals: Sequence[RemoveKernels]) -> tuple[gs.Graph, RemovalPlan]:
    """One removal step on a graph imported from ``proto``: zeroed at the probe points, or,
    where only per-channel ops after an activation stand in the way, at the end of the chains
    of the layers that need it (the fallback in the module's doc), with a ``UserWarning``.
    Returns the edited graph and what the step did."""
    from .gsio import import_graph

    graph = import_graph(proto)
    try:
        return graph, remove_step(graph, proto, removals)
    except EditError as at_probe:
        chained = [layer.name for layer in find_layers(proto)
                   if layer.probe != layer.channel_end]
        if not chained:
            raise
        graph = import_graph(proto)  # the failed attempt left the first one half edited
        result = remove_step(graph, proto, removals, chain_end=chained)
        for name in result.chain_end:
            if len(result.chain_end) == 1:
                break  # all at their probes is what failed first
            trial = [n for n in result.chain_end if n != name]
            tried = import_graph(proto)
            try:
                exact = remove_step(tried, proto, removals, chain_end=trial)
            except EditError:
                continue  # this layer needs the chain end
            graph, result = tried, exact
        reason = str(at_probe).removeprefix("cannot remove these kernels exactly: ")
        warnings.warn(
            f"removing kernels of {', '.join(map(repr, result.chain_end))} as if zeroed at "
            f"their probe points is not exact ({reason.split('; ')[0]}); they were removed "
            f"at the end of their per-channel chains instead, after the ops that follow the "
            f"activation, so the constant those ops add to a zeroed channel is dropped and the "
            f"outputs change, even for a dead kernel (retrain afterwards)",
            UserWarning, stacklevel=user_stacklevel())
        return graph, result
