"""Sizes a graph computes at run time (Shape -> Gather -> Concat chains): what a computed
reshape target or slice bound is made of, and whether it changes with the channels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..channels import (
    ChannelGraph,
    Flow,
    Unsupported,
)
from ..gsio import fold_node


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
