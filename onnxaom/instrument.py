"""Rewriting a model so that ONNX Runtime hands back what collection needs.

Two rewrites, both pure (the input proto is never changed):

* :func:`counting_graph` (the fast path): after each tapped tensor T of shape (N, K, H, W) or
  (N, K) it adds ``Greater(T, threshold) -> Cast(float) -> Reshape(N, K*H*W)`` and a
  ``MatMul`` with the one-hot label matrix fed as the extra input ``onnxaom_onehot`` of shape
  (C, N). Only the per-class counts, (C, K*H*W) per layer, leave the runtime. Samples whose
  one-hot column is all zero (padding) count nothing.
* :func:`probe_graph` (the plain path): the probe tensors become the graph outputs and are
  counted in numpy. It is the reference the fast path is tested against.

Both drop every node that the new outputs do not need (the classifier head after the last
probe, typically), and can make a fixed batch dimension symbolic.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ModelError
from .graph import GraphIndex, fed_inputs, subgraph_inputs
from .layers import Layer

__all__ = [
    "ONEHOT_INPUT",
    "Instrumented",
    "counting_graph",
    "image_input",
    "probe_graph",
    "tap_tensor",
    "threshold_in",
]

ONEHOT_INPUT = "onnxaom_onehot"
_PREFIX = "onnxaom_"
_SIGN_PRESERVING = frozenset({"Relu", "LeakyRelu", "PRelu", "Identity", "Dropout"})
_ORDER_PRESERVING = frozenset(
    {"MaxPool", "AveragePool", "Identity", "Dropout", "Flatten", "Reshape"}
)


@dataclass(frozen=True)
class Instrumented:
    """An instrumented model and the names of its outputs.

    ``outputs``: one per layer, in the layers' order. ``checks``: (layer position, output name)
    of the scalar NaN checks.
    """

    model: onnx.ModelProto
    input_name: str
    outputs: tuple[str, ...]
    checks: tuple[tuple[int, str], ...] = ()


def image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The graph input that takes the images: the one input that is not an initializer (an
    input no node reads is left out; the instrumented graphs drop it)."""
    inputs = fed_inputs(model)
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "(none)"
        hint = ("; bind the ones that are the same for every sample to constants with "
                "onnxaom.bind_inputs(model, {name: value}) (on the command line: --bind "
                "NAME=VALUE)" if len(inputs) > 1 else "")
        raise ModelError(f"model must have exactly one image input; it has {len(inputs)}: "
                         f"{names}{hint}")
    return inputs[0]


def threshold_in(threshold: float, dtype: Any) -> np.ndarray:
    """``threshold`` as a 0-d array of ``dtype`` that compares exactly: the largest value of
    ``dtype`` not above it, so that ``x > threshold_in(t, x.dtype)`` is ``x > t`` for every
    ``x`` of that type. Rounded to the nearest instead (0.3 -> float32 0.30000001), an
    activation of exactly that float32 would not count although it is above 0.3."""
    if np.dtype(dtype).kind in "biu":  # integers compare exactly with a float64 in numpy
        return np.array(threshold, np.float64)
    with np.errstate(over="ignore"):  # beyond the type's range: +-inf, stepped down below
        value = np.array(threshold, dtype)
    if float(value) > threshold:
        value = np.nextafter(value, np.array(-np.inf, dtype))
    return value


def tap_tensor(index: GraphIndex, layer: Layer, threshold: float) -> str:
    """The tensor to count for ``layer``: its probe, or an equivalent one ORT keeps fused.

    Reading a raw Conv output would stop ORT from fusing Conv+Relu. For threshold >= 0,
    ``x > t`` equals ``relu(x) > t`` (and likewise for LeakyRelu/PRelu with positive slopes,
    whose sign matches x), so when the raw output flows only into such an op we read that op's
    output instead and get the same counts.
    """
    if layer.probe_kind != "conv" or threshold < 0:
        return layer.probe
    tensor = layer.probe
    while True:
        reader = index.single_consumer(tensor)
        if reader is None:
            return tensor
        node = index.graph.node[reader]
        if node.op_type not in _SIGN_PRESERVING or node.input[0] != tensor:
            return tensor
        if node.op_type == "LeakyRelu" and float(index.attribute(node, "alpha", 0.01)) <= 0:  # type: ignore[arg-type]
            return tensor
        if node.op_type == "PRelu":
            slope = index.constant(node.input[1])
            if slope is None or np.any(slope <= 0):
                return tensor
        if node.op_type in ("LeakyRelu", "PRelu") and threshold > 0:
            return tensor  # x > t and leaky(x) > t agree only for t = 0
        tensor = node.output[0]


