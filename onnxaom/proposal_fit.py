"""Fit a proposal to what the surgery does: whole channels, balanced groups, coupled layers.

findings -> proposal -> **fitted to the model** -> edits. A strategy of :mod:`onnxaom.proposal`
ranks each layer's kernels alone; the surgery (:mod:`onnxaom.surgery`) removes channels, and a
channel can hold several kernels, or tie layers together. Given the model (``propose(...,
model=)``), :func:`fit_to_model` changes the choice so that the applied model keeps what the
proposal says:

* **whole units**: the kernels of one input channel of a depthwise conv with a channel
  multiplier go together, so a target rounds up to whole channels;
* **coupled layers**: layers merged element-wise (a residual Add) or tied (a depthwise conv)
  lose the same channels, so they get one choice; a layer coupled in another channel order (a
  multiplier, a concat) follows its lead's choice;
* **balanced groups**: a grouped conv removes as many channels from each of its groups, from
  its own outputs and from the inputs it reads, so the layer keeps as many from each;
* **notes** for what cannot be fitted, and for edits the surgery would refuse or apply only
  through its fallback.

Each change re-chooses kernels by the layer's own ranking (``LayerProposal.order``) and says why
in the kernel's reason.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .edits import RemoveKernels
from .errors import EditError, OnnxaomError, StatsError
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

if TYPE_CHECKING:
    from .proposal import LayerProposal
    from .surgery.channels import ChannelGraph

__all__ = ["fit_to_model", "rehearsal_notes"]


def fit_to_model(model: Model, props: list[LayerProposal], targets: Mapping[str, int]
                 ) -> tuple[list[LayerProposal], list[str]]:
    """``props`` changed so that the surgery of ``model`` carries them out as proposed (see the
    module docstring), and the notes that say what changed or what the surgery would not do.
    ``targets``: the kernel counts asked for (``propose(keep=)``), layer -> n."""
    notes: list[str] = []
    cg = _channel_graph(model, notes)
    coupled: list[list[str]] = []
    followers: dict[str, str] = {}
    if cg is not None:
        props = _whole_units(cg, props, notes)
        props, coupled, followers = _reconcile_coupled(cg, props, targets, notes)
        props = _whole_units(cg, props, notes)
    props = _balance_groups(model, props, notes, coupled, cg, followers)
    if cg is not None:
        notes.extend(_split_units_notes(cg, props))
        notes.extend(_surgery_notes(model, cg, props))
    return props, notes


def rehearsal_notes(model: Model, props: Sequence[LayerProposal]) -> list[str]:
    """What the surgery of ``model`` makes of ``props`` as they stand, nothing changed: the
    step rehearsed with :func:`onnxaom.apply` (its checks included), giving its warnings (a
    layer losing kernels besides those named, a fallback) or why it refuses. For a proposal the
    designer changed by hand (:func:`onnxaom.override`), which no longer follows the fitting
    above."""
    from .surgery.apply import apply

    edits = [RemoveKernels(p.layer, p.removed) for p in props if p.removed]
    if not edits:
        return []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            apply(model, edits)
    except OnnxaomError as exc:
        return [f"the surgery refuses these edits: {exc}"]
    return list(dict.fromkeys(str(w.message) for w in caught
                              if issubclass(w.category, UserWarning)))


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
