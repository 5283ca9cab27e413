"""Graph surgery: removal against the zeroing oracle, widen and deepen against the original,
refusals, and what the result keeps.

The oracle for removal: the original model with a Mul-by-mask inserted after the probe tensor
of every layer that loses kernels (``plan_removal`` says which: the requested layers and the
coupled ones), zeroing exactly the removed channels. The edited model must compute the same
outputs on random inputs, to 1e-5.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxaom
from onnxaom.edits import InsertLayer, RemoveKernels, WidenLayer, edits_from_json
from onnxaom.errors import EditError, LayerNotFoundError
from onnxaom.layers import find_layers
from onnxaom.model import Model
from onnxaom.surgery import METADATA_KEY, STEPS_KEY, apply, plan_removal, remove_kernels
from onnxaom.surgery.apply import apply_steps

from . import zoo

ATOL = 1e-5

# --------------------------------------------------------------------------------------------
# the oracle


def zeroed_at_probes(proto: onnx.ModelProto, removed: Mapping[str, Sequence[int]],
                     point: str = "probe", chain_end: Sequence[str] = ()) -> onnx.ModelProto:
    """``proto`` with the ``removed`` kernels of each layer forced to zero at its probe point
    (a Mul by a 0/1 mask right after the tensor's producer), or, with ``point="chain end"``
    (every layer) or for the layers in ``chain_end``, at the end of its per-channel chain
    (``Layer.channel_end``: after a batch norm that follows the ReLU; the removal's
    fallback)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    layers = {layer.name: layer for layer in find_layers(model)}
    for name, kernels in removed.items():
        layer = layers[name]
        rank = 4 if layer.op == "Conv" else 2
        mask = np.ones(layer.kernels, np.float32)
        mask[list(kernels)] = 0
        end = layer.probe if point == "probe" and name not in chain_end else layer.channel_end
        mask_name, masked = f"oracle_mask_{len(model.graph.initializer)}", f"{end}__zeroed"
        model.graph.initializer.append(
            numpy_helper.from_array(mask.reshape((1, -1) + (1,) * (rank - 2)), mask_name))
        nodes = list(model.graph.node)
        for node in nodes:
            for i, tensor in enumerate(node.input):
                if tensor == end:
                    node.input[i] = masked
        for output in model.graph.output:
            assert output.name != end, "a probe that is a graph output cannot be masked"
        producer = next(i for i, n in enumerate(nodes) if end in n.output)
        nodes.insert(producer + 1, helper.make_node("Mul", [end, mask_name], [masked]))
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return model


def assert_removal_exact(proto: onnx.ModelProto, removals: Mapping[str, Sequence[int]],
                         coupled: str = "propagate", batch: int = 3,
                         point: str = "probe") -> Model:
    """Remove ``removals`` and compare with the oracle zeroed at ``point``; returns the
    edited model."""
    model = Model(proto)
    digest = model.digest
    plan = plan_removal(model, removals, coupled=coupled)
    for layer, kernels in removals.items():
        assert set(kernels) <= set(plan.removed[layer])
    edited = remove_kernels(model, removals, coupled=coupled)
    assert model.digest == digest, "the input model changed"
    x = zoo.random_input(proto, batch=batch, seed=1)
    got = zoo.run(edited.proto, x)
    want = zoo.run(zeroed_at_probes(proto, plan.removed, point), x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=ATOL, atol=ATOL)
    kernels = {layer.name: layer.kernels for layer in model.layers()}
    new_kernels = {layer.name: layer.kernels for layer in edited.layers()}
    for name, gone in plan.removed.items():
        assert new_kernels[name] == kernels[name] - len(gone)
    return edited


def assert_same_function(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    x = zoo.random_input(before, batch=3, seed=2)
    for g, w in zip(zoo.run(after, x), zoo.run(before, x), strict=True):
        np.testing.assert_allclose(g, w, rtol=ATOL, atol=ATOL)


def editable_layers(proto: onnx.ModelProto) -> list[str]:
    """Layers whose kernels do not reach the graph output (the classifier's do)."""
    outputs = {o.name for o in proto.graph.output}
    return [layer.name for layer in find_layers(proto) if layer.probe not in outputs
            and layer.output not in outputs]


# --------------------------------------------------------------------------------------------
# private builders for structures the zoo does not have


class _Net:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op: str, name: str, inputs: Sequence[str], **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [f"{name}_out"], name=name,
                                           **attrs))
        return f"{name}_out"

    def conv(self, name: str, x: str, c_in: int, c_out: int, k: int = 3, group: int = 1,
             pads: int | None = None) -> str:
        w = self.rng.normal(0, (c_in // group * k * k) ** -0.5, (c_out, c_in // group, k, k))
        b = self.rng.uniform(-0.1, 0.1, c_out)
        return self.op("Conv", name, [x, self.const(f"{name}.weight", w.astype(np.float32)),
                                      self.const(f"{name}.bias", b.astype(np.float32))],
                       kernel_shape=[k, k], pads=[k // 2 if pads is None else pads] * 4,
                       group=group)

    def gemm(self, name: str, x: str, n_in: int, n_out: int) -> str:
        w = self.rng.normal(0, n_in ** -0.5, (n_out, n_in)).astype(np.float32)
        b = self.rng.uniform(-0.1, 0.1, n_out).astype(np.float32)
        return self.op("Gemm", name, [x, self.const(f"{name}.weight", w),
                                      self.const(f"{name}.bias", b)], transB=1)

    def bn(self, name: str, x: str, c: int, shift: bool = True) -> str:
        scale = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        bias = self.rng.normal(0, 0.2, c).astype(np.float32) if shift else np.zeros(c, np.float32)
        mean = self.rng.normal(0, 0.2, c).astype(np.float32) if shift else np.zeros(c, np.float32)
        var = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        return self.op("BatchNormalization", name,
                       [x] + [self.const(f"{name}.{p}", v) for p, v in
                              (("scale", scale), ("bias", bias), ("mean", mean), ("var", var))])

    def head(self, x: str, c: int, classes: int = 3, opset: int = 17) -> onnx.ModelProto:
        x = self.op("GlobalAveragePool", "gap", [x])
        x = self.op("Flatten", "flatten", [x], axis=1)
        self.gemm("fc", x, c, classes)
        self.nodes[-1].output[0] = "logits"
        graph = helper.make_graph(
            self.nodes, "test", [helper.make_tensor_value_info("input", 1, ["N", 3, 8, 8])],
            [helper.make_tensor_value_info("logits", 1, ["N", classes])], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  ir_version=8)
        onnx.checker.check_model(model, full_check=True)
        return model


def post_probe_bn(shift: bool = True) -> onnx.ModelProto:
    """conv1 → relu1 → pool → bn (after the probe) → conv2 → relu2 → head."""
    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4)])
    x = net.op("MaxPool", "pool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = net.bn("bn", x, 4, shift=shift)
    return net.head(net.op("Relu", "relu2", [net.conv("conv2", x, 4, 5)]), 5)


def squeeze_excite() -> onnx.ModelProto:
    """conv1 → relu1 → x; gap → flatten → se1 → relu → se2 → Sigmoid → Reshape (N, K, 1, 1)
    → Mul(x, ·) → conv2 → relu2 → head. se2's neurons are coupled to conv1's kernels."""
    net, k = _Net(), 6
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, k)])
    s = net.op("GlobalAveragePool", "se_gap", [x])
    s = net.op("Flatten", "se_flat", [s], axis=1)
    s = net.op("Relu", "se_relu", [net.gemm("se1", s, k, 2)])
    s = net.op("Sigmoid", "se_sigmoid", [net.gemm("se2", s, 2, k)])
    s = net.op("Reshape", "se_reshape", [s, net.const("se_shape", np.array([-1, k, 1, 1]))])
    x = net.op("Mul", "se_mul", [x, s])
    return net.head(net.op("Relu", "relu2", [net.conv("conv2", x, k, 5)]), 5)


def grouped() -> onnx.ModelProto:
    """conv1 (8) → relu1 → conv2 (8 → 8, group 2) → relu2 → head."""
    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 8)])
    return net.head(net.op("Relu", "relu2", [net.conv("conv2", x, 8, 8, group=2)]), 8)


def depthwise_multiplier() -> onnx.ModelProto:
    """conv1 (4) → relu1 → dw (group 4, 8 kernels: multiplier 2) → relu2 → pw (1x1, 5) →
    relu3 → head."""
    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4)])
    x = net.op("Relu", "relu2", [net.conv("dw", x, 4, 8, group=4)])
    return net.head(net.op("Relu", "relu3", [net.conv("pw", x, 8, 5, k=1)]), 5)


def merge_with_input(op: str) -> onnx.ModelProto:
    """conv1 (3) → relu1 → ``op``(relu1, input) → conv2 → relu2 → head (Concat on channels
    or Add)."""
    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 3)])
    attrs = {"axis": 1} if op == "Concat" else {}
    x = net.op(op, "merge", [x, "input"], **attrs)
    c = 6 if op == "Concat" else 3
    return net.head(net.op("Relu", "relu2", [net.conv("conv2", x, c, 5)]), 5)


def after_activation(op: str, **attrs: object) -> onnx.ModelProto:
    """conv1 → relu1 → ``op`` → conv2 → relu2 → head."""
    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4)])
    x = net.op(op, "middle", [x], **attrs)
    return net.head(net.op("Relu", "relu2", [net.conv("conv2", x, 4, 5)]), 5)


def pad_resize(pad_value: float = 0.0) -> onnx.ModelProto:
    """conv1 → relu1 → Pad (spatial, constant ``pad_value``) → Resize (x2 nearest) → conv2 →
    relu2 → head."""
    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4)])
    pads = net.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64))
    value = net.const("pad_value", np.array(pad_value, dtype=np.float32))
    x = net.op("Pad", "pad", [x, pads, value], mode="constant")
    scales = net.const("scales", np.array([1, 1, 2, 2], dtype=np.float32))
    x = net.op("Resize", "resize", [x, "", scales], mode="nearest")
    return net.head(net.op("Relu", "relu2", [net.conv("conv2", x, 4, 5)]), 5)


def resnet_bn() -> onnx.ModelProto:
    """stem conv → bn → relu (x0); block: conv_a → bn_a → relu_a → conv_b → bn_b → Add(·, x0)
    → relu → head. conv_b is coupled to the stem."""
    net = _Net()
    x0 = net.op("Relu", "stem_relu", [net.bn("stem_bn", net.conv("stem", "input", 3, 4), 4)])
    x = net.op("Relu", "relu_a", [net.bn("bn_a", net.conv("conv_a", x0, 4, 4), 4)])
    x = net.bn("bn_b", net.conv("conv_b", x, 4, 4), 4)
    x = net.op("Relu", "relu_out", [net.op("Add", "add", [x, x0])])
    return net.head(x, 4)


