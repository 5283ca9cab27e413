"""Small random ONNX CNNs built with ``onnx.helper`` and numpy only (no torch), for tests.

Every builder is keyword-only, seeded, and returns an ``onnx.ModelProto`` that passes
``onnx.checker.check_model(full_check=True)`` and runs in onnxruntime. Common parameters:

``seed``         weights come from ``numpy.random.default_rng(seed)``; same seed, same model.
``opset``        default-domain opset (13 .. 21 are tested); ops whose signature changed across
                 opsets (``ReduceMean`` axes, attribute before 18, input from 18) follow it.
``fixed_batch``  ``None``: the input is ``"input"`` of shape ``("N", C, H, W)`` with a symbolic
                 batch; an int bakes that batch size in.
``empty_names``  give every node the empty name, as some exporters do; tensor names stay.
``channels``, ``size``  the input's C and H = W (default 3 x 8 x 8).

Nodes are named after their role and position (``conv1``, ``bn1``, ``relu1``, ``pool``, ``fc1``),
their output tensors ``<node>_out``, their weights ``<node>.weight`` / ``<node>.bias``; every model
ends in ``"logits"`` of shape (batch, classes). Weights are drawn from N(0, 1/fan_in) and biases
from U(-0.1, 0.1), so for inputs from :func:`random_input` pre-activations are a mix of positive
and negative values.

Builders (see :data:`BUILDERS`): :func:`chain`, :func:`bn_kept`, :func:`folded_bn`,
:func:`residual`, :func:`concat`, :func:`depthwise`, :func:`reshape_matmul`,
:func:`reduce_mean_head`, :func:`activations`, :func:`conv_pool_no_act`. Helpers: :func:`run`,
:func:`save`, :func:`random_input`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "BUILDERS",
    "OPSET",
    "activations",
    "bn_kept",
    "chain",
    "concat",
    "conv_pool_no_act",
    "depthwise",
    "folded_bn",
    "random_input",
    "reduce_mean_head",
    "reshape_matmul",
    "residual",
    "run",
    "save",
]

OPSET = 17
BN_EPSILON = 1e-5


class _Net:
    """Nodes and initializers of one model under construction; tracks nothing but names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, name: str, inputs: Sequence[str], *, output: str | None = None,
           **attrs: Any) -> str:
        out = output or f"{name}_out"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def weights(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return self.rng.normal(0.0, np.sqrt(1.0 / fan_in), shape).astype(np.float32)

    def bias(self, n: int) -> np.ndarray:
        return self.rng.uniform(-0.1, 0.1, n).astype(np.float32)

    def conv(self, name: str, x: str, c_in: int, c_out: int, *, kernel: int = 3, pad: int = 1,
             group: int = 1) -> str:
        w = self.weights((c_out, c_in // group, kernel, kernel), fan_in=c_in // group * kernel**2)
        inputs = [x, self.const(f"{name}.weight", w), self.const(f"{name}.bias", self.bias(c_out))]
        return self.op("Conv", name, inputs, kernel_shape=[kernel, kernel], pads=[pad] * 4,
                       group=group)

    def gemm(self, name: str, x: str, n_in: int, n_out: int, *, output: str | None = None) -> str:
        w = self.const(f"{name}.weight", self.weights((n_out, n_in), fan_in=n_in))
        b = self.const(f"{name}.bias", self.bias(n_out))
        return self.op("Gemm", name, [x, w, b], output=output, transB=1)

    def gap_head(self, x: str, n_in: int, classes: int) -> str:
        """GlobalAveragePool → Flatten → Gemm to ``"logits"``."""
        x = self.op("GlobalAveragePool", "gap", [x])
        x = self.op("Flatten", "flatten", [x], axis=1)
        return self.gemm("fc", x, n_in, classes, output="logits")

    def model(self, graph_name: str, *, opset: int, fixed_batch: int | None, empty_names: bool,
              channels: int, size: int, classes: int) -> onnx.ModelProto:
        """The finished model, checked with ``full_check`` (strict shape inference); no
        intermediate ``value_info`` is written (exporters differ on it)."""
        if fixed_batch is not None and fixed_batch < 1:
            raise ValueError(f"fixed_batch must be None or a positive int, got {fixed_batch}")
        batch: str | int = "N" if fixed_batch is None else fixed_batch
        input_shape = [batch, channels, size, size]
        graph = helper.make_graph(
            self.nodes, graph_name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
            self.initializers,
        )
        opsets = [helper.make_opsetid("", opset)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="onnxaom-tests-zoo",
                                  ir_version=helper.find_min_ir_version_for(opsets))
        if empty_names:
            for node in model.graph.node:
                node.name = ""
        onnx.checker.check_model(model, full_check=True)
        return model


def _pool_size(size: int) -> int:
    return size // 2


def chain(*, seed: int = 0, opset: int = OPSET, fixed_batch: int | None = None,
          empty_names: bool = False, channels: int = 3, size: int = 8,
          kernels: tuple[int, int] = (4, 8), hidden: int = 16, classes: int = 3,
          fc_relu: bool = True) -> onnx.ModelProto:
    """conv1 (3x3, pad 1) → relu1 → conv2 (3x3, no pad) → relu2 → pool (MaxPool 2) → flatten →
    fc1 (Gemm) → relu3 (if ``fc_relu``) → fc2 (Gemm) → logits.

    conv1 outputs (K1, size, size), conv2 (K2, size - 2, size - 2).
    """
    k1, k2 = kernels
    net = _Net(seed)
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", channels, k1)])
    x = net.op("Relu", "relu2", [net.conv("conv2", x, k1, k2, pad=0)])
    x = net.op("MaxPool", "pool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = net.op("Flatten", "flatten", [x], axis=1)
    x = net.gemm("fc1", x, k2 * _pool_size(size - 2) ** 2, hidden)
    if fc_relu:
        x = net.op("Relu", "relu3", [x])
    net.gemm("fc2", x, hidden, classes, output="logits")
    return net.model("chain", opset=opset, fixed_batch=fixed_batch, empty_names=empty_names,
                     channels=channels, size=size, classes=classes)


def _bn_net(fold: bool, *, seed: int, opset: int, fixed_batch: int | None, empty_names: bool,
            channels: int, size: int, kernels: tuple[int, int], hidden: int, classes: int,
            conv_bias: bool) -> onnx.ModelProto:
    """conv → BN → relu, twice, then pool, flatten, fc1, relu, fc2; BN kept or folded into conv.

    The same random numbers are drawn in the same order either way, so the two are equivalent.
    """
    net = _Net(seed)
    x, c_in = "input", channels
    for i, k in enumerate(kernels, start=1):
        w = net.weights((k, c_in, 3, 3), fan_in=c_in * 9)
        b = net.bias(k) if conv_bias else np.zeros(k, np.float32)
        scale = net.rng.uniform(0.5, 1.5, k).astype(np.float32)
        shift = net.rng.normal(0.0, 0.2, k).astype(np.float32)
        mean = net.rng.normal(0.0, 0.2, k).astype(np.float32)
        var = net.rng.uniform(0.5, 1.5, k).astype(np.float32)
        conv_attrs: dict[str, Any] = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
        if fold:
            factor = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + BN_EPSILON)
            w_folded = (w * factor[:, None, None, None]).astype(np.float32)
            b_folded = ((b - mean) * factor + shift).astype(np.float32)
            x = net.op("Conv", f"conv{i}", [x, net.const(f"conv{i}.weight", w_folded),
                                            net.const(f"conv{i}.bias", b_folded)], **conv_attrs)
        else:
            inputs = [x, net.const(f"conv{i}.weight", w)]
            if conv_bias:
                inputs.append(net.const(f"conv{i}.bias", b))
            x = net.op("Conv", f"conv{i}", inputs, **conv_attrs)
            bn_inputs = [net.const(f"bn{i}.{part}", value) for part, value in
                         (("scale", scale), ("bias", shift), ("mean", mean), ("var", var))]
            x = net.op("BatchNormalization", f"bn{i}", [x, *bn_inputs], epsilon=BN_EPSILON)
        x = net.op("Relu", f"relu{i}", [x])
        c_in = k
    x = net.op("MaxPool", "pool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = net.op("Flatten", "flatten", [x], axis=1)
    x = net.op("Relu", f"relu{len(kernels) + 1}",
               [net.gemm("fc1", x, c_in * _pool_size(size) ** 2, hidden)])
    net.gemm("fc2", x, hidden, classes, output="logits")
    return net.model("folded_bn" if fold else "bn_kept", opset=opset, fixed_batch=fixed_batch,
                     empty_names=empty_names, channels=channels, size=size, classes=classes)


def bn_kept(*, seed: int = 0, opset: int = OPSET, fixed_batch: int | None = None,
            empty_names: bool = False, channels: int = 3, size: int = 8,
            kernels: tuple[int, int] = (4, 8), hidden: int = 16, classes: int = 3,
            conv_bias: bool = True) -> onnx.ModelProto:
    """conv1 → bn1 (BatchNormalization node) → relu1 → conv2 → bn2 → relu2 → pool → flatten →
    fc1 → relu3 → fc2 → logits. Convs are 3x3 with pad 1; BN parameters are random
    (scale U(0.5, 1.5), bias N(0, 0.2), mean N(0, 0.2), var U(0.5, 1.5)). ``conv_bias=False``
    gives convs without a bias input, as exporters write them before a BN.
    """
    return _bn_net(False, seed=seed, opset=opset, fixed_batch=fixed_batch, empty_names=empty_names,
                   channels=channels, size=size, kernels=kernels, hidden=hidden, classes=classes,
                   conv_bias=conv_bias)


def folded_bn(*, seed: int = 0, opset: int = OPSET, fixed_batch: int | None = None,
              empty_names: bool = False, channels: int = 3, size: int = 8,
              kernels: tuple[int, int] = (4, 8), hidden: int = 16, classes: int = 3,
              conv_bias: bool = True) -> onnx.ModelProto:
    """:func:`bn_kept` with each BN folded into the conv before it (always with a conv bias);
    numerically equivalent (about 1e-6) to ``bn_kept`` called with the same arguments.
    """
    return _bn_net(True, seed=seed, opset=opset, fixed_batch=fixed_batch, empty_names=empty_names,
                   channels=channels, size=size, kernels=kernels, hidden=hidden, classes=classes,
                   conv_bias=conv_bias)


def residual(*, seed: int = 0, opset: int = OPSET, fixed_batch: int | None = None,
             empty_names: bool = False, channels: int = 3, size: int = 8, kernels: int = 4,
             classes: int = 3) -> onnx.ModelProto:
    """conv1 → relu1 → conv2 → relu2 → conv3 → add1 (conv3 + relu1, the skip) → relu3 → gap
    (GlobalAveragePool) → flatten → fc → logits. All convs 3x3 pad 1 with ``kernels`` kernels.
    """
    net = _Net(seed)
    skip = net.op("Relu", "relu1", [net.conv("conv1", "input", channels, kernels)])
    x = net.op("Relu", "relu2", [net.conv("conv2", skip, kernels, kernels)])
    x = net.op("Add", "add1", [net.conv("conv3", x, kernels, kernels), skip])
    x = net.op("Relu", "relu3", [x])
    net.gap_head(x, kernels, classes)
    return net.model("residual", opset=opset, fixed_batch=fixed_batch, empty_names=empty_names,
                     channels=channels, size=size, classes=classes)


def concat(*, seed: int = 0, opset: int = OPSET, fixed_batch: int | None = None,
           empty_names: bool = False, channels: int = 3, size: int = 8,
           kernels: tuple[int, int, int] = (4, 6, 8), classes: int = 3) -> onnx.ModelProto:
    """Two branches on the input, conv1a (3x3, K1) → relu1a and conv1b (1x1, K2) → relu1b,
    concatenated on channels by concat1 (K1 + K2 channels, branch a first) → conv2 (3x3, K3) →
    relu2 → gap → flatten → fc → logits.
    """
    k1, k2, k3 = kernels
    net = _Net(seed)
    a = net.op("Relu", "relu1a", [net.conv("conv1a", "input", channels, k1)])
    b = net.op("Relu", "relu1b", [net.conv("conv1b", "input", channels, k2, kernel=1, pad=0)])
    x = net.op("Concat", "concat1", [a, b], axis=1)
    x = net.op("Relu", "relu2", [net.conv("conv2", x, k1 + k2, k3)])
    net.gap_head(x, k3, classes)
    return net.model("concat", opset=opset, fixed_batch=fixed_batch, empty_names=empty_names,
                     channels=channels, size=size, classes=classes)


def depthwise(*, seed: int = 0, opset: int = OPSET, fixed_batch: int | None = None,
              empty_names: bool = False, channels: int = 3, size: int = 8,
              kernels: tuple[int, int] = (4, 8), classes: int = 3) -> onnx.ModelProto:
    """conv1 (3x3, K1) → relu1 → dwconv2 (3x3 depthwise, group=K1, K1 kernels) → relu2 →
    pwconv3 (1x1 pointwise, K2) → relu3 → gap → flatten → fc → logits.
    """
    k1, k2 = kernels
    net = _Net(seed)
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", channels, k1)])
    x = net.op("Relu", "relu2", [net.conv("dwconv2", x, k1, k1, group=k1)])
    x = net.op("Relu", "relu3", [net.conv("pwconv3", x, k1, k2, kernel=1, pad=0)])
    net.gap_head(x, k2, classes)
    return net.model("depthwise", opset=opset, fixed_batch=fixed_batch, empty_names=empty_names,
                     channels=channels, size=size, classes=classes)


def reshape_matmul(*, seed: int = 0, opset: int = OPSET, fixed_batch: int | None = None,
                   empty_names: bool = False, channels: int = 3, size: int = 8, kernels: int = 4,
                   hidden: int = 16, classes: int = 3,
                   target: Literal["minus_one", "zero", "batch"] = "minus_one",
                   shape_source: Literal["initializer", "constant"] = "initializer",
                   ) -> onnx.ModelProto:
    """conv1 (3x3 pad 1) → relu1 → reshape1 → matmul1 → add1 (bias) → relu2 → matmul2 → add2 →
    logits: a flatten written the way exporters write it.

    ``target`` is the int64 shape given to reshape1: ``"minus_one"`` ``[-1, K*H*W]`` (dynamo
    with a dynamic batch), ``"zero"`` ``[0, -1]``, ``"batch"`` ``[B, K*H*W]`` with B =
    ``fixed_batch`` (dynamo with a fixed batch; needs ``fixed_batch``). ``shape_source`` puts it
    in an initializer ``reshape1.shape`` or in a ``Constant`` node of that name.
    """
    features = kernels * size * size
    if target == "batch":
        if fixed_batch is None:
            raise ValueError("target='batch' bakes the batch size in: pass fixed_batch as well")
        shape = [fixed_batch, features]
    else:
        shape = {"minus_one": [-1, features], "zero": [0, -1]}[target]
    net = _Net(seed)
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", channels, kernels)])
    shape_array = np.array(shape, dtype=np.int64)
    if shape_source == "constant":
        shape_name = net.op("Constant", "reshape1.shape", [], output="reshape1.shape",
                            value=numpy_helper.from_array(shape_array, "reshape1.shape"))
    else:
        shape_name = net.const("reshape1.shape", shape_array)
    x = net.op("Reshape", "reshape1", [x, shape_name])
    for i, (n_in, n_out) in enumerate(((features, hidden), (hidden, classes)), start=1):
        w = net.const(f"matmul{i}.weight", net.weights((n_in, n_out), fan_in=n_in))
        x = net.op("MatMul", f"matmul{i}", [x, w])
        x = net.op("Add", f"add{i}", [x, net.const(f"add{i}.bias", net.bias(n_out))],
                   output="logits" if i == 2 else None)
        if i == 1:
            x = net.op("Relu", "relu2", [x])
    return net.model("reshape_matmul", opset=opset, fixed_batch=fixed_batch,
                     empty_names=empty_names, channels=channels, size=size, classes=classes)


def reduce_mean_head(*, seed: int = 0, opset: int = OPSET, fixed_batch: int | None = None,
                     empty_names: bool = False, channels: int = 3, size: int = 8,
                     kernels: tuple[int, int] = (4, 8), classes: int = 3) -> onnx.ModelProto:
    """conv1 → relu1 → conv2 → relu2 → reduce_mean (ReduceMean over axes 2, 3, keepdims=0) →
    fc (Gemm) → logits. Axes are an attribute below opset 18 and an int64 initializer
    ``reduce_mean.axes`` from 18.
    """
    k1, k2 = kernels
    net = _Net(seed)
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", channels, k1)])
    x = net.op("Relu", "relu2", [net.conv("conv2", x, k1, k2)])
    if opset >= 18:
        axes = net.const("reduce_mean.axes", np.array([2, 3], dtype=np.int64))
        x = net.op("ReduceMean", "reduce_mean", [x, axes], keepdims=0)
    else:
        x = net.op("ReduceMean", "reduce_mean", [x], axes=[2, 3], keepdims=0)
    net.gemm("fc", x, k2, classes, output="logits")
    return net.model("reduce_mean_head", opset=opset, fixed_batch=fixed_batch,
                     empty_names=empty_names, channels=channels, size=size, classes=classes)


def activations(*, seed: int = 0, opset: int = OPSET, fixed_batch: int | None = None,
                empty_names: bool = False, channels: int = 3, size: int = 8, kernels: int = 4,
                classes: int = 3, leaky_alpha: float = 0.1) -> onnx.ModelProto:
    """Three non-ReLU activations in a row, all convs 3x3 pad 1 with ``kernels`` kernels:
    conv1 → leaky1 (LeakyRelu), conv2 → clip2 (Clip 0..6, min/max as initializers
    ``clip2.min``/``clip2.max``), conv3 → mul3 (per-channel scale, shape (K, 1, 1), in U(0.5,
    1.5)) → add3 (per-channel shift, N(0, 0.1)) → relu3; then gap → flatten → fc → logits.
    """
    net = _Net(seed)
    x = net.op("LeakyRelu", "leaky1", [net.conv("conv1", "input", channels, kernels)],
               alpha=leaky_alpha)
    clip_min = net.const("clip2.min", np.array(0.0, dtype=np.float32))
    clip_max = net.const("clip2.max", np.array(6.0, dtype=np.float32))
    x = net.op("Clip", "clip2", [net.conv("conv2", x, kernels, kernels), clip_min, clip_max])
    x = net.conv("conv3", x, kernels, kernels)
    scale = net.rng.uniform(0.5, 1.5, (kernels, 1, 1)).astype(np.float32)
    shift = net.rng.normal(0.0, 0.1, (kernels, 1, 1)).astype(np.float32)
    x = net.op("Mul", "mul3", [x, net.const("mul3.scale", scale)])
    x = net.op("Add", "add3", [x, net.const("add3.shift", shift)])
    x = net.op("Relu", "relu3", [x])
    net.gap_head(x, kernels, classes)
    return net.model("activations", opset=opset, fixed_batch=fixed_batch, empty_names=empty_names,
                     channels=channels, size=size, classes=classes)


def conv_pool_no_act(*, seed: int = 0, opset: int = OPSET, fixed_batch: int | None = None,
                     empty_names: bool = False, channels: int = 3, size: int = 8,
                     kernels: tuple[int, int] = (4, 8), classes: int = 3) -> onnx.ModelProto:
    """conv1 (3x3 pad 1) → pool1 (MaxPool 2, no activation in between) → conv2 → relu2 → gap →
    flatten → fc → logits.
    """
    k1, k2 = kernels
    net = _Net(seed)
    x = net.op("MaxPool", "pool1", [net.conv("conv1", "input", channels, k1)],
               kernel_shape=[2, 2], strides=[2, 2])
    x = net.op("Relu", "relu2", [net.conv("conv2", x, k1, k2)])
    net.gap_head(x, k2, classes)
    return net.model("conv_pool_no_act", opset=opset, fixed_batch=fixed_batch,
                     empty_names=empty_names, channels=channels, size=size, classes=classes)


#: Every builder by name; each accepts ``seed``, ``opset``, ``fixed_batch`` and ``empty_names``.
BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "chain": chain,
    "bn_kept": bn_kept,
    "folded_bn": folded_bn,
    "residual": residual,
    "concat": concat,
    "depthwise": depthwise,
    "reshape_matmul": reshape_matmul,
    "reduce_mean_head": reduce_mean_head,
    "activations": activations,
    "conv_pool_no_act": conv_pool_no_act,
}


def hand_built(nodes: Sequence[onnx.NodeProto], inits: Sequence[onnx.TensorProto],
               input_shape: Sequence[int | str], output_shape: Sequence[int | str], *,
               opset: int = 17, name: str = "hand_built") -> onnx.ModelProto:
    """A model of ``nodes`` from input ``x`` (float, ``input_shape``) to output ``y`` (float,
    ``output_shape``), for tests that write a graph node by node."""
    graph = helper.make_graph(
        list(nodes), name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def random_input(model: onnx.ModelProto, *, batch: int = 2, seed: int = 0) -> np.ndarray:
    """Float32 N(0, 1) input for ``model``'s first input: a symbolic batch becomes ``batch``, a
    fixed one stays. Array of shape (batch, C, H, W).
    """
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else batch for d in dims]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    """Run ``model`` on onnxruntime's CPU provider with ``x`` as its first input; every graph
    output, in graph order.
    """
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: np.asarray(x, dtype=np.float32)})


def save(model: onnx.ModelProto, path: str | os.PathLike[str], external_data: bool = False) -> Path:
    """Write ``model`` to ``path``; with ``external_data`` every initializer, however small
    (int64 shapes included), goes to ``<file name>.data`` beside it (any old one is replaced).
    ``model`` itself is not modified. Returns the path.
    """
    path = Path(path)
    if not external_data:
        onnx.save_model(model, path)
        return path
    data_path = path.with_name(path.name + ".data")
    data_path.unlink(missing_ok=True)  # onnx appends to an existing data file
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save_model moves the tensor data out of the proto it is given
    onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_path.name, size_threshold=0)
    return path