def _with_dynamic_batch(model: onnx.ModelProto, input_name: str) -> None:
    """Make dim 0 of the image input symbolic and forget intermediate shapes (in place)."""
    for value in model.graph.input:
        if value.name == input_name and value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            if len(dims) > 0 and dims[0].HasField("dim_value"):
                dims[0].ClearField("dim_value")
                dims[0].dim_param = "N"
    del model.graph.value_info[:]


def _prune(model: onnx.ModelProto, needed_outputs: list[str], image_input: str) -> None:
    """Drop nodes, initializers and initializer-inputs that ``needed_outputs`` do not need.

    Old exporters list initializers among the graph inputs too (keep_initializers_as_inputs);
    such an input whose initializer is dropped would become a feed ORT asks for, so it goes too.
    """
    needed = set(needed_outputs)
    keep = [False] * len(model.graph.node)
    for i in range(len(model.graph.node) - 1, -1, -1):
        node = model.graph.node[i]
        if any(o in needed for o in node.output):
            keep[i] = True
            needed.update(n for n in node.input if n)
            needed.update(subgraph_inputs(node))  # outer-scope reads, at any depth
    nodes = [n for n, k in zip(model.graph.node, keep, strict=True) if k]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    initializers = [t for t in model.graph.initializer if t.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    keep_inputs = needed | {image_input, ONEHOT_INPUT}
    inputs = [i for i in model.graph.input if i.name in keep_inputs]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def _start(model: onnx.ModelProto, dynamic_batch: bool) -> tuple[onnx.ModelProto, str]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _batch_norms_in_inference_mode(copy)
    input_name = image_input(copy).name
    if dynamic_batch:
        _with_dynamic_batch(copy, input_name)
    return copy, input_name


def _batch_norms_in_inference_mode(model: onnx.ModelProto) -> None:
    """Make every BatchNormalization of ``model`` (a copy) use its running statistics (in
    place). One written with its training outputs (mean, var, saved_mean, saved_var: old
    Caffe2 and CNTK files) or ``training_mode=1`` normalises each batch by its own statistics in
    ONNX Runtime, so a sample's counts would depend on the batch it came in. Refused
    (:class:`ModelError`) where another node reads those outputs."""
    read = {name for node in model.graph.node for name in node.input if name}
    read |= {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        extra = [o for o in node.output[1:] if o]
        training = any(a.name == "training_mode" and a.i for a in node.attribute)
        if not extra and not training:
            continue
        used = [o for o in extra if o in read]
        if used:
            raise ModelError(
                f"node {node.name or node.output[0]!r} (BatchNormalization) runs in training "
                f"mode, and its batch statistics {used} are read: its output depends on the "
                f"batch, so occurrences cannot be counted; export the model in eval mode")
        warnings.warn(f"node {node.name or node.output[0]!r} (BatchNormalization) is written "
                      f"in training mode (batch statistics); onnxaom counts it with its running "
                      f"statistics, as the model computes at inference", UserWarning,
                      stacklevel=2)
        del node.output[1:]
        kept = [a for a in node.attribute if a.name != "training_mode"]
        del node.attribute[:]
        node.attribute.extend(kept)


def probe_graph(
    model: onnx.ModelProto, layers: list[Layer], *, dynamic_batch: bool = True
) -> Instrumented:
    """The model with exactly the layers' probe tensors as outputs (plain path)."""
    copy, input_name = _start(model, dynamic_batch)
    index = GraphIndex(model)
    outputs: list[str] = []
    del copy.graph.output[:]
    for layer in layers:
        if layer.probe in outputs:
            continue
        elem = index.elem_type(layer.probe)
        copy.graph.output.append(helper.make_tensor_value_info(layer.probe, elem, None))
        outputs.append(layer.probe)
    _prune(copy, outputs, input_name)
    return Instrumented(copy, input_name, tuple(layer.probe for layer in layers))


def count_prefix(position: int) -> str:
    """The name prefix of every node and tensor the count at ``position`` adds."""
    return f"{_PREFIX}{position}_"


def positive_tensor(position: int) -> str:
    """The Greater output (the boolean mask) of the count at ``position`` in a counting graph."""
    return count_prefix(position) + "positive"


def counting_graph(
    model: onnx.ModelProto,
    layers: list[Layer],
    *,
    threshold: float = 0.0,
    dynamic_batch: bool = True,
    check_nan: bool = True,
) -> Instrumented:
    """The model with in-graph per-class occurrence counting for every layer (fast path).

    After each tapped tensor x (N, K, H, W) or (N, K)::

        Greater(x, t) -> Cast(uint8) -> Reshape(N, K*H*W) -> MatMulInteger(onehot, .)

    with ``onnxaom_onehot`` a uint8 (C, N) input, gives ``onnxaom_count_<i>``: int32
    (C, K*H*W), the batch's exact counts (samples with x > t per class and position; exact
    for batches below 2**31 samples). The mask is one byte per value, so the reduction reads a
    quarter of what a float MatMul would; every extra full pass over an activation costs about
    as much as a cheap layer (see benchmarks/RESULTS.md for the formulations measured).

    Greater is false for NaN, so with ``check_nan`` each layer also gets a scalar
    ``onnxaom_check_<i>``, NaN when x held a NaN (or infinities of both signs): the sum of x's
    per-channel means (GlobalAveragePool, which ORT runs in its blocked NCHWc layout without an
    extra reorder), or ReduceSum(x) for fully-connected layers.
    """
    copy, input_name = _start(model, dynamic_batch)
    index = GraphIndex(model)
    graph = copy.graph
    del graph.output[:]
    graph.input.append(helper.make_tensor_value_info(ONEHOT_INPUT, TensorProto.UINT8, ["C", "N"]))
    flat_shape = f"{_PREFIX}flat_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([0, -1], np.int64), flat_shape))
    outputs: list[str] = []
    checks: list[tuple[int, str]] = []
    check_types: list[int] = []
    thresholds: dict[int, str] = {}
    for i, layer in enumerate(layers):
        tap = tap_tensor(index, layer, threshold)
        elem = index.elem_type(tap)
        if elem not in thresholds:
            dtype = helper.tensor_dtype_to_np_dtype(elem)
            thresholds[elem] = f"{_PREFIX}threshold_{len(thresholds)}"
            graph.initializer.append(
                numpy_helper.from_array(threshold_in(threshold, dtype), thresholds[elem])
            )
        p = count_prefix(i)
        count = f"{_PREFIX}count_{i}"
        nodes = [
            helper.make_node(
                "Greater", [tap, thresholds[elem]], [positive_tensor(i)], name=p + "greater"
            ),
            helper.make_node(
                "Cast", [positive_tensor(i)], [p + "mask"], to=TensorProto.UINT8, name=p + "cast"
            ),
        ]
        mask = p + "mask"
        if layer.probe_perm:  # a channels-last probe: counted in (N, K, H, W) order
            nodes.append(helper.make_node("Transpose", [mask], [p + "mask_nchw"],
                                          perm=list(layer.probe_perm), name=p + "to_nchw"))
            mask = p + "mask_nchw"
        nodes += [
            helper.make_node("Reshape", [mask, flat_shape], [p + "flat"], name=p + "flatten"),
            helper.make_node(
                "MatMulInteger", [ONEHOT_INPUT, p + "flat"], [count], name=p + "count"
            ),
        ]
        if check_nan:
            check = f"{_PREFIX}check_{i}"
            summed = tap
            if layer.op == "Conv":
                # GlobalAveragePool runs in ORT's NCHWc layout, on the data before the reorder
                # that the count needs: the check then costs almost nothing (RESULTS.md)
                summed = p + "means"
                nodes.append(
                    helper.make_node("GlobalAveragePool", [tap], [summed], name=p + "means")
                )
            nodes.append(
                helper.make_node("ReduceSum", [summed], [check], keepdims=0, name=p + "check")
            )
            checks.append((i, check))
            check_types.append(elem)
        graph.node.extend(nodes)
        outputs.append(count)
    for name in outputs:  # counts first, then the NaN checks
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT32, None))
    for (_, name), elem in zip(checks, check_types, strict=True):
        graph.output.append(helper.make_tensor_value_info(name, elem, None))
    _prune(copy, outputs + [name for _, name in checks], input_name)
    _ensure_opset(copy)
    return Instrumented(copy, input_name, tuple(outputs), tuple(checks))


def _ensure_opset(model: onnx.ModelProto) -> None:
    """MatMulInteger needs opset >= 10; older models are rejected."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < 10:
            raise ModelError(
                f"model opset {imp.version} is too old for in-graph counting (needs >= 10); "
                f"convert it with onnx.version_converter or use method='plain'"
            )