# --------------------------------------------------------------------------------------------
# removal, structure by structure

ZOO_CASES = [(name, layer) for name, build in zoo.BUILDERS.items()
             for layer in editable_layers(build())]


@pytest.mark.parametrize("builder, layer", ZOO_CASES)
@pytest.mark.parametrize("pick", ["first", "last_two"])
def test_removal_equals_zeroing_at_the_probe(builder, layer, pick):
    proto = zoo.BUILDERS[builder]()
    k = Model(proto).layer(layer).kernels
    kernels = [0] if pick == "first" else [k - 2, k - 1]
    assert_removal_exact(proto, {layer: kernels})


@pytest.mark.parametrize("builder", ["chain", "bn_kept", "concat", "reduce_mean_head",
                                     "reshape_matmul"])
def test_removal_in_several_layers_at_once(builder):
    proto = zoo.BUILDERS[builder]()
    removals = {name: [0] for name in editable_layers(proto)}
    assert_removal_exact(proto, removals)


@pytest.mark.parametrize("options", [{"opset": 13}, {"opset": 18}, {"opset": 21},
                                     {"fixed_batch": 2}, {"empty_names": True}])
def test_removal_across_opsets_batches_and_unnamed_nodes(options):
    for builder in ("chain", "reduce_mean_head", "residual", "reshape_matmul"):
        if builder == "reshape_matmul" and options.get("fixed_batch"):
            proto = zoo.reshape_matmul(target="batch", **options)
        else:
            proto = zoo.BUILDERS[builder](**options)
        for layer in editable_layers(proto):
            assert_removal_exact(proto, {layer: [1]})


@pytest.mark.parametrize("target, source", [("minus_one", "initializer"), ("zero", "constant"),
                                            ("minus_one", "constant")])
def test_reshape_targets_are_updated(target, source):
    proto = zoo.reshape_matmul(target=target, shape_source=source)
    edited = assert_removal_exact(proto, {"conv1": [0, 2]})
    if target == "minus_one":
        reshape = next(n for n in edited.proto.graph.node if n.op_type == "Reshape")
        assert reshape.input[1] == "reshape1.shape"  # same name, new value
        values = [numpy_helper.to_array(t) for t in edited.proto.graph.initializer
                  if t.name == "reshape1.shape"]
        values += [numpy_helper.to_array(a.t) for n in edited.proto.graph.node
                   if n.op_type == "Constant" for a in n.attribute]
        assert [v.tolist() for v in values] == [[-1, 2 * 8 * 8]]


def test_residual_coupling_propagates_to_every_coupled_layer():
    proto = zoo.residual()
    plan = plan_removal(Model(proto), {"conv3": [1, 2]})
    assert plan.removed == {"conv1": (1, 2), "conv3": (1, 2)}
    assert plan.coupled == ("conv1",)
    assert_removal_exact(proto, {"conv3": [1, 2]})
    assert_removal_exact(proto, {"conv1": [0], "conv3": [3]})  # union of both


def test_residual_coupling_refused_on_request_names_the_coupled_layer():
    model = Model(zoo.residual())
    with pytest.raises(EditError) as info:
        remove_kernels(model, {"conv1": [0]}, coupled="refuse")
    message = str(info.value)
    assert "'conv3'" in message and "add1" in message and "coupled='propagate'" in message
    # naming every coupled layer in the same step is explicit enough
    assert_removal_exact(model.proto, {"conv1": [0], "conv3": [0]}, coupled="refuse")


def test_resnet_with_batch_norm_in_the_residual_branch():
    proto = resnet_bn()
    assert plan_removal(Model(proto), {"conv_b": [1]}).removed == {"stem": (1,), "conv_b": (1,)}
    assert_removal_exact(proto, {"conv_b": [1]})
    assert_removal_exact(proto, {"conv_a": [0, 3]})


def test_depthwise_channels_and_groups_follow_the_producer():
    proto = zoo.depthwise()
    edited = assert_removal_exact(proto, {"conv1": [0, 2]})
    dw = next(n for n in edited.proto.graph.node if n.name == "dwconv2")
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 2
    # removing a depthwise kernel takes its input channel too, even with coupled="refuse"
    assert plan_removal(Model(proto), {"dwconv2": [1]}, coupled="refuse").removed == {
        "conv1": (1,), "dwconv2": (1,)}
    assert_removal_exact(proto, {"dwconv2": [1]}, coupled="refuse")


