"""A model's graph put in the form the rest of the library reads, without changing what it
computes: done once, when a :class:`~onnxaom.model.Model` is made.

ONNX Runtime runs graphs that the ONNX spec, and so layer discovery, shape inference and the
surgery, do not expect. Four forms are normalised:

* **model-local functions** are inlined (:mod:`onnxaom.inline`);
* **sparse initializers** (``graph.sparse_initializer``) become dense initializers of the same
  name, and ``Constant`` nodes with a ``sparse_value`` dense ones, so that a conv with a sparse
  weight is a layer and can be edited;
* **nodes out of topological order** are sorted (stable: nodes already in order keep it);
  a graph that cannot be sorted (a tensor nothing provides, a cycle) is refused, naming the
  node; a ``UserWarning`` says it was sorted;
* **stored intermediate shapes that contradict shape inference** (``value_info`` left stale by
  a hand edit or a tool) are replaced by the inferred ones, with a ``UserWarning`` naming them:
  ORT ignores them, but shape inference keeps them and every size read from them is wrong;
* **a ``CastLike`` whose type comes from an activation** (``CastLike(0, x)``: what
  ``torch.onnx.export(dynamo=True, optimize=False)`` writes for a ReLU6's bounds or a bias-less
  conv's zero bias) becomes a ``Cast`` to that type: it reads only ``x``'s element type, yet
  made a second reader of ``x``, which ended a layer's chain before its activation and made
  the surgery refuse a removal.

A model that needs none of this is returned as it is (the same proto object).
"""

from __future__ import annotations

import heapq
import logging
import warnings

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import ModelError
from .graph import subgraph_inputs
from .inline import inline_functions
from .warn import user_stacklevel

__all__ = ["normalize"]

log = logging.getLogger(__name__)


def normalize(proto: onnx.ModelProto, name: str = "model") -> onnx.ModelProto:
    """``proto`` in normal form (see the module's doc); ``proto`` itself when already so."""
    proto = inline_functions(proto, name=name)
    proto = _densified(proto, name)
    proto = _sorted(proto, name)
    proto = _without_type_reads(proto)
    return _without_stale_shapes(proto, name)


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


