"""Finding a model's analysable layers and the tensor where each kernel's activation is read.

A *layer* is a 2-D Conv node, a Gemm node, or a MatMul node whose second input is a constant
2-D weight (fully-connected neurons, H = W = 1). Layers are listed in the graph's node order,
which ONNX requires to be topological.

Probe points (``probe=``):

* ``"activation"`` (default): the layer output after the per-channel chain that follows it, up
  to and including its first activation: BatchNormalization, InstanceNormalization,
  Add/Sub/Mul/Div with a per-channel or scalar constant, Identity and Dropout, then an
  element-wise activation that is positive exactly where its input is (Relu, LeakyRelu and
  PRelu with slopes >= 0, Clip with a lower bound <= 0 < its upper bound, Elu, Selu, Celu,
  Gelu, HardSwish). Per-channel ops *after* the activation (a BatchNormalization after the
  ReLU) are not read: they would shift a kernel that is off into "on". The chain stops before
  pooling, before any merge with another tensor (Add of two tensors, Concat), wherever a
  tensor has several readers or is a graph output, and before an activation whose sign is not
  its input's: one positive everywhere (Softplus, Sigmoid, Exp, a Clip with a positive lower
  bound), one that flips it (LeakyRelu/PRelu with a negative slope, Elu with a negative alpha)
  or one never positive (a Clip with an upper bound <= 0). After those "> 0" says nothing about
  whether the kernel found its feature, so the pre-activation is read instead.
  A normalisation across channels right after the layer (GroupNormalization,
  LayerNormalization over the channel axis and after, or the Reshape + InstanceNormalization
  + Reshape form legacy exporters write for a group norm) is read through, with the
  per-channel chain after it up to its activation (Conv -> GroupNorm -> affine -> ReLU is read
  at the ReLU): channel k there is still kernel k's, and it is what the next layer sees.
  :func:`channel_mixing_reader` names that norm. It is not part of the per-channel chain the
  surgery removes a channel with (:attr:`Layer.channel_end` stays before it).
* ``"conv"``: the raw layer output, after its bias: where a layer's bias is a separate
  ``Add`` of one constant per kernel (:func:`bias_add`: MatMul + Add, a Conv without bias
  input + Add), the probe is that Add's output, so the same network reads the same in
  either form.
* ``"pool"``: the output of the MaxPool/AveragePool/LpPool that reads the activation, where
  there is one; layers without such a pool are read at their activation (``Layer.probe_kind``
  says which).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import ModelError
from .graph import GraphIndex, Shape

__all__ = ["PROBES", "Layer", "chain_layout", "channel_mixing_reader", "clip_ceiling",
           "clip_floor", "find_layers", "layer_nodes", "nchw_shape"]

log = logging.getLogger(__name__)

PROBES = ("activation", "conv", "pool")
#: Activations with f(x) > 0 exactly where x > 0 (Clip: when its lower bound is <= 0).
ELEMENTWISE_ACTIVATIONS = frozenset(
    {"Relu", "LeakyRelu", "PRelu", "Clip", "Elu", "Selu", "Celu", "Gelu", "HardSwish"}
)
PASS_THROUGH = frozenset({"Identity", "Dropout"})
#: Per-channel normalisations with per-channel parameters (like BatchNormalization).
PER_CHANNEL_NORMS = frozenset({"BatchNormalization", "InstanceNormalization"})
#: Normalisations whose output for a channel depends on other channels.
CHANNEL_MIXING_NORMS = frozenset({"GroupNormalization", "LayerNormalization"})
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
    channel_end: the end of the whole per-channel chain after the layer (the probe, or later
        when per-channel ops follow the activation, or earlier when the probe reads through a
        normalisation across channels): where a removed kernel's channel is simply gone (the
        surgery's removal point).
    probe_perm: the axes permutation (for ``numpy.transpose``, or an ONNX ``Transpose``)
        that brings the probe tensor to (N, K, H, W) where the chain transposed it (a
        channels-last chain: Conv -> Transpose to NHWC -> per-channel ops -> Relu); empty
        when the probe is in that order.
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
    channel_end: str = ""
    probe_perm: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.channel_end:
            object.__setattr__(self, "channel_end", self.probe)

    def to_dict(self) -> dict[str, object]:
        """JSON-able form: name, op, node, kernels, probe, probe kind, chain and shape."""
        return {
            "name": self.name,
            "op": self.op,
            "node": self.node,
            "kernels": self.kernels,
            "probe": self.probe,
            "probe_kind": self.probe_kind,
            "chain": list(self.chain),
            "shape": list(self.shape),
            **({"probe_perm": list(self.probe_perm)} if self.probe_perm else {}),
        }


def layer_nodes(model: onnx.ModelProto, index: GraphIndex | None = None
                ) -> list[tuple[int, str, int]]:
    """(node index, unique layer name, kernels) for every analysable layer node, in order.

    This is the single naming rule of onnxaom: surgery, stats and reports all use it.
    ``index``: the model's :class:`GraphIndex`, when the caller has one (its shape inference
    is the costly part).
    """
    index = GraphIndex(model) if index is None else index
    found: list[tuple[int, str, int]] = []
    per_op: Counter[str] = Counter()
    real = _unique_node_names(model)
    used: set[str] = set()
    _refuse_foreign_layers(model)
    shapes = _with_computed_weights(model, index)
    for i, node in enumerate(model.graph.node):
        kernels = _kernels(index, node, shapes)
        if kernels is None:
            continue
        if node.name:
            found.append((i, node.name, kernels))
            continue
        # counted among unnamed nodes only: a named insertion shifts no name; a real node's
        # name is never given to another (an unnamed Conv is not "Conv_0" beside a node of
        # that name)
        name = f"{node.op_type}_{per_op[node.op_type]}"
        per_op[node.op_type] += 1
        unique, n = name, 1
        while unique in used or unique in real:
            unique, n = f"{name}_{n}", n + 1
        used.add(unique)
        found.append((i, unique, kernels))
    return found


def _refuse_foreign_layers(model: onnx.ModelProto) -> None:
    """:class:`ModelError` for a layer onnxaom cannot read as one: ONNX Runtime's fused ops
    (a model saved after its extended or full optimisations) and quantized layer ops
    (QLinearConv, ConvInteger, ... of a QOperator or dynamically quantized model). Skipped,
    they would silently leave the model short of layers."""
    for node in model.graph.node:
        name = node.name or node.output[0]
        if node.domain in RUNTIME_DOMAINS and node.op_type in RUNTIME_LAYER_OPS:
            raise ModelError(
                f"node {name!r} is ONNX Runtime's own {node.domain} {node.op_type}: the model "
                f"was saved after ONNX Runtime's extended or full graph optimisations, whose "
                f"fused layers onnxaom cannot read or edit; give it the model as exported (or "
                f"as saved at ORT_ENABLE_BASIC)")
        if node.op_type in QUANTIZED_LAYER_OPS and node.domain in ("", "ai.onnx",
                                                                   *RUNTIME_DOMAINS):
            raise ModelError(
                f"node {name!r} ({node.op_type}) is a quantized layer, which onnxaom cannot "
                f"read or edit as a layer; give it the float model, or a QDQ model (float "
                f"Conv/Gemm/MatMul between QuantizeLinear and DequantizeLinear nodes, as "
                f"onnxruntime.quantization writes with QuantFormat.QDQ)")


def _with_computed_weights(model: onnx.ModelProto, index: GraphIndex) -> dict[str, Shape]:
    """``index.shapes``, filled from one run (:func:`onnxaom.shapes.fill_unknown`) where a
    Conv's weight is computed and shape inference cannot size it (a weight standardisation
    reshaped to a target the legacy exporter writes as ``Identity`` of a constant): without
    it such a conv would silently not be a layer. Unfilled (an input of unknown size): each
    such conv is named in a warning."""
    shapes = index.shapes

    def unsized(node: onnx.NodeProto) -> bool:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            return False
        weight = index.constant_shape(node.input[1]) or shapes.get(node.input[1])
        return (weight is None or len(weight) == 4) and _kernels(index, node, shapes) is None

    if not any(unsized(node) for node in model.graph.node):
        return shapes

    shapes = index.run_shapes
    for node in model.graph.node:
        if unsized(node):
            log.warning("Conv node %r is not analysed: its weight is computed and its kernel "
                        "count cannot be told (shape inference cannot, and the model could "
                        "not be run on an input of its declared size)",
                        node.name or node.output[0])
    return shapes


def _unique_node_names(model: onnx.ModelProto) -> set[str]:
    """The names of ``model``'s nodes; :class:`ModelError` naming a name two nodes share
    (ONNX Runtime refuses such a model, and a layer name must pick one node)."""
    seen: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            continue
        if node.name in seen:
            first = model.graph.node[seen[node.name]]
            raise ModelError(
                f"nodes {seen[node.name]} ({first.op_type}) and {i} ({node.op_type}) are both "
                f"named {node.name!r}: node names must be unique (ONNX Runtime refuses the "
                f"model, and a layer name must pick one node); rename one of them")
        seen[node.name] = i
    return set(seen)


def find_layers(model: onnx.ModelProto, probe: str = "activation",
                index: GraphIndex | None = None) -> list[Layer]:
    """Every analysable layer of ``model`` with its probe point, in topological order.
    ``index``: the model's :class:`GraphIndex`, when the caller has one (its shape inference
    is the costly part)."""
    if probe not in PROBES:
        raise ModelError(f"unknown probe {probe!r}; choose one of {', '.join(PROBES)}")
    index = GraphIndex(model) if index is None else index
    layers = []
    for i, name, kernels in layer_nodes(model, index):
        node = model.graph.node[i]
        output = node.output[0]
        spatial = node.op_type == "Conv"
        chain: tuple[str, ...]
        nodes = _follow_channel_chain(index, output, kernels, spatial)
        channel_end = nodes[-1].output[0] if nodes else output
        if probe == "conv":
            bias = bias_add(index, node, kernels)  # the layer's own bias, written apart
            tensor, chain = (bias.output[0], ("Add",)) if bias is not None else (output, ())
            kind, perm = "conv", tuple[int, ...]()
        else:
            cut = _activation_cut(index, nodes)
            read = nodes[:cut]
            while read and read[-1].op_type == "Transpose":
                read.pop()  # read before a Transpose that nothing per-channel follows
            if cut == len(nodes) and not chain_layout(nodes) and not any(
                    n.op_type in ELEMENTWISE_ACTIVATIONS for n in nodes):
                read += _through_channel_mixing_norm(index, channel_end, kernels, spatial)
            tensor = read[-1].output[0] if read else output
            chain = tuple(n.op_type for n in read)
            perm = chain_layout(read)
            kind = "activation"
            if probe == "pool" and not perm:
                found = _pool_after(index, tensor)
                if found is not None:
                    tensor, kind = found[-1].output[0], "pool"
                    chain = (*chain, *(n.op_type for n in found))
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
                shape=_probe_shape(index, tensor, kernels, spatial, perm),
                channel_end=channel_end,
                probe_perm=perm,
            )
        )
    return layers


def _kernels(index: GraphIndex, node: onnx.NodeProto,
             shapes: Mapping[str, Shape] | None = None) -> int | None:
    """K for a layer node, None if the node is not an analysable layer. ``shapes``: tensor
    shapes (default: shape inference's)."""
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    shapes = index.shapes if shapes is None else shapes
    weight = index.constant_shape(node.input[1]) or shapes.get(node.input[1])
    if node.op_type == "Conv":
        if weight is None or len(weight) != 4:
            return None  # only 2-D convolutions are analysed
        if weight[0] is not None:
            return int(weight[0])
        # a computed weight: K is the output's channel count, or the bias's size
        out = shapes.get(node.output[0])
        bias = index.constant_shape(node.input[2]) if len(node.input) > 2 and node.input[2] \
            else None
        k = out[1] if out is not None and len(out) == 4 else None
        k = k if k is not None else (bias[0] if bias is not None and len(bias) == 1 else None)
        return None if k is None else int(k)
    if node.op_type == "Gemm":
        if weight is None or len(weight) != 2:
            return None
        transposed = index.attribute(node, "transB", 0)
        k, features = (weight[0], weight[1]) if transposed else (weight[1], weight[0])
        if features is not None and not _rows_may_be_samples(index, node.input[0], features):
            return None
        return None if k is None else int(k)
    if node.op_type == "MatMul":
        if weight is None or len(weight) != 2 or not _from_constants(index, node.input[1]):
            return None  # a product of two activations (attention) is not a layer
        rank = _rank(index, node.input[0])
        if rank != 2:
            return None  # batched matmuls (attention, per-token Linear) are not neuron layers
        if weight[0] is not None and not _rows_may_be_samples(index, node.input[0], weight[0]):
            return None
        return None if weight[1] is None else int(weight[1])
    return None


def _from_constants(index: GraphIndex, tensor: str, depth: int = 16) -> bool:
    """Whether ``tensor`` is computed from constants only (an initializer, a Constant node's
    output, or ops on those: MNIST-8's MatMul weight is a ``Reshape`` of an initializer),
    within ``depth`` ops."""
    if index.constant_shape(tensor) is not None:
        return True
    at = index.producer.get(tensor)
    if at is None or depth <= 0:
        return False
    node = index.graph.node[at]
    return node.domain in ("", "ai.onnx") and all(
        _from_constants(index, name, depth - 1) for name in node.input if name)


def _rows_may_be_samples(index: GraphIndex, tensor: str, features: int) -> bool:
    """False when the rows of the 2-D ``tensor`` are known not to be samples: it is a
    reshape of a tensor whose per-sample size is known and is not ``features`` (tf2onnx's
    ``Reshape(x, (-1, C))`` for a Dense applied at every position of an (N, H, W, C) map). True
    otherwise, also when it cannot be told (collect then checks the rows when it runs). Read
    through element-wise ops and earlier dense layers, which keep the rows."""
    for _ in range(64):
        producer = index.producer.get(tensor)
        if producer is None:
            return True
        node = index.graph.node[producer]
        if node.op_type in ("Reshape", "Flatten"):
            source = index.shapes.get(node.input[0])
            if source is None or len(source) < 2 or None in source[1:]:
                source = index.run_shapes.get(node.input[0])  # sizes inference lost
            if source is None or len(source) < 2 or None in source[1:]:
                return True
            axis = int(index.attribute(node, "axis", 1))  # type: ignore[call-overload]
            axis = axis if node.op_type == "Flatten" else 1
            axis = axis + len(source) if axis < 0 else axis
            return axis == 1 and math.prod(int(d) for d in source[1:] if d is not None) == \
                int(features)
        weight = index.constant_shape(node.input[1]) if len(node.input) > 1 else None
        if node.op_type in ("MatMul", "Gemm") and weight is not None and len(weight) == 2:
            rows = weight[1] if node.op_type == "Gemm" and index.attribute(node, "transB", 0) \
                else weight[0]
            if rows is None:
                return True
            tensor, features = node.input[0], int(rows)  # a dense layer keeps the rows
            continue
        if node.op_type not in _RANK_KEEPING or not node.input:
            return True
        tensor = next((name for name in node.input
                       if name and index.constant_shape(name) is None), node.input[0])
    return True


#: Operator domains of ONNX Runtime's own ops (written by its offline graph optimisation).
RUNTIME_DOMAINS = frozenset({"com.microsoft", "com.microsoft.nchwc"})
#: Those of their ops that hold a layer (a conv or dense layer fused with what follows, or in
#: ORT's blocked layout): a model with them would seem to lack those layers.
RUNTIME_LAYER_OPS = frozenset({"Conv", "FusedConv", "NhwcConv", "NhwcFusedConv", "FusedGemm",
                               "FusedMatMul", "QLinearConv", "ConvTransposeWithDynamicPads"})

#: Quantized layer ops (ONNX's QOperator and integer forms, ONNX Runtime's quantized
#: contrib ops): a model with them is refused rather than read short of those layers.
QUANTIZED_LAYER_OPS = frozenset({"QLinearConv", "ConvInteger", "QLinearMatMul",
                                 "MatMulInteger", "QGemm", "DynamicQuantizeMatMul",
                                 "MatMulIntegerToFloat", "QLinearConvTranspose"})

#: Ops whose output has their first input's rank.
_RANK_KEEPING = frozenset({"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu",
                           "HardSwish", "Clip", "Sigmoid", "Tanh", "Identity", "Dropout", "Cast",
                           "Add", "Sub", "Mul", "Div", "BatchNormalization"})


def _rank(index: GraphIndex, tensor: str, depth: int = 256) -> int | None:
    """The rank of ``tensor``: inferred, or read from the ops that make it, where shape
    inference lost it (after a computed reshape at opsets without shape-value propagation):
    Flatten and Gemm give 2, a Reshape its target's length, a Conv its weight's rank,
    Reduce*/Squeeze/Unsqueeze their input's rank less or more their axes, MatMul with a 2-D
    weight, element-wise ops, pools, norms, Resize, Pad and Transpose their input's; None when
    unknown."""
    shape = index.shapes.get(tensor)
    if shape is not None:
        return len(shape)
    producer = index.producer.get(tensor)
    if producer is None or depth <= 0:
        return None
    node = index.graph.node[producer]
    op = node.op_type
    if op in ("Flatten", "Gemm"):
        return 2
    second = node.input[1] if len(node.input) > 1 and node.input[1] else None
    if op == "Reshape" and second is not None:  # rank = the target's length
        target = index.constant_shape(second) or index.shapes.get(second)
        return None if target is None or len(target) != 1 else target[0]
    if op in ("Conv", "ConvTranspose") and second is not None:
        weight = index.constant_shape(second) or index.shapes.get(second)
        return None if weight is None else len(weight)
    if op == "MatMul" and len(index.constant_shape(second or "") or ()) != 2:
        return None
    if not node.input or not node.input[0]:
        return None
    if op in _AXES_CHANGING:
        below = _rank(index, node.input[0], depth - 1)
        axes = index.attribute(node, "axes", None)
        if axes is None and second is not None:
            value = index.constant(second)
            axes = None if value is None else [int(a) for a in np.ravel(value)]
        if below is None:
            return None
        if op.startswith("Reduce"):
            if int(index.attribute(node, "keepdims", 1)):  # type: ignore[call-overload]
                return below
            if axes is None:  # all axes, unless told to do nothing
                return below if index.attribute(node, "noop_with_empty_axes", 0) else 0
        if axes is None:
            return None  # a Squeeze of every axis of size 1
        return below + len(axes) if op == "Unsqueeze" else below - len(axes)  # type: ignore[arg-type]
    if op not in _RANK_KEEPING and op not in _RANK_KEEPING_LAYOUT:
        return None
    # follow the computed input (Add(bias, x) broadcasts x's rank, not the bias's)
    computed = next((name for name in node.input
                     if name and index.constant_shape(name) is None), node.input[0])
    return _rank(index, computed, depth - 1)


#: Ops whose output has their input's rank though not its layout (for :func:`_rank` only).
_RANK_KEEPING_LAYOUT = frozenset({
    "MatMul", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
    "GlobalLpPool", "Resize", "Upsample", "Pad", "Transpose", "InstanceNormalization",
    "LayerNormalization", "GroupNormalization", "LRN", "Softmax", "LogSoftmax", "HardSigmoid",
    "Softplus", "Softsign", "Abs", "Neg", "Exp", "Log", "Sqrt", "Pow", "Max", "Min", "Sum",
    "Mean", "Tile", "Expand", "DepthToSpace", "SpaceToDepth"})
#: Ops that remove or add axes: the Reduce family (with ``keepdims=0``), Squeeze, Unsqueeze.
_AXES_CHANGING = frozenset({
    "Squeeze", "Unsqueeze", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})


def _is_per_channel_constant(index: GraphIndex, name: str, kernels: int, spatial: bool,
                             axis: int = 1) -> bool:
    """Whether constant ``name`` is one value, or one per kernel on the channel ``axis`` once
    broadcast against the (N, K, H, W) or (N, K) activation (``axis`` 3 for an activation
    transposed to channels last)."""
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
    return padded[axis] == kernels


def _follow_channel_chain(
    index: GraphIndex, tensor: str, kernels: int, spatial: bool
) -> list[onnx.NodeProto]:
    """The nodes of the per-channel chain after a layer's output, in order: per-channel
    normalisations and constants, pass-through ops and element-wise activations (each with
    per-channel or scalar parameters), while each tensor has a single reader.

    A conv's chain also runs through a ``Transpose`` that keeps the batch axis first (the
    channels-last chains of converters that keep Keras' layout: Conv -> Transpose to NHWC ->
    Mul/Add of one constant per channel on the last axis -> Relu); a chain never ends on such
    a Transpose (:func:`chain_layout` gives the layout at any point)."""
    chain: list[onnx.NodeProto] = []
    layout: tuple[int, ...] | None = _NCHW if spatial else None
    while True:
        reader = index.single_consumer(tensor)
        if reader is None:
            break
        node = index.graph.node[reader]
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            break
        axis = 1 if layout is None else layout.index(1)
        ok = False
        if op in ELEMENTWISE_ACTIVATIONS or op in PASS_THROUGH:
            others = [n for n in node.input[1:] if n]
            ok = node.input[0] == tensor and all(
                _is_per_channel_constant(index, n, kernels, spatial, axis) for n in others
            ) and not (op == "Clip" and (clip_floor(index, node) or 0.0) > 0)  # None: computed
        elif op in PER_CHANNEL_NORMS:
            # a BatchNormalization of a dense layer's (N, K) output normalises each of its K
            # kernels alone (torch's BatchNorm1d, which the legacy exporter keeps); on a
            # longer dense output, (N, T, K), its channel axis would be T
            ok = node.input[0] == tensor and axis == 1 and (spatial or (
                op == "BatchNormalization" and len(index.shapes.get(tensor) or ()) == 2))
        elif op in CONSTANT_ARITHMETIC and len(node.input) == 2:
            other = node.input[1] if node.input[0] == tensor else node.input[0]
            ok = other != tensor and _is_per_channel_constant(index, other, kernels, spatial,
                                                              axis)
        elif op == "Transpose" and layout is not None:
            moved = _transposed(layout, node)
            ok = moved is not None
            if ok:
                layout = moved
        elif op == "QuantizeLinear" and axis == 1:
            pair = _quantize_pair(index, node, tensor, kernels)
            if pair is None:
                break
            chain.extend(pair)
            tensor = pair[1].output[0]
            continue
        if not ok:
            break
        chain.append(node)
        tensor = node.output[0]
    while chain and chain[-1].op_type == "Transpose":
        chain.pop()  # nothing per-channel after it: the chain ends before it, as it did
    return chain


#: The axis order of a conv's output: axis i of the tensor holds axis ``layout[i]`` of (N, K,
#: H, W).
_NCHW: tuple[int, ...] = (0, 1, 2, 3)


def _transposed(layout: tuple[int, ...], node: onnx.NodeProto) -> tuple[int, ...] | None:
    """The layout after Transpose ``node`` of a tensor in ``layout``; None for one that moves
    the batch axis or has no explicit 4-D ``perm``."""
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    if perm is None or sorted(perm) != list(range(len(layout))) or perm[0] != 0:
        return None
    return tuple(layout[p] for p in perm)


def chain_layout(nodes: Sequence[onnx.NodeProto]) -> tuple[int, ...]:
    """The axes permutation that brings the output of the last of ``nodes`` (a prefix of a
    conv's chain) back to (N, K, H, W), for ``numpy.transpose``; empty when it is in that
    order already."""
    layout: tuple[int, ...] | None = _NCHW
    for node in nodes:
        if node.op_type == "Transpose" and layout is not None:
            layout = _transposed(layout, node)
    if layout is None or layout == _NCHW:
        return ()
    return tuple(layout.index(axis) for axis in _NCHW)


def _quantize_pair(index: GraphIndex, quantize: onnx.NodeProto, tensor: str, kernels: int
                   ) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """``quantize`` and the DequantizeLinear that alone reads it, when the pair is a
    per-channel op on ``tensor`` (a QDQ model's activation quantization: scale and zero point
    per tensor, or per channel on axis 1, the same zero point in both): DQ(Q(x)) > 0 only
    where x > 0, and it is the value the next layer reads (with a uint8 zero point of 0 it is
    also the ReLU the quantizer folded away). None otherwise: a chain never ends between the
    two, on integers."""
    if quantize.input[0] != tensor:
        return None
    reader = index.single_consumer(quantize.output[0])
    if reader is None:
        return None
    dequantize = index.graph.node[reader]
    if dequantize.op_type != "DequantizeLinear" or dequantize.domain not in ("", "ai.onnx") \
            or dequantize.input[0] != quantize.output[0]:
        return None
    for node in (quantize, dequantize):
        params = [n for n in node.input[1:] if n]
        axis = int(index.attribute(node, "axis", 1))  # type: ignore[call-overload]
        for name in params:
            shape = index.constant_shape(name)
            if shape is None or not (math.prod(d or 0 for d in shape) == 1 or (
                    len(shape) == 1 and shape[0] == kernels and axis in (1, -3))):
                return None
        if any(a.name == "block_size" and a.i for a in node.attribute):
            return None

    def zero_point(node: onnx.NodeProto) -> np.ndarray | None:
        return index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None

    zq, zd = zero_point(quantize), zero_point(dequantize)
    same = (zq is None and zd is None) or (
        zq is not None and zd is not None and np.array_equal(np.ravel(zq), np.ravel(zd))) or (
        zq is None and zd is not None and not np.any(zd)) or (
        zd is None and zq is not None and not np.any(zq))
    return (quantize, dequantize) if same else None


def _through_channel_mixing_norm(index: GraphIndex, tensor: str, kernels: int,
                                 spatial: bool) -> list[onnx.NodeProto]:
    """When ``tensor`` (the end of a layer's per-channel chain, no activation yet) is read by
    a normalisation across channels (:func:`_mixing_norm`), that norm's nodes followed by the
    per-channel chain after it up to its activation (a group norm's affine Mul/Add, then the
    ReLU): the activation the next layer sees, channel k still being kernel k's. Empty
    otherwise."""
    norm = _mixing_norm(index, tensor)
    if not norm:
        return []
    after = _follow_channel_chain(index, norm[-1].output[0], kernels, spatial)
    return norm + after[:_activation_cut(index, after)]


def _mixing_norm(index: GraphIndex, tensor: str) -> list[onnx.NodeProto]:
    """The nodes of a normalisation across channels that reads ``tensor`` alone and gives a
    tensor of its shape, channel k at channel k: a GroupNormalization; a LayerNormalization
    over the channel axis and those after it; or a group norm as legacy exporters write it,
    ``Reshape`` to (N, groups, -1) -> ``InstanceNormalization`` -> ``Reshape`` back to the
    shape of ``tensor``. Empty when there is none."""
    if tensor in index.graph_outputs:
        return []
    readers = index.consumers.get(tensor, [])
    sizes = [r for r in readers if index.graph.node[r].op_type == "Shape"]  # for reshape_as
    main = [r for r in readers if r not in sizes]
    if len(main) != 1:
        return []
    node = index.graph.node[main[0]]
    if node.domain not in ("", "ai.onnx") or not node.input or node.input[0] != tensor:
        return []
    if node.op_type in ("GroupNormalization", "LayerNormalization") and sizes:
        return []
    if node.op_type == "GroupNormalization":
        return [node]
    if node.op_type == "LayerNormalization":
        rank = _rank(index, tensor)
        axis = int(index.attribute(node, "axis", -1))  # type: ignore[call-overload]
        if rank is not None and (axis + rank if axis < 0 else axis) >= 1:
            return [node]
        return []
    if node.op_type != "Reshape":
        return []
    norm_at = index.single_consumer(node.output[0])
    if norm_at is None or index.graph.node[norm_at].op_type != "InstanceNormalization":
        return []
    norm = index.graph.node[norm_at]
    back_at = index.single_consumer(norm.output[0])
    if back_at is None:
        return []
    back = index.graph.node[back_at]
    if back.op_type != "Reshape" or back.input[0] != norm.output[0] \
            or not _same_shape_as(index, back, tensor):
        return []
    if any(index.consumers.get(index.graph.node[r].output[0], []) != [back_at] for r in sizes):
        return []  # a Shape of the tensor read by anything but the reshape back
    return [node, norm, back]


def _same_shape_as(index: GraphIndex, reshape: onnx.NodeProto, tensor: str) -> bool:
    """Whether ``reshape`` restores the shape of ``tensor``: its target is ``Shape(tensor)``
    (PyTorch's ``reshape_as``), or shape inference gives both the same fully known shape."""
    producer = index.producer.get(reshape.input[1]) if len(reshape.input) > 1 else None
    if producer is not None:
        shape_node = index.graph.node[producer]
        if shape_node.op_type == "Shape" and shape_node.input[0] == tensor and \
                not any(a.name in ("start", "end") for a in shape_node.attribute):
            return True
    a, b = index.shapes.get(tensor), index.shapes.get(reshape.output[0])
    return a is not None and a == b and None not in a[1:]


def _activation_cut(index: GraphIndex, nodes: list[onnx.NodeProto]) -> int:
    """How many nodes of a chain the probe reads through: up to and including the first
    activation when it keeps its input's sign, up to just before it when it does not; the whole
    chain when it has no activation."""
    for i, node in enumerate(nodes):
        if node.op_type in ELEMENTWISE_ACTIVATIONS:
            return i + 1 if _keeps_sign(index, node) else i
    return len(nodes)


def _keeps_sign(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """Whether activation ``node`` is > 0 exactly where its input is > 0."""
    op = node.op_type
    if op == "LeakyRelu":
        return float(index.attribute(node, "alpha", 0.01)) >= 0  # type: ignore[arg-type]
    if op == "PRelu":
        slope = index.constant(node.input[1])
        return slope is not None and bool(np.all(slope >= 0))
    if op == "Elu":
        return float(index.attribute(node, "alpha", 1.0)) >= 0  # type: ignore[arg-type]
    if op == "Selu":
        return (float(index.attribute(node, "alpha", 1.67326)) >= 0  # type: ignore[arg-type]
                and float(index.attribute(node, "gamma", 1.0507)) > 0)  # type: ignore[arg-type]
    if op == "Clip":
        ceiling = clip_ceiling(index, node)
        return ceiling is None or ceiling > 0  # None: computed, taken as a ReLU6-like bound
    return True  # Relu, Celu, Gelu, HardSwish


def bias_add(index: GraphIndex, node: onnx.NodeProto, kernels: int) -> onnx.NodeProto | None:
    """The ``Add`` of one constant per kernel right after a layer without a bias of its own:
    its bias written as a separate node (tf2onnx's Dense as MatMul + Add, PyTorch's Linear on
    more than 2 dims, a Conv without bias input + ``Add`` in CNTK files and hand-edited graphs);
    None when there is none."""
    if node.op_type not in ("Conv", "MatMul", "Gemm"):
        return None
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
        return None  # it has its own bias
    reader = index.single_consumer(node.output[0])
    add = index.graph.node[reader] if reader is not None else None
    if add is None or add.op_type != "Add" or len(add.input) != 2:
        return None
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    shape = index.constant_shape(other)
    if shape is None or math.prod(d or 0 for d in shape) != kernels:
        return None  # a scalar, or values over positions, is not a bias
    return add if _is_per_channel_constant(index, other, kernels, node.op_type == "Conv") \
        else None


def channel_mixing_reader(model: onnx.ModelProto, layer: Layer,
                          index: GraphIndex | None = None) -> str | None:
    """The normalisation across channels (GroupNormalization, LayerNormalization, or a Reshape
    that splits the channels into groups for an InstanceNormalization) that ``layer``'s probe
    reads through, described for a message; None when there is none (or the probe is the raw
    output). ``index``: the model's :class:`GraphIndex`, when the caller asks for several
    layers."""
    if layer.probe_kind == "conv":
        return None
    index = GraphIndex(model) if index is None else index
    norm = _mixing_norm(index, layer.channel_end)
    if not norm or layer.probe == layer.channel_end:
        return None
    node = norm[1] if norm[0].op_type == "Reshape" else norm[0]
    return f"{node.name or node.output[0]!r} ({node.op_type})"


def clip_floor(index: GraphIndex, node: onnx.NodeProto) -> float | None:
    """A Clip's lower bound: its constant input 1 (opset 11 on) or its ``min`` attribute
    (before); ``-inf`` when it has none, None when it is computed."""
    if len(node.input) > 1 and node.input[1]:
        value = index.constant(node.input[1])
        return None if value is None else float(value.min())
    return float(index.attribute(node, "min", -np.inf))  # type: ignore[arg-type]


def clip_ceiling(index: GraphIndex, node: onnx.NodeProto) -> float | None:
    """A Clip's upper bound: its constant input 2 (opset 11 on) or its ``max`` attribute
    (before); ``inf`` when it has none, None when it is computed."""
    if len(node.input) > 2 and node.input[2]:
        value = index.constant(node.input[2])
        return None if value is None else float(value.max())
    return float(index.attribute(node, "max", np.inf))  # type: ignore[arg-type]


def _pool_after(index: GraphIndex, tensor: str) -> list[onnx.NodeProto] | None:
    """The pool that reads ``tensor`` (:data:`POOLS`), with the value-keeping ops an exporter
    may put before it: Identity, Dropout, a multiplication or division by 1, an addition of
    0, and a zero constant Pad (the legacy exporter's AvgPool2d with padding at opset 9);
    None when the first op that is none of these is not a pool."""
    passed: list[onnx.NodeProto] = []
    for _ in range(8):
        reader = index.single_consumer(tensor)
        if reader is None:
            return None
        node = index.graph.node[reader]
        if node.domain not in ("", "ai.onnx") or node.input[0] != tensor:
            return None
        if node.op_type in POOLS:
            return [*passed, node]
        if not (node.op_type in PASS_THROUGH or _neutral(index, node)):
            return None
        passed.append(node)
        tensor = node.output[0]
    return None


def _neutral(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """Whether ``node`` leaves its first input's values as they are: Mul or Div by a constant
    1, Add or Sub of a constant 0, a constant-mode Pad with 0 (which only a pool may follow)."""
    op = node.op_type
    if op in CONSTANT_ARITHMETIC and len(node.input) == 2:
        value = index.constant(node.input[1])
        neutral = 1.0 if op in ("Mul", "Div") else 0.0
        return value is not None and value.size > 0 and bool(np.all(value == neutral))
    if op == "Pad":
        mode = index.attribute(node, "mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        fill = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else \
            np.asarray(index.attribute(node, "value", 0.0))
        return mode == "constant" and fill is not None and bool(np.all(fill == 0)) \
            and _pads_spatial_only(index, node)
    return False


def _pads_spatial_only(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """Whether Pad ``node`` of a 4-D tensor only adds (never crops) along H and W: padding the
    channels or the batch would not be a pool's padding."""
    given = index.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else \
        index.attribute(node, "pads")
    if given is None:
        return False
    pads = [int(p) for p in np.ravel(np.asarray(given))]
    rank = len(pads) // 2
    axes = index.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if axes is not None and len(index.shapes.get(node.input[0]) or (0,) * 4) != 4:
        return False  # axes counted from the end of a tensor whose rank is not 4
    axes_list = [int(a) + 4 if int(a) < 0 else int(a) for a in np.ravel(axes)] \
        if axes is not None else list(range(rank))
    if len(axes_list) != rank or any(p < 0 for p in pads):
        return False
    return all(pads[i] == 0 and pads[i + rank] == 0
               for i, axis in enumerate(axes_list) if axis in (0, 1))


def _probe_shape(
    index: GraphIndex, tensor: str, kernels: int, spatial: bool, perm: Sequence[int] = ()
) -> tuple[int, int | None, int | None]:
    if not spatial:
        return (kernels, 1, 1)
    shape = index.shapes.get(tensor)
    if shape is None or len(shape) != 4:
        return (kernels, None, None)
    shape = nchw_shape(shape, perm)
    return (kernels, shape[2], shape[3])


def nchw_shape(shape: Sequence[int | None], perm: Sequence[int]) -> tuple[int | None, ...]:
    """``shape`` of a probe tensor in (N, K, H, W) order (:attr:`Layer.probe_perm`)."""
    return tuple(shape[p] for p in perm) if perm else tuple(shape)