def per_channel_group_norm(groups: int = 4, pad: int = 1) -> onnx.ModelProto:
    """conv1 (4) -> nn.GroupNorm(groups, 4) as the legacy exporter writes it (Reshape to
    (N, groups, -1) -> InstanceNormalization -> Reshape back to Shape(conv output) -> Mul ->
    Add, the shifts positive) -> ReLU -> conv2 (3, padded by ``pad``) -> global average pool ->
    Flatten -> Gemm."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.array([0, groups, -1], np.int64), "grouped"),
             numpy_helper.from_array(np.ones(groups, np.float32), "in_scale"),
             numpy_helper.from_array(np.zeros(groups, np.float32), "in_bias"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, (4, 1, 1)).astype(np.float32), "g"),
             numpy_helper.from_array(rng.uniform(0.2, 0.8, (4, 1, 1)).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(size=(3, 4, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(size=(2, 3)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Reshape", ["c1", "grouped"], ["r1"]),
             helper.make_node("InstanceNormalization", ["r1", "in_scale", "in_bias"], ["n1"]),
             helper.make_node("Shape", ["c1"], ["c1_shape"]),
             helper.make_node("Reshape", ["n1", "c1_shape"], ["r2"]),
             helper.make_node("Mul", ["r2", "g"], ["scaled"]),
             helper.make_node("Add", ["scaled", "b"], ["shifted"]),
             helper.make_node("Relu", ["shifted"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2"], ["c2"], name="conv2", pads=[pad] * 4),
             helper.make_node("GlobalAveragePool", ["c2"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("pad", [0, 1])
def test_removal_through_a_per_channel_group_norm_zeroes_at_the_relu(pad: int):
    """nn.GroupNorm(C, C) as the legacy exporter writes it normalises each channel alone,
    so the surgery removes through it. The conv output is read twice (by the Reshape and by
    the Shape the Reshape back reads): the chain to the probe went on no further, so the
    surgery took the removed channel as zero at the conv output and folded ReLU(shift) into
    the next layer's bias, 2e-2 off the removal at the probe, with no warning (or, before a
    padded conv, refused the removal)."""
    proto = per_channel_group_norm(pad=pad)
    assert find_layers(proto)[0].chain[-1] == "Relu"
    for kernels in ([0], [1, 3], [0, 2, 3]):
        assert_removal_exact(proto, {"conv1": kernels})
    with pytest.raises(EditError, match="'r1' \\(Reshape\\) reshapes the channel axis"):
        remove_kernels(Model(per_channel_group_norm(groups=2)), {"conv1": [0]})  # 2 a group


def native_group_norm(groups: int, opset: int) -> onnx.ModelProto:
    """conv1 (4) -> ONNX GroupNormalization(num_groups=``groups``; scale and bias per channel
    at opset 21, per group at 18) -> ReLU -> conv2 (3, padded) -> global average pool ->
    Flatten -> Gemm."""
    rng = np.random.default_rng(6)
    params = 4 if opset >= 21 else groups
    inits = [numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, params).astype(np.float32), "gs"),
             numpy_helper.from_array(rng.uniform(0.2, 0.8, params).astype(np.float32), "gb"),
             numpy_helper.from_array(rng.normal(size=(3, 4, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(size=(2, 3)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("GroupNormalization", ["c1", "gs", "gb"], ["n1"], name="gn",
                              num_groups=groups),
             helper.make_node("Relu", ["n1"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2"], ["c2"], name="conv2", pads=[1] * 4),
             helper.make_node("GlobalAveragePool", ["c2"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["y"], name="fc", transB=1)]
    model = zoo.hand_built(nodes, inits, ["N", 2, 6, 6], ["N", 2], opset=opset, name="g")
    model.ir_version = 10 if opset >= 21 else 8
    return model


@pytest.mark.filterwarnings("ignore:the input model fails the ONNX checker")  # opset 18's op
@pytest.mark.parametrize("opset", [18, 21])
def test_removal_through_a_native_group_norm_of_one_channel_a_group(opset: int):
    """An ONNX GroupNormalization with num_groups = C normalises each channel alone: the
    surgery edits through it (it was refused as an unsupported op), num_groups following;
    with two channels a group it is refused, naming why."""
    proto = native_group_norm(4, opset)
    for kernels in ([0], [1, 3]):
        edited = assert_removal_exact(proto, {"conv1": kernels})
        gn = next(n for n in edited.proto.graph.node if n.op_type == "GroupNormalization")
        assert helper.get_attribute_value(gn.attribute[0]) == 4 - len(kernels)
    with pytest.raises(EditError, match=r"'gn'.* normalises groups of several channels"):
        remove_kernels(Model(native_group_norm(2, opset)), {"conv1": [0]})


def test_depthwise_with_channel_multiplier():
    proto = depthwise_multiplier()
    assert plan_removal(Model(proto), {"conv1": [1]}).removed == {"conv1": (1,), "dw": (2, 3)}
    assert_removal_exact(proto, {"conv1": [1]})
    assert_removal_exact(proto, {"dw": [2]})
    assert_removal_exact(proto, {"pw": [0, 4]})


def test_grouped_conv_accepts_equal_removals_per_group_only():
    proto = grouped()
    assert_removal_exact(proto, {"conv1": [0, 4]})
    assert_removal_exact(proto, {"conv1": [1, 2, 5, 7]})
    assert_removal_exact(proto, {"conv2": [3, 4]})
    with pytest.raises(EditError, match="same number of channels from every group"):
        remove_kernels(Model(proto), {"conv1": [0, 1]})
    with pytest.raises(EditError, match="same number of channels from every group"):
        remove_kernels(Model(proto), {"conv2": [0]})


def test_squeeze_excitation_couples_the_gate_to_the_features():
    proto = squeeze_excite()
    plan = plan_removal(Model(proto), {"conv1": [2]})
    assert plan.removed == {"conv1": (2,), "se2": (2,)}
    assert_removal_exact(proto, {"conv1": [2]})
    assert_removal_exact(proto, {"se1": [0]})


def test_concat_with_a_graph_input_keeps_the_input_channels():
    proto = merge_with_input("Concat")
    assert_removal_exact(proto, {"conv1": [1]})


def test_add_with_a_graph_input_is_refused():
    with pytest.raises(EditError) as info:
        remove_kernels(Model(merge_with_input("Add")), {"conv1": [1]})
    assert "'merge' (Add)" in str(info.value) and "no layer produces" in str(info.value)


def test_pad_and_resize_pass_channels_through():
    assert_removal_exact(pad_resize(), {"conv1": [0, 3]})



def resize_sizes_on_axes() -> onnx.ModelProto:
    """conv1 → relu1 → Resize to sizes [12, 12] given for ``axes=[2, 3]`` only (opset 18) →
    conv2 → relu2 → head."""
    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4)])
    sizes = net.const("sizes", np.array([12, 12], dtype=np.int64))
    x = net.op("Resize", "resize", [x, "", "", sizes], mode="nearest", axes=[2, 3])
    return net.head(net.op("Relu", "relu2", [net.conv("conv2", x, 4, 5)]), 5, opset=18)


def test_a_resize_whose_sizes_leave_out_the_channel_axis_passes_channels_through():
    """Its sizes name H and W alone: nothing to rewrite (it crashed with a bare ValueError)."""
    assert_removal_exact(resize_sizes_on_axes(), {"conv1": [0, 3]})
    assert_same_function(resize_sizes_on_axes(), apply(Model(resize_sizes_on_axes()),
                                                       [WidenLayer("conv1", add=2)]).proto)

def test_pad_with_a_non_zero_value_after_the_probe_is_refused():
    with pytest.raises(EditError, match=r"'pad' \(Pad\) pads with the constant 0.5"):
        remove_kernels(Model(pad_resize(0.5)), {"conv1": [0]})


@pytest.mark.parametrize("op, attrs, node", [
    ("Softmax", {"axis": 1}, "'middle' (Softmax)"),
    ("Hardmax", {"axis": 1}, "'middle' (Hardmax)"),
    ("LRN", {"size": 3}, "'middle' (LRN)"),
])
def test_unsupported_ops_on_the_path_are_named(op, attrs, node):
    proto = after_activation(op, **attrs)
    with pytest.raises(EditError) as info:
        remove_kernels(Model(proto), {"conv1": [0]})
    assert node in str(info.value)
    assert_removal_exact(proto, {"conv2": [0]})  # layers after it are fine


def test_non_zero_preserving_activation_after_the_probe_is_refused():
    with pytest.raises(EditError, match=r"'middle' \(Sigmoid\) does not map 0 to 0"):
        remove_kernels(Model(after_activation("Sigmoid")), {"conv1": [0]})
    assert_removal_exact(after_activation("Tanh"), {"conv1": [0]})


def test_batch_norm_after_the_probe_refuses_unless_its_shift_is_zero():
    with pytest.raises(EditError, match=r"'bn' \(BatchNormalization\)"):
        remove_kernels(Model(post_probe_bn()), {"conv1": [0]})
    assert_removal_exact(post_probe_bn(shift=False), {"conv1": [0, 1]})


# --------------------------------------------------------------------------------------------
# refusals


def test_refusals_name_the_problem():
    model = Model(zoo.chain())
    with pytest.raises(LayerNotFoundError, match=r"no layer 'conv9'.*conv1, conv2, fc1, fc2"):
        remove_kernels(model, {"conv9": [0]})
    with pytest.raises(EditError, match=r"has 4 kernels \(indices 0..3\); 4, 7 out of range"):
        remove_kernels(model, {"conv1": [0, 4, 7]})
    with pytest.raises(EditError, match="all 4 kernels of layer 'conv1'"):
        remove_kernels(model, {"conv1": [0, 1, 2, 3]})
    with pytest.raises(EditError, match="repeats"):
        remove_kernels(model, {"conv1": [1, 1]})
    with pytest.raises(EditError, match="graph output 'logits'"):
        remove_kernels(model, {"fc2": [0]})
    with pytest.raises(EditError, match="named by two RemoveKernels edits"):
        apply(model, [RemoveKernels("conv1", [0]), RemoveKernels("conv1", [1])])
    with pytest.raises(EditError, match="non-empty mapping"):
        remove_kernels(model, {})
    with pytest.raises(EditError, match=r"expected an onnxaom\.Model"):
        apply(model.proto, [])  # type: ignore[arg-type]


def test_coupling_that_would_empty_a_layer_is_refused():
    with pytest.raises(EditError, match=r"all 4 kernels of layer 'conv1' \(it is coupled"):
        remove_kernels(Model(zoo.residual()), {"conv3": [0, 1, 2, 3]})


# --------------------------------------------------------------------------------------------
# widen (task 2)

WIDEN_CASES = [*ZOO_CASES, ("se", "conv1"), ("se", "se1"), ("resnet_bn", "stem"),
               ("resnet_bn", "conv_a"), ("depthwise_multiplier", "pw"), ("pad_resize", "conv1"),
               ("post_probe_bn", "conv1")]
EXTRA = {"se": squeeze_excite, "resnet_bn": resnet_bn,
         "depthwise_multiplier": depthwise_multiplier, "pad_resize": pad_resize,
         "post_probe_bn": post_probe_bn}


def _build(name: str) -> onnx.ModelProto:
    return EXTRA[name]() if name in EXTRA else zoo.BUILDERS[name]()


@pytest.mark.parametrize("builder, layer", WIDEN_CASES)
@pytest.mark.parametrize("init", ["net2net", "random", "zeros"])
def test_widening_keeps_the_function(builder, layer, init):
    proto = _build(builder)
    model = Model(proto)
    k = model.layer(layer).kernels
    edited = apply(model, WidenLayer(layer, add=3, init=init, seed=1))
    assert edited.layer(layer).kernels == k + 3
    assert_same_function(proto, edited.proto)


def test_net2net_copies_the_named_sources_and_splits_the_consumer():
    proto = zoo.chain()
    edited = apply(Model(proto), WidenLayer("conv1", add=2, sources=(1, 1)))
    weights = {t.name: numpy_helper.to_array(t) for t in edited.proto.graph.initializer}
    before = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_array_equal(weights["conv1.weight"][4], before["conv1.weight"][1])
    np.testing.assert_array_equal(weights["conv1.weight"][5], before["conv1.weight"][1])
    np.testing.assert_allclose(weights["conv2.weight"][:, 1], before["conv2.weight"][:, 1] / 3)
    np.testing.assert_allclose(weights["conv2.weight"][:, 5], before["conv2.weight"][:, 1] / 3)
    assert_same_function(proto, edited.proto)


def test_widening_with_noise_breaks_symmetry():
    proto = zoo.chain()
    edited = apply(Model(proto), WidenLayer("conv1", add=2, noise=0.5, seed=3))
    x = zoo.random_input(proto, seed=0)
    assert not np.allclose(zoo.run(edited.proto, x)[0], zoo.run(proto, x)[0], atol=ATOL)


def test_random_widening_draws_new_kernels_and_zero_consumer_weights():
    proto = zoo.chain()
    edited = apply(Model(proto), WidenLayer("conv1", add=2, init="random", seed=0))
    weights = {t.name: numpy_helper.to_array(t) for t in edited.proto.graph.initializer}
    assert np.abs(weights["conv1.weight"][4:]).sum() > 0
    assert not np.any(weights["conv2.weight"][:, 4:])
    assert not np.any(weights["conv1.bias"][4:])


@pytest.mark.parametrize("op", ["Div", "Reciprocal"])
def test_zero_widening_into_an_op_infinite_at_zero_is_refused(op: str) -> None:
    """conv1 -> 2 / x (or 1 / x) -> conv2: zero-started kernels give activations of 0, then
    inf, then NaN in conv2 (0 * inf): init='zeros' is refused, naming the way out; 'random'
    and 'net2net' keep the function (they were all applied, 'zeros' with NaN outputs)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(v, n) for n, v in {
        "w1": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.3, 4).astype(np.float32),
        "two": np.full((4, 1, 1), 2.0, np.float32),
        "w2": rng.normal(0, 0.3, (5, 4, 3, 3)).astype(np.float32),
        "wf": rng.normal(0, 0.3, (3, 5)).astype(np.float32)}.items()]
    middle = (helper.make_node("Div", ["two", "c1"], ["o"], name="div") if op == "Div"
              else helper.make_node("Reciprocal", ["c1"], ["o"], name="recip"))
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
             middle,
             helper.make_node("Conv", ["o", "w2"], ["c2"], name="conv2", pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1)]
    proto = zoo.hand_built(nodes, inits, ["N", 3, 6, 6], ["N", 3])
    model = Model(proto)
    with pytest.raises(EditError, match=r"inf or NaN in output\(s\) 'y' .*WidenLayer\('conv1', "
                                        r"init='zeros'\).*init='random' or 'net2net'"):
        apply(model, WidenLayer("conv1", add=2, init="zeros"))
    x = zoo.random_input(proto, seed=1)
    for init in ("random", "net2net"):
        edited = apply(model, WidenLayer("conv1", add=2, init=init))
        np.testing.assert_allclose(zoo.run(edited.proto, x)[0], zoo.run(proto, x)[0],
                                   rtol=1e-4, atol=1e-4)


def test_widening_a_residual_group_widens_every_coupled_layer():
    model = Model(zoo.residual())
    edited = apply(model, WidenLayer("conv1", add=2))
    assert {layer.name: layer.kernels for layer in edited.layers()}["conv3"] == 6
    with pytest.raises(EditError, match=r"coupled to layer.*'conv3'"):
        apply(model, WidenLayer("conv1", add=2, coupled="refuse"))


def test_widening_into_a_depthwise_conv_grows_its_groups():
    proto = zoo.depthwise()
    edited = apply(Model(proto), WidenLayer("conv1", add=2))
    kernels = {layer.name: layer.kernels for layer in edited.layers()}
    assert kernels["conv1"] == kernels["dwconv2"] == 6
    assert_same_function(proto, edited.proto)


def test_widening_refuses_consumers_it_cannot_split():
    with pytest.raises(EditError, match="grouped conv 'conv2'"):
        apply(Model(grouped()), WidenLayer("conv1", add=1))
    with pytest.raises(EditError, match=r"'middle' \(Softmax\)"):
        apply(Model(after_activation("Softmax", axis=1)), WidenLayer("conv1", add=1))
    with pytest.raises(EditError, match="graph output"):
        apply(Model(zoo.chain()), WidenLayer("fc2", add=1))
    with pytest.raises(EditError, match="channel multiplier"):
        apply(Model(depthwise_multiplier()), WidenLayer("conv1", add=1))
    with pytest.raises(EditError, match="'dw'.*channel multiplier"):
        apply(Model(depthwise_multiplier()), WidenLayer("dw", add=1))
    with pytest.raises(EditError, match=r"sources \[9\] out of range"):
        apply(Model(zoo.chain()), WidenLayer("conv1", add=1, sources=(9,)))


