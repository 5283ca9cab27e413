"""The op registry: per op, how layer channels flow through it and how it changes with them.

Each :class:`Handler` answers three questions for the ops it is registered for:

* ``trace``: given the :class:`~onnxaom.surgery.channels.Flow` of each input (None where an
  input carries no layer channels), the flows of the outputs; raise
  :class:`~onnxaom.surgery.channels.Unsupported` where the op does something with the
  channels that the surgery cannot follow (the channels are then blocked, never edited);
* ``apply``: given the :class:`~onnxaom.surgery.channels.Change` of each input and output,
  rewrite the node's constants and attributes (out-channel side for layers, in-channel side for
  consumers, per-channel parameters for everything in between);
* ``zero_reason`` / ``zero_state``: for removal after a layer's probe point, what the op
  makes of zeroed channels: zero, a constant per channel (a Sigmoid, a BN shift, an added
  constant; :class:`~onnxaom.surgery.channels.Constant`), or something else (why);
* ``fold_constant``: for layers reading such constants, taking them into the bias (a conv
  without padding, a Gemm); where a layer cannot, or reads anything else, the surgery refuses,
  because removing the channels would not equal zeroing them.

Supported: layers (Conv, including grouped and depthwise; Gemm; MatMul with a constant weight)
on both sides; element-wise activations, Identity, Dropout, Cast, Clip, PRelu; BatchNormalization;
Add/Sub/Mul/Div/Max/Min/Pow/Sum/Mean with constants, with another layer's tensor (coupling), or
with a tensor broadcast over channels; pools (Max/Average/Lp, global ones); Pad and Resize that
leave the channel axis alone; Concat; Flatten and Reshape (channel-major flattening, trailing
dims merged, (N, F) -> (N, F, 1, 1); the target a constant or ``Concat`` of constants and
sizes of tensors, PyTorch's legacy export of ``x.view(x.size(0), -1)`` or ``view(b, c, 1,
1)``); Shape and Size (computed
at run time, no channels in their output); Reduce* over other axes; Squeeze, Unsqueeze,
Transpose; Slice and Split along other axes. Everything else blocks the channels it reads.
A channels-last flatten (Transpose to NHWC, then Flatten or Reshape to (N, H*W*C), as Keras
models exported by tf2onnx have before their dense head) interleaves the channels: a flow's
segments then repeat once per position (:attr:`Flow.outer`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeAlias

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import EditError
from ..graph import casts_to_float
from .channels import (
    Change,
    ChannelGraph,
    Constant,
    Flow,
    LayerSlots,
    Rewriter,
    Segment,
    Unsupported,
    concat_flows,
    describe,
)
from .gsio import constant_value, fold_node

__all__ = ["HANDLERS", "LAYER_HANDLERS", "Handler", "conv_weight", "handler_for",
           "integer_storage", "layer_handler_for", "layer_weight"]

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


# --------------------------------------------------------------------------------------------
# element-wise


ZERO_PRESERVING_UNARY = frozenset({
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "HardSwish", "Tanh", "Identity",
    "Dropout", "Abs", "Neg", "Sqrt", "Erf", "Softsign", "Mish", "Cast", "Sign", "Floor", "Ceil",
    "Round", "ThresholdedRelu", "Sin", "Asin", "Atan", "Sinh", "Asinh", "Atanh", "Tan",
})
OTHER_UNARY = frozenset({
    "Sigmoid", "Softplus", "Exp", "HardSigmoid", "Log", "Reciprocal", "Cos", "Cosh",
})


@register(*ZERO_PRESERVING_UNARY, *OTHER_UNARY, "Clip")
class Unary(Handler):
    """Element-wise ops of one tensor (Clip's min/max and Dropout's ratio must be constants)."""

    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        flow = _only_first_input(node, ins)
        for t in node.inputs[1:]:
            if t.name and cg.const(t) is None:
                raise Unsupported(f"has a computed parameter input {t.name!r}")
            if node.op == "Clip" and t.name and np.asarray(cg.const(t)).size != 1:
                raise Unsupported("clips with per-element bounds")
        if node.op == "Dropout":
            _extra_outputs_unused(cg, node)
        return _same(flow, len(node.outputs))

    def zero_reason(self, r: Rewriter, node: gs.Node, ins: Changes) -> str | None:
        if node.op in ZERO_PRESERVING_UNARY:
            return None
        if node.op == "Clip":
            bounds = [r.const(t) if t.name else None for t in node.inputs[1:3]]
            low = node.attrs.get("min", -np.inf) if not bounds or bounds[0] is None \
                else float(np.asarray(bounds[0]))
            high = node.attrs.get("max", np.inf) if len(bounds) < 2 or bounds[1] is None \
                else float(np.asarray(bounds[1]))
            value = float(np.clip(0.0, low, high))
            return None if value == 0 else f"clips 0 to {value}"
        return "does not map 0 to 0"

    def zero_state(self, r: Rewriter, node: gs.Node, ins: Changes,
                   states: dict[int, State]) -> State:
        """Constants go through the ops with a numpy form (:meth:`_numpy`)."""
        held = _held(states, 0, len(ins[0].removed()) if ins[0] is not None else 0)
        if isinstance(held, str):
            return held
        out = self._numpy(r, node, held)
        if out is None:
            return super().zero_state(r, node, ins, states)
        return _constant_or_zero(out, _origin(states, node, self.zero_reason(r, node, ins)
                                              or "maps zeroed channels to non-zero values"))

    @staticmethod
    def _numpy(r: Rewriter, node: gs.Node, x: np.ndarray) -> np.ndarray | None:
        """The op on the values ``x`` (float64), or None for ops without a form here."""
        op, attr = node.op, node.attrs.get
        with np.errstate(all="ignore"):
            if op in ("Identity", "Dropout") or (op == "Cast" and casts_to_float(attr("to"))):
                return x  # float casts: the values the oracle holds, to within rounding
            if op == "Relu":
                return np.maximum(x, 0.0)
            if op == "LeakyRelu":
                return np.where(x >= 0, x, float(attr("alpha", 0.01)) * x)
            if op == "Elu":
                return np.where(x > 0, x, float(attr("alpha", 1.0)) * np.expm1(x))
            if op == "Sigmoid":
                return 1.0 / (1.0 + np.exp(-x))
            if op == "HardSigmoid":
                return np.clip(float(attr("alpha", 0.2)) * x + float(attr("beta", 0.5)), 0, 1)
            if op == "HardSwish":
                return x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)
            if op in ("Tanh", "Abs", "Neg", "Exp"):
                return {"Tanh": np.tanh, "Abs": np.abs, "Neg": np.negative,
                        "Exp": np.exp}[op](x)
            if op == "Softplus":
                return np.logaddexp(0.0, x)
            if op == "Clip":
                bounds = [r.const(t) if t.name else None for t in node.inputs[1:3]]
                low = attr("min", -np.inf) if not bounds or bounds[0] is None \
                    else float(np.asarray(bounds[0]))
                high = attr("max", np.inf) if len(bounds) < 2 or bounds[1] is None \
                    else float(np.asarray(bounds[1]))
                return np.clip(x, low, high)
        return None


@register("PRelu")
class PRelu(Handler):
    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        flow = _only_first_input(node, ins)
        slope = cg.const(node.inputs[1])
        if slope is None:
            raise Unsupported("has a computed slope")
        _channel_dim(slope.shape, flow, flow.rank)
        return _same(flow, len(node.outputs))

    def apply(self, r: Rewriter, node: gs.Node, ins: Changes, outs: Changes) -> None:
        change = ins[0]
        if change is None:
            return
        flow = r.cg.flows[node.inputs[0].name]
        slope = r.require_const(node, 1, "slope")
        d = _channel_dim(slope.shape, flow, flow.rank)
        if d is not None:
            r.set_input(node, 1, r.per_channel(slope, d, change, 0.25))


@register("BatchNormalization")
class BatchNorm(Handler):
    PARAMS: tuple[tuple[int, str, float], ...] = (
        (1, "scale", 1.0), (2, "bias", 0.0), (3, "mean", 0.0), (4, "var", 1.0))

    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        flow = _only_first_input(node, ins)
        if flow.axis != 1:
            raise Unsupported("normalises an axis that does not carry the channels")
        for i, what, _ in self.PARAMS:
            value = cg.const(node.inputs[i])
            if value is None or value.shape != (flow.size,):
                raise Unsupported(f"has a {what} that is not a constant of {flow.size} values")
        _extra_outputs_unused(cg, node)
        return _same(flow, len(node.outputs))

    def apply(self, r: Rewriter, node: gs.Node, ins: Changes, outs: Changes) -> None:
        change = ins[0]
        if change is None:
            return
        for i, what, neutral in self.PARAMS:
            r.set_input(node, i, r.per_channel(r.require_const(node, i, what), 0, change,
                                               neutral))

    def zero_reason(self, r: Rewriter, node: gs.Node, ins: Changes) -> str | None:
        change = ins[0]
        if change is None:
            return None
        out = self._normalised(r, node, change, np.zeros(len(change.removed())))
        if np.any(out != 0):
            return "(a batch norm after the probe) shifts zeroed channels to non-zero values"
        return None

    def zero_state(self, r: Rewriter, node: gs.Node, ins: Changes,
                   states: dict[int, State]) -> State:
        change = ins[0]
        assert change is not None  # states are given for inputs with removed channels
        held = _held(states, 0, len(change.removed()))
        if isinstance(held, str):
            return held
        reason = self.zero_reason(r, node, ins) or "shifts removed channels"
        return _constant_or_zero(self._normalised(r, node, change, held),
                                 _origin(states, node, reason))

    def _normalised(self, r: Rewriter, node: gs.Node, change: Change,
                    x: np.ndarray) -> np.ndarray:
        """The norm's output at the removed channels for inputs constant at ``x``."""
        scale, bias, mean, var = (r.require_const(node, i, w)[change.removed()]
                                  .astype(np.float64) for i, w, _ in self.PARAMS)
        eps = float(node.attrs.get("epsilon", 1e-5))
        return scale * (x - mean) / np.sqrt(var + eps) + bias


