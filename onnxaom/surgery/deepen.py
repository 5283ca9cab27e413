"""Deepening a model (task 3): Net2DeeperNet, an identity layer + ReLU after a ReLU layer.

The new layer reads the probe tensor of ``after`` (its activation), which must be a ``Relu``
output (or a ``Clip`` with a lower bound of 0 or more, such as ReLU6), and everything that read
that tensor reads the new ReLU's output instead. With the identity init,
``relu(conv_identity(x)) == x`` for ``x >= 0``, so the function is unchanged. Only such places
are allowed: after a layer whose per-channel chain ends in a ReLU (e.g. Conv → BN → ReLU,
Gemm → ReLU, Conv → BN → ReLU6); a layer followed directly by pooling, by another activation
or by a merge has no such place.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..edits import InsertLayer
from ..errors import EditError, LayerNotFoundError
from ..graph import GraphIndex
from ..layers import clip_floor, find_layers
from .gsio import NameRegistry, constant_value
from .ops import integer_storage

__all__ = ["insert_step"]


def _nonnegative(proto: onnx.ModelProto, probe: str, chain: tuple[str, ...]) -> bool:
    """Whether a layer's activation ``probe`` is never negative: its chain ends in a Relu, or
    in a Clip whose lower bound is >= 0."""
    if not chain or chain[-1] not in ("Relu", "Clip"):
        return False
    if chain[-1] == "Relu":
        return True
    index = GraphIndex(proto)
    floor = clip_floor(index, proto.graph.node[index.producer[probe]])
    return floor is not None and floor >= 0


def insert_step(graph: gs.Graph, proto: onnx.ModelProto, edit: InsertLayer) -> dict[str, object]:
    """Insert the layer of ``edit`` into ``graph`` in place; returns the new layer's name."""
    layers = find_layers(proto)
    by_name = {layer.name: layer for layer in layers}
    if edit.after not in by_name:
        known = ", ".join(by_name) or "(none)"
        raise LayerNotFoundError(f"the model has no layer {edit.after!r}; its layers: {known}")
    layer = by_name[edit.after]
    if layer.probe_perm:
        chain = " → ".join((layer.op, *layer.chain))
        raise EditError(
            f"InsertLayer(after={edit.after!r}) is not supported where the layer's activation "
            f"is transposed from (N, K, H, W) on its way ({chain}): the new conv would read "
            f"channels last")
    if not _nonnegative(proto, layer.probe, layer.chain):
        chain = " → ".join((layer.op, *layer.chain))
        raise EditError(
            f"InsertLayer(after={edit.after!r}) needs a layer whose activation is a ReLU "
            f"(or ReLU6) output, so that an identity layer + ReLU leaves it unchanged; layer "
            f"{edit.after!r} has {chain}. Choose a layer followed by a ReLU"
        )
    node = graph.nodes[layer.node_index]
    stored = integer_storage(node.inputs[1])
    if stored is not None:
        raise EditError(f"layer {edit.after!r} has quantized weights ({stored}): the surgery "
                        f"edits float models (edit the float model, then quantize it again)")
    weight = constant_value(node.inputs[1])
    if weight is None:
        raise EditError(f"layer {edit.after!r} has weights that are not constant (computed at "
                        f"run time)")
    tensors = graph.tensors()
    probe = tensors[layer.probe]
    k = layer.kernels
    names = NameRegistry(graph)
    if edit.name is not None:
        taken = {n.name for n in graph.nodes} | set(by_name)
        if edit.name in taken:
            raise EditError(f"InsertLayer.name {edit.name!r} is already used by a node or "
                            f"layer; choose another name")
        name = names.take(edit.name)  # as given: a tensor of that name is no clash
    else:
        name = names.fresh(f"{edit.after}_deep")
    rng = np.random.default_rng(edit.seed)
    dtype = weight.dtype
    if layer.op == "Conv":
        size, pad = edit.kernel_size, edit.kernel_size // 2
        if edit.init == "identity":
            w = np.zeros((k, k, size, size), dtype=dtype)
            w[np.arange(k), np.arange(k), pad, pad] = 1
        else:
            w = rng.normal(0.0, np.sqrt(2.0 / (k * size * size)), (k, k, size, size))
        attrs = {"kernel_shape": [size, size], "pads": [pad] * 4, "strides": [1, 1],
                 "dilations": [1, 1], "group": 1}
        op = "Conv"
    else:
        w = np.eye(k, dtype=dtype) if edit.init == "identity" \
            else rng.normal(0.0, np.sqrt(2.0 / k), (k, k))
        attrs = {"transB": 1}
        op = "Gemm"
    w_const = gs.Constant(names.fresh(f"{name}.weight"), np.ascontiguousarray(w, dtype=dtype))
    b_const = gs.Constant(names.fresh(f"{name}.bias"), np.zeros(k, dtype=dtype))
    mid = gs.Variable(names.fresh(f"{name}_output_0"), dtype=probe.dtype)
    relu_name = names.fresh(f"{name}_relu")
    out = gs.Variable(names.fresh(f"{relu_name}_output_0"), dtype=probe.dtype)
    readers = list(probe.outputs)
    graph_output = [i for i, t in enumerate(graph.outputs) if t.name == probe.name]
    new_layer = gs.Node(op, name, attrs=attrs, inputs=[probe, w_const, b_const], outputs=[mid])
    relu = gs.Node("Relu", relu_name, inputs=[mid], outputs=[out])
    for reader in readers:
        for i, t in enumerate(reader.inputs):
            if t is probe:
                reader.inputs[i] = out
    if graph_output:  # keep the output's name: the old tensor gets a new one
        old_name = probe.name
        probe.name = names.fresh(f"{old_name}_before_{name}")
        out.name = old_name
        out.shape = graph.outputs[graph_output[0]].shape
        for i in graph_output:
            graph.outputs[i] = out
    producer = probe.inputs[0] if probe.inputs else None
    at = next((i + 1 for i, n in enumerate(graph.nodes) if n is producer), len(graph.nodes))
    graph.nodes[at:at] = [new_layer, relu]  # right after the activation: layer order follows
    return {"layer": name, "after": edit.after, "kernels": k}
