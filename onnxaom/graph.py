"""Read-only helpers over an ONNX graph: producers, consumers, constants, inferred shapes.

Shared by layer discovery, instrumentation and surgery so that each asks the graph the same
questions the same way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["FLOAT_TYPES", "GraphIndex", "Shape", "casts_to_float", "dim_values"]

Shape = tuple[int | None, ...]
#: ONNX element types of floating-point tensors.
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                         onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16})


def casts_to_float(to: object) -> bool:
    """Whether a Cast with attribute ``to`` makes floats (a shape cast between integer types
    does not; neither does an attribute that is not an element type)."""
    try:
        return int(to) in FLOAT_TYPES  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False


def dim_values(type_proto: onnx.TypeProto) -> Shape | None:
    """Static dims of a tensor type (None for symbolic/unknown ones); None if rank unknown."""
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    return tuple(
        int(d.dim_value) if d.HasField("dim_value") else None
        for d in type_proto.tensor_type.shape.dim
    )


@dataclass
class GraphIndex:
    """Index of one model's main graph. Built once, never mutates the model."""

    model: onnx.ModelProto

    @property
    def graph(self) -> onnx.GraphProto:
        return self.model.graph

    @cached_property
    def producer(self) -> dict[str, int]:
        """Tensor name -> index of the node that produces it."""
        out: dict[str, int] = {}
        for i, node in enumerate(self.graph.node):
            for name in node.output:
                if name:
                    out[name] = i
        return out

    @cached_property
    def consumers(self) -> dict[str, list[int]]:
        """Tensor name -> indices of the nodes that read it (subgraph reads included)."""
        out: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(self.graph.node):
            for name in set(node.input) | subgraph_inputs(node):
                if name:
                    out[name].append(i)
        return out

    @cached_property
    def graph_outputs(self) -> set[str]:
        return {o.name for o in self.graph.output}

    @cached_property
    def initializers(self) -> dict[str, onnx.TensorProto]:
        return {t.name: t for t in self.graph.initializer}

    def constant(self, name: str, depth: int = 8) -> np.ndarray | None:
        """The value of ``name`` if it is an initializer, a Constant node's output, or one of
        the shape and type ops exports leave unfolded on constants (:data:`FOLDED_OPS`:
        a ReLU6's bounds as a Cast of a Constant; nn.GroupNorm's weight and nn.PReLU's slope as
        an Unsqueeze or Reshape of an initializer, without constant folding)."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        index = self.producer.get(name)
        if index is None:
            return None
        node = self.graph.node[index]
        if node.op_type in FOLDED_OPS and node.domain in ("", "ai.onnx") and node.input \
                and depth > 0:
            args = [self.constant(n, depth - 1) if n else None for n in node.input]
            if args[0] is None:
                return None
            try:
                return _fold(node, args, self.attribute)
            except (KeyError, TypeError, ValueError, IndexError):  # malformed: not constant
                return None
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            return None
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
            if attr.name == "value_float":
                return np.array(attr.f, dtype=np.float32)
            if attr.name == "value_floats":
                return np.array(list(attr.floats), dtype=np.float32)
            if attr.name == "value_int":
                return np.array(attr.i, dtype=np.int64)
            if attr.name == "value_ints":
                return np.array(list(attr.ints), dtype=np.int64)
        return None

    def constant_shape(self, name: str) -> Shape | None:
        """Shape of a constant without materialising big initializers."""
        if name in self.initializers:
            return tuple(int(d) for d in self.initializers[name].dims)
        value = self.constant(name)
        return None if value is None else tuple(value.shape)

    @cached_property
    def _inferred_values(self) -> list[onnx.ValueInfoProto]:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model, data_prop=True)
        except Exception:  # inference is best effort; exporters sometimes write odd graphs
            inferred = self.model
        graph = inferred.graph
        return [*graph.input, *graph.value_info, *graph.output]

    @cached_property
    def shapes(self) -> dict[str, Shape]:
        """Tensor name -> shape from ONNX shape inference (dims None where symbolic)."""
        out: dict[str, Shape] = {}
        for value in self._inferred_values:
            dims = dim_values(value.type)
            if dims is not None:
                out[value.name] = dims
        for name in self.initializers:
            out[name] = self.constant_shape(name) or ()
        return out

    @cached_property
    def run_shapes(self) -> dict[str, Shape]:
        """:attr:`shapes` with what inference left unknown filled from one ONNX Runtime run
        (:func:`onnxaom.shapes.fill_unknown`; no run where nothing is unknown), once per
        index."""
        from .shapes import fill_unknown

        return fill_unknown(self.model, self.shapes)

    def elem_type(self, tensor: str) -> int:
        """ONNX element type of ``tensor`` (FLOAT when inference could not tell)."""
        if tensor in self.initializers:
            return int(self.initializers[tensor].data_type)
        for value in self._inferred_values:
            if value.name == tensor and value.type.tensor_type.elem_type:
                return int(value.type.tensor_type.elem_type)
        return int(onnx.TensorProto.FLOAT)

    def single_consumer(self, tensor: str) -> int | None:
        """The only node reading ``tensor``, or None (several readers, or a graph output)."""
        readers = self.consumers.get(tensor, [])
        if len(readers) != 1 or tensor in self.graph_outputs:
            return None
        return readers[0]

    def attribute(self, node: onnx.NodeProto, name: str, default: object = None) -> object:
        for attr in node.attribute:
            if attr.name == name:
                return onnx.helper.get_attribute_value(attr)
        return default


#: Ops :meth:`GraphIndex.constant` evaluates on constant inputs: they only retype, reshape or
#: broadcast their first input, count (``Range``: the axes of an unoptimised GroupNorm's
#: affine Unsqueeze), or do small arithmetic on constants (the bounds of that Range); cheap,
#: and exact (integer Div rounds toward zero, as ONNX).
FOLDED_OPS = frozenset({"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Expand",
                        "Flatten", "Range", "Add", "Sub", "Mul", "Div", "Concat", "Shape",
                        "Gather"})
#: The most elements an arithmetic op is folded for (shape and index arithmetic, not weights).
_FOLDED_ARITHMETIC = 4096


def _fold(node: onnx.NodeProto, args: list[np.ndarray | None],
          attribute: Any) -> np.ndarray | None:
    """``node`` (one of :data:`FOLDED_OPS`) on constant ``args`` (None: not constant)."""
    op, value = node.op_type, args[0]
    assert value is not None
    second = args[1] if len(args) > 1 else None
    if op == "Concat":  # a reshape target of constants (dynamo's p.view(1, -1, 1, 1))
        parts = [a for a in args if a is not None]
        if len(parts) != len(args) or sum(int(a.size) for a in parts) > _FOLDED_ARITHMETIC:
            return None
        return np.concatenate(parts, axis=int(attribute(node, "axis", 0)))
    if op == "Shape":
        start, end = int(attribute(node, "start", 0)), attribute(node, "end")
        return np.asarray(value.shape[start:None if end is None else int(end)], dtype=np.int64)
    if op == "Gather":
        if second is None or value.size > _FOLDED_ARITHMETIC:
            return None
        return np.take(value, np.asarray(second).astype(np.int64),
                       axis=int(attribute(node, "axis", 0)))
    if op == "Identity":
        return value
    if op == "Cast":
        return value.astype(onnx.helper.tensor_dtype_to_np_dtype(int(attribute(node, "to", 0))))
    if op in ("Unsqueeze", "Squeeze"):
        axes = second if len(node.input) > 1 and node.input[1] else attribute(node, "axes")
        if len(node.input) > 1 and node.input[1] and second is None:
            return None  # computed axes
        return squeezed(op, value, axes)
    if op == "Reshape":
        if second is None:
            return None
        shape = [int(d) for d in np.ravel(second)]
        zero_is_copy = not int(attribute(node, "allowzero", 0))
        shape = [value.shape[i] if d == 0 and zero_is_copy else d for i, d in enumerate(shape)]
        return value.reshape(shape)
    if op == "Expand":
        if second is None:
            return None
        return value * np.ones([int(d) for d in np.ravel(second)], dtype=value.dtype)
    if op in ("Add", "Sub", "Mul", "Div"):
        if second is None or value.size > _FOLDED_ARITHMETIC or np.size(second) > \
                _FOLDED_ARITHMETIC:
            return None
        return arithmetic(op, value, second)
    if op == "Range":
        return ranged(args)
    if op == "Flatten":
        axis = int(attribute(node, "axis", 1))
        axis = axis + value.ndim if axis < 0 else axis
        return value.reshape(int(np.prod(value.shape[:axis])), -1)
    return None


def arithmetic(op: str, first: np.ndarray, second: Any) -> np.ndarray | None:
    """ONNX ``Add``, ``Sub``, ``Mul`` or ``Div`` (``op``) of constants, in ``first``'s type
    (integer Div rounds toward zero, as ONNX; None for an integer division by zero); for
    constant folding."""
    other = np.asarray(second)
    if op == "Div" and np.issubdtype(first.dtype, np.integer):
        if np.any(other == 0):
            return None
        return np.trunc(first / other).astype(first.dtype)
    with np.errstate(all="ignore"):
        result = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply,
                  "Div": np.divide}[op](first, other)
    return np.asarray(result).astype(first.dtype)


def ranged(args: Sequence[Any]) -> np.ndarray | None:
    """ONNX ``Range`` of constant (start, limit, delta), in start's type; None when an input is
    not constant or delta is 0; for constant folding."""
    if len(args) != 3 or any(a is None for a in args):
        return None
    start, limit, delta = (np.asarray(a).reshape(()).item() for a in args)
    return None if delta == 0 else np.arange(start, limit, delta).astype(np.asarray(args[0]).dtype)


def squeezed(op: str, value: np.ndarray, axes: Any) -> np.ndarray | None:
    """ONNX ``Squeeze`` or ``Unsqueeze`` (``op``) of ``value`` along ``axes`` (None: a Squeeze
    of every axis of size 1; an Unsqueeze needs axes); for constant folding."""
    if axes is None:
        return np.squeeze(value) if op == "Squeeze" else None
    axes = [int(a) for a in np.ravel(axes)]
    if op == "Squeeze":
        return np.squeeze(value, axis=tuple(a % value.ndim for a in axes))
    rank = value.ndim + len(axes)
    for axis in sorted(a % rank for a in axes):
        value = np.expand_dims(value, axis)
    return value


def fed_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a run must feed: those that are not initializers, less those no node
    reads where there are several (an input left unused by an edit of another tool)."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) > 1:
        read = GraphIndex(model).consumers
        inputs = [i for i in inputs if i.name in read] or inputs
    return inputs


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names read from the outer scope by If/Loop/Scan bodies."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for sub in g.node:
                local.update(sub.output)
            for sub in g.node:
                names.update(n for n in sub.input if n and n not in local)
                names.update(n for n in subgraph_inputs(sub) if n not in local)
    return names
