"""Handlers of element-wise ops: unary activations, PRelu, the per-channel norms, binary
arithmetic."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ...graph import casts_to_float
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
from .base import (
    Changes,
    Flows,
    Handler,
    State,
    _channel_dim,
    _constant_or_zero,
    _extra_outputs_unused,
    _first,
    _held,
    _only_first_input,
    _origin,
    _out_rank,
    _same,
    register,
)

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


@register("GroupNormalization")
class GroupNorm(InstanceNorm):
    """An ONNX GroupNormalization with one channel a group (``num_groups`` = C: an instance
    norm with a per-channel scale and bias, at opset 18 and 21 alike) is edited like one, its
    ``num_groups`` following the channel count. With several channels a group, removing one
    would change how the others are normalised: refused."""

    def trace(self, cg: ChannelGraph, node: gs.Node, ins: Flows,
              layer: LayerSlots | None) -> list[Flow | None]:
        flow = _only_first_input(node, ins)
        groups = node.attrs.get("num_groups")
        if groups != flow.size:
            raise Unsupported(f"normalises groups of several channels together ({groups} "
                              f"groups of {flow.size} channels), so a removed channel would "
                              f"change how the others are normalised")
        return super().trace(cg, node, ins, layer)

    def apply(self, r: Rewriter, node: gs.Node, ins: Changes, outs: Changes) -> None:
        super().apply(r, node, ins, outs)
        if ins[0] is not None:
            node.attrs["num_groups"] = ins[0].size


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


_ADDED_AFTER_PROBE = ("maps the zeroed channels to non-zero values (a constant added after "
                      "the probe)")