# --------------------------------------------------------------------------------------------
# deepen (task 3)

DEEPEN_CASES = [("chain", "conv1"), ("chain", "conv2"), ("chain", "fc1"), ("bn_kept", "conv1"),
                ("folded_bn", "conv2"), ("residual", "conv1"), ("residual", "conv2"),
                ("concat", "conv1b"), ("depthwise", "dwconv2"), ("reshape_matmul", "conv1"),
                ("reshape_matmul", "matmul1"), ("reduce_mean_head", "conv2"),
                ("activations", "conv3"), ("activations", "conv2")]  # conv2: ReLU6 (Clip 0..6)


@pytest.mark.parametrize("builder, layer", DEEPEN_CASES)
@pytest.mark.parametrize("size", [1, 3])
def test_identity_layer_keeps_the_function(builder, layer, size):
    proto = zoo.BUILDERS[builder]()
    edited = apply(Model(proto), InsertLayer(after=layer, kernel_size=size))
    names = [x.name for x in edited.layers()]
    new = names[names.index(layer) + 1]
    assert new == f"{layer}_deep"
    assert edited.layer(new).kernels == Model(proto).layer(layer).kernels
    assert edited.layer(new).chain == ("Relu",)
    assert_same_function(proto, edited.proto)


def test_inserted_layer_can_be_named_and_randomly_initialised():
    proto = zoo.chain()
    edited = apply(Model(proto), InsertLayer("conv1", init="random", name="extra"))
    assert [x.name for x in edited.layers()] == ["conv1", "extra", "conv2", "fc1", "fc2"]
    x = zoo.random_input(proto)
    assert not np.allclose(zoo.run(edited.proto, x)[0], zoo.run(proto, x)[0], atol=ATOL)
    with pytest.raises(EditError, match="already used"):
        apply(Model(proto), InsertLayer("conv1", name="conv2"))
    # a tensor's name is no node's: the layer gets it as given (not with '_1' added), and a
    # later edit in the same step finds it
    tensor = next(n.output[0] for n in proto.graph.node if n.name == "relu1")
    named = apply(Model(proto), [InsertLayer("conv1", name=tensor),
                                 WidenLayer(tensor, add=1)])
    assert {x.name: x.kernels for x in named.layers()}[tensor] == 5


def test_insertion_needs_a_relu():
    with pytest.raises(EditError, match="Conv → LeakyRelu"):
        apply(Model(zoo.activations()), InsertLayer("conv1"))
    with pytest.raises(EditError, match=r"Conv\. Choose"):
        apply(Model(zoo.conv_pool_no_act()), InsertLayer("conv1"))
    with pytest.raises(LayerNotFoundError):
        apply(Model(zoo.chain()), InsertLayer("conv7"))


def test_insertion_after_a_probe_that_is_a_graph_output_keeps_the_output_name():
    proto = zoo.chain()
    proto.graph.output.append(helper.make_tensor_value_info("relu1_out", 1, ["N", 4, 8, 8]))
    edited = apply(Model(proto), InsertLayer("conv1"))
    assert [o.name for o in edited.proto.graph.output] == ["logits", "relu1_out"]
    assert_same_function(proto, edited.proto)


# --------------------------------------------------------------------------------------------
# sequences, replay, and what the result keeps


def test_edit_sequences_replay_from_the_metadata():
    proto = zoo.bn_kept()
    model = Model(proto)
    edits = [WidenLayer("conv1", add=2), RemoveKernels("conv1", [0, 5]),
             RemoveKernels("conv2", [1]), InsertLayer("conv2"), RemoveKernels("conv2_deep", [3]),
             WidenLayer("fc1", add=4, init="random")]
    edited = apply(model, edits)
    history = dict((p.key, p.value) for p in edited.proto.metadata_props)[METADATA_KEY]
    assert edits_from_json(history) == edits
    replayed = apply(model, edits_from_json(history))
    x = zoo.random_input(proto)
    np.testing.assert_array_equal(zoo.run(replayed.proto, x)[0], zoo.run(edited.proto, x)[0])
    # edits applied to an edited model extend its history
    again = apply(edited, RemoveKernels("conv1", [0]))
    meta = dict((p.key, p.value) for p in again.proto.metadata_props)
    assert edits_from_json(meta[METADATA_KEY]) == [*edits, RemoveKernels("conv1", [0])]


def test_the_result_keeps_opset_names_metadata_and_doc_strings():
    proto = zoo.chain(opset=18)
    proto.producer_name, proto.producer_version = "exporter", "9.9"
    proto.doc_string, proto.graph.doc_string, proto.model_version = "model doc", "graph doc", 7
    onnx.helper.set_model_props(proto, {"author": "me", "license": "MIT"})
    proto.graph.node[0].doc_string = "first conv"
    proto.graph.node[0].metadata_props.add(key="namespace", value="net/conv1")
    before = onnx.ModelProto()
    before.CopyFrom(proto)
    edited = apply(Model(proto), [RemoveKernels("conv2", [0, 1]), WidenLayer("conv1", 1)]).proto
    assert proto == before  # the input proto is untouched
    assert edited.opset_import == proto.opset_import and edited.ir_version == proto.ir_version
    assert (edited.producer_name, edited.producer_version) == ("exporter", "9.9")
    assert (edited.doc_string, edited.graph.doc_string) == ("model doc", "graph doc")
    assert edited.model_version == 7 and edited.graph.name == proto.graph.name
    meta = {p.key: p.value for p in edited.metadata_props}
    assert meta["author"] == "me" and meta["license"] == "MIT" and METADATA_KEY in meta
    assert [n.name for n in edited.graph.node] == [n.name for n in proto.graph.node]
    assert {t.name for t in edited.graph.initializer} == {t.name for t in proto.graph.initializer}
    assert edited.graph.node[0].doc_string == "first conv"
    assert edited.graph.node[0].metadata_props[0].value == "net/conv1"
    assert [i.name for i in edited.graph.input] == ["input"]
    assert len(edited.graph.value_info) == 0  # the zoo writes none, so none are added


def test_value_info_is_kept_and_updated():
    proto = onnx.shape_inference.infer_shapes(zoo.chain())
    assert len(proto.graph.value_info)
    edited = remove_kernels(Model(proto), {"conv1": [0]}).proto
    assert {v.name for v in edited.graph.value_info} == {v.name for v in proto.graph.value_info}
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in edited.graph.value_info}
    assert shapes["conv1_out"] == ["N", 3, 8, 8]
    deeper = apply(Model(proto), InsertLayer("conv1")).proto
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in deeper.graph.value_info}
    assert shapes["conv1_deep_output_0"] == ["N", 4, 8, 8]


def test_external_data_stays_external_and_the_input_file_is_untouched(tmp_path):
    proto = zoo.chain(kernels=(16, 16), hidden=64)
    path = zoo.save(proto, tmp_path / "model.onnx", external_data=True)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = onnxaom.load(path)
    edited = remove_kernels(model, {"conv2": list(range(8))})
    assert edited.external_data and edited.path is None
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    out = edited.save(tmp_path / "pruned.onnx")
    assert (tmp_path / "pruned.onnx.data").exists()
    header = onnx.load(out, load_external_data=False)
    big = next(t for t in header.graph.initializer if t.name == "fc1.weight")
    assert big.data_location == TensorProto.EXTERNAL
    assert_same_function(zeroed_at_probes(proto, {"conv2": range(8)}),
                         onnxaom.load(out).proto)
    with pytest.raises(onnxaom.ModelError, match="refusing to overwrite"):
        model.save(path)


def test_empty_edit_list_returns_an_equal_model():
    proto = zoo.chain()
    edited = apply(Model(proto), [])
    assert_same_function(proto, edited.proto)
    assert {p.key: p.value for p in edited.proto.metadata_props} == {METADATA_KEY: "[]",
                                                                      STEPS_KEY: "[]"}


def test_apply_accepts_edit_dicts():
    edited = apply(Model(zoo.chain()), [{"edit": "RemoveKernels", "layer": "conv1",
                                         "kernels": [0]}])
    assert edited.layer("conv1").kernels == 3


@pytest.mark.parametrize("builder", sorted(zoo.BUILDERS))
def test_node_order_and_layer_names_are_kept(builder):
    proto = zoo.BUILDERS[builder](empty_names=True)
    model = Model(proto)
    layer = editable_layers(proto)[0]
    for edit in (RemoveKernels(layer, [0]), WidenLayer(layer, 2)):
        edited = apply(model, edit)
        assert [n.output[0] for n in edited.proto.graph.node] == \
            [n.output[0] for n in proto.graph.node]
        assert [x.name for x in edited.layers()] == [x.name for x in model.layers()]


def test_inserted_layers_come_right_after_their_activation():
    edited = apply(Model(zoo.concat()), InsertLayer("conv1a"))
    assert [n.name for n in edited.proto.graph.node][:5] == [
        "conv1a", "relu1a", "conv1a_deep", "conv1a_deep_relu", "conv1b"]


def test_insertion_keeps_the_names_of_unnamed_layers():
    model = Model(zoo.chain(empty_names=True))
    edited = apply(model, InsertLayer("Conv_0"))
    assert [x.name for x in edited.layers()] == ["Conv_0", "Conv_0_deep", "Conv_1", "Gemm_0",
                                                 "Gemm_1"]


def test_a_real_node_name_is_never_given_to_an_unnamed_layer():
    """An unnamed conv would be "Conv_0"; beside a node really named "Conv_0" it is
    "Conv_0_1", and the name picks the node that has it (the edit went to the unnamed conv)."""
    proto = zoo.chain()
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    convs[0].name, convs[1].name = "", "Conv_0"
    model = Model(proto)
    assert [x.name for x in model.layers()][:2] == ["Conv_0_1", "Conv_0"]
    assert model.layer("Conv_0").node_index == list(proto.graph.node).index(convs[1])
    edited = remove_kernels(model, {"Conv_0": [0]})
    assert [x.kernels for x in edited.layers()][:2] == [4, 7]