# ------------------------------------------------------------------------ sparse initializers
def dense_array(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array of a sparse tensor (indices as ONNX stores them: (NNZ,) linear or
    (NNZ, rank) coordinates)."""
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    shape = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(shape, dtype=values.dtype)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(tuple(indices.T), shape) if indices.size else \
            np.zeros(0, np.int64)
    dense.reshape(-1)[indices.reshape(-1)] = values.reshape(-1)
    return dense


def _densified(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    sparse_constants = [i for i, node in enumerate(proto.graph.node) if node.op_type == "Constant"
                        and any(a.name == "sparse_value" for a in node.attribute)]
    if not proto.graph.sparse_initializer and not sparse_constants:
        return proto
    out = _copy(proto)
    for i in sparse_constants:
        node = out.graph.node[i]
        sparse = next(a.sparse_tensor for a in node.attribute if a.name == "sparse_value")
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute(
            "value", numpy_helper.from_array(dense_array(sparse))))
    for sparse in out.graph.sparse_initializer:
        try:
            array = dense_array(sparse)
        except (ValueError, IndexError) as exc:
            raise ModelError(f"model {name!r}: sparse initializer {sparse.values.name!r} cannot "
                             f"be read ({exc})") from exc
        out.graph.initializer.append(numpy_helper.from_array(array, sparse.values.name))
    count = len(out.graph.sparse_initializer)
    del out.graph.sparse_initializer[:]
    log.info("model %r: %d sparse initializer(s) stored dense", name, count)
    return out


# ------------------------------------------------------------------------ topological order
def _sorted(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    graph = proto.graph
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    needs = []
    for node in nodes:
        inputs = {t for t in node.input if t} | subgraph_inputs(node)
        needs.append({producer[t] for t in inputs if t in producer})
    if all(all(j < i for j in need) for i, need in enumerate(needs)):
        return proto
    readers: list[list[int]] = [[] for _ in nodes]
    waiting = [len(need) for need in needs]
    for i, need in enumerate(needs):
        if i in need:
            raise ModelError(f"model {name!r}: node {_label(nodes[i], i)} reads its own output")
        for j in need:
            readers[j].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for r in readers[i]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) < len(nodes):
        stuck = min(set(range(len(nodes))) - set(order))
        raise ModelError(f"model {name!r}: its nodes form a cycle through node "
                         f"{_label(nodes[stuck], stuck)}; it cannot be put in topological order")
    out = _copy(proto)
    del out.graph.node[:]
    out.graph.node.extend(nodes[i] for i in order)
    warnings.warn(f"model {name!r}: its nodes were not in topological order (ONNX requires "
                  "it); they were sorted", UserWarning, stacklevel=user_stacklevel())
    return out


def _label(node: onnx.NodeProto, position: int) -> str:
    return f"{node.name!r} ({node.op_type})" if node.name else f"#{position} ({node.op_type})"


# ------------------------------------------------------------------------ stale value_info
def _conflict(stored: onnx.TypeProto, inferred: onnx.TypeProto) -> bool:
    """Whether two tensor types disagree where both are known (element type, rank, a dim)."""
    if not (stored.HasField("tensor_type") and inferred.HasField("tensor_type")):
        return False
    a, b = stored.tensor_type, inferred.tensor_type
    if a.elem_type and b.elem_type and a.elem_type != b.elem_type:
        return True
    if not (a.HasField("shape") and b.HasField("shape")):
        return False
    if len(a.shape.dim) != len(b.shape.dim):
        return True
    return any(x.HasField("dim_value") and y.HasField("dim_value") and x.dim_value != y.dim_value
               for x, y in zip(a.shape.dim, b.shape.dim, strict=True))


def _without_type_reads(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Each ``CastLike`` whose second input (which gives only the type) is computed, as a
    ``Cast`` to that input's element type, where shape inference knows it."""
    constant = {t.name for t in proto.graph.initializer} | {
        out for node in proto.graph.node if node.op_type == "Constant" for out in node.output}
    casts = [i for i, node in enumerate(proto.graph.node)
             if node.op_type == "CastLike" and node.domain in ("", "ai.onnx")
             and len(node.input) == 2 and node.input[1] and node.input[1] not in constant]
    if not casts:
        return proto
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # inference is best effort: without the types the nodes stay as they are
        return proto
    types = {v.name: v.type.tensor_type.elem_type for v in (
        *inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)}
    out: onnx.ModelProto | None = None
    for i in casts:
        node = proto.graph.node[i]
        elem = types.get(node.input[1], 0)
        if not elem:
            continue
        out = out if out is not None else _copy(proto)
        cast = onnx.helper.make_node("Cast", [node.input[0]], list(node.output), name=node.name,
                                     to=elem)
        cast.attribute.extend(node.attribute)  # saturate, round_mode: Cast has them too
        out.graph.node[i].CopyFrom(cast)
    return proto if out is None else out


def _without_stale_shapes(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    if not proto.graph.value_info:
        return proto
    bare = _copy(proto)
    del bare.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(bare, data_prop=True)
    except Exception:  # inference is best effort; without it nothing can be judged stale
        return proto
    fresh = {v.name: v for v in inferred.graph.value_info}
    stale = [i for i, v in enumerate(proto.graph.value_info)
             if v.name in fresh and _conflict(v.type, fresh[v.name].type)]
    if not stale:
        return proto
    out = _copy(proto)
    for i in stale:
        out.graph.value_info[i].CopyFrom(fresh[out.graph.value_info[i].name])
    names = [proto.graph.value_info[i].name for i in stale]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    warnings.warn(f"model {name!r}: {len(names)} stored intermediate shape(s) contradict shape "
                  f"inference and were replaced by the inferred ones: {shown}", UserWarning,
                  stacklevel=user_stacklevel())
    return out