@register("InstanceNormalization")
class InstanceNorm(BatchNorm):
    """Per-sample, per-channel normalisation with a per-channel scale and bias: a channel is
    sliced like a batch norm's; a zeroed channel comes out as its bias."""

    PARAMS = ((1, "scale", 1.0), (2, "bias", 0.0))

    def zero_reason(self, r: Rewriter, node: gs.Node, ins: Changes) -> str | None:
        change = ins[0]
        if change is None:
            return None
        if np.any(r.require_const(node, 2, "bias")[change.removed()] != 0):
            return "(an instance norm after the probe) shifts zeroed channels to its bias"
        return None

    def _normalised(self, r: Rewriter, node: gs.Node, change: Change,
                    x: np.ndarray) -> np.ndarray:
        """A channel constant over its positions normalises to 0: the output is the bias."""
        return r.require_const(node, 2, "bias")[change.removed()].astype(np.float64)


BINARY_NEUTRAL = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0, "Pow": 1.0, "Max": 0.0,
                  "Min": 0.0, "Sum": 0.0, "Mean": 0.0}
_NUMPY_OPS: dict[str, Callable[..., np.ndarray]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power,
    "Max": np.maximum, "Min": np.minimum,
}


@register(*BINARY_NEUTRAL)
class Elementwise(Handler):
    """Element-wise ops of several tensors with broadcasting.

    Layer tensors merged here are coupled channel by channel; constants are per-channel
    parameters (edited) or broadcast over channels (left alone); another tensor is fine if it
    broadcasts over channels, and couples to channels no layer produces (blocked) otherwise.
    """

    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        traced = [f for f in ins if f is not None]
        ref = traced[0]
        rank = _out_rank(cg, node, max(f.rank for f in traced))
        a_out = ref.axis + (rank - ref.rank)
        for other in traced[1:]:
            if other.axis + (rank - other.rank) != a_out:
                raise Unsupported("merges tensors whose channels lie on different axes")
            cg.couple(ref, other, node)
        for t, flow in zip(node.inputs, ins, strict=True):
            if flow is not None or not t.name:
                continue
            value = cg.const(t)
            shape = value.shape if value is not None else cg.shape(t)
            if shape is None:
                raise Unsupported(f"merges tensor {t.name!r} of unknown shape")
            d = _channel_dim(shape, ref, rank)
            if value is None and d is not None:
                lost = f" (layer channels were lost there: {cg.lost[t.name]})" \
                    if t.name in cg.lost else ""
                pinned = cg.pinned(ref.size, f"node {describe(node)} merges its channels with "
                                             f"tensor {t.name!r}, which no layer produces{lost}")
                cg.slots.union(ref.expanded(), pinned)
        return _same(ref.moved(rank, a_out), len(node.outputs))

    def apply(self, r: Rewriter, node: gs.Node, ins: Changes, outs: Changes) -> None:
        change = _first(ins)
        if change is None:
            return
        ref = next(r.cg.flows[t.name] for t, c in zip(node.inputs, ins, strict=True)
                   if c is not None)
        rank = _out_rank(r.cg, node, ref.rank)
        for i, (t, c) in enumerate(zip(node.inputs, ins, strict=True)):
            if c is not None or not t.name or t.name in r.cg.flows:
                continue
            value = r.const(t)
            if value is None:
                continue
            d = _channel_dim(value.shape, ref, rank)
            if d is not None:
                r.set_input(node, i, r.per_channel(value, d, change, BINARY_NEUTRAL[node.op]))

    def zero_state(self, r: Rewriter, node: gs.Node, ins: Changes,
                   states: dict[int, State]) -> State:
        if node.op == "Mul" and any(s is None for s in states.values()):
            return None  # anything times a zero is zero
        bad = next((s for s in states.values() if isinstance(s, str)), None)
        if bad is not None:
            return bad
        result = self._at_removed(r, node, ins, states)
        if isinstance(result, str):
            held = next((s for s in states.values() if isinstance(s, Constant)), None)
            where = f"node {describe(node)} {result}"
            return where if held is None else f"{held.origin}, and {where}"
        return _constant_or_zero(result, _origin(states, node, _ADDED_AFTER_PROBE))

    def zero_reason(self, r: Rewriter, node: gs.Node, ins: Changes) -> str | None:
        result = self._at_removed(r, node, ins, {})
        if isinstance(result, str):
            return result
        return _ADDED_AFTER_PROBE if np.any(result) else None

    def _at_removed(self, r: Rewriter, node: gs.Node, ins: Changes,
                    states: dict[int, State]) -> np.ndarray | str:
        """The output at the removed channels, one value each (float64, shape (n,)), with
        traced inputs holding their states' values (zero by default) and constants their
        values there; why not, where that is not one value a channel (a constant that varies
        over positions, a tensor no layer produces)."""
        change = _first(ins)
        if change is None:
            return np.zeros(0)
        gone = change.removed()
        n = len(gone)
        ref = next(r.cg.flows[t.name] for t, c in zip(node.inputs, ins, strict=True)
                   if c is not None)
        rank = _out_rank(r.cg, node, ref.rank)
        axis = ref.axis + (rank - ref.rank)
        form = [1] * rank
        form[axis] = n  # the removed channels on the output's channel axis
        constant_in = any(isinstance(held, Constant) for held in states.values())
        operands: list[np.ndarray] = []
        for i, t in enumerate(node.inputs):
            if t.name in r.cg.flows:
                held = states.get(i)
                operands.append(held.values.reshape(form) if isinstance(held, Constant)
                                else np.zeros(1))
                continue
            value = r.const(t)
            if value is None:
                if node.op == "Mul" and not constant_in:
                    operands.append(np.ones(1))
                    continue
                return f"combines the zeroed channels with tensor {t.name!r}"
            d = _channel_dim(value.shape, ref, rank)
            operands.append(np.asarray(value, dtype=np.float64) if d is None
                            else np.take(value, gone, axis=d).astype(np.float64))
        with np.errstate(all="ignore"):
            if node.op in ("Sum", "Mean"):
                result = np.zeros(1)
                for operand in operands:
                    result = np.add(result, operand)
                if node.op == "Mean":
                    result = result / len(operands)
            else:
                result = _NUMPY_OPS[node.op](operands[0], operands[1])
        result = np.asarray(result, dtype=np.float64)
        if result.size == 1:
            return np.full(n, float(result.ravel()[0]))
        if result.ndim > rank:
            return "maps the zeroed channels to values that vary over positions"
        result = result.reshape((1,) * (rank - result.ndim) + result.shape)
        result = np.broadcast_to(result, np.broadcast_shapes(result.shape, tuple(form)))
        per = np.moveaxis(result, axis, 0).reshape(n, -1)
        if not np.all(per == per[:, :1]):
            return "maps the zeroed channels to values that vary over positions"
        return per[:, 0].copy()


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


