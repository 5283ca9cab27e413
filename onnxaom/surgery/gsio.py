"""Moving a model between ``onnx`` and onnx-graphsurgeon, and reading/writing constants.

Surgery edits a :class:`gs.Graph`; this module is the only one that converts. Exporting keeps
every model-level field of the proto it started from (IR version, opset imports, producer,
doc string, metadata, local functions) and only replaces the graph; the graph's own name, doc
string and metadata are kept too. Node doc strings and metadata, which onnx-graphsurgeon drops,
are put back by :func:`restore_node_metadata`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import arithmetic, ranged, squeezed

__all__ = [
    "GRAPH_FIELDS_KEPT",
    "NameRegistry",
    "constant_value",
    "export_model",
    "fold_node",
    "import_graph",
    "restore_node_metadata",
    "restore_value_info",
]

#: Graph fields that onnx-graphsurgeon does not round-trip and that exporting copies back.
GRAPH_FIELDS_KEPT = ("name", "doc_string", "metadata_props")


def import_graph(proto: onnx.ModelProto) -> gs.Graph:
    """The graph of ``proto`` (not modified; weights are shared until a constant is replaced),
    with the element types shape inference gives its tensors (``CastLike`` folding needs its
    reference's type; the exported graph drops intermediate ``value_info`` again)."""
    if not proto.graph.value_info:
        with contextlib.suppress(Exception):  # best effort; types then stay unknown
            proto = onnx.shape_inference.infer_shapes(proto)
    return gs.import_onnx(proto)


def export_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """``graph`` cleaned up, sorted and exported, inside a copy of ``template``'s model fields.

    Nodes keep the order they have in ``graph`` when it is topological (gs's own sort, run
    first as the check, would regroup independent branches).

    Intermediate ``value_info`` is dropped (shapes may have changed); see
    :func:`restore_value_info`.
    """
    before = list(graph.nodes)
    graph.cleanup().toposort()
    # gs sorts by depth, which reorders independent branches (and so the layers of a model with
    # unnamed nodes); keep the edited order where it is still topological.
    remaining = {id(node) for node in graph.nodes}
    stable = [node for node in before if id(node) in remaining]
    if len(stable) == len(graph.nodes) and _is_topological(stable):
        graph.nodes = stable
    exported = gs.export_onnx(graph, do_type_check=False)
    out = onnx.ModelProto()
    for field, value in template.ListFields():
        if field.name == "graph":
            continue
        if hasattr(value, "extend"):  # repeated (FieldDescriptor.label is gone in protobuf 7)
            getattr(out, field.name).extend(value)
        elif field.message_type is not None:
            getattr(out, field.name).CopyFrom(value)
        else:
            setattr(out, field.name, value)
    out.graph.CopyFrom(exported.graph)
    del out.graph.value_info[:]
    out.graph.name = template.graph.name
    out.graph.doc_string = template.graph.doc_string
    del out.graph.metadata_props[:]
    out.graph.metadata_props.extend(template.graph.metadata_props)
    _list_initializers_as_inputs(out.graph, template)
    return out


def _list_initializers_as_inputs(graph: onnx.GraphProto, template: onnx.ModelProto) -> None:
    """List initializers among ``graph``'s inputs as ``template`` did, at their new shapes
    and in the template's order: every one (new ones too) below IR version 4, which requires
    it, or where the template listed every one (``keep_initializers_as_inputs`` exports);
    otherwise those the template listed. onnx-graphsurgeon exports initializers as
    initializers only."""
    initializers = {t.name: t for t in graph.initializer}
    before = {t.name for t in template.graph.initializer}
    listed_before = {i.name for i in template.graph.input} & before
    every = template.ir_version < 4 or (bool(before) and listed_before == before)
    if not every and not listed_before:
        return
    inputs = {i.name: _copied(i) for i in graph.input}
    order = [i.name for i in template.graph.input]
    order += [name for name in inputs if name not in order]
    if every:
        order += [name for name in initializers if name not in order]
    wanted = []
    for name in order:
        if name in initializers and (every or name in listed_before):
            tensor = initializers[name]
            wanted.append(onnx.helper.make_tensor_value_info(name, tensor.data_type,
                                                             list(tensor.dims)))
        elif name in inputs:
            wanted.append(inputs[name])
    del graph.input[:]
    graph.input.extend(wanted)


def _copied(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(value)
    return out


def _is_topological(nodes: list[gs.Node]) -> bool:
    produced = {t.name for node in nodes for t in node.outputs if t.name}
    seen: set[str] = set()
    for node in nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Variable) and tensor.name in produced \
                    and tensor.name not in seen:
                return False
        seen.update(t.name for t in node.outputs)
    return True


def restore_node_metadata(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Copy node doc strings and metadata from ``original`` to the nodes of ``model`` that
    have the same name (or, for unnamed nodes, the same op and first output). In place."""
    by_key: dict[tuple[str, str], onnx.NodeProto] = {}
    for node in original.graph.node:
        if node.doc_string or len(node.metadata_props):
            by_key.setdefault(_node_key(node), node)
    if not by_key:
        return
    for node in model.graph.node:
        source = by_key.get(_node_key(node))
        if source is None or source.op_type != node.op_type:
            continue
        if not node.doc_string:
            node.doc_string = source.doc_string
        if not len(node.metadata_props):
            node.metadata_props.extend(source.metadata_props)


def _node_key(node: onnx.NodeProto) -> tuple[str, str]:
    if node.name:
        return ("name", node.name)
    return ("output", node.output[0] if len(node.output) else "")


def restore_value_info(model: onnx.ModelProto, names: Iterable[str]) -> None:
    """Give ``model`` value_info for exactly the tensors in ``names`` that still exist, with
    shapes from ONNX shape inference (initializers: from their dims). In place.

    Exporters differ on whether they write value_info; this keeps a model's choice.
    """
    wanted = list(dict.fromkeys(names))
    del model.graph.value_info[:]
    if not wanted:
        return
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    found = {v.name: v for v in inferred.graph.value_info}
    io = {v.name for v in [*model.graph.input, *model.graph.output]}
    initializers = {t.name: t for t in model.graph.initializer}
    for name in wanted:
        if name in io:
            continue
        if name in found:
            value = onnx.ValueInfoProto()
            value.CopyFrom(found[name])
            _unlink_invented_dims(value.type)
            model.graph.value_info.append(value)
        elif name in initializers:
            tensor = initializers[name]
            model.graph.value_info.append(
                onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims))
            )


def _unlink_invented_dims(type_proto: onnx.TypeProto) -> None:
    """Clear the dim names shape inference invents (``unk__N``) in ``type_proto``, in place: it
    gives one name to dims it merely could not tell (the two parts of a SplitToSequence read
    by SequenceAt), and ONNX Runtime then requires them equal. Unnamed, they are unknown."""
    tensor = None
    if type_proto.HasField("tensor_type"):
        tensor = type_proto.tensor_type
    elif type_proto.HasField("sequence_type"):
        _unlink_invented_dims(type_proto.sequence_type.elem_type)
        return
    if tensor is None or not tensor.HasField("shape"):
        return
    for dim in tensor.shape.dim:
        if dim.HasField("dim_param") and dim.dim_param.startswith("unk__"):
            dim.ClearField("dim_param")


#: The size of a tensor's dims, None where unknown (the batch), for :func:`constant_value`.
Sizes = Callable[[gs.Tensor], "Sequence[int | None] | None"]


def constant_value(tensor: gs.Tensor, depth: int = 16, sizes: Sizes | None = None,
                   unknown: int = 1) -> np.ndarray | None:
    """The value of ``tensor`` if it is constant: an initializer, a ``Constant`` node's output,
    or a few shape and type ops of constants that exports leave unfolded (``Identity``, which
    exporters share equal weights with; ``Cast``, ``CastLike``, whose second input only gives
    the type; ``Shape`` of a constant, ``ConstantOfShape``, ``Expand``, ``Unsqueeze``,
    ``Squeeze``, ``Reshape``, ``Slice``, ``Gather``, ``Transpose``, ``Concat``, ``Range``,
    ``Add``/``Sub``/``Mul``/``Div`` of two constants, and float32/64 ``Sqrt``/``Neg``/
    ``Reciprocal``/``Abs``); else None. ``depth`` bounds the ops followed. With ``sizes``, the
    ``Shape`` of a computed tensor is taken from it too, its unknown dims as ``unknown``:
    callers fold with several values to see that the result does not depend on them (the
    legacy exporter's ``x.chunk(2, 1)`` computes its slice bounds from ``Shape(x)``)."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if depth <= 0 or len(tensor.inputs) != 1:
        return None
    producer = tensor.inputs[0]
    if producer.domain not in (None, "", "ai.onnx") or len(producer.outputs) != 1:
        return None
    if producer.op == "Constant":
        return _constant_node_value(producer)
    if producer.op == "Shape" and sizes is not None and producer.inputs \
            and not isinstance(producer.inputs[0], gs.Constant):
        dims = sizes(producer.inputs[0])
        if dims is None:
            return None
        full = np.asarray([unknown if d is None else int(d) for d in dims], dtype=np.int64)
        return full[int(producer.attrs.get("start", 0)):producer.attrs.get("end")]
    args = [constant_value(t, depth - 1, sizes, unknown) if t.name else None
            for t in producer.inputs]
    try:
        return fold_node(producer, args)
    except (ValueError, TypeError, IndexError):  # malformed arguments: leave it computed
        return None


_UNARY = {"Sqrt": np.sqrt, "Neg": np.negative, "Reciprocal": np.reciprocal, "Abs": np.abs}


def fold_node(node: gs.Node, args: list[np.ndarray | None]) -> np.ndarray | None:
    """``node`` evaluated on constant ``args`` (None: not constant), for the ops
    :func:`constant_value` follows; None when it is not one of them or an input is computed."""
    op, first = node.op, args[0] if args else None
    if op == "CastLike":  # the second input only gives the type
        ref = node.inputs[1] if len(node.inputs) > 1 else None
        dtype = getattr(ref, "dtype", None)  # None when the graph does not say: left computed
        return None if first is None or dtype is None else first.astype(dtype)
    if op == "ConstantOfShape":
        value = node.attrs.get("value")
        fill = np.asarray(value.values).ravel() if isinstance(value, gs.Constant) \
            else np.zeros(1, np.float32)
        return None if first is None else np.full([int(d) for d in np.ravel(first)], fill[0],
                                                  dtype=fill.dtype)
    if first is None or (op != "Concat" and any(a is None for a in args[1:2])):
        return None
    if op == "Identity":
        return first
    if op == "Shape":  # of a constant (an exporter's zero bias shaped like the weight)
        start, end = node.attrs.get("start", 0), node.attrs.get("end")
        return np.asarray(first.shape[start:end], dtype=np.int64)
    if op == "Expand" and len(args) > 1:
        shape = [int(d) for d in np.ravel(np.asarray(args[1]))]
        return first * np.ones(shape, dtype=first.dtype)  # broadcasting both ways, as ONNX
    if op == "Cast":
        return first.astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    if op in _UNARY and first.dtype in (np.float32, np.float64):
        # IEEE-exact as in ORT (onnxoptimizer's BN fusion: W * gamma / Sqrt(var + eps)); not
        # float16, which ORT's CPU provider computes in float32 without rounding back
        with np.errstate(all="ignore"):
            return np.asarray(_UNARY[op](first)).astype(first.dtype)
    if op in ("Unsqueeze", "Squeeze"):
        return squeezed(op, first, args[1] if len(args) > 1 else node.attrs.get("axes"))
    if op == "Reshape" and len(args) > 1:
        shape = [int(d) for d in np.ravel(np.asarray(args[1]))]
        shape = [first.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return first.reshape(shape)
    if op == "Gather" and len(args) > 1:
        indices = np.asarray(args[1]).astype(np.int64)
        return np.take(first, indices, axis=int(node.attrs.get("axis", 0)))
    if op in ("Add", "Sub", "Mul", "Div") and len(args) > 1:
        return arithmetic(op, first, args[1])
    if op == "Transpose":
        perm = node.attrs.get("perm")
        return np.transpose(first, None if perm is None else [int(p) for p in perm])
    if op == "Slice":
        return _slice(node, first, args)
    if op == "Range":
        return ranged(args)
    if op == "Concat" and all(a is not None for a in args):
        return np.concatenate([np.asarray(a) for a in args], axis=int(node.attrs.get("axis", 0)))
    return None


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    for key, value in node.attrs.items():
        if key == "value" and isinstance(value, gs.Constant):
            return np.asarray(value.values)
        if key in ("value_float", "value_int"):
            return np.asarray(value, dtype=np.float32 if key == "value_float" else np.int64)
        if key in ("value_floats", "value_ints"):
            return np.asarray(list(value), dtype=np.float32 if key == "value_floats" else np.int64)
    return None


def _slice(node: gs.Node, data: np.ndarray, args: list[np.ndarray | None]) -> np.ndarray | None:
    """ONNX Slice of a constant: bounds as attributes (opset < 10) or constant inputs."""
    if "starts" in node.attrs:
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes, steps = node.attrs.get("axes"), None
    else:
        if len(args) < 3 or args[1] is None or args[2] is None:
            return None
        if any(len(args) > i and node.inputs[i].name and args[i] is None for i in (3, 4)):
            return None
        starts, ends = args[1], args[2]
        axes = args[3] if len(args) > 3 and node.inputs[3].name else None
        steps = args[4] if len(args) > 4 and node.inputs[4].name else None
    starts = [int(v) for v in np.ravel(starts)]
    ends = [int(v) for v in np.ravel(ends)]
    axes_list = list(range(len(starts))) if axes is None else [int(a) for a in np.ravel(axes)]
    steps_list = [1] * len(starts) if steps is None else [int(v) for v in np.ravel(steps)]
    index: list[slice] = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes_list, steps_list, strict=True):
        dim = data.shape[axis % data.ndim]
        start, end = (v + dim if v < 0 else v for v in (start, end))
        if step > 0:  # ONNX's clamping; numpy's differs for negative steps
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            index[axis % data.ndim] = slice(start, end, step)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            index[axis % data.ndim] = slice(start, None if end < 0 else end, step)
    return data[tuple(index)]


class NameRegistry:
    """Fresh node and tensor names for one graph."""

    def __init__(self, graph: gs.Graph) -> None:
        self._used: set[str] = set(graph.tensors().keys())
        self._used.update(node.name for node in graph.nodes if node.name)

    def take(self, name: str) -> str:
        """``name`` itself, for a node, taken from now on. A node's names are apart from its
        tensors' in ONNX, so a tensor of that name does not stand in the way; the caller
        checks the node names."""
        self._used.add(name)
        return name

    def fresh(self, base: str) -> str:
        name, n = base, 1
        while name in self._used:
            name, n = f"{base}_{n}", n + 1
        self._used.add(name)
        return name
