"""Handlers of spatial ops that leave the channels alone: pools, Pad, Resize, Slice, Split."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from ...errors import EditError
from ..channels import (
    ChannelGraph,
    Constant,
    Flow,
    LayerSlots,
    Rewriter,
    Segment,
    Unsupported,
    describe,
)
from ..gsio import constant_value
from .base import (
    Changes,
    Flows,
    Handler,
    Positional,
    State,
    _extra_outputs_unused,
    _ints,
    _norm_axis,
    _only_first_input,
    _pads,
    _same,
    register,
)
from .sizes import (
    _shape_entries,
    _SizeOf,
)


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
          "GlobalLpPool")
class Pool(Handler):
    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        flow = _only_first_input(node, ins)
        if flow.axis != 1 or flow.rank < 3:
            raise Unsupported("pools over the channel axis")
        _extra_outputs_unused(cg, node)
        return _same(flow, len(node.outputs))

    def zero_state(self, r: Rewriter, node: gs.Node, ins: Changes,
                   states: dict[int, State]) -> State:
        """A channel constant over its positions pools to the same constant (max and average
        pools; an average pool that counts its padding does not, at the borders)."""
        held = states.get(0)
        keeps = node.op in ("MaxPool", "GlobalMaxPool", "GlobalAveragePool") or (
            node.op == "AveragePool" and not (int(node.attrs.get("count_include_pad", 0))
                                               and _pads(node)))
        if isinstance(held, Constant) and keeps:
            return held
        return super().zero_state(r, node, ins, states)


@register("Pad")
class Pad(Handler):
    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        flow = _only_first_input(node, ins)
        pads = _ints(cg, node, "pads", 1)
        axes = _ints(cg, node, "axes", 3) if len(node.inputs) > 3 else None
        if pads is None:
            raise Unsupported("has no pads")
        axes = [_norm_axis(a, flow.rank) for a in axes] if axes else list(range(flow.rank))
        half = len(pads) // 2
        for j, a in enumerate(axes[:half]):
            if a == flow.axis and (pads[j] != 0 or pads[j + half] != 0):
                raise Unsupported("pads the channel axis")
        return _same(flow, len(node.outputs))

    def zero_state(self, r: Rewriter, node: gs.Node, ins: Changes,
                   states: dict[int, State]) -> State:
        """A channel constant over its positions, padded with copies of its own values (modes
        edge, reflect and wrap), stays that constant."""
        held = states.get(0)
        if isinstance(held, Constant) and node.attrs.get("mode", "constant") != "constant":
            return held
        return super().zero_state(r, node, ins, states)

    def zero_reason(self, r: Rewriter, node: gs.Node, ins: Changes) -> str | None:
        if node.attrs.get("mode", "constant") != "constant":
            return None
        value = node.attrs.get("value", 0.0)
        if len(node.inputs) > 2 and node.inputs[2].name:
            const = r.const(node.inputs[2])
            value = 0.0 if const is None else float(np.asarray(const).ravel()[0])
        return None if value == 0 else f"pads with the constant {value}"


@register("Resize", "Upsample")
class Resize(Positional):
    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        flow = _only_first_input(node, ins)
        axes = [_norm_axis(int(a), flow.rank) for a in node.attrs.get("axes", [])] \
            or list(range(flow.rank))
        if flow.axis not in axes:
            return _same(flow, len(node.outputs))
        j = axes.index(flow.axis)
        scale_input = 1 if node.op == "Upsample" or len(node.inputs) == 2 else 2
        scales = cg.const(node.inputs[scale_input]) if len(node.inputs) > scale_input and \
            node.inputs[scale_input].name else None
        sizes = cg.const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name \
            else None
        if scales is not None and scales.size:
            if float(scales.ravel()[j]) != 1.0:
                raise Unsupported("resizes the channel axis")
        elif sizes is not None and sizes.size:
            if int(sizes.ravel()[j]) != flow.size:
                raise Unsupported("resizes the channel axis")
        elif "scales" in node.attrs:
            if float(node.attrs["scales"][j]) != 1.0:
                raise Unsupported("resizes the channel axis")
        elif len(node.inputs) > 3 and node.inputs[3].name:
            self._computed_sizes(cg, node, flow, axes)
        else:
            raise Unsupported("has computed scales")
        return _same(flow, len(node.outputs))

    @staticmethod
    def _computed_sizes(cg: ChannelGraph, node: gs.Node, flow: Flow, axes: list[int]) -> None:
        """Sizes computed from shapes (``F.interpolate(x, size=y.shape[2:])``): the channel
        entry must be a channel count that follows the resized channels by itself."""
        entries = _shape_entries(cg, node.inputs[3])
        if entries is None or len(entries) != len(axes):
            raise Unsupported("has computed sizes")
        entry = entries[axes.index(flow.axis)]
        source = cg.flows.get(entry.tensor.name) if isinstance(entry, _SizeOf) else None
        if source is None or source.axis != entry.axis:  # type: ignore[union-attr]
            raise Unsupported("has computed sizes whose channel entry is not read from the "
                              "channels of a tensor")
        cg.couple(flow, source, node)

    def apply(self, r: Rewriter, node: gs.Node, ins: Changes, outs: Changes) -> None:
        change = ins[0]
        if change is None or len(node.inputs) <= 3 or not node.inputs[3].name:
            return
        sizes = r.const(node.inputs[3])
        if sizes is None or not sizes.size:
            return
        flow = r.cg.flows[node.inputs[0].name]
        axes = [_norm_axis(int(a), flow.rank) for a in node.attrs.get("axes", [])] \
            or list(range(flow.rank))
        if flow.axis not in axes:  # ``axes`` names only other axes: sizes of those alone
            return
        new = np.array(sizes, copy=True)
        new[axes.index(flow.axis)] = change.size
        r.set_input(node, 3, new)


#: Values tried for the unknown dims (batch, dynamic H and W) of a shape a slice bound is
#: computed from: a bound is frozen only when it is the same for all of them. Spread out so
#: that floor divisions (``N // 8``, ``H // 32``), clamps and sums all move.
_UNKNOWN_PROBES = (1, 7, 1031, 2**31 - 1)


@register("Slice")
class Slice(Positional):
    """A slice of the channel axis. One that keeps every channel (GhostNet's
    ``cat(...)[:, :out]``) passes a removal or a widening through; one that takes a range
    (``x[:, 4:8]``; the legacy exporter's ``x.chunk(2, 1)``, whose bounds it computes from
    ``Shape(x)``) gives its output that range's channels, and a removal writes the bounds of
    the kept ones as constants. Widening a layer whose channels a range cuts is refused."""

    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        flow = _only_first_input(node, ins)
        parsed = self._parse(cg, node, flow)
        if parsed is None or self._keeps_every_channel(flow, *parsed[1:]):
            return _same(flow, len(node.outputs))
        if not flow.channel_level:
            raise Unsupported("slices the channel axis of a flattened tensor")
        taken = self._taken(flow, *parsed[1:])
        if not len(taken):
            raise Unsupported("slices no channel")
        kept = replace(flow, segments=(Segment(flow.all_slots()[taken]),))
        return _same(kept, len(node.outputs))

    def apply(self, r: Rewriter, node: gs.Node, ins: Changes, outs: Changes) -> None:
        """Keeping every channel: an end below the new count (``[:, :out]``) is raised to it,
        and a start counted from the end (``[:, -out:]``) above minus the new count becomes
        0. A range: its bounds become those of the channels it keeps."""
        change = ins[0]
        flow = r.cg.flows[node.inputs[0].name]
        parsed = None if change is None else self._parse(r.cg, node, flow)
        if change is None or parsed is None:
            return
        at, start, end, step = parsed
        starts = self._bounds(r.cg, node, "starts", 1) or []
        ends = self._bounds(r.cg, node, "ends", 2) or []
        if self._keeps_every_channel(flow, start, end, step):
            if end >= change.size and not -change.size < start < 0:
                return
            starts[at] = 0 if start < 0 else start
            ends[at] = max(end, change.size)
        else:
            if change.grows:
                raise EditError(f"node {describe(node)} takes a range of the channels a "
                                f"widening adds to; widen a layer it does not cut")
            inside = np.isin(change.index, self._taken(flow, start, end, step))
            if not inside.any():
                raise EditError(f"node {describe(node)} would slice out no channel: keep at "
                                f"least one kernel of its range")
            starts[at] = int(np.flatnonzero(inside)[0])
            ends[at] = starts[at] + int(inside.sum())
        self._write(r, node, "starts", 1, starts)
        self._write(r, node, "ends", 2, ends)

    @classmethod
    def _parse(cls, cg: ChannelGraph, node: gs.Node, flow: Flow
               ) -> tuple[int, int, int, int] | None:
        """(position of the channel axis among the slice's axes, its start, end, step), or
        None when the slice leaves the channel axis alone."""
        starts, ends = cls._bounds(cg, node, "starts", 1), cls._bounds(cg, node, "ends", 2)
        if starts is None:
            raise Unsupported("has no starts")
        axes = cls._bounds(cg, node, "axes", 3)
        axes = [_norm_axis(a, flow.rank) for a in axes] if axes else list(range(len(starts)))
        if flow.axis not in axes:
            return None
        steps = cls._bounds(cg, node, "steps", 4)
        if ends is None or len(starts) != len(axes) or len(ends) != len(axes) \
                or (steps is not None and len(steps) != len(axes)):
            raise Unsupported("has starts and ends that do not match its axes")
        at = axes.index(flow.axis)
        return at, starts[at], ends[at], 1 if steps is None else steps[at]

    @staticmethod
    def _keeps_every_channel(flow: Flow, start: int, end: int, step: int) -> bool:
        """Whether the slice takes every channel in order: start at or before 0, step 1, end
        at or past the count, bounds that still take every channel once channels are removed
        (ONNX clamps them)."""
        return step == 1 and (start == 0 or start <= -flow.size) and end >= flow.size

    @staticmethod
    def _taken(flow: Flow, start: int, end: int, step: int) -> np.ndarray:
        """The input channels a range takes, in order; refused for a step other than 1."""
        if step != 1:
            raise Unsupported("slices the channel axis with a step")
        return np.arange(flow.size)[slice(start, end)]

    @staticmethod
    def _bounds(cg: ChannelGraph, node: gs.Node, attr: str, index: int) -> list[int] | None:
        """``starts``/``ends``/``axes``/``steps`` as ints: an attribute (before opset 10), a
        constant input, or an input computed from shapes alone (folded with each of
        :data:`_UNKNOWN_PROBES` for the unknown dims, and taken only when all agree); None
        when not given."""
        if attr in node.attrs:
            return [int(v) for v in node.attrs[attr]]
        if index >= len(node.inputs) or not node.inputs[index].name:
            return None
        values: list[np.ndarray] = []
        for unknown in _UNKNOWN_PROBES:
            value = constant_value(node.inputs[index], sizes=cg.shape, unknown=unknown)
            if value is None or (values and not np.array_equal(values[0], value)):
                raise Unsupported(f"has a computed {attr!r} input")
            values.append(value)
        return [int(v) for v in np.ravel(values[0])]

    @staticmethod
    def _write(r: Rewriter, node: gs.Node, attr: str, index: int, values: list[int]) -> None:
        if attr in node.attrs:
            node.attrs[attr] = values
        else:
            r.set_input(node, index, np.asarray(values, dtype=np.int64))


@register("Split")
class Split(Positional):
    """A split of the channel axis (``torch.chunk``/``split`` on dim 1: CSP and C2f blocks)
    gives each output its run of channels; a removal rewrites the split sizes to the kept
    channels of each run. Widening a layer whose kernels a part boundary cuts is refused (its
    new channels would have no place: :class:`~onnxaom.surgery.channels.WidenPlan` says so);
    new channels after a run inside one part (a layer coupled to that part) grow the part."""

    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        flow = _only_first_input(node, ins)
        if _norm_axis(int(node.attrs.get("axis", 0)), flow.rank) != flow.axis:
            return [flow] * len(node.outputs)
        if not flow.channel_level:
            raise Unsupported("splits the channel axis of a flattened tensor")
        slots, start = flow.all_slots(), 0
        flows: list[Flow | None] = []
        for size in self._sizes(cg, node, flow):
            flows.append(replace(flow, segments=(Segment(slots[start:start + size]),)))
            start += size
        return flows

    @staticmethod
    def _sizes(cg: ChannelGraph, node: gs.Node, flow: Flow) -> list[int]:
        n = len(node.outputs)
        sizes = _ints(cg, node, "split", 1)
        if sizes is None:  # equal parts; opset 18 lets the last be smaller
            chunk = -(-flow.size // n)
            sizes = [min(chunk, max(flow.size - i * chunk, 0)) for i in range(n)]
        if len(sizes) != n or sum(sizes) != flow.size or min(sizes) < 0:
            raise Unsupported(f"splits {flow.size} channels into parts {sizes} that do not "
                              f"add up")
        return sizes

    def apply(self, r: Rewriter, node: gs.Node, ins: Changes, outs: Changes) -> None:
        flow = r.cg.flows[node.inputs[0].name]
        if ins[0] is None or _norm_axis(int(node.attrs.get("axis", 0)), flow.rank) != flow.axis:
            return
        sizes = [change.size if change is not None else r.cg.flows[t.name].size
                 for t, change in zip(node.outputs, outs, strict=True)]
        empty = [t.name for t, size in zip(node.outputs, sizes, strict=True) if size == 0]
        if empty:
            raise EditError(f"node {describe(node)} would split off no channel into "
                            f"{', '.join(empty)}: keep at least one kernel of each part")
        if "split" in node.attrs or r.cg.graph.opset < 13:  # an attribute before opset 13
            node.attrs["split"] = sizes
            return
        node.attrs.pop("num_outputs", None)  # opset 18: either it or the sizes input
        values = np.asarray(sizes, dtype=np.int64)
        if len(node.inputs) > 1 and node.inputs[1].name:
            r.set_input(node, 1, values)
        else:
            given = gs.Constant(r.names.fresh(f"{node.name or 'split'}.sizes"), values)
            if len(node.inputs) > 1:  # an empty name: the optional input left out
                node.inputs[1] = given
            else:
                node.inputs.append(given)

    def zero_state(self, r: Rewriter, node: gs.Node, ins: Changes,
                   states: dict[int, State]) -> State:
        """Zero stays zero in every part; constants are followed only through the first
        output by :func:`.base._by_slot`, so they are refused here."""
        held = states.get(0)
        if isinstance(held, Constant):
            return f"{held.origin}, which node {describe(node)} splits into parts"
        return held