_ADDED_AFTER_PROBE = ("maps the zeroed channels to non-zero values (a constant added after "
                      "the probe)")


# --------------------------------------------------------------------------------------------
# spatial ops that leave channels alone


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
        output by :func:`_by_slot`, so they are refused here."""
        held = states.get(0)
        if isinstance(held, Constant):
            return f"{held.origin}, which node {describe(node)} splits into parts"
        return held


# --------------------------------------------------------------------------------------------
# layout


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


@dataclass(frozen=True)
class _SizeOf:
    """An entry of a computed shape: ``tensor``'s size along ``axis``."""

    tensor: gs.Tensor
    axis: int


_ENTRIES_DEPTH = 8  # ops between a computed shape and the Shape nodes it is made of


def _shape_entries(cg: ChannelGraph, tensor: gs.Tensor, depth: int = _ENTRIES_DEPTH
                   ) -> list[int | _SizeOf | None] | None:
    """The entries of a 1-D (or scalar) integer ``tensor`` computed from shapes, as exporters
    write reshape targets and resize sizes: constants, ``Shape(x[, start, end])``,
    ``Gather``/``Slice`` of those along axis 0, ``Concat``, products of sizes no edit changes
    (``x.size(2) * x.size(3)``, as a constant), and ``Cast``, ``Identity``,
    ``(Un)Squeeze`` and ``Reshape`` to one dimension around them (PyTorch's ``x.size(i)``,
    tf2onnx's ``Slice(Cast(Gather(Shape(x), perm)))`` for a transposed shape). An entry computed
    any other way is None; the whole is None when not even the number of entries is known."""
    value = cg.const(tensor)
    if value is not None:
        return [int(v) for v in np.asarray(value).ravel()]
    node = _producer(tensor)
    if node is None or depth <= 0:
        return _unknown_entries(cg, tensor)
    inner = node.inputs[0] if node.inputs else None
    if node.op in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape") and inner is not None:
        entries = _shape_entries(cg, inner, depth - 1)
        if node.op in ("Squeeze", "Unsqueeze", "Reshape") and (entries is None or
                                                              len(entries) != 1):
            return _unknown_entries(cg, tensor)  # only a single entry keeps its meaning
        return entries
    if node.op == "Shape":
        shape = cg.shape(inner)  # type: ignore[arg-type]
        if shape is None:
            return _unknown_entries(cg, tensor)
        first, stop = _shape_range(node, len(shape))
        return [_SizeOf(inner, a) for a in range(first, stop)]  # type: ignore[arg-type]
    if node.op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1):
        out: list[int | _SizeOf | None] = []
        for part in node.inputs:
            entries = _shape_entries(cg, part, depth - 1)
            if entries is None:
                return None
            out += entries
        return out
    if node.op == "Mul" and len(node.inputs) == 2:  # x.size(2) * x.size(3)
        factors = [_shape_entries(cg, t, depth - 1) for t in node.inputs]
        sizes = [_fixed_size(cg, f[0]) if f is not None and len(f) == 1 else None
                 for f in factors]
        left, right = sizes
        if left is not None and right is not None:
            return [left * right]
        return _unknown_entries(cg, tensor)
    if node.op in ("Gather", "Slice"):  # picks entries: fold the op on their positions
        entries = _shape_entries(cg, inner, depth - 1)  # type: ignore[arg-type]
        if entries is None:
            return _unknown_entries(cg, tensor)
        args = [np.arange(len(entries)), *(cg.const(t) if t.name else None
                                           for t in node.inputs[1:])]
        try:
            picked = fold_node(node, args)
        except (ValueError, TypeError, IndexError):  # out of range, another axis
            picked = None
        if picked is None or np.ndim(picked) > 1:
            return _unknown_entries(cg, tensor)
        return [entries[int(i)] for i in np.ravel(picked)]
    return _unknown_entries(cg, tensor)


