"""Handlers of layout ops: Concat, Flatten, Reshape, Shape/Size, CastLike, Reduce*, (Un)Squeeze,
Transpose."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ...errors import EditError
from ..channels import (
    Change,
    ChannelGraph,
    Flow,
    LayerSlots,
    Rewriter,
    Segment,
    Unsupported,
    concat_flows,
    describe,
)
from ..gsio import constant_value, fold_node
from .base import (
    Changes,
    Flows,
    Handler,
    Positional,
    State,
    _by_slot,
    _constant_or_zero,
    _held,
    _ints,
    _norm_axis,
    _only_first_input,
    _origin,
    _same,
    register,
)
from .sizes import (
    _follow_sizes,
    _producer,
    _reshape_target,
    _shape_entries,
    _shape_range,
    _SizeOf,
    _target_dims,
    _why_unread,
)


@register("Concat")
class Concat(Positional):
    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        traced = [f for f in ins if f is not None]
        rank = traced[0].rank
        if any(f.rank != rank for f in traced):
            raise Unsupported("concatenates tensors of different ranks")
        axis = _norm_axis(int(node.attrs.get("axis", 0)), rank)
        if any(f.axis != axis for f in traced):
            if all(f.axis == traced[0].axis for f in traced) and len(traced) == len(ins):
                for other in traced[1:]:
                    cg.couple(traced[0], other, node)
                return _same(traced[0], len(node.outputs))
            raise Unsupported("concatenates along an axis that does not carry the channels")
        parts: list[Flow] = []
        for t, flow in zip(node.inputs, ins, strict=True):
            if flow is not None:
                parts.append(flow)
                continue
            shape = cg.shape(t)
            width = None if shape is None or len(shape) != rank else shape[axis]
            if width is None:
                raise Unsupported(f"concatenates tensor {t.name!r} of unknown channel count")
            pinned = cg.pinned(int(width), f"channels of tensor {t.name!r} (no layer's)")
            parts.append(Flow(rank, axis, (Segment(pinned),)))
        return _same(concat_flows(parts, rank, axis), len(node.outputs))

    def zero_state(self, r: Rewriter, node: gs.Node, ins: Changes,
                   states: dict[int, State]) -> State:
        """Along the channel axis each output channel comes from one input (:func:`_by_slot`).
        Along another axis the inputs are coupled (the same channels in each): a removed
        channel holds each input's values at that input's positions, a constant only where
        every input holds the same one (a batch norm's shift beside a zero is neither)."""
        traced = [r.cg.flows.get(t.name) for t, change in zip(node.inputs, ins, strict=True)
                  if change is not None]
        first = traced[0] if traced else None
        if first is None or first.axis == _norm_axis(int(node.attrs.get("axis", 0)),
                                                       first.rank):
            return _by_slot(r, node, ins, states)
        held = [_held(states, i, len(change.removed()))
                for i, change in enumerate(ins) if change is not None]
        bad = next((h for h in held if isinstance(h, str)), None)
        if bad is not None:
            return bad
        values = [np.asarray(h, np.float64) for h in held]
        origin = _origin(states, node, "")
        if all(v.shape == values[0].shape and np.array_equal(v, values[0]) for v in values):
            return _constant_or_zero(values[0], origin)
        return (f"{origin}, and node {describe(node)} joins those channels to other values "
                f"along axis {node.attrs.get('axis', 0)}")


@register("Flatten")
class Flatten(Positional):
    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        flow = _only_first_input(node, ins)
        axis = _norm_axis(int(node.attrs.get("axis", 1)), flow.rank)
        if axis != 1 or flow.axis not in (1, flow.rank - 1):
            raise Unsupported("flattens in an order that does not keep channels together")
        if flow.rank == 2:
            return _same(flow, len(node.outputs))
        shape = cg.shape(node.inputs[0])
        if shape is None or any(d is None for d in shape[1:]):
            positions = _positions_read(cg, node.outputs[0], flow)
            if positions is None:
                raise Unsupported("flattens a tensor whose spatial size is unknown (and is not "
                                  "read by dense layers whose width would give it)")
            if flow.axis == flow.rank - 1:
                return _same(flow.flattened_last(positions), len(node.outputs))
            return _same(flow.flattened(positions), len(node.outputs))
        if flow.axis == flow.rank - 1:  # channels last (NHWC): features (position, channel)
            return _same(flow.flattened_last(int(np.prod([int(d) for d in shape[1:-1]
                                                          if d is not None]))),
                         len(node.outputs))
        inner = int(np.prod([int(d) for d in shape[2:] if d is not None]))
        return _same(flow.flattened(inner), len(node.outputs))


def _positions_read(cg: ChannelGraph, tensor: gs.Tensor, flow: Flow) -> int | None:
    """Positions per channel of a flattened ``tensor`` whose spatial size shape inference
    left unknown (a legacy export whose Pad amounts are computed, for reflect padding), from
    the dense layers that read it: their constant weights' input width F is channels x
    positions. None unless every reader is a Gemm or MatMul with a constant 2-D weight and
    they agree on an F that ``flow``'s channels divide."""
    widths = set()
    for reader in tensor.outputs:
        if not reader.inputs or reader.inputs[0] is not tensor or reader.op not in ("Gemm",
                                                                                   "MatMul"):
            return None
        weight = cg.const(reader.inputs[1]) if len(reader.inputs) > 1 else None
        if weight is None or np.ndim(weight) != 2:
            return None
        transposed = reader.op == "Gemm" and int(reader.attrs.get("transB", 0))
        widths.add(int(np.shape(weight)[1] if transposed else np.shape(weight)[0]))
    if len(widths) != 1:
        return None
    features, channels = widths.pop(), flow.size
    if channels < 1 or features % channels or features < channels:
        return None
    return features // channels


@register("Reshape")
class Reshape(Positional):
    """Reshapes that keep channel positions meaningful: (N, C, ...) -> (N, C, ...) (trailing
    dims merged or split) and (N, C, H, W) -> (N, C*H*W) (channel-major flatten). The target
    shape must be a constant, or computed as ``Concat`` of constants, the batch size and sizes
    of other tensors (PyTorch's legacy export of ``x.view(x.size(0), -1)``, or of an SE
    block's ``view(b, c, 1, 1)`` with ``b, c = x.size()[:2]``); a literal channel (or feature)
    count in it is updated, and a channel count taken from a tensor follows that tensor's
    channels, which are coupled to the output's (:func:`_follow_sizes`)."""

    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        flow = _only_first_input(node, ins)
        resolved = _reshape_target(cg, node)
        if resolved is None:
            raise Unsupported(f"has a computed target shape{_why_unread(cg, node)}")
        target, computed = resolved
        src, dst = cg.shape(node.inputs[0]), cg.shape(node.outputs[0])
        if target[0] is None and src is not None:
            dims = _target_dims(target, src)
            dst = None if dims is None else tuple(dims)
            if dst is not None and (cg.shape(node.outputs[0]) is None
                                    or None in cg.shape(node.outputs[0])[1:]):  # type: ignore[index]
                cg.shapes[node.outputs[0].name] = dst  # for the readers of the output
        if (src is not None and len(src) > 2 and flow.axis == len(src) - 1
                and None not in src[1:] and len(target) == 2
                and target[1] in (-1, int(np.prod(src[1:])))  # type: ignore[arg-type]
                and (target[0] in (None, 0, -1) or target[0] == src[0])):
            # channels last (NHWC, as tf2onnx writes Keras' Flatten): (N, H, W, C) -> (N, H*W*C),
            # features in (position, channel) order
            return self._out(cg, node, computed,
                             flow.flattened_last(int(np.prod(src[1:-1]))))  # type: ignore[arg-type]
        if src is None or dst is None or flow.axis != 1 or len(dst) < 2:
            raise Unsupported("reshapes tensors of unknown or unsuitable shape")
        if src[0] != dst[0]:
            raise Unsupported("moves channels into the batch axis")
        if dst[1] == src[1]:
            rest_src, rest_dst = src[2:], dst[2:]
            if None in rest_src or None in rest_dst or \
                    int(np.prod(rest_src)) != int(np.prod(rest_dst)):  # type: ignore[arg-type]
                raise Unsupported("reshapes the channel axis")
            return self._out(cg, node, computed, flow.moved(len(dst), 1))
        if len(dst) == 2 and None not in src[1:] and dst[1] == int(np.prod(src[1:])):  # type: ignore[arg-type]
            return self._out(cg, node, computed,
                             flow.flattened(int(np.prod(src[2:]))))  # type: ignore[arg-type]
        raise Unsupported("reshapes the channel axis")

    @staticmethod
    def _out(cg: ChannelGraph, node: gs.Node, computed: dict[int, _SizeOf],
             out: Flow) -> list[Flow | None]:
        _follow_sizes(cg, node, computed, out)
        return _same(out, len(node.outputs))

    def apply(self, r: Rewriter, node: gs.Node, ins: Changes, outs: Changes) -> None:
        change = outs[0]
        if change is None:
            return
        if r.const(node.inputs[1]) is None:  # Concat(sizes, constants): edit the constants
            self._apply_computed(r, node, change)
            return
        target = r.require_const(node, 1, "target shape")
        new = np.array(target, copy=True)
        if new.ndim != 1 or len(new) < 2:
            raise EditError(f"node {describe(node)}: unexpected target shape {target.tolist()}")
        if int(new[1]) == change.old_size:
            new[1] = change.size
        elif int(new[1]) not in (-1, 0):
            raise EditError(f"node {describe(node)}: target shape {target.tolist()} does not "
                            f"name the {change.old_size} channels at position 1")
        if not np.array_equal(new, target):
            r.set_input(node, 1, new)

    @staticmethod
    def _apply_computed(r: Rewriter, node: gs.Node, change: Change) -> None:
        """Update a literal channel count at position 1 of a computed target: in one of the
        constants its ``Concat`` is made of (a size read from a tensor follows by itself)."""
        concat = _producer(node.inputs[1])
        while concat is not None and concat.op in ("Cast", "Identity"):
            concat = _producer(concat.inputs[0])
        entries = _shape_entries(r.cg, node.inputs[1])
        assert entries is not None  # trace read every entry
        if not isinstance(entries[1], int) or entries[1] in (-1, 0):
            return
        if entries[1] != change.old_size:
            raise EditError(f"node {describe(node)}: its computed target shape does not "
                            f"name the {change.old_size} channels at position 1")
        position = 0
        for i, part in enumerate(concat.inputs if concat is not None and
                                 concat.op == "Concat" else ()):
            value = r.const(part)
            width = len(_shape_entries(r.cg, part) or ())
            if value is not None and position <= 1 < position + width:
                new = np.array(value, copy=True).ravel()
                new[1 - position] = change.size
                r.set_input(concat, i, new.reshape(np.asarray(value).shape))  # type: ignore[arg-type]
                return
            position += width
        raise EditError(f"node {describe(node)}: cannot update the channel count "
                        f"{change.old_size} in its computed target shape")


@register("Shape", "Size")
class ShapeOf(Handler):
    """The shape (or size) of a tensor, computed when the graph runs: it follows any change
    of the channel count by itself, and its output carries no channels. Where the edit
    changes the channel count it reads, every op the count reaches must be one whose own
    channels change too (a Reshape of the same channels, the slices of the legacy exporter's
    ``chunk``: their handlers rewrite or refuse them); anything else (a slice of another
    tensor, a ``ConstantOfShape``) would silently compute something else, and is refused."""

    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        return [None] * len(node.outputs)

    def apply(self, r: Rewriter, node: gs.Node, ins: Changes, outs: Changes) -> None:
        change = ins[0]
        if change is None or change.size == change.old_size:
            return
        flow = r.cg.flows[node.inputs[0].name]
        position: int | None = None
        length = 1
        if node.op == "Shape":
            first, stop = _shape_range(node, flow.rank)
            if not first <= flow.axis < stop:
                return
            position, length = flow.axis - first, stop - first
        for sink in _count_readers(node.outputs[0], position, length):
            data = sink.inputs[0] if sink.inputs else None
            moved = data is not None and data.name in r.cg.flows and \
                r.plan.change(r.cg.flows[data.name]) is not None
            if not moved:
                raise EditError(
                    f"node {describe(node)} reads the channel count of tensor "
                    f"{node.inputs[0].name!r}, which this edit changes, and node "
                    f"{describe(sink)} computes with it on channels the edit leaves alone: "
                    f"the edited model would compute something else there")


#: Ops through which a computed size stays a size (the count may reach what reads them).
_SIZE_OPS = frozenset({"Cast", "Identity", "Unsqueeze", "Squeeze", "Concat", "Add", "Sub",
                       "Mul", "Div", "Mod", "Floor", "Ceil", "Max", "Min", "Neg", "Abs",
                       "Gather", "Slice", "ReduceProd", "ReduceSum"})


def _count_readers(tensor: gs.Tensor, position: int | None, length: int) -> list[gs.Node]:
    """The nodes a channel count in ``tensor`` (entry ``position`` of a Shape output of
    ``length`` entries; None: may be anywhere) reaches past the size arithmetic: a Gather or
    Slice of constant indices on the Shape output itself lets it through only where it picks
    that entry."""
    sinks: list[gs.Node] = []
    todo: list[tuple[gs.Tensor, int | None]] = [(tensor, position)]
    seen: set[int] = set()
    while todo:
        current, at = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for reader in current.outputs:
            if reader.op not in _SIZE_OPS:
                sinks.append(reader)
                continue
            if reader.op in ("Gather", "Slice") and reader.inputs:
                if reader.inputs[0] is not current:
                    sinks.append(reader)  # the count as indices or bounds: what they pick moves
                    continue
                if at is not None and not _picks(reader, at, length):
                    continue
            todo.extend((out, None) for out in reader.outputs)
    return sinks


def _picks(node: gs.Node, position: int, length: int) -> bool:
    """Whether a Gather or Slice of a shape vector of ``length`` entries picks entry
    ``position``: the op folded on the entries' positions, as :func:`_shape_entries` does
    (True when its indices or bounds are computed)."""
    args = [np.arange(length), *(constant_value(t) if t.name else None for t in node.inputs[1:])]
    try:
        picked = fold_node(node, args)
    except (ValueError, TypeError, IndexError):  # out of range, another axis
        picked = None
    return picked is None or position in {int(i) for i in np.ravel(picked)}


@register("CastLike")
class CastLike(Handler):
    """``CastLike(a, b)``: ``a`` cast to ``b``'s element type. Layer channels in ``a`` pass
    through as for ``Cast``; ``b`` only gives the type, so a constant cast like a layer's
    channels (unfolded exports write Clip bounds that way) carries none."""

    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        if ins[0] is not None:
            return _same(ins[0], len(node.outputs))
        if cg.const(node.inputs[0]) is not None:
            return [None] * len(node.outputs)
        raise Unsupported("casts a computed tensor to the type of a layer's channels")


def _without_axes(flow: Flow, axes: set[int]) -> Flow:
    """``flow`` once the (other) axes ``axes`` are gone."""
    return flow.moved(flow.rank - len(axes), flow.axis - sum(a < flow.axis for a in axes))


REDUCE_OPS = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2",
              "ReduceSumSquare", "ReduceProd")


