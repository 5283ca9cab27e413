"""Handlers of the layers themselves (Conv, ConvTranspose, Gemm, MatMul): their out-channel
side, their in-channel side, and folding constants into their bias."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ...errors import EditError
from ...graph import casts_to_float
from ..channels import (
    Change,
    ChannelGraph,
    Flow,
    LayerSlots,
    Rewriter,
    Segment,
    Unsupported,
    describe,
)
from .base import (
    Changes,
    Flows,
    Handler,
    _out_change,
    _out_rank,
    _pads,
    _same,
    register,
)


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