def _shape_range(node: gs.Node, rank: int) -> tuple[int, int]:
    """The axes ``[first, stop)`` a ``Shape`` node of a rank-``rank`` tensor gives (its
    ``start`` and ``end``, opset 15 on, clamped as ONNX does)."""
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    first, stop = (max(0, min(rank, v + rank if v < 0 else v))
                   for v in (start, rank if end is None else int(end)))
    return first, stop


def _fixed_size(cg: ChannelGraph, entry: int | _SizeOf | None) -> int | None:
    """``entry`` as a number no edit changes: a constant, or a tensor's known size along an
    axis that does not carry layer channels (not the batch, whose size is not known)."""
    if entry is None or isinstance(entry, int):
        return entry
    flow = cg.flows.get(entry.tensor.name)
    shape = cg.shape(entry.tensor)
    if (flow is not None and flow.axis == entry.axis) or shape is None:
        return None
    size = shape[entry.axis]
    return None if size is None else int(size)


def _unknown_entries(cg: ChannelGraph, tensor: gs.Tensor) -> list[int | _SizeOf | None] | None:
    shape = cg.shape(tensor)
    if shape is None or len(shape) > 1 or (shape and shape[0] is None):
        return None
    return [None] * (int(shape[0]) if shape else 1)  # type: ignore[arg-type]