def _flatten_head(kind: str) -> onnx.ModelProto:
    """conv1 → relu → conv2 → relu → a flatten → fc, the flatten as other exporters write it:
    ``slice_batch``: Reshape to Concat(Slice(Shape(x), 0, 1), [-1]); ``nhwc_flatten``:
    Transpose to NHWC then Flatten (tf2onnx's Keras Flatten)."""
    net = _Net(3)
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4)])
    x = net.op("Relu", "relu2", [net.conv("conv2", x, 4, 5)])
    if kind == "slice_batch":
        shape = net.op("Shape", "shape", [x])
        batch = net.op("Slice", "batch", [shape, net.const("zero", np.array([0])),
                                          net.const("one", np.array([1]))])
        target = net.op("Concat", "target", [batch, net.const("rest", np.array([-1]))], axis=0)
        x = net.op("Reshape", "flat", [x, target])
    else:
        x = net.op("Transpose", "nhwc", [x], perm=[0, 2, 3, 1])
        x = net.op("Flatten", "flat", [x], axis=1)
    net.gemm("fc", x, 5 * 8 * 8, 3)
    net.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        net.nodes, "test", [helper.make_tensor_value_info("input", 1, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", 1, ["N", 3])], net.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("kind", ["slice_batch", "nhwc_flatten"])
def test_flatten_heads_of_other_exporters_take_every_edit(kind):
    proto = _flatten_head(kind)
    for removed in ([0, 3], [1], [0, 1, 2, 4]):
        assert_removal_exact(proto, {"conv2": removed})
    assert_same_function(proto, apply(Model(proto), WidenLayer("conv2", add=3)).proto)
    assert_removal_exact(proto, {"conv1": [2]})


def test_a_refused_coupling_names_the_merge_not_a_silu_multiply():
    """SiLU exported as x * Sigmoid(x) multiplies a layer's channels by a function of
    themselves: no coupling. Only the residual Add couples conv1 and conv2."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(4, 4, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(size=(3, 4, 3, 3)).astype(np.float32), "w3")]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Sigmoid", ["c1"], ["g1"], name="sig1"),
             helper.make_node("Mul", ["c1", "g1"], ["s1"], name="silu1"),
             helper.make_node("Conv", ["s1", "w2"], ["c2"], name="conv2", pads=[1] * 4),
             helper.make_node("Sigmoid", ["c2"], ["g2"], name="sig2"),
             helper.make_node("Mul", ["c2", "g2"], ["s2"], name="silu2"),
             helper.make_node("Add", ["s1", "s2"], ["sum"], name="residual"),
             helper.make_node("Conv", ["sum", "w3"], ["c3"], name="conv3", pads=[1] * 4),
             helper.make_node("ReduceMean", ["c3"], ["logits"], axes=[2, 3], keepdims=0)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 7
    with pytest.raises(EditError) as info:
        remove_kernels(Model(proto), {"conv1": [0]}, coupled="refuse")
    assert "merged by node 'residual' (Add));" in str(info.value)
    assert "silu" not in str(info.value)
    assert_removal_exact(proto, {"conv1": [0]})  # propagated to conv2, exact


def test_a_widening_that_cannot_fit_in_memory_is_refused_before_allocating():
    proto = zoo.residual()
    with pytest.raises(EditError, match=r"add=100000000\): .* could need up to .* GiB of weights"):
        apply(Model(proto), [WidenLayer("conv1", 100_000_000)])


def test_a_flatten_of_unknown_spatial_size_takes_it_from_the_dense_reader():
    """Input H and W symbolic (as a legacy export with computed reflect-pad amounts leaves
    them): the Flatten's positions per channel come from fc1's weight width."""
    proto = zoo.chain(kernels=(4, 6))
    for axis in (2, 3):
        dim = proto.graph.input[0].type.tensor_type.shape.dim[axis]
        dim.Clear()
        dim.dim_param = "HW"[axis - 2]
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    model = Model(proto)
    plan = plan_removal(model, {"conv2": [0, 4]})
    edited = remove_kernels(model, {"conv2": [0, 4]})
    np.testing.assert_allclose(zoo.run(edited.proto, x)[0],
                               zoo.run(zeroed_at_probes(proto, plan.removed), x)[0],
                               rtol=ATOL, atol=ATOL)
    fc1 = next(t for t in edited.proto.graph.initializer if t.name.startswith("fc1") and
               len(t.dims) == 2)
    assert 4 * 9 in tuple(fc1.dims)  # 6 - 2 channels of 3 x 3 positions


def test_a_transposed_conv_reading_a_layer_loses_or_gains_its_input_rows():
    """conv1 -> relu -> ConvTranspose (weight (C_in, C_out, kh, kw)) -> relu -> gap -> fc."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(6, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(6,)).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(size=(6, 4, 2, 2)).astype(np.float32), "wt"),
             numpy_helper.from_array(rng.normal(size=(4,)).astype(np.float32), "bt"),
             numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "wf")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("ConvTranspose", ["r1", "wt", "bt"], ["u"], name="up",
                              strides=[2, 2]),
             helper.make_node("Relu", ["u"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1)]
    proto = zoo.hand_built(nodes, inits, ["N", 3, 8, 8], ["N", 3])
    assert_removal_exact(proto, {"conv1": [0, 3]})
    wider = apply(Model(proto), [WidenLayer(layer="conv1", add=2)])
    assert_same_function(proto, wider.proto)
    grouped_up = onnx.ModelProto()
    grouped_up.CopyFrom(proto)
    grouped_up.graph.node[2].attribute.append(helper.make_attribute("group", 2))
    grouped_up.graph.initializer[2].CopyFrom(
        numpy_helper.from_array(rng.normal(size=(6, 2, 2, 2)).astype(np.float32), "wt"))
    with pytest.raises(EditError, match="grouped transposed conv"):
        remove_kernels(Model(grouped_up), {"conv1": [0, 3]})


def test_constants_that_an_export_left_unfolded_are_read_as_constants():
    """What ``dynamo=True, optimize=False`` and ``do_constant_folding=False`` exports write: a
    zero conv bias as ``Expand(CastLike(0, x), Shape(w))``, ReLU6 bounds as ``CastLike(6, x)``,
    a PReLU slope as ``Unsqueeze(slope)`` and ReduceMean axes as ``Reshape(constant)``."""
    rng = np.random.default_rng(1)
    const = helper.make_tensor
    inits = [numpy_helper.from_array(rng.normal(size=(6, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(5, 6, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.uniform(0.1, 0.3, 5).astype(np.float32), "slope"),
             numpy_helper.from_array(rng.normal(size=(3, 5)).astype(np.float32), "wf")]
    nodes = [
        helper.make_node("Constant", [], ["zero"], value=const("z", TensorProto.FLOAT, [], [0])),
        helper.make_node("CastLike", ["zero", "x"], ["zero_like"]),
        helper.make_node("Shape", ["w1"], ["w1_k"], start=0, end=1),
        helper.make_node("Expand", ["zero_like", "w1_k"], ["b1"]),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Constant", [], ["lo"], value=const("lo", TensorProto.FLOAT, [], [0])),
        helper.make_node("Constant", [], ["hi"], value=const("hi", TensorProto.FLOAT, [], [6])),
        helper.make_node("CastLike", ["lo", "c1"], ["lo_like"]),
        helper.make_node("CastLike", ["hi", "c1"], ["hi_like"]),
        helper.make_node("Clip", ["c1", "lo_like", "hi_like"], ["r1"], name="relu6"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1] * 4),
        helper.make_node("Constant", [], ["axes_1d"],
                         value=const("a", TensorProto.INT64, [2], [1, 2])),
        helper.make_node("Unsqueeze", ["slope", "axes_1d"], ["slope_chw"]),
        helper.make_node("PRelu", ["c2", "slope_chw"], ["p2"], name="prelu"),
        helper.make_node("Constant", [], ["axes_2d"],
                         value=const("a2", TensorProto.INT64, [1, 2], [2, 3])),
        helper.make_node("Constant", [], ["flat"], value=const("f", TensorProto.INT64, [1], [-1])),
        helper.make_node("Reshape", ["axes_2d", "flat"], ["axes"]),
        helper.make_node("ReduceMean", ["p2", "axes"], ["g"], keepdims=0),
        helper.make_node("Gemm", ["g", "wf"], ["y"], name="fc", transB=1)]
    proto = zoo.hand_built(nodes, inits, ["N", 3, 6, 6], ["N", 3], opset=18)
    onnx.checker.check_model(proto, full_check=True)
    assert_removal_exact(proto, {"conv1": [0, 4]})
    assert_removal_exact(proto, {"conv2": [1]})


@pytest.mark.parametrize("variant", ["shape_of_transposed", "gather_of_transposed",
                                     "slice_of_shape_from_1"])
def test_a_size_that_is_not_the_batch_is_not_taken_for_it(variant):
    """``Reshape(y, Concat(b, [4], [-1]))`` where ``b`` is y's channel count read through a
    Transpose or a Shape starting at axis 1, not the batch (both are 4 here): taking it for the
    batch would regroup samples after an edit. It is read as the channel count it is, which
    the target puts at the batch's position, so the edit is refused."""
    def i64(name, values):
        return numpy_helper.from_array(np.array(values, np.int64), name)

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "wf"),
             i64("zero", [0]), i64("one", [1]), i64("four", [4]), i64("flat", [-1]),
             i64("axes", [0, 2]), numpy_helper.from_array(np.array(0, np.int64), "zero_scalar")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["act"], name="relu1")]
    if variant == "shape_of_transposed":
        nodes += [helper.make_node("Transpose", ["act"], ["t"], perm=[1, 0, 2, 3]),
                  helper.make_node("Shape", ["t"], ["b"], start=0, end=1)]
    elif variant == "gather_of_transposed":
        nodes += [helper.make_node("Transpose", ["act"], ["t"], perm=[1, 0, 2, 3]),
                  helper.make_node("Shape", ["t"], ["s"]),
                  helper.make_node("Gather", ["s", "zero_scalar"], ["g"], axis=0),
                  helper.make_node("Unsqueeze", ["g", "zero"], ["b"])]
    else:
        nodes += [helper.make_node("Shape", ["act"], ["s"], start=1),
                  helper.make_node("Slice", ["s", "zero", "one"], ["b"])]
    nodes += [helper.make_node("Concat", ["b", "four", "flat"], ["target"], axis=0),
              helper.make_node("Reshape", ["act", "target"], ["r"], name="reshape"),
              helper.make_node("ReduceMean", ["r", "axes"], ["m"], keepdims=1),
              helper.make_node("Flatten", ["m"], ["f"], axis=1),
              helper.make_node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1)]
    proto = zoo.hand_built(nodes, inits, [4, 3, 4, 4], [1, 3], opset=18)
    with pytest.raises(EditError, match="puts the channel count of tensor '(t|act)' at "
                                        "position 0 of its target shape"):
        remove_kernels(Model(proto), {"conv1": [1, 3]})