@register(*REDUCE_OPS)
class Reduce(Handler):
    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        flow = _only_first_input(node, ins)
        axes = _ints(cg, node, "axes", 1)
        if not axes:
            raise Unsupported("reduces over every axis, channels included")
        axes = [_norm_axis(a, flow.rank) for a in axes]
        if flow.axis in axes:
            raise Unsupported("reduces over the channel axis")
        if int(node.attrs.get("keepdims", 1)):
            return _same(flow, len(node.outputs))
        return _same(_without_axes(flow, set(axes)), len(node.outputs))

    def zero_state(self, r: Rewriter, node: gs.Node, ins: Changes,
                   states: dict[int, State]) -> State:
        """The mean, max or min of a channel constant over its positions is that constant
        (a global average pool written as ReduceMean, as the dynamo exporter does)."""
        if node.op in ("ReduceMean", "ReduceMax", "ReduceMin"):
            return _by_slot(r, node, ins, states)
        return super().zero_state(r, node, ins, states)


@register("Squeeze")
class Squeeze(Positional):
    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        flow = _only_first_input(node, ins)
        axes = _ints(cg, node, "axes", 1)
        if axes is None:
            shape = cg.shape(node.inputs[0])
            if shape is None:
                raise Unsupported("squeezes axes of unknown size")
            axes = [i for i, d in enumerate(shape) if d == 1]
        dropped = {_norm_axis(a, flow.rank) for a in axes}
        if flow.axis in dropped:
            raise Unsupported("squeezes the channel axis")
        return _same(_without_axes(flow, dropped), len(node.outputs))

    def apply(self, r: Rewriter, node: gs.Node, ins: Changes, outs: Changes) -> None:
        """A Squeeze without axes (torch's ``x.squeeze()``) drops every axis of size 1 at run
        time: where an edit leaves one channel, the axes it dropped before are written in, so
        that the channel axis stays."""
        change = ins[0]
        if change is None or change.size != 1 or _ints(r.cg, node, "axes", 1) is not None:
            return
        shape = r.cg.shape(node.inputs[0])
        assert shape is not None  # trace refuses a Squeeze without axes of unknown shape
        axes = [i for i, d in enumerate(shape) if d == 1]
        if r.cg.graph.opset < 13:  # an attribute before opset 13
            node.attrs["axes"] = axes
            return
        given = gs.Constant(r.names.fresh(f"{node.name or 'squeeze'}.axes"),
                            np.asarray(axes, dtype=np.int64))
        if len(node.inputs) > 1:  # an empty name: the optional input left out
            node.inputs[1] = given
        else:
            node.inputs.append(given)


@register("Unsqueeze")
class Unsqueeze(Positional):
    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        flow = _only_first_input(node, ins)
        axes = _ints(cg, node, "axes", 1)
        if not axes:
            raise Unsupported("has no axes")
        rank = flow.rank + len(axes)
        inserted = {_norm_axis(a, rank) for a in axes}
        kept = [i for i in range(rank) if i not in inserted]
        return _same(flow.moved(rank, kept[flow.axis]), len(node.outputs))


@register("Transpose")
class Transpose(Positional):
    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        flow = _only_first_input(node, ins)
        perm = [int(p) for p in node.attrs.get("perm", list(range(flow.rank))[::-1])]
        return _same(flow.moved(flow.rank, perm.index(flow.axis)), len(node.outputs))
