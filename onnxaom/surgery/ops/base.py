"""The registry of op handlers, the :class:`Handler` interface and the helpers the handlers
share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeAlias

import numpy as np
import onnx_graphsurgeon as gs

from ..channels import (
    Change,
    ChannelGraph,
    Constant,
    Flow,
    LayerSlots,
    Rewriter,
    Unsupported,
    describe,
)

Flows = Sequence["Flow | None"]
Changes = Sequence["Change | None"]
State: TypeAlias = "str | Constant | None"


def _held(states: dict[int, State], i: int, n: int) -> np.ndarray | str:
    """The values input ``i``'s ``n`` removed positions hold (zeros where nothing is known to
    be there), or the reason they hold no constant."""
    held = states.get(i)
    if isinstance(held, str):
        return held
    return np.zeros(n) if held is None else held.values


def _origin(states: dict[int, State], node: gs.Node, reason: str) -> str:
    """Where constant removed channels come from: an input's origin, else ``node``."""
    held = next((s for s in states.values() if isinstance(s, Constant)), None)
    return held.origin if held is not None else f"node {describe(node)} {reason}"


def _out_change(r: Rewriter, node: gs.Node) -> Change | None:
    """How the plan changes ``node``'s first output (None: not at all, or not traced)."""
    flow = r.cg.flows.get(node.outputs[0].name)
    return r.plan.change(flow) if flow is not None else None


def _pads(node: gs.Node) -> bool:
    """Whether a conv or pool pads its input (``pads`` or an ``auto_pad`` that may)."""
    return any(int(p) for p in node.attrs.get("pads", [])) or \
        node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")


def _constant_or_zero(values: np.ndarray, origin: str) -> State:
    return None if not np.any(values) else Constant(np.asarray(values, np.float64), origin)


class Handler:
    """Channel rules for one family of ops (see the module docstring)."""

    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        raise NotImplementedError

    def apply(self, r: Rewriter, node: gs.Node, ins: Changes, outs: Changes) -> None:
        """Default: nothing to rewrite (shapes are inferred again after the edit)."""

    def zero_reason(self, r: Rewriter, node: gs.Node, ins: Changes) -> str | None:
        """Why zero inputs give non-zero outputs at the removed channels (None: they don't).
        Default: zero in, zero out."""
        return None

    def zero_state(self, r: Rewriter, node: gs.Node, ins: Changes,
                   states: dict[int, State]) -> State:
        """What the output's removed channels hold in the oracle: zero (None), a
        :class:`~onnxaom.surgery.channels.Constant`, or why neither, given the same for each
        input carrying removed channels. Default: anything but zero in gives the first
        input's reason (a constant cannot go through this op), zero in gives
        :meth:`zero_reason`."""
        bad = next((s for s in states.values() if isinstance(s, str)), None)
        if bad is not None:
            return bad
        held = next((s for s in states.values() if isinstance(s, Constant)), None)
        if held is not None:
            return f"{held.origin}, which node {describe(node)} does not keep constant"
        reason = self.zero_reason(r, node, ins)
        return None if reason is None else f"node {describe(node)} {reason}"

    def fold_constant(self, r: Rewriter, node: gs.Node, change: Change,
                      values: np.ndarray) -> str | None:
        """For a layer: take the constant ``values`` that its input's removed positions hold
        in the oracle into its bias, so that removing them is exact; None when done, else why
        it cannot."""
        return "it cannot take constant inputs into a bias"


HANDLERS: dict[str, Handler] = {}
LAYER_HANDLERS: dict[str, Handler] = {}


def register(*ops: str, layer: bool = False) -> Callable[[type[Handler]], type[Handler]]:
    def wrap(cls: type[Handler]) -> type[Handler]:
        instance = cls()
        for op in ops:
            (LAYER_HANDLERS if layer else HANDLERS)[op] = instance
        return cls
    return wrap


def handler_for(node: gs.Node) -> Handler | None:
    return HANDLERS.get(node.op)


def layer_handler_for(op: str) -> Handler:
    return LAYER_HANDLERS[op]