def test_a_tf2onnx_flatten_with_a_dynamic_batch_is_editable():
    """tf2onnx's Keras ``Flatten`` with a dynamic batch: ``Transpose`` to NHWC, then a
    ``Reshape`` whose target is ``Cast(Concat(Slice(Cast(Gather(Shape(x), perm)), 0, 1),
    [H*W*C]))``, the transposed shape's batch entry, in int32."""
    def ints(name, values, dtype=np.int64):
        return numpy_helper.from_array(np.array(values, dtype), name)

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(6 * 6 * 4, 3)).astype(np.float32), "wf"),
             ints("perm", [0, 2, 3, 1]), ints("zero", [0]), ints("one", [1]),
             ints("features", [6 * 6 * 4], np.int32)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["act"], name="relu1"),
             helper.make_node("Transpose", ["act"], ["nhwc"], perm=[0, 2, 3, 1]),
             helper.make_node("Shape", ["act"], ["shape"]),
             helper.make_node("Gather", ["shape", "perm"], ["nhwc_shape"], axis=0),
             helper.make_node("Cast", ["nhwc_shape"], ["nhwc_shape32"], to=TensorProto.INT32),
             helper.make_node("Slice", ["nhwc_shape32", "zero", "one", "zero"], ["batch"]),
             helper.make_node("Concat", ["batch", "features"], ["target32"], axis=0),
             helper.make_node("Cast", ["target32"], ["target"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["nhwc", "target"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "wf"], ["y"], name="fc")]
    proto = zoo.hand_built(nodes, inits, ["N", 3, 6, 6], ["N", 3], opset=13)
    onnx.checker.check_model(proto, full_check=True)
    edited = assert_removal_exact(proto, {"conv1": [0, 3]})
    target = {t.name: numpy_helper.to_array(t) for t in edited.proto.graph.initializer}
    assert target["features"].tolist() == [6 * 6 * 2]
    assert_same_function(proto, apply(Model(proto), WidenLayer("conv1", add=2)).proto)


@pytest.mark.parametrize("ir_version", [3, 8])
def test_initializers_listed_as_inputs_stay_listed(ir_version):
    """IR version 3 requires every initializer among the graph inputs; old exporters
    (``keep_initializers_as_inputs=True``) list them at any IR version. Every edit keeps that
    listing, at the edited shapes (onnx-graphsurgeon exports initializers only as
    initializers, which failed the checker at IR 3)."""
    proto = zoo.chain(opset=9)
    proto.ir_version = ir_version
    proto.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in proto.graph.initializer)
    onnx.checker.check_model(proto, full_check=True)
    for layer in editable_layers(proto):
        edited = assert_removal_exact(proto, {layer: [0]})
        declared = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
                    for i in edited.proto.graph.input}
        assert declared == {"input": declared["input"], **{
            t.name: list(t.dims) for t in edited.proto.graph.initializer}}
        assert edited.proto.graph.input[0].name == "input"
    for edit in (WidenLayer("conv1", 2), InsertLayer("conv1")):
        edited = apply(Model(proto), [edit])
        assert {t.name for t in edited.proto.graph.initializer} <= {
            i.name for i in edited.proto.graph.input}


def test_a_depthwise_conv_with_a_multiplier_on_the_graph_input_is_a_grouped_conv():
    """A depthwise conv reading the image (3 channels, 2 kernels each) ties its kernels to no
    layer's channels: it loses the same number of kernels in every group, like any grouped
    conv; without a multiplier a kernel cannot go (its input channel is the image's)."""
    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("dw", "input", 3, 6, group=3)])
    x = net.op("Relu", "relu2", [net.conv("conv2", x, 6, 4)])
    proto = net.head(x, 4)
    edited = assert_removal_exact(proto, {"dw": [0, 3, 5]})  # one of each group's two
    assert [a.i for a in next(n for n in edited.proto.graph.node if n.name == "dw").attribute
            if a.name == "group"] == [3]
    with pytest.raises(EditError, match=r"would lose \[1, 0, 0\] output channels per group"):
        remove_kernels(Model(proto), {"dw": [0]})
    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("dw", "input", 3, 3, group=3)])
    proto = net.head(net.op("Relu", "relu2", [net.conv("conv2", x, 3, 4)]), 4)
    with pytest.raises(EditError, match="depthwise conv on tensor 'input', whose channels no "
                                        "layer produces"):
        remove_kernels(Model(proto), {"dw": [0]})