def _shape_entry(cg: ChannelGraph, tensor: gs.Tensor) -> _SizeOf | None:
    """The size ``tensor`` is, when it is a single entry of a tensor's shape
    (:func:`_shape_entries`)."""
    entries = _shape_entries(cg, tensor)
    return entries[0] if entries is not None and len(entries) == 1 and \
        isinstance(entries[0], _SizeOf) else None


def _batch_of_shape(cg: ChannelGraph, tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` is the batch size as a 1-D tensor (:func:`_shape_entry` of axis 0)
    of a tensor known to have the batch first (:func:`_batch_first`)."""
    entry = _shape_entry(cg, tensor)
    return entry is not None and entry.axis == 0 and _batch_first(cg, entry.tensor)


def _batch_first(cg: ChannelGraph, tensor: gs.Tensor) -> bool:
    """Whether ``tensor``'s first axis is the batch: the image input, or a tensor carrying a
    layer's channels on an axis after the first, reached from the input by ops that keep the
    batch first (a Transpose that moved the channels to axis 0 leaves them there, so a traced
    channel axis of 0, or an untraced tensor, is not taken for batch-first)."""
    if any(tensor.name == t.name for t in cg.graph.inputs):
        return True
    flow = cg.flows.get(tensor.name)
    return flow is not None and flow.axis >= 1


def _producer(tensor: gs.Tensor | None) -> gs.Node | None:
    if tensor is None or not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
        return None
    return tensor.inputs[0]


def _reshape_target(cg: ChannelGraph, node: gs.Node
                    ) -> tuple[list[int | None], dict[int, _SizeOf]] | None:
    """The target shape of a Reshape, ``None`` standing for the batch size where the target is
    computed (:func:`_shape_entries`: the legacy export of ``x.view(x.size(0), -1)`` or of
    ``x.view(b, c, 1, 1)`` with ``b, c = x.size()[:2]``, tf2onnx's flatten), with the sizes
    computed from tensors other than the batch, by position; ``None`` (the whole) when an
    entry is computed any other way or a size is not known."""
    entries = _shape_entries(cg, node.inputs[1])
    if entries is None:
        return None
    target: list[int | None] = []
    computed: dict[int, _SizeOf] = {}
    for entry in entries:
        if entry is None:
            return None
        if isinstance(entry, int):
            target.append(entry)
            continue
        if entry.axis == 0 and _batch_first(cg, entry.tensor):
            target.append(None)
            continue
        size = _size_known(cg, entry)
        if size is None:
            return None
        computed[len(target)] = entry
        target.append(size)
    return target, computed


def _why_unread(cg: ChannelGraph, node: gs.Node) -> str:
    """Which entry of a Reshape's computed target the surgery cannot read, for its message."""
    entries = _shape_entries(cg, node.inputs[1])
    if entries is None:
        return " (not made of constants and tensor sizes)"
    for i, entry in enumerate(entries):
        if entry is None:
            return (f" (entry {i} is computed in a way the surgery does not read, such as a "
                    f"product of sizes only known at run time)")
        if isinstance(entry, _SizeOf) and _size_known(cg, entry) is None and not (
                entry.axis == 0 and _batch_first(cg, entry.tensor)):
            return (f" (entry {i} is the size of tensor {entry.tensor.name!r} along axis "
                    f"{entry.axis}, only known at run time)")
    return ""


def _size_known(cg: ChannelGraph, entry: _SizeOf) -> int | None:
    """``entry``'s size as shape inference (or the tensor's traced channels) tells it."""
    shape, flow = cg.shape(entry.tensor), cg.flows.get(entry.tensor.name)
    size = shape[entry.axis] if shape is not None else None
    if size is None and flow is not None and flow.axis == entry.axis:
        size = flow.size
    return None if size is None else int(size)


def _follow_sizes(cg: ChannelGraph, node: gs.Node, computed: dict[int, _SizeOf],
                  out: Flow) -> None:
    """Check that the sizes a computed reshape target takes from other tensors stay right
    after an edit: a size taken from a tensor's channel axis must be where the output's
    channels are, and those channels are coupled to that tensor's; one that no edit changes
    must not be there."""
    for position, entry in computed.items():
        flow = cg.flows.get(entry.tensor.name)
        follows = flow is not None and flow.axis == entry.axis
        if follows and position == out.axis:
            cg.couple(out, flow, node)  # type: ignore[arg-type]
        elif follows:
            raise Unsupported(f"puts the channel count of tensor {entry.tensor.name!r} at "
                              f"position {position} of its target shape")
        elif position == out.axis:
            raise Unsupported(f"takes the size of its channel axis from tensor "
                              f"{entry.tensor.name!r} (axis {entry.axis}), which does not "
                              f"change with the channels")


def _target_dims(target: Sequence[int | None], src: Sequence[int | None]
                 ) -> list[int | None] | None:
    """The output shape of reshaping ``src`` to ``target``, whose first entry is the batch
    (``None``; 0: copy; -1: inferred from the other entries); ``None`` when it cannot be told."""
    if None in src[1:]:
        return None
    dims = [src[0] if t is None else (src[i] if t == 0 and i < len(src) else t)
            for i, t in enumerate(target)]
    if dims.count(-1) == 1:
        rest = int(np.prod([int(d) for d in dims[1:] if d != -1 and d is not None]))
        total = int(np.prod([int(d) for d in src[1:] if d is not None]))
        if rest == 0 or total % rest or None in dims[1:]:
            return None
        dims[dims.index(-1)] = total // rest
    return None if -1 in dims else dims


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


# --------------------------------------------------------------------------------------------
# layers


def layer_weight(cg: ChannelGraph, node: gs.Node) -> np.ndarray:
    """The constant weight (input 1) of layer ``node``; :class:`Unsupported` saying why where
    there is none the surgery can edit: computed at run time, or stored as integers (a QDQ
    model's DequantizeLinear, a Cast of integers times a scale), which an edit would silently
    store as floats."""
    stored = integer_storage(node.inputs[1])
    if stored is not None:
        raise Unsupported(f"has quantized weights ({stored}): the surgery edits float weights "
                          f"(edit the float model, then quantize it again)")
    weight = cg.const(node.inputs[1])
    if weight is None:
        raise Unsupported("has weights that are not constant (computed at run time)")
    return weight


def integer_storage(tensor: gs.Tensor, depth: int = 8) -> str | None:
    """What turns integers into the values of ``tensor`` (a DequantizeLinear, a Cast from an
    integer type) within ``depth`` ops before it; None when nothing does."""
    todo, seen = [(tensor, 0)], set()
    while todo:
        t, level = todo.pop()
        if id(t) in seen or isinstance(t, gs.Constant) or len(t.inputs) != 1 or level >= depth:
            continue
        seen.add(id(t))
        producer = t.inputs[0]
        if producer.op in ("DequantizeLinear", "DynamicQuantizeLinear"):
            return f"node {describe(producer)}"
        if producer.op == "Cast" and producer.inputs and casts_to_float(
                producer.attrs.get("to")):
            source = producer.inputs[0]
            dtype = source.values.dtype if isinstance(source, gs.Constant) \
                else getattr(source, "dtype", None)
            if dtype is not None and np.issubdtype(np.dtype(dtype), np.integer):
                return f"node {describe(producer)} casts integers"
        todo.extend((i, level + 1) for i in producer.inputs if i.name)
    return None


def _layer_inputs(node: gs.Node, ins: Flows) -> Flow | None:
    if any(f is not None for f in ins[1:]):
        raise Unsupported("reads layer channels as weights or bias")
    return ins[0]


def _check_features(flow: Flow | None, weight: np.ndarray | None, axis: int) -> None:
    """A fully-connected layer's traced input must have as many features as its weight reads
    on ``axis``; anything else means the trace lost the layout, so the edit is refused."""
    if flow is not None and weight is not None and flow.size != int(weight.shape[axis]):
        raise Unsupported(f"reads {flow.size} traced features but its weight takes "
                          f"{int(weight.shape[axis])}")


@register("Conv", layer=True)
class Conv(Handler):
    """2-D Conv layers: out-channels are the layer's kernels; in-channels follow the input.

    Grouped convs: a depthwise-style conv (one input channel per group) ties each group's
    kernels to its input channel (they go, and the group count drops, together). Other grouped
    convs accept removals that take the same number of channels from every group.
    """

    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        if layer is None:
            raise Unsupported("is not an analysable layer (weights not a constant 4-D tensor)")
        flow = _layer_inputs(node, ins)
        weight = layer_weight(cg, node)
        group = int(node.attrs.get("group", 1))
        n_in = int(weight.shape[1])
        if flow is not None:
            if flow.rank != 4 or flow.axis != 1 or not flow.channel_level:
                raise Unsupported("reads channels that are not on axis 1 of a 4-D tensor")
            if flow.size != n_in * group:
                raise Unsupported(f"expects {n_in * group} input channels, gets {flow.size}")
        if group > 1 and n_in == 1:
            multiplier = len(layer.slots) // group
            if flow is None and multiplier == 1:
                raise Unsupported(f"is a depthwise conv on tensor {node.inputs[0].name!r}, "
                                  f"whose channels no layer produces")
            if flow is not None:
                cg.slots.union(np.repeat(flow.all_slots(), multiplier), layer.slots, tie=True)
            # on a graph input with a channel multiplier: a grouped conv, which loses the same
            # number of kernels in every group (checked when it is rewritten)
        out = Flow(4, 1, (Segment(layer.slots),))
        return _same(out, len(node.outputs))

    def apply(self, r: Rewriter, node: gs.Node, ins: Changes, outs: Changes) -> None:
        in_change, out_change = ins[0], outs[0]
        group = int(node.attrs.get("group", 1))
        weight, new_group = conv_weight(r, r.require_const(node, 1, "weight"), group, in_change,
                                        out_change, f"conv {describe(node)}")
        if new_group != group:
            node.attrs["group"] = new_group
        r.set_input(node, 1, weight)
        if out_change is not None and len(node.inputs) > 2 and node.inputs[2].name:
            bias = r.require_const(node, 2, "bias")
            r.set_input(node, 2, r.out_channels(bias, 0, out_change, fan_in=1, bias=True))

    def fold_constant(self, r: Rewriter, node: gs.Node, change: Change,
                      values: np.ndarray) -> str | None:
        """Without padding every window sees a constant input channel whole: its weights'
        sum times the constant joins the bias of the kernels of its group. Nothing to do when
        those kernels go too (a depthwise conv's channel tied to the removed one)."""
        weight = r.require_const(node, 1, "weight")
        group = int(node.attrs.get("group", 1))
        per_group_in, per_group_out = weight.shape[1], weight.shape[0] // group
        out_change = _out_change(r, node)
        gone = set(out_change.removed().tolist()) if out_change is not None else set()
        groups = {int(p) // per_group_in for p in change.removed().tolist()}
        if all(o in gone for g in groups
               for o in range(g * per_group_out, (g + 1) * per_group_out)):
            return None
        if _pads(node):
            return "it pads its input, so a constant channel is not constant at the borders"
        sums = weight.astype(np.float64).sum(axis=(2, 3))  # (K, C_in / group)
        shift = np.zeros(weight.shape[0])
        for position, value in zip(change.removed().tolist(), values.tolist(), strict=True):
            g, local = divmod(int(position), per_group_in)
            rows = slice(g * per_group_out, (g + 1) * per_group_out)
            shift[rows] += sums[rows, local] * value
        _add_bias(r, node, 2, shift)
        _record_fold(r, node, shift)
        return None


@register("ConvTranspose")
class ConvTranspose(Handler):
    """A transposed conv reading a layer's channels (a decoder's upsampling): its weight is
    (C_in, C_out / group, kh, kw), so removed or added input channels are rows of axis 0. Its
    outputs are not a layer's kernels and are not traced further. Grouped ones are refused."""

    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        flow = _layer_inputs(node, ins)
        weight = cg.const(node.inputs[1])
        if weight is None or np.ndim(weight) != 4:
            raise Unsupported("has weights that are not a constant 4-D tensor")
        if int(node.attrs.get("group", 1)) != 1:
            raise Unsupported("is a grouped transposed conv")
        if flow is None or flow.rank != 4 or flow.axis != 1 or not flow.channel_level:
            raise Unsupported("reads channels that are not on axis 1 of a 4-D tensor")
        if flow.size != int(weight.shape[0]):
            raise Unsupported(f"expects {int(weight.shape[0])} input channels, gets {flow.size}")
        return [None] * len(node.outputs)

    def apply(self, r: Rewriter, node: gs.Node, ins: Changes, outs: Changes) -> None:
        if ins[0] is not None:
            r.set_input(node, 1, r.in_channels(r.require_const(node, 1, "weight"), 0, ins[0]))


def conv_weight(r: Rewriter, weight: np.ndarray, group: int, in_change: Change | None,
                out_change: Change | None, where: str) -> tuple[np.ndarray, int]:
    """A Conv weight (K, C/group, kh, kw) and its group count after the changes of its input
    and output channels: plain, depthwise (kernels tied to input channels, the group count
    follows the input) or grouped (equal changes per group; so is a depthwise conv whose
    kernels change without its input: a channel multiplier on the graph input). Shared by the
    ONNX surgery and the torch adapter; ``where`` names the conv in errors."""
    c_out, n_in = int(weight.shape[0]), int(weight.shape[1])
    taps = int(np.prod(weight.shape[2:]))
    if group == 1:
        if out_change is not None:
            weight = r.out_channels(weight, 0, out_change, fan_in=n_in * taps)
        if in_change is not None:
            weight = r.in_channels(weight, 1, in_change)
        return weight, group
    if n_in == 1 and (in_change is not None or out_change is None):  # depthwise
        multiplier = c_out // group
        if out_change is not None:
            weight = r.out_channels(weight, 0, out_change, fan_in=taps)
        new_group = in_change.size if in_change is not None else group
        if weight.shape[0] != new_group * multiplier:
            raise EditError(f"internal: depthwise {where} would get {weight.shape[0]} kernels "
                            f"for {new_group} groups")
        return weight, new_group
    ins = _per_group(in_change, n_in * group, group, "input", where)
    outs = _per_group(out_change, c_out, group, "output", where)
    per_out = c_out // group
    blocks = [weight[g * per_out + outs[g]][:, ins[g]] for g in range(group)]
    return np.concatenate(blocks, axis=0), group


def _per_group(change: Change | None, size: int, group: int, what: str,
               where: str) -> list[np.ndarray]:
    """Kept positions (local to their group) for each group, refusing unequal groups."""
    per = size // group
    if change is None:
        return [np.arange(per)] * group
    if change.grows:
        raise EditError(f"cannot widen through grouped {where} (group={group}): its groups "
                        f"would become unequal; widen a layer it does not read")
    kept = [change.index[(change.index >= g * per) & (change.index < (g + 1) * per)] - g * per
            for g in range(group)]
    counts = [len(k) for k in kept]
    if len(set(counts)) != 1 or counts[0] == 0:
        removed = [per - c for c in counts]
        raise EditError(
            f"grouped {where} (group={group}) would lose {removed} {what} channels per group; "
            f"ONNX groups must stay equal and non-empty: remove the same number of channels "
            f"from every group of {per}"
        )
    return kept


@register("Gemm", layer=True)
class Gemm(Handler):
    """Fully-connected layers ``Y = alpha * A @ op(B) + beta * C``: neurons are B's output
    side (rows with ``transB=1``), inputs its other side; C is per neuron or broadcast."""

    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        if layer is None:
            raise Unsupported("is not an analysable layer (weights not a constant)")
        flow = _layer_inputs(node, ins)
        layer_weight(cg, node)
        if flow is not None and (int(node.attrs.get("transA", 0)) or flow.rank != 2
                                 or flow.axis != 1):
            raise Unsupported("reads features that are not on axis 1 of its (N, F) input")
        _check_features(flow, cg.const(node.inputs[1]),
                        1 if int(node.attrs.get("transB", 0)) else 0)
        return _same(Flow(2, 1, (Segment(layer.slots),)), len(node.outputs))

    def apply(self, r: Rewriter, node: gs.Node, ins: Changes, outs: Changes) -> None:
        in_change, out_change = ins[0], outs[0]
        weight = r.require_const(node, 1, "weight")
        out_axis = 0 if int(node.attrs.get("transB", 0)) else 1
        in_axis = 1 - out_axis
        if out_change is not None:
            weight = r.out_channels(weight, out_axis, out_change,
                                    fan_in=int(weight.shape[in_axis]))
        if in_change is not None:
            weight = r.in_channels(weight, in_axis, in_change)
        r.set_input(node, 1, weight)
        if out_change is not None and len(node.inputs) > 2 and node.inputs[2].name:
            bias = r.require_const(node, 2, "bias C")
            if bias.size == 1:
                return
            if bias.shape[-1] != out_change.old_size or bias.size != out_change.old_size:
                raise EditError(f"node {describe(node)}: bias C of shape {bias.shape} is not "
                                f"one value per neuron")
            r.set_input(node, 2, r.out_channels(bias, bias.ndim - 1, out_change, fan_in=1,
                                                bias=True))

    def fold_constant(self, r: Rewriter, node: gs.Node, change: Change,
                      values: np.ndarray) -> str | None:
        """``alpha * values @ B[removed rows]`` joins ``beta * C``."""
        weight = r.require_const(node, 1, "weight").astype(np.float64)
        if int(node.attrs.get("transB", 0)):
            weight = weight.T
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        shift = alpha * (values @ weight[change.removed()])
        if beta == 0:  # C is not read: it becomes the constants' contribution
            node.attrs["beta"] = 1.0
            beta = 1.0
            if len(node.inputs) > 2 and node.inputs[2].name:
                r.set_input(node, 2, np.zeros_like(shift))
        _add_bias(r, node, 2, shift / beta)
        _record_fold(r, node, shift)
        return None


def _record_fold(r: Rewriter, node: gs.Node, shift: np.ndarray) -> None:
    name = node.name or node.outputs[0].name
    r.folds[name] = r.folds.get(name, np.zeros_like(shift)) + shift


def _add_bias(r: Rewriter, node: gs.Node, i: int, shift: np.ndarray) -> None:
    """Add ``shift`` (one value per output channel) to ``node``'s bias input ``i``, made (or
    widened from a broadcast scalar) where needed."""
    if len(node.inputs) > i and node.inputs[i].name:
        bias = r.require_const(node, i, "bias")
        if bias.size != 1 and bias.shape[-1] != shift.size:
            raise EditError(f"node {describe(node)}: its bias of shape {bias.shape} is not one "
                            f"value per output, so the removed channels' constants cannot "
                            f"join it")
        r.set_input(node, i, (bias + shift).astype(bias.dtype))  # (N,), (1, N) or a scalar
        return
    weight_dtype = r.require_const(node, 1, "weight").dtype
    new = gs.Constant(r.names.fresh(f"{node.name or node.outputs[0].name}_bias"),
                      np.ascontiguousarray(shift, dtype=weight_dtype))
    while len(node.inputs) < i:
        node.inputs.append(gs.Variable.empty())
    if len(node.inputs) == i:
        node.inputs.append(new)
    else:
        node.inputs[i] = new


@register("MatMul", layer=True)
class MatMul(Handler):
    """``Y = X @ W`` with a constant W of shape (F, K): neurons are W's columns."""

    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        if layer is None:
            raise Unsupported("is not an analysable layer (second input not a constant 2-D "
                              "weight)")
        flow = _layer_inputs(node, ins)
        layer_weight(cg, node)
        rank = _out_rank(cg, node, 2)
        if flow is not None and (flow.rank != 2 or flow.axis != 1):
            raise Unsupported("reads features that are not on the last axis of its (N, F) input")
        _check_features(flow, cg.const(node.inputs[1]), 0)
        return _same(Flow(rank, rank - 1, (Segment(layer.slots),)), len(node.outputs))

    def apply(self, r: Rewriter, node: gs.Node, ins: Changes, outs: Changes) -> None:
        in_change, out_change = ins[0], outs[0]
        weight = r.require_const(node, 1, "weight")
        if out_change is not None:
            weight = r.out_channels(weight, 1, out_change, fan_in=int(weight.shape[0]))
        if in_change is not None:
            weight = r.in_channels(weight, 0, in_change)
        r.set_input(node, 1, weight)

    def fold_constant(self, r: Rewriter, node: gs.Node, change: Change,
                      values: np.ndarray) -> str | None:
        """``values @ W[removed rows]`` joins the bias exporters add right after a MatMul
        (tf2onnx's Dense: ``Add`` of a constant of K values, read by nothing else), or a new
        bias ``Add`` where there is none."""
        out = node.outputs[0]
        add = out.outputs[0] if len(out.outputs) == 1 else None
        weight = r.require_const(node, 1, "weight")
        shift = values @ weight.astype(np.float64)[change.removed()]
        _record_fold(r, node, shift)
        i = 1 if add is not None and add.inputs and add.inputs[0] is out else 0
        bias = r.const(add.inputs[i]) if add is not None and add.op == "Add" and \
            len(add.inputs) == 2 else None
        if bias is not None and bias.size == weight.shape[1] == bias.shape[-1]:
            r.set_input(add, i, (bias + shift).astype(bias.dtype))  # type: ignore[arg-type]
            return None
        # no bias (tf2onnx drops a Dense's all-zero one): add one right after the MatMul,
        # already cut to the neurons this step keeps (the new node is not among the records)
        out_change = _out_change(r, node)
        if out_change is not None:
            shift = r.out_channels(shift, 0, out_change, fan_in=1, bias=True)
        name = node.name or out.name
        before = gs.Variable(r.names.fresh(f"{name}_before_bias"), dtype=out.dtype)
        node.outputs[0] = before
        bias_add = gs.Node("Add", r.names.fresh(f"{name}_bias"), inputs=[
            before, gs.Constant(r.names.fresh(f"{name}.bias"),
                                np.ascontiguousarray(shift, dtype=weight.dtype))],
            outputs=[out])
        nodes = r.cg.graph.nodes
        nodes.insert(next(j + 1 for j, n in enumerate(nodes) if n is node), bias_add)
        return None
