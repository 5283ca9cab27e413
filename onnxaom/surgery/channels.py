"""The channel dependency graph: which tensor positions carry which layer's kernels.

Torch-Pruning's idea on an ONNX graph. Every kernel of every layer gets a *slot* (an int id).
A forward pass in topological order gives each tensor that carries layer channels a
:class:`Flow`: its channel axis and, position by position along it, the slot it carries
(after a Flatten a channel covers H*W consecutive positions). The op registry
(:mod:`onnxaom.surgery.ops`) says, per op, how flows go from inputs to outputs.

Slots are merged into *classes* (union-find) where the graph forces channels to change together:

* an element-wise merge of two layer tensors (Add of a residual block, Mul, Max ...) *couples*
  the channels at the same position; such layers form a group;
* a depthwise Conv *ties* each of its kernels to its input channel (kernel and input channel
  can only go together).

A class is *blocked* (with a reason naming the node) where the graph does something with its
channels that the surgery cannot follow: an unsupported op, a graph output, a merge with a
tensor that no layer produces. Editing a blocked class raises :class:`~onnxaom.EditError`.

An edit is turned into a plan (:class:`RemovePlan`, :class:`WidenPlan`) over classes, and each
flow into a :class:`Change` (new position -> old position) that the op handlers apply to their
constants (:class:`Rewriter`). Nothing here edits a graph until :func:`rewrite` is called.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import EditError, LayerNotFoundError
from ..graph import GraphIndex, Shape
from ..layers import Layer, find_layers
from .gsio import NameRegistry, constant_value

if TYPE_CHECKING:
    from .ops import Handler

__all__ = [
    "Change",
    "ChannelGraph",
    "Constant",
    "Flow",
    "LayerSlots",
    "NodeRecord",
    "Plan",
    "RemovePlan",
    "Rewriter",
    "Segment",
    "Slots",
    "Unsupported",
    "build",
    "rewrite",
]

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = (None, "", "ai.onnx")


class Unsupported(Exception):
    """Raised by an op handler that cannot follow a flow; the message completes
    "node 'X' (Op) ..."."""


# --------------------------------------------------------------------------------------------
# flows


@dataclass(frozen=True)
class Segment:
    """A run of channels along a flow's axis.

    slots: array of shape (n_channels,), the slot of each channel.
    inner: consecutive positions per channel (1; H*W once flattened channel-major).
    """

    slots: np.ndarray
    inner: int = 1

    @property
    def size(self) -> int:
        return len(self.slots) * self.inner


@dataclass(frozen=True)
class Flow:
    """Which slot sits at each position of a tensor's channel axis.

    rank: the tensor's rank; axis: its channel axis; segments: the runs of channels along the
    axis, in order; pre_probe: the tensor lies between a layer and its probe point (its
    per-channel chain), where a removed channel is simply gone; outer: how many times the
    segments repeat along the axis (1; H*W once flattened channels-last, features in
    (position, channel) order).
    """

    rank: int
    axis: int
    segments: tuple[Segment, ...]
    pre_probe: bool = False
    outer: int = 1

    @property
    def period(self) -> int:
        """Positions of one repeat of the segments."""
        return sum(seg.size for seg in self.segments)

    @property
    def size(self) -> int:
        return self.outer * self.period

    @property
    def channel_level(self) -> bool:
        return self.outer == 1 and all(seg.inner == 1 for seg in self.segments)

    def all_slots(self) -> np.ndarray:
        return np.concatenate([seg.slots for seg in self.segments])

    def expanded(self) -> np.ndarray:
        """Slot per position, array of shape (size,)."""
        one = np.concatenate([np.repeat(seg.slots, seg.inner) for seg in self.segments])
        return np.tile(one, self.outer)

    def moved(self, rank: int, axis: int, pre_probe: bool | None = None) -> Flow:
        return replace(self, rank=rank, axis=axis,
                       pre_probe=self.pre_probe if pre_probe is None else pre_probe)

    def flattened(self, inner: int) -> Flow:
        """This flow with every channel spread over ``inner`` positions (a channel-major
        flatten of the trailing axes), as a rank-2 (N, features) flow."""
        if self.outer != 1:
            raise Unsupported("flattens features that were flattened channels-last")
        return Flow(2, 1, tuple(Segment(seg.slots, seg.inner * inner) for seg in self.segments),
                    self.pre_probe)

    def flattened_last(self, positions: int) -> Flow:
        """This channel-level flow, channels last, flattened with the ``positions`` before it
        (a channels-last flatten: feature = position * channels + channel), as a rank-2 flow."""
        if not self.channel_level:
            raise Unsupported("flattens channels-last a tensor already flattened")
        return Flow(2, 1, self.segments, self.pre_probe, outer=positions)

    def repeated(self, index: np.ndarray) -> np.ndarray:
        """``index`` (positions within one period, -1 for none) for every repeat."""
        if self.outer == 1:
            return index
        shifts = self.period * np.arange(self.outer, dtype=np.int64)[:, None]
        return np.where(index[None, :] >= 0, index[None, :] + shifts, -1).ravel()


def concat_flows(parts: Sequence[Flow], rank: int, axis: int) -> Flow:
    """The flow of a concatenation; adjacent segments of the same ``inner`` merge."""
    segments: list[Segment] = []
    if any(part.outer != 1 for part in parts):
        raise Unsupported("concatenates features flattened channels-last")
    for part in parts:
        for seg in part.segments:
            if segments and segments[-1].inner == seg.inner:
                segments[-1] = Segment(np.concatenate([segments[-1].slots, seg.slots]), seg.inner)
            else:
                segments.append(seg)
    return Flow(rank, axis, tuple(segments))


# --------------------------------------------------------------------------------------------
# slots and classes


class Slots:
    """Slot ids with their owners and two union-finds: all couplings, and depthwise ties only."""

    def __init__(self) -> None:
        self.owner: list[tuple[str, int] | None] = []
        self._parent: list[int] = []
        self._tie_parent: list[int] = []
        self._blocked: dict[int, list[str]] = {}
        self._couplers: dict[int, list[str]] = {}

    def new(self, n: int, layer: str | None = None, reason: str | None = None) -> np.ndarray:
        """``n`` fresh slots: kernels 0..n-1 of ``layer``, or pinned channels (owner None)
        blocked with ``reason``."""
        start = len(self.owner)
        for k in range(n):
            self.owner.append((layer, k) if layer is not None else None)
            self._parent.append(start + k)
            self._tie_parent.append(start + k)
        ids = np.arange(start, start + n, dtype=np.int64)
        if reason is not None:
            self.block(ids, reason)
        return ids

    @staticmethod
    def _find(parent: list[int], a: int) -> int:
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def find(self, a: int) -> int:
        return self._find(self._parent, int(a))

    def find_tie(self, a: int) -> int:
        return self._find(self._tie_parent, int(a))

    def roots(self, slots: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(s) for s in slots), dtype=np.int64, count=len(slots))

    def union(self, a: np.ndarray, b: np.ndarray, tie: bool = False,
              coupler: str | None = None) -> None:
        """Merge the classes of ``a[i]`` and ``b[i]`` for every i."""
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self._parent[ry] = rx
                if ry in self._blocked:
                    self._blocked.setdefault(rx, []).extend(self._blocked.pop(ry))
                if ry in self._couplers:
                    self._couplers.setdefault(rx, []).extend(self._couplers.pop(ry))
                if coupler is not None:  # only a merge of two classes couples (not x * f(x))
                    names = self._couplers.setdefault(rx, [])
                    if coupler not in names:
                        names.append(coupler)
            if tie:
                tx, ty = self.find_tie(x), self.find_tie(y)
                if tx != ty:
                    self._tie_parent[ty] = tx

    def block(self, slots: Iterable[int], reason: str) -> None:
        for s in {self.find(s) for s in np.asarray(list(slots), dtype=np.int64).tolist()}:
            reasons = self._blocked.setdefault(s, [])
            if reason not in reasons:
                reasons.append(reason)

    def blocked(self, root: int) -> list[str]:
        return self._blocked.get(self.find(root), [])

    def couplers(self, root: int) -> list[str]:
        return self._couplers.get(self.find(root), [])

    def members(self) -> dict[int, list[int]]:
        """Class root -> its slots."""
        out: dict[int, list[int]] = {}
        for s in range(len(self.owner)):
            out.setdefault(self.find(s), []).append(s)
        return out


# --------------------------------------------------------------------------------------------
# the traced graph


@dataclass
class LayerSlots:
    """A layer of the graph being edited: its :class:`~onnxaom.layers.Layer`, node and slots."""

    layer: Layer
    node: gs.Node
    slots: np.ndarray


@dataclass
class NodeRecord:
    """A node that reads or writes layer channels, with the flows of its inputs and outputs
    (None where a tensor carries no layer channels)."""

    node: gs.Node
    handler: Handler
    ins: list[Flow | None]
    outs: list[Flow | None]
    layer: LayerSlots | None = None


@dataclass
class ChannelGraph:
    """The result of tracing a graph (see :func:`build`)."""

    graph: gs.Graph
    layers: dict[str, LayerSlots]
    flows: dict[str, Flow]
    records: list[NodeRecord]
    slots: Slots
    shapes: dict[str, Shape]
    layer_order: list[str] = field(default_factory=list)
    #: outputs of the nodes that blocked the layer channels they read -> why, so that a merge
    #: further on can say where its other operand lost them
    lost: dict[str, str] = field(default_factory=dict)

    def layer(self, name: str) -> LayerSlots:
        if name not in self.layers:
            known = ", ".join(self.layer_order) or "(none)"
            raise LayerNotFoundError(f"the model has no layer {name!r}; its layers: {known}")
        return self.layers[name]

    def shape(self, tensor: gs.Tensor) -> Shape | None:
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in tensor.shape)
        return self.shapes.get(tensor.name)

    def const(self, tensor: gs.Tensor) -> np.ndarray | None:
        return constant_value(tensor)

    # ---- used by handlers while tracing

    def pinned(self, n: int, reason: str) -> np.ndarray:
        return self.slots.new(n, reason=reason)

    def couple(self, a: Flow, b: Flow, node: gs.Node) -> None:
        """Couple two flows merged element-wise by ``node`` position by position."""
        if a.size != b.size:
            raise Unsupported(f"merges tensors of {a.size} and {b.size} channels")
        if a.outer == b.outer and len(a.segments) == len(b.segments) and all(
            sa.inner == sb.inner and len(sa.slots) == len(sb.slots)
            for sa, sb in zip(a.segments, b.segments, strict=True)
        ):
            self.slots.union(a.all_slots(), b.all_slots(), coupler=describe(node))
        else:
            self.slots.union(a.expanded(), b.expanded(), coupler=describe(node))

    # ---- questions the plans ask

    def classes(self, slots: np.ndarray) -> set[int]:
        return {self.slots.find(s) for s in slots.tolist()}

    def layers_in(self, classes: set[int]) -> dict[str, list[int]]:
        """Layer name -> its kernels whose slot is in one of ``classes``, in layer order."""
        out: dict[str, list[int]] = {}
        for name in self.layer_order:
            kernels = [k for k, s in enumerate(self.layers[name].slots.tolist())
                       if self.slots.find(s) in classes]
            if kernels:
                out[name] = kernels
        return out


def describe(node: gs.Node) -> str:
    name = node.name or (node.outputs[0].name if node.outputs else "?")
    return f"{name!r} ({node.op})"


def _chain_tensors(index: GraphIndex, layer: Layer, end: str) -> set[str]:
    """Tensors from the layer's output up to (not including) ``end``, its probe point or the
    end of its per-channel chain (:attr:`Layer.channel_end`): where a removed channel is
    simply gone. A ``Shape`` beside the chain (a legacy group norm's reshape back to
    ``Shape(x)``) reads only sizes; the chain goes on through the one other reader."""
    out: set[str] = set()
    tensor = layer.output
    while tensor != end and tensor not in out:
        out.add(tensor)
        if tensor in index.graph_outputs:
            break
        readers = [r for r in index.consumers.get(tensor, [])
                   if index.graph.node[r].op_type != "Shape"]
        if len(readers) != 1:
            break
        tensor = index.graph.node[readers[0]].output[0]
    return out


def _subgraph_reads(proto: onnx.ModelProto, index: GraphIndex) -> dict[str, int]:
    """Tensor -> index of a node with a subgraph that reads it from the outer scope."""
    with_graphs = {
        i for i, node in enumerate(proto.graph.node)
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute)
    }
    out: dict[str, int] = {}
    if not with_graphs:
        return out
    for name, readers in index.consumers.items():
        for i in readers:
            if i in with_graphs and name not in proto.graph.node[i].input:
                out[name] = i
    return out


#: Where a removal zeroes a kernel's channel (see :func:`build`).
REMOVAL_POINTS = ("probe", "chain end")


def build(graph: gs.Graph, proto: onnx.ModelProto, removal_point: str = "probe",
          chain_end: Iterable[str] = ()) -> ChannelGraph:
    """Trace ``graph`` (imported from ``proto``, same node order) into a :class:`ChannelGraph`.

    ``proto`` names the layers (:func:`onnxaom.layers.find_layers`) and gives the shapes.
    ``removal_point``: where a removed kernel's channel is zero in the removal's oracle, its
    layer's ``"probe"``, or the ``"chain end"`` (:attr:`Layer.channel_end`: after per-channel
    ops that follow the activation, such as Conv -> ReLU -> BN's batch norm); the nodes
    between a layer and that point lose the channel with it. ``chain_end``: layers removed at
    their chain end whatever ``removal_point`` says (the removal's per-layer fallback).
    """
    if removal_point not in REMOVAL_POINTS:
        raise ValueError(f"removal_point must be one of {REMOVAL_POINTS}, got {removal_point!r}")
    at_chain_end = set(chain_end)
    from .ops import handler_for, layer_handler_for

    index = GraphIndex(proto)
    layers = find_layers(proto, index=index)
    shapes = index.run_shapes  # H, W that inference could not tell
    if len(graph.nodes) != len(proto.graph.node):
        raise EditError("internal: the imported graph lost nodes; cannot map layers")
    cg = ChannelGraph(graph, {}, {}, [], Slots(), dict(shapes), [layer.name for layer in layers])
    by_index: dict[int, Layer] = {layer.node_index: layer for layer in layers}
    pre_probe: set[str] = set()
    for layer in layers:
        at_probe = removal_point == "probe" and layer.name not in at_chain_end
        pre_probe |= _chain_tensors(index, layer, layer.probe if at_probe else layer.channel_end)
    subgraph_reads = _subgraph_reads(proto, index)

    for i, node in enumerate(graph.nodes):
        ins: list[Flow | None] = [
            None if isinstance(t, gs.Constant) or not t.name else cg.flows.get(t.name)
            for t in node.inputs
        ]
        found = by_index.get(i)
        if found is None and not any(f is not None for f in ins):
            continue
        ref: LayerSlots | None = None
        handler: Handler | None
        if found is not None:
            if node.outputs[0].name != found.output:
                raise EditError(f"internal: layer {found.name!r} does not match node "
                                f"{describe(node)}")
            ref = LayerSlots(found, node, cg.slots.new(found.kernels, layer=found.name))
            cg.layers[found.name] = ref
            handler = layer_handler_for(node.op)
        else:
            handler = handler_for(node) if node.domain in DEFAULT_DOMAINS else None
        try:
            if handler is None:
                raise Unsupported("is an op the surgery does not support")
            outs = handler.trace(cg, node, ins, ref)
        except Unsupported as exc:
            reason = f"node {describe(node)} {exc}"
            for flow in ins:
                if flow is not None:
                    cg.slots.block(flow.all_slots(), reason)
            if ref is not None:
                cg.slots.block(ref.slots, reason)
            cg.lost.update((t.name, reason) for t in node.outputs if t.name)
            logger.debug("blocked: %s", reason)
            continue
        outs = [None if f is None else replace(f, pre_probe=t.name in pre_probe)
                for f, t in zip(outs, node.outputs, strict=True)]
        for flow, tensor in zip(outs, node.outputs, strict=True):
            if flow is not None:
                cg.flows[tensor.name] = flow
        cg.records.append(NodeRecord(node, handler, ins, outs, ref))

    for out in graph.outputs:
        flow = cg.flows.get(out.name)
        if flow is not None:
            cg.slots.block(flow.all_slots(), f"its channels reach the graph output {out.name!r}, "
                                             f"whose shape cannot change")
    for name, i in subgraph_reads.items():
        flow = cg.flows.get(name)
        if flow is not None:
            cg.slots.block(flow.all_slots(), f"tensor {name!r} is read inside the subgraph of "
                                             f"node {describe(graph.nodes[i])}")
    return cg


# --------------------------------------------------------------------------------------------
# plans and changes


@dataclass(frozen=True)
class Change:
    """How one flow's axis changes: new position j takes the values of old position
    ``index[j]`` (``-1``: a fresh channel with nothing to copy); ``added[j]`` marks positions
    that did not exist before (copies and fresh ones). Arrays of shape (new_size,)."""

    index: np.ndarray
    added: np.ndarray
    old_size: int

    @property
    def size(self) -> int:
        return len(self.index)

    @property
    def fresh(self) -> np.ndarray:
        return self.index < 0

    @property
    def grows(self) -> bool:
        return bool(self.added.any())

    def removed(self) -> np.ndarray:
        """Old positions that are gone."""
        keep = np.zeros(self.old_size, dtype=bool)
        keep[self.index[self.index >= 0]] = True
        return np.flatnonzero(~keep)

    def counts(self) -> np.ndarray:
        """How many new positions copy each old position, array of shape (old_size,)."""
        return np.bincount(self.index[self.index >= 0], minlength=self.old_size)


class Plan(Protocol):
    """Turns a flow into its :class:`Change` (None: unchanged)."""

    def change(self, flow: Flow) -> Change | None: ...


class _CachedChanges:
    """A plan's :meth:`change` per flow, worked out once (flows are immutable)."""

    def change(self, flow: Flow) -> Change | None:
        cache: dict[int, Change | None] = self.__dict__.setdefault("_changes", {})
        key = id(flow)
        if key not in cache:
            cache[key] = self._change(flow)
        return cache[key]

    def _change(self, flow: Flow) -> Change | None:
        raise NotImplementedError


@dataclass
class RemovePlan(_CachedChanges):
    """Remove every channel whose class is in ``removed``."""

    cg: ChannelGraph
    removed: set[int]

    def _change(self, flow: Flow) -> Change | None:
        parts: list[np.ndarray] = []
        offset = 0
        for seg in flow.segments:
            roots = self.cg.slots.roots(seg.slots)
            kept = np.flatnonzero(~np.isin(roots, list(self.removed)))
            positions = (kept[:, None] * seg.inner + np.arange(seg.inner)[None, :]).ravel()
            parts.append(positions + offset)
            offset += seg.size
        index = flow.repeated(np.concatenate(parts).astype(np.int64))
        if len(index) == flow.size:
            return None
        return Change(index, np.zeros(len(index), dtype=bool), flow.size)


@dataclass
class WidenPlan(_CachedChanges):
    """Append new channels after every run of ``block`` (the widened layer's classes, in
    kernel order): ``sources[j]`` is the kernel new channel j copies (-1: fresh)."""

    cg: ChannelGraph
    block: np.ndarray
    sources: np.ndarray
    layer: str

    def _change(self, flow: Flow) -> Change | None:
        k = len(self.block)
        index_parts: list[np.ndarray] = []
        added_parts: list[np.ndarray] = []
        offset, grew = 0, False
        for seg in flow.segments:
            roots = self.cg.slots.roots(seg.slots)
            member = np.isin(roots, self.block)
            covered = np.zeros(len(roots), dtype=bool)
            entries: list[int] = []
            added: list[bool] = []
            i = 0
            while i < len(roots):
                if member[i] and i + k <= len(roots) and np.array_equal(roots[i:i + k], self.block):
                    entries.extend(range(i, i + k))
                    added.extend([False] * k)
                    covered[i:i + k] = True
                    entries.extend(int(i + s) if s >= 0 else -1 for s in self.sources)
                    added.extend([True] * len(self.sources))
                    i += k
                    grew = True
                else:
                    entries.append(i)
                    added.append(False)
                    i += 1
            if (member & ~covered).any():
                raise EditError(
                    f"cannot widen layer {self.layer!r}: a tensor carries some of its channels "
                    f"without the others in kernel order (a slice, a channel multiplier or a "
                    f"reordering), so new channels have no place there"
                )
            ch = np.asarray(entries, dtype=np.int64)
            pos = np.where(ch[:, None] >= 0, ch[:, None] * seg.inner + np.arange(seg.inner), -1)
            index_parts.append(np.where(pos >= 0, pos + offset, -1).ravel())
            added_parts.append(np.repeat(np.asarray(added, dtype=bool), seg.inner))
            offset += seg.size
        if not grew:
            return None
        return Change(flow.repeated(np.concatenate(index_parts)),
                      np.tile(np.concatenate(added_parts), flow.outer), flow.size)


# --------------------------------------------------------------------------------------------
# rewriting


class Rewriter:
    """What op handlers use to change their constants under a plan.

    ``init`` says how fresh channels start: ``"zeros"`` or ``"random"`` (He-normal);
    ``noise`` is added to copied kernels (relative to the weights' standard deviation).
    """

    def __init__(self, cg: ChannelGraph, plan: Plan, *, init: str = "zeros",
                 rng: np.random.Generator | None = None, noise: float = 0.0) -> None:
        self.cg = cg
        self.plan = plan
        self.init = init
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.noise = noise
        self.names = NameRegistry(cg.graph)
        #: layer node name -> what a removal's constant channels add to each of its outputs
        #: (its bias before its own channels change), for adapters that follow the surgery
        self.folds: dict[str, np.ndarray] = {}

    def const(self, tensor: gs.Tensor) -> np.ndarray | None:
        return constant_value(tensor)

    def require_const(self, node: gs.Node, i: int, what: str) -> np.ndarray:
        value = self.const(node.inputs[i]) if i < len(node.inputs) else None
        if value is None:
            raise EditError(f"node {describe(node)}: its {what} (input {i}) is not a constant, "
                            f"so it cannot be edited")
        return value

    def set_input(self, node: gs.Node, i: int, values: np.ndarray) -> None:
        """Make input ``i`` of ``node`` the constant ``values`` (same dtype as before). A
        constant used only here is changed in place (keeps its name); otherwise a new one."""
        old = node.inputs[i]
        dtype = self.const(old)
        values = np.ascontiguousarray(values, dtype=None if dtype is None else dtype.dtype)
        if isinstance(old, gs.Constant) and len(old.outputs) == 1:
            old.values = values
            return
        producer = old.inputs[0] if isinstance(old, gs.Variable) and len(old.inputs) == 1 \
            else None
        if producer is not None and producer.op == "Constant" and len(old.outputs) == 1 \
                and old.name not in {t.name for t in self.cg.graph.outputs}:
            producer.attrs = {"value": gs.Constant(old.name, values)}  # keeps the Constant node
            return
        node.inputs[i] = gs.Constant(self.names.fresh(old.name or f"{node.name}_const"), values)

    @staticmethod
    def per_channel(values: np.ndarray, axis: int, change: Change, neutral: float) -> np.ndarray:
        """Per-channel parameters: copies keep their source's, fresh ones get ``neutral``."""
        out = np.take(values, np.maximum(change.index, 0), axis=axis)
        if change.fresh.any():
            sl = [slice(None)] * values.ndim
            sl[axis] = change.fresh  # type: ignore[call-overload]
            out[tuple(sl)] = neutral
        return out

    def out_channels(self, values: np.ndarray, axis: int, change: Change, fan_in: int,
                     bias: bool = False) -> np.ndarray:
        """A layer's kernels (or biases): copies keep their source's (plus noise for
        weights), fresh ones start by ``init`` (biases at zero)."""
        out = np.take(values, np.maximum(change.index, 0), axis=axis)
        moved = np.moveaxis(out, axis, 0)
        copies = change.added & ~change.fresh
        if not bias and self.noise > 0 and copies.any():
            scale = float(values.std()) * self.noise
            moved[copies] += self.rng.normal(0.0, scale, moved[copies].shape).astype(out.dtype)
        if change.fresh.any():
            if bias or self.init == "zeros":
                moved[change.fresh] = 0
            else:
                std = np.sqrt(2.0 / max(fan_in, 1))
                moved[change.fresh] = self.rng.normal(0.0, std, moved[change.fresh].shape)
        return out

    @staticmethod
    def in_channels(values: np.ndarray, axis: int, change: Change) -> np.ndarray:
        """A consumer's weights along its input-channel ``axis``: each old input's weights are
        split evenly among its copies (Net2WiderNet); fresh inputs get zero weights; removed
        inputs lose theirs."""
        counts = change.counts()
        idx = np.maximum(change.index, 0)
        out = np.take(values, idx, axis=axis)
        shape = [1] * values.ndim
        shape[axis] = len(idx)
        divisor = np.where(change.fresh, 1, counts[idx]).astype(values.dtype)
        out = out / divisor.reshape(shape)
        if change.fresh.any():
            moved = np.moveaxis(out, axis, 0)
            moved[change.fresh] = 0
        return out.astype(values.dtype)


def rewrite(cg: ChannelGraph, rewriter: Rewriter, check_zero: bool) -> int:
    """Apply ``rewriter.plan`` to every recorded node; returns how many nodes changed.

    ``check_zero`` (removal): follows, after each layer's probe point, what the removed
    channels hold in the original model once zeroed at the probe: zero, a constant per channel
    (a batch norm shift, a Sigmoid, an added constant; a Mul by a zeroed channel makes them
    zero again), or something else. A layer that reads constants takes them into its bias
    where that is exact (a conv without padding, a Gemm: DenseNet's BN-ReLU-Conv after a
    concat); a layer that would read anything else makes the edit refuse: removing the
    channels there would not be the same as zeroing them.
    """
    changed = 0
    state: dict[str, str | Constant | None] = {}
    for rec in cg.records:
        try:
            ins = [None if f is None else rewriter.plan.change(f) for f in rec.ins]
            outs = [None if f is None else rewriter.plan.change(f) for f in rec.outs]
        except EditError as exc:  # a plan that cannot place its channels: say where
            raise EditError(f"{exc} (node {describe(rec.node)})") from exc
        if all(c is None for c in ins) and all(c is None for c in outs):
            continue
        if check_zero:
            _follow_zeros(rewriter, rec, ins, state)
        rec.handler.apply(rewriter, rec.node, ins, outs)
        changed += 1
    io = {t.name for t in [*cg.graph.inputs, *cg.graph.outputs]}
    for tensor in cg.graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in io:
            tensor.shape = None
    return changed


@dataclass(frozen=True)
class Constant:
    """Removed channels that are constant in the oracle (zeroed at the probe, then shifted by
    a batch norm, a Sigmoid, an added constant...): ``values`` at the removed positions of the
    tensor, in their order (float64, shape (n_removed,)); ``origin``: the node that made them
    non-zero, as a message fragment."""

    values: np.ndarray
    origin: str


#: Ops that read only a tensor's size, never its values.
_SIZE_READERS = frozenset({"Shape", "Size"})


def _follow_zeros(rewriter: Rewriter, rec: NodeRecord, ins: list[Change | None],
                  state: dict[str, str | Constant | None]) -> None:
    """Update ``state`` (tensor -> what its removed channels hold in the oracle: zero (None),
    a :class:`Constant`, or why neither) for the outputs of ``rec``; a layer that reads
    constant removed channels takes them into its bias where it can (a conv without padding,
    a Gemm); raise where a layer reads anything else, or constants it cannot take."""
    post = {i: state.get(rec.node.inputs[i].name)
            for i, (f, c) in enumerate(zip(rec.ins, ins, strict=True))
            if f is not None and c is not None and not f.pre_probe and len(c.removed())}
    out_state: str | Constant | None = None
    if rec.layer is not None:
        for i, held in post.items():
            if held is None:
                continue
            why = held if isinstance(held, str) else held.origin
            cannot = None if isinstance(held, str) else \
                rec.handler.fold_constant(rewriter, rec.node, ins[i], held.values)  # type: ignore[arg-type]
            if isinstance(held, str) or cannot is not None:
                extra = f" ({cannot})" if cannot else ""
                raise EditError(
                    f"cannot remove these kernels exactly: {why}, and layer "
                    f"{rec.layer.layer.name!r} reads those values{extra}; zeroing the channels "
                    f"at their probe point would not remove their contribution, so removing "
                    f"them would change the model's outputs. Remove other kernels, or fold "
                    f"that node into the layer before it")
    elif post:
        out_state = rec.handler.zero_state(rewriter, rec.node, ins, post)
        if out_state is not None and all(flow is None for flow in rec.outs) \
                and rec.node.op not in _SIZE_READERS:
            # a consumer whose outputs are not the channels (a ConvTranspose losing input
            # rows): nothing follows the values it reads, so nothing can take them
            why = next(h if isinstance(h, str) else h.origin for h in post.values()
                       if h is not None)
            raise EditError(
                f"cannot remove these kernels exactly: {why}, and node {rec.node.name!r} "
                f"({rec.node.op}) reads those values; no bias can take them there, so removing "
                f"them would change the model's outputs. Remove other kernels, or fold that "
                f"node into the layer before it")
    for tensor, flow in zip(rec.node.outputs, rec.outs, strict=True):
        if flow is not None:
            state[tensor.name] = out_state