def test_a_matmul_whose_weight_is_a_reshaped_constant_is_a_layer():
    """MNIST-8 (CNTK) writes its dense layer as MatMul(flatten, Reshape(W)): a layer, counted
    and summed up (it was left out), and a removal before it slices the reshaped weight."""
    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4, k=3, pads=1)])
    x = net.op("MaxPool", "pool", [x], kernel_shape=[2, 2], strides=[2, 2])
    flat = net.op("Reshape", "flat", [x, net.const("target", np.array([-1, 64]))])
    w = net.op("Reshape", "w_shape", [net.const("w_flat", net.rng.normal(size=64 * 3)
                                                .astype(np.float32)),
                                      net.const("w_target", np.array([64, 3]))])
    net.op("MatMul", "dense", [flat, w])
    net.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        net.nodes, "test", [helper.make_tensor_value_info("input", 1, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", 1, [1, 3])], net.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = Model(proto)
    assert [(x.name, x.op, x.kernels) for x in model.layers()] == [("conv1", "Conv", 4),
                                                                   ("dense", "MatMul", 3)]
    assert onnxaom.summary(model).layers[1].params == 64 * 3
    assert_removal_exact(proto, {"conv1": [1]}, batch=1)


def test_an_input_model_the_checker_rejects_is_checked_by_onnx_runtime():
    """ONNX Runtime runs models the checker rejects (an int64 Constant at opset 8, in
    emotion_ferplus-style files): an edit is checked by loading the result in ONNX Runtime,
    with a warning, instead of being refused as "a bug in onnxaom's surgery"."""
    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4)])
    x = net.op("Relu", "relu2", [net.conv("conv2", x, 4, 4)])
    net.nodes.append(helper.make_node("Constant", [], ["target"], name="target_c",
                                      value=numpy_helper.from_array(np.array([1, 256]))))
    flat = net.op("Reshape", "flat", [x, "target"])
    net.gemm("fc", flat, 256, 3)
    net.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        net.nodes, "test", [helper.make_tensor_value_info("input", 1, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", 1, [1, 3])], net.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)
    with pytest.raises(Exception, match="int64"):
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    with pytest.warns(UserWarning, match="fails the ONNX checker or shape inference itself"):
        edited = assert_removal_exact(proto, {"conv1": [1]}, batch=1)
    assert edited.layer("conv1").kernels == 3


def test_a_model_before_opset_7_is_refused_by_the_surgery():
    """Opset 6 and before broadcast Add and Mul by attributes (a (K,) bias added on axis 1)
    that the surgery does not read: a widening wrote a bias of the old width. Refused, with
    the conversion to use."""
    proto = zoo.chain()
    proto.opset_import[0].version = 6
    with pytest.raises(EditError, match=r"at opset 6: the surgery reads opset 7 and later.*"
                                        r"convert_version\(proto, 7\)"):
        apply(Model(proto), WidenLayer("conv1", 2))


def _weight_fused_at_run_time(proto: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    """``proto`` with ``layer``'s weight written as onnxoptimizer's ``fuse_bn_into_conv``
    leaves it: ``W * Unsqueeze(gamma / Sqrt(var + eps))``, computed from initializers."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == layer)
    weight = numpy_helper.to_array(inits[node.input[1]])
    k = weight.shape[0]
    rng = np.random.default_rng(5)
    gamma = rng.uniform(0.5, 1.5, k).astype(np.float32)
    var = rng.uniform(0.5, 2.0, k).astype(np.float32)
    scale = gamma / np.sqrt(var + np.float32(1e-5))
    for name, value in (("raw_w", weight / scale[:, None, None, None]), ("gamma", gamma),
                        ("var", var), ("eps", np.float32(1e-5)),
                        ("axes", np.array([1, 2, 3], np.int64))):
        model.graph.initializer.append(numpy_helper.from_array(
            np.asarray(value, np.float32 if name != "axes" else np.int64), name))
    fused = [helper.make_node("Add", ["var", "eps"], ["var_eps"]),
             helper.make_node("Sqrt", ["var_eps"], ["std"]),
             helper.make_node("Div", ["gamma", "std"], ["scale"]),
             helper.make_node("Unsqueeze", ["scale", "axes"], ["scale4"]),
             helper.make_node("Mul", ["raw_w", "scale4"], ["fused_w"])]
    node.input[1] = "fused_w"
    nodes = fused + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_a_weight_computed_from_constants_is_folded_and_edited_exactly() -> None:
    """onnxoptimizer's BN fusion writes conv weights as Sqrt/Div/Mul of initializers: they are
    folded (float32, as ONNX Runtime computes them) and every edit stays exact."""
    proto = _weight_fused_at_run_time(zoo.chain(), "conv1")
    assert_removal_exact(proto, {"conv1": [1, 2]})
    assert_removal_exact(proto, {"conv2": [0, 5]})
    model = Model(proto)
    wider = onnxaom.apply(model, [WidenLayer(layer="conv1", add=2, init="zeros")])
    x = zoo.random_input(proto, batch=3, seed=2)
    for g, w in zip(zoo.run(wider.proto, x), zoo.run(proto, x), strict=True):
        np.testing.assert_allclose(g, w, rtol=ATOL, atol=ATOL)
    assert wider.layers()[0].kernels == 6


def csp_split(opset: int = 17, form: str = "input", sizes: tuple[int, int] = (3, 5)
              ) -> onnx.ModelProto:
    """conv1 (8) -> relu -> Split on channels into ``sizes`` -> part 1 through conv2 (-> 6)
    -> relu; Concat(part 0, conv2's) -> conv3 (9 -> 4) -> relu -> head: a CSP/C2f block.
    ``form``: the sizes as an ``input`` (opset 13+), an ``attribute`` (before 13), or not
    given (``equal`` parts; opset 18 says ``num_outputs``)."""
    net = zoo._Net(0)
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 8)])
    inputs, attrs = [x], {"axis": 1}
    if form == "input":
        inputs.append(net.const("split_sizes", np.array(sizes, np.int64)))
    elif form == "attribute":
        attrs["split"] = list(sizes)
    elif opset >= 18:
        attrs["num_outputs"] = 2
    net.nodes.append(helper.make_node("Split", inputs, ["part0", "part1"], name="split",
                                      **attrs))
    b = net.op("Relu", "relu2", [net.conv("conv2", "part1", sizes[1], 6)])
    c = net.op("Concat", "concat", ["part0", b], axis=1)
    x = net.op("Relu", "relu3", [net.conv("conv3", c, sizes[0] + 6, 4)])
    net.gap_head(x, 4, 3)
    return net.model("csp", opset=opset, fixed_batch=None, empty_names=False, channels=3,
                     size=8, classes=3)


@pytest.mark.parametrize("opset, form, sizes", [
    (17, "input", (3, 5)), (11, "attribute", (3, 5)), (13, "equal", (4, 4)),
    (18, "equal", (4, 4)), (18, "input", (2, 6)),
])
def test_a_channel_split_loses_the_removed_channels_of_each_part(opset, form, sizes):
    proto = csp_split(opset, form, sizes)
    assert_removal_exact(proto, {"conv1": [0, 4, 6]})
    assert_removal_exact(proto, {"conv1": [sizes[0]]})  # only the second part shrinks
    assert_removal_exact(proto, {"conv2": [1, 5]})


def test_a_channel_split_refuses_to_empty_a_part_or_widen_through_it():
    model = Model(csp_split())
    with pytest.raises(EditError, match=r"'split' \(Split\) would split off no channel into "
                                        r"part0: keep at least one kernel of each part"):
        remove_kernels(model, {"conv1": [0, 1, 2]})
    with pytest.raises(EditError, match="carries some of its channels without the others"):
        onnxaom.apply(model, [WidenLayer(layer="conv1", add=2)])
    wider = onnxaom.apply(model, [WidenLayer(layer="conv2", add=2, init="zeros")])
    x = zoo.random_input(model.proto, batch=2, seed=1)
    for g, w in zip(zoo.run(wider.proto, x), zoo.run(model.proto, x), strict=True):
        np.testing.assert_allclose(g, w, rtol=ATOL, atol=ATOL)


@pytest.mark.slow
def test_torch_chunk_through_the_dynamo_exporter_is_a_split_the_surgery_edits(tmp_path):
    """``x.chunk(2, 1)`` in a C2f-style block: the dynamo exporter writes a Split (the legacy
    one computed Slices, refused by name), whose parts lose their own removed channels."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class C2f(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.m, self.cv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(12, 6, 1)

        def forward(self, x):
            a, b = torch.relu(self.bn1(self.cv1(x))).chunk(2, 1)
            return torch.relu(self.cv2(torch.cat([a, b, torch.relu(self.m(b))], 1)))

    torch.manual_seed(0)
    path = tmp_path / "c2f.onnx"
    torch.onnx.export(C2f().eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=True,
                      input_names=["x"], dynamic_shapes={"x": {0: torch.export.Dim("n")}})
    model = onnxaom.load(path)
    assert any(node.op_type == "Split" for node in model.proto.graph.node)
    first = model.layers()[0].name
    assert_removal_exact(model.proto, {first: [0, 1, 5]})  # parts of 2 and 3 channels


def range_slices(opset: int = 17, bounds: tuple[int, int, int] = (0, 3, 8)) -> onnx.ModelProto:
    """conv1 (8) -> relu -> x[:, a:b] and x[:, b:c] as two Slices -> the second part through
    conv2 (-> 6) -> Concat(part 0, conv2's) -> conv3 -> head. Bounds are constant inputs
    (opset 10 on) or attributes (before)."""
    a, b, c = bounds
    net = zoo._Net(0)
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 8)])
    parts = []
    for i, (start, end) in enumerate(((a, b), (b, c))):
        if opset >= 10:
            inputs = [x, net.const(f"s{i}.starts", np.array([start], np.int64)),
                      net.const(f"s{i}.ends", np.array([end], np.int64)),
                      net.const(f"s{i}.axes", np.array([1], np.int64))]
            parts.append(net.op("Slice", f"slice{i}", inputs))
        else:
            parts.append(net.op("Slice", f"slice{i}", [x], starts=[start], ends=[end], axes=[1]))
    widths = (len(range(8)[a:b]), len(range(8)[b:c]))
    second = net.op("Relu", "relu2", [net.conv("conv2", parts[1], widths[1], 6)])
    merged = net.op("Concat", "concat", [parts[0], second], axis=1)
    y = net.op("Relu", "relu3", [net.conv("conv3", merged, widths[0] + 6, 4)])
    net.gap_head(y, 4, 3)
    return net.model("ranges", opset=opset, fixed_batch=None, empty_names=False, channels=3,
                     size=8, classes=3)


@pytest.mark.parametrize("opset, bounds", [(17, (0, 3, 8)), (9, (0, 3, 8)),
                                           (13, (1, 4, 2 ** 62)), (17, (-8, -5, 8))])
def test_a_channel_range_slice_keeps_the_bounds_of_its_kept_channels(opset, bounds):
    proto = range_slices(opset, bounds)
    assert_removal_exact(proto, {"conv1": [0, 4, 6]})
    assert_removal_exact(proto, {"conv1": [7]})
    assert_removal_exact(proto, {"conv2": [2]})


def test_a_channel_range_slice_refuses_to_empty_its_range_or_widen_through_it():
    model = Model(range_slices())
    with pytest.raises(EditError, match=r"'slice0' \(Slice\) would slice out no channel"):
        remove_kernels(model, {"conv1": [0, 1, 2]})
    with pytest.raises(EditError, match="carries some of its channels without the others"):
        onnxaom.apply(model, [WidenLayer(layer="conv1", add=2)])


@pytest.mark.parametrize("opset", [11, 17])
def test_the_legacy_exporters_chunk_computes_bounds_the_surgery_folds(tmp_path, opset):
    """``x.chunk(2, 1)`` through the legacy exporter: Slices whose bounds come from
    ``Shape(x)`` (Gather, Add, Div, Mul), folded with the known channel count (and found not
    to depend on the batch), then written as constants for the kept channels."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class C2f(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.m, self.cv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(12, 6, 1)

        def forward(self, x):
            a, b = torch.relu(self.cv1(x)).chunk(2, 1)
            return torch.relu(self.cv2(torch.cat([a, b, torch.relu(self.m(b))], 1)))

    torch.manual_seed(0)
    path = tmp_path / "c2f.onnx"
    torch.onnx.export(C2f().eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False,
                      opset_version=opset, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    model = onnxaom.load(path)
    assert any(node.op_type == "Shape" for node in model.proto.graph.node)
    first = model.layers()[0].name
    edited = assert_removal_exact(model.proto, {first: [0, 1, 5]})
    assert not any(node.op_type == "Shape" for node in edited.proto.graph.node)


def test_a_slice_bound_that_depends_on_the_batch_is_not_frozen():
    """``x[:, 2:6, :N // 8 + 4]``: the bound is the same for batches 1 and 7 but not 1031, so
    it is left computed, and the removal refused, never frozen to a constant."""
    net = zoo._Net(0)
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 8)])
    shape = net.op("Shape", "shape", [x])
    batch = net.op("Gather", "batch", [shape, net.const("zero", np.array(0, np.int64))], axis=0)
    eighth = net.op("Div", "eighth", [batch, net.const("eight", np.array(8, np.int64))])
    end = net.op("Add", "end", [eighth, net.const("four", np.array(4, np.int64))])
    ends = net.op("Concat", "ends", [net.const("six", np.array([6], np.int64)),
                                     net.op("Unsqueeze", "end1", [end, net.const(
                                         "ax0", np.array([0], np.int64))])], axis=0)
    part = net.op("Slice", "crop", [x, net.const("starts", np.array([2, 0], np.int64)), ends,
                                    net.const("axes", np.array([1, 2], np.int64))])
    y = net.op("Relu", "relu2", [net.conv("conv2", part, 4, 4)])
    net.gap_head(y, 4, 3)
    proto = net.model("crop", opset=17, fixed_batch=None, empty_names=False, channels=3,
                      size=8, classes=3)
    with pytest.raises(EditError, match=r"'crop' \(Slice\) has a computed 'ends' input"):
        remove_kernels(Model(proto), {"conv1": [0]})


def test_a_channel_count_used_on_another_tensor_is_refused():
    """``z[:, C - 4:C]`` with ``C`` read from conv1's output by ``Shape``: removing conv1's
    kernels changes C, which moves the slice of z (whose channels the edit leaves alone), so
    the removal is refused, naming both nodes."""
    net = zoo._Net(0)
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 8)])
    z = net.op("Relu", "relu2", [net.conv("conv2", "input", 3, 10)])
    count = net.op("Gather", "count", [net.op("Shape", "shape", [x]),
                                       net.const("one", np.array(1, np.int64))], axis=0)
    end = net.op("Unsqueeze", "end", [count, net.const("ax0", np.array([0], np.int64))])
    start = net.op("Sub", "start", [end, net.const("four", np.array([4], np.int64))])
    part = net.op("Slice", "zs", [z, start, end, net.const("axes", np.array([1], np.int64))])
    merged = net.op("Concat", "cat", [x, part], axis=1)
    y = net.op("Relu", "relu3", [net.conv("conv3", merged, 12, 4)])
    net.gap_head(y, 4, 3)
    proto = net.model("count", opset=17, fixed_batch=None, empty_names=False, channels=3,
                      size=8, classes=3)
    with pytest.raises(EditError, match=r"'shape' \(Shape\) reads the channel count of tensor "
                                        r"'relu1_out'.*'zs' \(Slice\) computes with it"):
        remove_kernels(Model(proto), {"conv1": [0]})
    assert_removal_exact(proto, {"conv3": [1]})  # a layer after it: nothing to refuse


# --------------------------------------------------------------------------------------------
# consumers found in review: ConvTranspose, Squeeze without axes, x[:, -C:]


def constant_into_conv_transpose(activation: str) -> onnx.ModelProto:
    """conv1 (4) → relu1 → pool → ``activation`` (Sigmoid, or a BN after the probe) →
    ConvTranspose (4 → 3) → relu2 → head: the removed channels reach the ConvTranspose as a
    non-zero constant."""
    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4)])
    x = net.op("MaxPool", "pool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = net.op("Sigmoid", "sig", [x]) if activation == "Sigmoid" else net.bn("bn", x, 4)
    weight = net.const("up.weight", net.rng.normal(0, 0.3, (4, 3, 2, 2)).astype(np.float32))
    x = net.op("ConvTranspose", "up", [x, weight], kernel_shape=[2, 2], strides=[2, 2])
    return net.head(net.op("Relu", "relu2", [x]), 3)


@pytest.mark.parametrize("activation", ["Sigmoid", "BatchNormalization"])
def test_a_conv_transpose_reading_constant_removed_channels_is_refused(activation):
    """No bias can take a constant channel through a transposed conv (its stride pattern
    spreads it unevenly): refused, naming it, where it used to be accepted and off by 0.6."""
    with pytest.raises(EditError, match=r"'up' \(ConvTranspose\) reads those values"):
        remove_kernels(Model(constant_into_conv_transpose(activation)), {"conv1": [0, 2]})


def squeeze_head(opset: int) -> onnx.ModelProto:
    """conv1 (3) → relu1 → global pool → Squeeze without axes (torch's ``x.squeeze()``) →
    Gemm: every axis of size 1 goes at run time, the channel axis too once one kernel is
    left."""
    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 3)])
    x = net.op("Squeeze", "squeeze", [net.op("GlobalAveragePool", "gap", [x])])
    net.gemm("fc", x, 3, 2)
    net.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        net.nodes, "squeeze", [helper.make_tensor_value_info("input", 1, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", 1, ["N", 2])], net.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("removed", [[0], [0, 2]])
def test_squeeze_without_axes_keeps_a_single_channel(opset, removed):
    """Leaving one kernel used to return a model ORT could not run (the Squeeze dropped the
    channel axis too); the axes it squeezed are now written in."""
    edited = assert_removal_exact(squeeze_head(opset), {"conv1": removed})
    squeeze = next(n for n in edited.proto.graph.node if n.op_type == "Squeeze")
    written = len(squeeze.input) > 1 or any(a.name == "axes" for a in squeeze.attribute)
    assert written == (len(removed) == 2)


def negative_slice(start: int) -> onnx.ModelProto:
    """conv1 (4) → relu1 → Slice [:, start:] of the channels → conv2 → relu2 → head."""
    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4)])
    x = net.op("Slice", "take", [x, net.const("starts", np.array([start], np.int64)),
                                 net.const("ends", np.array([2**62], np.int64)),
                                 net.const("axes", np.array([1], np.int64))])
    return net.head(net.op("Relu", "relu2", [net.conv("conv2", x, 4, 5)]), 5)


@pytest.mark.parametrize("start", [-4, -7, 0])
def test_a_slice_from_the_end_that_takes_every_channel_follows_a_widening(start):
    """``x[:, -C:]`` takes every channel; widened, it would take only the last C (a model ORT
    cannot run): its start is rewritten to the first channel."""
    proto = negative_slice(start)
    assert_same_function(proto, apply(Model(proto), WidenLayer("conv1", add=2)).proto)
    assert_removal_exact(proto, {"conv1": [1, 3]})


def test_the_run_check_catches_what_the_checker_cannot_see():
    """The safety net behind every edit: a model that passes the checker and shape inference
    with a symbolic batch but cannot run (192 values a sample reshaped into rows of 5) is
    caught by running it once on zeros; a sound model, or one with unknown sizes, passes."""
    from onnxaom.surgery.apply import _check_failure, _run_batches

    def _run_failure(proto):
        return _run_batches(proto)[0]

    net = _Net()
    net.op("Reshape", "rows", ["input", net.const("shape", np.array([-1, 5], np.int64))])
    net.nodes[-1].output[0] = "rows"
    graph = helper.make_graph(
        net.nodes, "broken", [helper.make_tensor_value_info("input", 1, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("rows", 1, ["R", 5])], net.inits)
    broken = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                               ir_version=8)
    assert _check_failure(broken) is None
    assert "Reshape" in (_run_failure(broken) or "")
    assert _run_failure(zoo.chain()) is None
    broken.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    assert _run_failure(broken) is None  # sizes unknown: nothing to feed


def concat_along_height(after: str) -> onnx.ModelProto:
    """conv1 → relu1 → ``after`` (a BN or a Sigmoid: a constant for a zeroed channel) and
    convb → relub, joined along H (coupling the two layers' channels), → unpadded conv2."""
    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4)])
    x = net.bn("bn1", x, 4) if after == "bn" else net.op("Sigmoid", "sig1", [x])
    y = net.op("Relu", "relub", [net.conv("convb", "input", 3, 4)])
    x = net.op("Concat", "cat_h", [x, y], axis=2)
    return net.head(net.op("Relu", "relu2", [net.conv("conv2", x, 4, 5, pads=0)]), 5)


def test_a_constant_joined_to_zeros_along_another_axis_is_not_folded():
    """Along H, a removed channel holds the BN's shift in one half and zero in the other: no
    constant, so no bias fold (it used to fold it, off by up to 0.5). The BN after the probe
    falls back to the chain end; a Sigmoid is refused."""
    with pytest.warns(UserWarning, match="per-channel chains"):
        assert_removal_exact(concat_along_height("bn"), {"conv1": [1]}, point="chain end")
    model = Model(concat_along_height("bn"))
    for edit in (lambda: apply(model, [RemoveKernels("conv1", (1,))]),
                 lambda: remove_kernels(model, {"conv1": [1]})):
        with pytest.warns(UserWarning, match="per-channel chains") as caught:
            edit()
        assert caught[0].filename == __file__  # the caller's line, by either entry point
    with pytest.raises(EditError, match=r"'cat_h' \(Concat\) joins those channels"):
        remove_kernels(Model(concat_along_height("sigmoid")), {"conv1": [1]})


def norms_after_relus() -> onnx.ModelProto:
    """conv1 → relu1 → bn1 → padded conv2 (no bias can take bn1's shift) → relu2 → bn2 →
    unpadded conv3 (its bias takes bn2's shift) → relu3 → head."""
    net = _Net()
    x = net.bn("bn1", net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4)]), 4)
    x = net.bn("bn2", net.op("Relu", "relu2", [net.conv("conv2", x, 4, 5)]), 5)
    return net.head(net.op("Relu", "relu3", [net.conv("conv3", x, 5, 6, pads=0)]), 6)


