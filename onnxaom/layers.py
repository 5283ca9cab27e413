"""Finding a model's analysable layers and the tensor where each kernel's activation is read.

A *layer* is a 2-D Conv node, a Gemm node, or a MatMul node whose second input is a constant
2-D weight (fully-connected neurons, H = W = 1). Layers are listed in the graph's node order,
which ONNX requires to be topological.

Probe points (``probe=``):

* ``"activation"`` (default): the layer output after the per-channel chain that follows it:
  BatchNormalization, element-wise activations that are positive exactly where their input is
  (Relu, LeakyRelu, PRelu, Clip with a lower bound <= 0, Elu, Selu, Celu, Gelu, HardSwish),
  Add/Sub/Mul/Div with a per-channel or scalar constant, Identity and Dropout. The chain stops
  before pooling, before any merge with another tensor (Add of two tensors, Concat), wherever a
  tensor has several readers or is a graph output, and before an activation whose output is
  positive everywhere (Softplus, Sigmoid, Exp, a Clip with a positive lower bound): after one,
  every position would count as "on", so the pre-activation is read instead.
* ``"conv"``: the raw layer output.
* ``"pool"``: the output of the MaxPool/AveragePool/LpPool that reads the activation, where
  there is one; layers without such a pool are read at their activation (``Layer.probe_kind``
  says which).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import ModelError
from .graph import GraphIndex

__all__ = ["PROBES", "Layer", "clip_floor", "find_layers", "layer_nodes"]

PROBES = ("activation", "conv", "pool")
#: Activations with f(x) > 0 exactly where x > 0 (Clip: when its lower bound is <= 0).
ELEMENTWISE_ACTIVATIONS = frozenset(
    {"Relu", "LeakyRelu", "PRelu", "Clip", "Elu", "Selu", "Celu", "Gelu", "HardSwish"}
)
PASS_THROUGH = frozenset({"Identity", "Dropout"})
CONSTANT_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div"})
POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})


@dataclass(frozen=True)
class Layer:
    """One analysable layer.

    Attributes
    ----------
    name: unique layer name: the node's name, or ``<op>_<i>`` when the node has none (i counts
        the unnamed layer nodes of that op), with ``_<n>`` appended if a name repeats.
    op: ``"Conv"``, ``"Gemm"`` or ``"MatMul"``.
    node: the node's name in the graph (may be empty).
    node_index: position of the node in ``graph.node``.
    kernels: K, the number of kernels (output channels or neurons).
    output: the layer node's output tensor.
    probe: the tensor whose values are counted.
    probe_kind: ``"activation"``, ``"conv"`` or ``"pool"``: where the probe really is.
    chain: op types between the layer output and the probe, in order.
    shape: (K, H, W) of one sample's activation; H or W is None when only known at run time.
    """

    name: str
    op: str
    node: str
    node_index: int
    kernels: int
    output: str
    probe: str
    probe_kind: str
    chain: tuple[str, ...]
    shape: tuple[int, int | None, int | None]

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "op": self.op,
            "node": self.node,
            "kernels": self.kernels,
            "probe": self.probe,
            "probe_kind": self.probe_kind,
            "chain": list(self.chain),
            "shape": list(self.shape),
        }


def layer_nodes(model: onnx.ModelProto) -> list[tuple[int, str, int]]:
    """(node index, unique layer name, kernels) for every analysable layer node, in order.

    This is the single naming rule of onnxaom: surgery, stats and reports all use it.
    """
    index = GraphIndex(model)
    found: list[tuple[int, str, int]] = []
    per_op: Counter[str] = Counter()
    used: set[str] = set()
    for i, node in enumerate(model.graph.node):
        kernels = _kernels(index, node)
        if kernels is None:
            continue
        name = node.name
        if not name:  # counted among unnamed nodes only: a named insertion shifts no name
            name = f"{node.op_type}_{per_op[node.op_type]}"
            per_op[node.op_type] += 1
        unique, n = name, 1
        while unique in used:
            unique, n = f"{name}_{n}", n + 1
        used.add(unique)
        found.append((i, unique, kernels))
    return found


def find_layers(model: onnx.ModelProto, probe: str = "activation") -> list[Layer]:
    """Every analysable layer of ``model`` with its probe point, in topological order."""
    if probe not in PROBES:
        raise ModelError(f"unknown probe {probe!r}; choose one of {', '.join(PROBES)}")
    index = GraphIndex(model)
    layers = []
    for i, name, kernels in layer_nodes(model):
        node = model.graph.node[i]
        output = node.output[0]
        spatial = node.op_type == "Conv"
        chain: tuple[str, ...]
        if probe == "conv":
            tensor, chain, kind = output, (), "conv"
        else:
            tensor, chain = _follow_channel_chain(index, output, kernels, spatial)
            kind = "activation"
            if probe == "pool":
                reader = index.single_consumer(tensor)
                if reader is not None and index.graph.node[reader].op_type in POOLS:
                    pool = index.graph.node[reader]
                    tensor, chain, kind = pool.output[0], (*chain, pool.op_type), "pool"
        layers.append(
            Layer(
                name=name,
                op=node.op_type,
                node=node.name,
                node_index=i,
                kernels=kernels,
                output=output,
                probe=tensor,
                probe_kind=kind,
                chain=chain,
                shape=_probe_shape(index, tensor, kernels, spatial),
            )
        )
    return layers


def _kernels(index: GraphIndex, node: onnx.NodeProto) -> int | None:
    """K for a layer node, None if the node is not an analysable layer."""
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    weight = index.constant_shape(node.input[1]) or index.shapes.get(node.input[1])
    if node.op_type == "Conv":
        if weight is None or len(weight) != 4 or weight[0] is None:
            return None  # only 2-D convolutions are analysed
        return int(weight[0])
    if node.op_type == "Gemm":
        if weight is None or len(weight) != 2:
            return None
        k = weight[0] if index.attribute(node, "transB", 0) else weight[1]
        return None if k is None else int(k)
    if node.op_type == "MatMul":
        if index.constant_shape(node.input[1]) is None or weight is None or len(weight) != 2:
            return None
        a = index.shapes.get(node.input[0])
        if a is not None and len(a) != 2:
            return None  # batched matmuls (attention etc.) are not neuron layers
        return None if weight[1] is None else int(weight[1])
    return None


def _is_per_channel_constant(index: GraphIndex, name: str, kernels: int, spatial: bool) -> bool:
    found = index.constant_shape(name)
    if found is None or any(d is None for d in found):
        return False
    shape = tuple(int(d) for d in found if d is not None)
    size = 1
    for d in shape:
        size *= int(d)
    if size == 1:
        return True
    if size != kernels:
        return False
    # the K entries must sit on the channel axis once broadcast against (N, K, H, W) / (N, K)
    rank = 4 if spatial else 2
    if len(shape) > rank:
        return False
    padded = (1,) * (rank - len(shape)) + shape
    return padded[1] == kernels


def _follow_channel_chain(
    index: GraphIndex, tensor: str, kernels: int, spatial: bool
) -> tuple[str, tuple[str, ...]]:
    chain: list[str] = []
    while True:
        reader = index.single_consumer(tensor)
        if reader is None:
            break
        node = index.graph.node[reader]
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            break
        ok = False
        if op in ELEMENTWISE_ACTIVATIONS or op in PASS_THROUGH:
            others = [n for n in node.input[1:] if n]
            ok = node.input[0] == tensor and all(
                _is_per_channel_constant(index, n, kernels, spatial) for n in others
            ) and not (op == "Clip" and (clip_floor(index, node) or 0.0) > 0)  # None: computed
        elif op == "BatchNormalization":
            ok = node.input[0] == tensor and spatial
        elif op in CONSTANT_ARITHMETIC and len(node.input) == 2:
            other = node.input[1] if node.input[0] == tensor else node.input[0]
            ok = other != tensor and _is_per_channel_constant(index, other, kernels, spatial)
        if not ok:
            break
        chain.append(op)
        tensor = node.output[0]
    return tensor, tuple(chain)


def clip_floor(index: GraphIndex, node: onnx.NodeProto) -> float | None:
    """A Clip's lower bound: its constant input 1 (opset 11 on) or its ``min`` attribute
    (before); ``-inf`` when it has none, None when it is computed."""
    if len(node.input) > 1 and node.input[1]:
        value = index.constant(node.input[1])
        return None if value is None else float(value.min())
    return float(index.attribute(node, "min", -np.inf))  # type: ignore[arg-type]


def _probe_shape(
    index: GraphIndex, tensor: str, kernels: int, spatial: bool
) -> tuple[int, int | None, int | None]:
    if not spatial:
        return (kernels, 1, 1)
    shape = index.shapes.get(tensor)
    if shape is None or len(shape) != 4:
        return (kernels, None, None)
    return (kernels, shape[2], shape[3])