# --------------------------------------------------------------------------------------------
# helpers


def _first(changes: Changes) -> Change | None:
    return next((c for c in changes if c is not None), None)


def _only_first_input(node: gs.Node, ins: Flows) -> Flow:
    if any(f is not None for f in ins[1:]):
        raise Unsupported("reads layer channels as a parameter input")
    flow = ins[0]
    if flow is None:
        raise Unsupported("reads layer channels as a parameter input")
    return flow


def _extra_outputs_unused(cg: ChannelGraph, node: gs.Node) -> None:
    graph_outputs = {t.name for t in cg.graph.outputs}
    for tensor in node.outputs[1:]:
        if tensor.name and (tensor.outputs or tensor.name in graph_outputs):
            raise Unsupported(f"has its extra output {tensor.name!r} in use")


def _same(flow: Flow, n_outputs: int) -> list[Flow | None]:
    return [flow] + [None] * (n_outputs - 1)


def _out_rank(cg: ChannelGraph, node: gs.Node, default: int) -> int:
    shape = cg.shape(node.outputs[0])
    return len(shape) if shape is not None else default


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _ints(cg: ChannelGraph, node: gs.Node, attr: str, input_index: int) -> list[int] | None:
    """An int list given as attribute ``attr`` (older opsets) or constant input (newer)."""
    if attr in node.attrs:
        return [int(v) for v in node.attrs[attr]]
    if input_index < len(node.inputs) and node.inputs[input_index].name:
        value = cg.const(node.inputs[input_index])
        if value is None:
            raise Unsupported(f"has a computed {attr!r} input")
        return [int(v) for v in np.asarray(value).ravel()]
    return None


def _channel_dim(shape: Sequence[int | None], flow: Flow, out_rank: int) -> int | None:
    """Where a broadcast operand of ``shape`` meets the flow's channel axis: its own dim index
    when that dim has the channel size, None when it broadcasts (size 1 or absent)."""
    a_out = flow.axis + (out_rank - flow.rank)
    d = a_out - (out_rank - len(shape))
    if d < 0 or shape[d] == 1:
        return None
    if shape[d] == flow.size:
        return d
    raise Unsupported(f"broadcasts an operand of shape {tuple(shape)} against "
                      f"{flow.size} channels")



def _by_slot(r: Rewriter, node: gs.Node, ins: Changes, states: dict[int, State]) -> State:
    """The state of an op that moves or copies positions but not values (Flatten, Reshape,
    Transpose, (Un)Squeeze, Concat): each removed output position holds what the input
    position carrying the same channel (slot) holds. Refused (the first origin) where one
    channel holds different values at different input positions."""
    bad = next((s for s in states.values() if isinstance(s, str)), None)
    if bad is not None:
        return bad
    if not any(isinstance(s, Constant) for s in states.values()):
        return None
    by_slot: dict[int, float] = {}
    origin = _origin(states, node, "")
    for i, (t, change) in enumerate(zip(node.inputs, ins, strict=True)):
        if change is None or i not in states:
            continue
        held = _held(states, i, len(change.removed()))
        slots = r.cg.flows[t.name].expanded()[change.removed()]
        for slot, value in zip(slots.tolist(), np.asarray(held).tolist(), strict=True):
            if by_slot.setdefault(slot, value) != value:
                return origin
    out_flow = r.cg.flows[node.outputs[0].name]
    out_change = r.plan.change(out_flow)
    if out_change is None:
        return origin
    slots = out_flow.expanded()[out_change.removed()]
    if any(slot not in by_slot for slot in slots.tolist()):
        return origin
    return _constant_or_zero(np.array([by_slot[slot] for slot in slots.tolist()]), origin)


class Positional(Handler):
    """Ops that move or copy positions but not values (layout ops, Concat, Slice, Split,
    Resize): removed channels hold at each output position what they hold at the input
    position they come from (:func:`_by_slot`)."""

    def zero_state(self, r: Rewriter, node: gs.Node, ins: Changes,
                   states: dict[int, State]) -> State:
        return _by_slot(r, node, ins, states)