def norm_then_pad(mode: str) -> onnx.ModelProto:
    """conv1 → relu1 → bn1 → Pad (``mode``) → unpadded conv2 → relu2 → head."""
    net = _Net()
    x = net.bn("bn1", net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4)]), 4)
    pads = net.const("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1], dtype=np.int64))
    x = net.op("Pad", "pad", [x, pads], mode=mode)
    return net.head(net.op("Relu", "relu2", [net.conv("conv2", x, 4, 5, pads=0)]), 5)


@pytest.mark.parametrize("mode", ["reflect", "edge", "constant"])
def test_a_pad_copying_its_border_keeps_a_constant_channel_constant(mode):
    """bn1's shift of a removed channel survives a reflect or edge Pad as the same constant,
    so conv2's bias takes it (exact at the probe); zero padding breaks it (the chain end)."""
    if mode == "constant":
        with pytest.warns(UserWarning, match="per-channel chains"):
            assert_removal_exact(norm_then_pad(mode), {"conv1": [1, 2]}, point="chain end")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert_removal_exact(norm_then_pad(mode), {"conv1": [1, 2]})

def test_the_fallback_is_per_layer():
    """In one step with conv1 (needs the chain end) and conv2 (exact at its probe), only conv1
    falls back: conv2's removal stays exact, bn2's shift going into conv3's bias."""
    proto = norms_after_relus()
    model = Model(proto)
    with pytest.warns(UserWarning, match=r"removing kernels of 'conv1' as if zeroed"):
        edited, (removal,) = apply_steps(model, [RemoveKernels("conv1", (1,)),
                                                 RemoveKernels("conv2", (0, 3))])
    assert removal.removed_at == "chain end" and removal.chain_end == ("conv1",)
    assert set(removal.folds) == {"conv3"}
    x = zoo.random_input(proto, batch=3, seed=1)
    want = zoo.run(zeroed_at_probes(proto, removal.removed, chain_end=["conv1"]), x)
    for got, expected in zip(zoo.run(edited.proto, x), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=ATOL, atol=ATOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # alone, conv2 needs no fallback
        _, (exact,) = apply_steps(model, [RemoveKernels("conv2", (0, 3))])
    assert exact.removed_at == "probe" and exact.chain_end == ()
    assert_removal_exact(proto, {"conv2": [0, 3]})

def test_the_metadata_records_what_each_step_did():
    """Key ``onnxaom.steps``: per step its edits and result, the removal point included (the
    fallback to the chain end is recorded, not only warned); a later apply appends."""
    model = Model(concat_along_height("bn"))
    with pytest.warns(UserWarning, match="per-channel chains"):
        edited = apply(model, [RemoveKernels("conv1", (1,)), WidenLayer("conv2", add=1)])
    steps = json.loads(dict((p.key, p.value) for p in edited.proto.metadata_props)[STEPS_KEY])
    assert [s["edits"] for s in steps] == [[RemoveKernels("conv1", (1,)).to_dict()],
                                           [WidenLayer("conv2", add=1).to_dict()]]
    removal, widening = steps[0]["result"], steps[1]["result"]
    assert removal["removed_at"] == "chain end" and removal["requested"] == {"conv1": [1]}
    assert removal["removed"] == {"conv1": [1], "convb": [1]} and removal["coupled"] == ["convb"]
    assert widening["layers"] == ["conv2"] and len(widening["sources"]) == 1
    again = apply(edited, [InsertLayer("conv2")])
    steps = json.loads(dict((p.key, p.value) for p in again.proto.metadata_props)[STEPS_KEY])
    assert len(steps) == 3 and steps[2]["result"]["after"] == "conv2"
    plain = apply(Model(zoo.chain()), [RemoveKernels("conv1", (0,))])
    steps = json.loads(dict((p.key, p.value) for p in plain.proto.metadata_props)[STEPS_KEY])
    assert steps[0]["result"]["removed_at"] == "probe"


def test_the_step_record_replays_two_applies_the_flat_edit_list_cannot():
    """Two prunes of conv1 in a row: in the flat edit list they are one step (and refused as
    one layer named twice); the step record keeps them apart."""
    proto = zoo.chain()
    once = apply(Model(proto), [RemoveKernels("conv1", (0,))])
    twice = apply(once, [RemoveKernels("conv1", (0,))])
    meta = dict((p.key, p.value) for p in twice.proto.metadata_props)
    with pytest.raises(EditError, match="named by two RemoveKernels edits in one step"):
        apply(Model(proto), edits_from_json(meta[METADATA_KEY]))
    replayed = Model(proto)
    for step in json.loads(meta[STEPS_KEY]):
        replayed = apply(replayed, edits_from_json(json.dumps(step["edits"])))
    assert_same_function(twice.proto, replayed.proto)


def test_a_removal_plan_pickles() -> None:
    """Its folds were a MappingProxyType, which pickle refuses (API review, 2026-11-25)."""
    import pickle

    model = Model(zoo.bn_kept())
    first = model.layers()[0].name
    plan = plan_removal(model, {first: [0]})
    again = pickle.loads(pickle.dumps(plan))  # noqa: S301
    assert again.removed == plan.removed and set(again.folds) == set(plan.folds)
