"""Layer discovery and probe points on every structure of the zoo."""

from __future__ import annotations

import pytest

import onnxaom
from onnxaom import ModelError
from onnxaom.graph import GraphIndex

from . import zoo

EXPECTED = {
    "chain": [
        ("conv1", "relu1_out", ("Relu",), (4, 8, 8)),
        ("conv2", "relu2_out", ("Relu",), (8, 6, 6)),
        ("fc1", "relu3_out", ("Relu",), (16, 1, 1)),
        ("fc2", "logits", (), (3, 1, 1)),
    ],
    "bn_kept": [
        ("conv1", "relu1_out", ("BatchNormalization", "Relu"), (4, 8, 8)),
        ("conv2", "relu2_out", ("BatchNormalization", "Relu"), (8, 8, 8)),
        ("fc1", "relu3_out", ("Relu",), (16, 1, 1)),
        ("fc2", "logits", (), (3, 1, 1)),
    ],
    # the merge (Add of two tensors) ends conv3's chain: it is read before the skip is added
    "residual": [
        ("conv1", "relu1_out", ("Relu",), (4, 8, 8)),
        ("conv2", "relu2_out", ("Relu",), (4, 8, 8)),
        ("conv3", "conv3_out", (), (4, 8, 8)),
        ("fc", "logits", (), (3, 1, 1)),
    ],
    "concat": [
        ("conv1a", "relu1a_out", ("Relu",), (4, 8, 8)),
        ("conv1b", "relu1b_out", ("Relu",), (6, 8, 8)),
        ("conv2", "relu2_out", ("Relu",), (8, 8, 8)),
        ("fc", "logits", (), (3, 1, 1)),
    ],
    "depthwise": [
        ("conv1", "relu1_out", ("Relu",), (4, 8, 8)),
        ("dwconv2", "relu2_out", ("Relu",), (4, 8, 8)),
        ("pwconv3", "relu3_out", ("Relu",), (8, 8, 8)),
        ("fc", "logits", (), (3, 1, 1)),
    ],
    "reshape_matmul": [
        ("conv1", "relu1_out", ("Relu",), (4, 8, 8)),
        ("matmul1", "relu2_out", ("Add", "Relu"), (16, 1, 1)),
        ("matmul2", "logits", ("Add",), (3, 1, 1)),
    ],
    "activations": [
        ("conv1", "leaky1_out", ("LeakyRelu",), (4, 8, 8)),
        ("conv2", "clip2_out", ("Clip",), (4, 8, 8)),
        ("conv3", "relu3_out", ("Mul", "Add", "Relu"), (4, 8, 8)),
        ("fc", "logits", (), (3, 1, 1)),
    ],
    "conv_pool_no_act": [
        ("conv1", "conv1_out", (), (4, 8, 8)),
        ("conv2", "relu2_out", ("Relu",), (8, 4, 4)),
        ("fc", "logits", (), (3, 1, 1)),
    ],
}


@pytest.mark.parametrize("structure", sorted(EXPECTED))
def test_probe_points(structure: str) -> None:
    layers = onnxaom.Model(getattr(zoo, structure)()).layers()
    got = [(x.name, x.probe, x.chain, x.shape) for x in layers]
    assert got == EXPECTED[structure]


def test_raw_and_pool_probes() -> None:
    model = onnxaom.Model(zoo.chain())
    raw = model.layers(probe="conv")
    assert [x.probe for x in raw] == [x.output for x in raw]
    pooled = {x.name: x for x in model.layers(probe="pool")}
    assert pooled["conv2"].probe_kind == "pool" and pooled["conv2"].shape[1:] == (3, 3)
    assert pooled["conv1"].probe_kind == "activation"  # no pool follows conv1


def test_kernels_and_order_for_bundled_model() -> None:
    from onnxaom.cli import DEFAULT_MODEL

    layers = onnxaom.load(DEFAULT_MODEL).layers()
    assert [(x.op, x.kernels) for x in layers] == [
        ("Conv", 16),
        ("Conv", 16),
        ("Gemm", 128),
        ("Gemm", 10),
    ]
    assert layers[0].shape == (16, 26, 26) and layers[1].shape == (16, 24, 24)


def test_unknown_probe() -> None:
    with pytest.raises(ModelError, match="probe"):
        onnxaom.Model(zoo.chain()).layers(probe="somewhere")


def _conv_then(op: str, opset: int = 13, **clip: float) -> onnxaom.Model:
    """input -> Conv(2 kernels) -> ``op`` -> logits; Clip bounds as inputs (opset >= 11) or
    attributes (before)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")]
    inputs = ["c"]
    attrs: dict[str, float] = {}
    if op == "Clip" and opset >= 11:
        for key in ("min", "max"):
            inits.append(numpy_helper.from_array(np.array(clip[key], np.float32), key))
            inputs.append(key)
    elif op == "Clip":
        attrs = dict(clip)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
             helper.make_node(op, inputs, ["logits"], name="act", **attrs)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 5, 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return onnxaom.Model(model)


@pytest.mark.parametrize("op", ["Softplus", "Sigmoid"])
def test_activation_positive_everywhere_is_read_before(op: str) -> None:
    """softplus(x) > 0 for every x: read after it, every kernel would be always on."""
    layer = _conv_then(op).layer("conv")
    assert (layer.probe, layer.chain) == ("c", ())


@pytest.mark.parametrize("opset", [9, 13])
def test_clip_is_in_the_chain_only_with_a_lower_bound_at_most_zero(opset: int) -> None:
    relu6 = _conv_then("Clip", opset, min=0.0, max=6.0).layer("conv")
    assert (relu6.probe, relu6.chain) == ("logits", ("Clip",))
    floor = _conv_then("Clip", opset, min=0.5, max=6.0).layer("conv")
    assert (floor.probe, floor.chain) == ("c", ())


def _keras_dense_head(per_position: bool, target_known: bool, size: int | str = 6
                      ) -> onnxaom.Model:
    """conv1 -> ReLU -> Transpose to NHWC -> Reshape -> MatMul (dense1) -> Relu -> MatMul
    (dense2), as tf2onnx writes Keras: ``per_position`` reshapes to (-1, C) (a Dense applied at
    every position, rows N*H*W), else to (-1, H*W*C) (Flatten); ``target_known`` False computes
    the target from Shape, so that shape inference before opset 13 data propagation loses
    the rank after it. ``size``: the input's height and width (a name: dynamic)."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    features = 4 if per_position else 6 * 6 * 4
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(features, 5)).astype(np.float32), "wd1"),
             numpy_helper.from_array(rng.normal(size=(5, 3)).astype(np.float32), "wd2"),
             numpy_helper.from_array(np.array([-1, features], np.int64), "target"),
             numpy_helper.from_array(np.array([features], np.int64), "features"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["act"]),
             helper.make_node("Transpose", ["act"], ["nhwc"], perm=[0, 2, 3, 1])]
    if target_known:
        nodes.append(helper.make_node("Reshape", ["nhwc", "target"], ["flat"]))
    else:
        nodes += [helper.make_node("Shape", ["nhwc"], ["shape"]),
                  helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
                  helper.make_node("Concat", ["batch", "features"], ["computed"], axis=0),
                  helper.make_node("Reshape", ["nhwc", "computed"], ["flat"])]
    nodes += [helper.make_node("MatMul", ["flat", "wd1"], ["d1"], name="dense1"),
              helper.make_node("Relu", ["d1"], ["r1"]),
              helper.make_node("MatMul", ["r1", "wd2"], ["y"], name="dense2")]
    rows = "M" if per_position else "N"
    proto = zoo.hand_built(nodes, inits, ["N", 3, size, size], [rows, 3], opset=11)
    return onnxaom.Model(proto)


def test_a_dense_layer_applied_at_every_position_is_not_a_layer_of_neurons():
    names = [layer.name for layer in _keras_dense_head(True, True).layers()]
    assert names == ["conv1"]  # rows are N*H*W, not samples: dense1 and dense2 are left out
    assert [layer.name for layer in _keras_dense_head(False, True).layers()] == \
        ["conv1", "dense1", "dense2"]


def test_a_dense_layer_at_every_position_after_sizes_inference_lost_is_not_a_layer():
    """As above, with the conv's input padded by computed amounts (a Cast), so that shape
    inference loses H and W before the Reshape to (-1, C): the sizes one run gives tell that
    the rows are positions, not samples. Before, the dense layer was listed, and the default
    collect stopped on it (tf2onnx's Keras Dense on a 4-D map at opset 13)."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(4, 5)).astype(np.float32), "wd1"),
             numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.float32), "padsf"),
             numpy_helper.from_array(np.array([-1, 4], np.int64), "target")]
    nodes = [helper.make_node("Cast", ["padsf"], ["pads"], to=7),
             helper.make_node("Pad", ["x", "pads"], ["xp"]),
             helper.make_node("Conv", ["xp", "w1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["act"]),
             helper.make_node("Transpose", ["act"], ["nhwc"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["nhwc", "target"], ["flat"]),
             helper.make_node("MatMul", ["flat", "wd1"], ["d1"], name="dense1")]
    model = onnxaom.Model(zoo.hand_built(nodes, inits, ["N", 3, 6, 6], ["M", 5], opset=11))
    assert [layer.name for layer in model.layers()] == ["conv1"]
    x = np.random.default_rng(1).random((6, 3, 6, 6)).astype(np.float32)
    stats = onnxaom.collect(model, x, np.arange(6) % 2, progress=False)
    assert stats.layer_names == ("conv1",)


def test_a_dense_head_after_a_flatten_of_unknown_rank_is_found():
    """At opset 11 a computed flatten target leaves the rank unknown to shape inference; the
    second MatMul's input rank is read through the first."""
    assert [layer.name for layer in _keras_dense_head(False, False).layers()] == \
        ["conv1", "dense1", "dense2"]


def test_collect_names_a_layer_whose_rows_are_not_samples():
    """A per-position dense layer that discovery cannot rule out (the input's height and width
    are dynamic) is named by collect, for either counting method."""
    import numpy as np

    model = _keras_dense_head(True, True, size="S")
    names = [layer.name for layer in model.layers()]
    assert names == ["conv1", "dense1", "dense2"]
    x = np.random.default_rng(0).normal(size=(4, 3, 6, 6)).astype(np.float32)
    for method in ("graph", "plain"):
        for name in names[1:]:
            with pytest.raises(ModelError, match=f"layer '{name}': its probe tensor .* has 144 "
                                                 f"rows for a batch of 4 samples"):
                onnxaom.collect(model, x, np.arange(4) % 2, layers=[name], method=method,
                                progress=False)


def test_a_model_with_onnx_runtimes_fused_layers_is_refused_by_name():
    """ORT_ENABLE_EXTENDED writes Conv + Relu as com.microsoft FusedConv: such a model would
    seem to have no layer there."""
    import numpy as np
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    node = helper.make_node("FusedConv", ["x", "w"], ["y"], name="conv_relu",
                            domain="com.microsoft", activation="Relu")
    proto = zoo.hand_built([node], [w], ["N", 3, 6, 6], ["N", 4, 4, 4])
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(ModelError, match="node 'conv_relu' is ONNX Runtime's own com.microsoft "
                                         "FusedConv: .* give it the model as exported"):
        onnxaom.Model(proto).layers()


@pytest.mark.parametrize("head", ["gap_squeeze", "reduce_mean"])
def test_a_dense_head_is_found_where_inference_lost_the_rank_further_up(head):
    """A reshape to a computed target (opset 11: no shape-value propagation) loses every rank
    after it; the dense head's input rank is read back through Conv -> GlobalAveragePool ->
    Squeeze (Keras' GlobalAveragePooling2D), or through ReduceMean(keepdims=0) of a rank-3
    reshape (GlobalAveragePooling1D)."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(5, 4, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(size=(5, 2)).astype(np.float32), "wd"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([4], np.int64), "four"),
             numpy_helper.from_array(np.array([-1], np.int64), "rest")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("Shape", ["a1"], ["shape"]),
             helper.make_node("Slice", ["shape", "zero", "one"], ["batch"])]
    if head == "gap_squeeze":
        nodes += [helper.make_node("Concat", ["batch", "four", "rest"], ["t"], axis=0),
                  helper.make_node("Reshape", ["a1", "t"], ["r"]),
                  helper.make_node("Unsqueeze", ["r"], ["r4"], axes=[3]),
                  helper.make_node("Conv", ["r4", "w2"], ["c2"], name="conv2"),
                  helper.make_node("Relu", ["c2"], ["a2"]),
                  helper.make_node("GlobalAveragePool", ["a2"], ["g"]),
                  helper.make_node("Squeeze", ["g"], ["f"], axes=[2, 3])]
        inits[2] = numpy_helper.from_array(rng.normal(size=(5, 2)).astype(np.float32), "wd")
    else:
        nodes += [helper.make_node("Concat", ["batch", "rest", "four"], ["t"], axis=0),
                  helper.make_node("Reshape", ["a1", "t"], ["r"]),
                  helper.make_node("ReduceMean", ["r"], ["f"], axes=[1], keepdims=0)]
        inits[2] = numpy_helper.from_array(rng.normal(size=(4, 2)).astype(np.float32), "wd")
    nodes.append(helper.make_node("MatMul", ["f", "wd"], ["y"], name="dense"))
    model = onnxaom.Model(zoo.hand_built(nodes, inits, ["N", 3, 6, 6], ["N", 2], opset=11))
    assert "f" not in GraphIndex(model.proto).shapes  # inference lost it
    assert [layer.name for layer in model.layers()][-1] == "dense"


@pytest.mark.parametrize("op", ["QLinearConv", "ConvInteger", "MatMulInteger", "QGemm"])
def test_a_quantized_layer_is_refused_by_name(op):
    """QOperator and dynamically quantized models hold their layers as quantized ops: read as
    they were, they seemed to have no layer (or only the float ones left: a false "too
    shallow" finding, MACs short of the real count)."""
    from onnx import helper

    domain = "com.microsoft" if op == "QGemm" else ""
    node = helper.make_node(op, ["x", "w"], ["y"], name="qlayer", domain=domain)
    proto = zoo.hand_built([node], [], ["N", 3, 6, 6], ["N", 4, 4, 4])
    with pytest.raises(ModelError, match=rf"node 'qlayer' \({op}\) is a quantized layer.* QDQ"):
        onnxaom.Model(proto).layers()


def test_a_conv_whose_weight_is_computed_to_an_unknown_shape_is_a_layer():
    """A weight standardised in the graph and reshaped to a target shape inference cannot read
    (``Identity`` of a constant: PyTorch's legacy export of timm's ScaledStdConv2d): the conv's
    kernel count comes from one run, so it is a layer, counted and summed up (it was left out
    without a word: 9 of NF-ResNet-26's 29 convs)."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    v = rng.normal(size=(5, 2, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(v.reshape(1, 5, -1), "v"),
             numpy_helper.from_array(np.array([5, 2, 3, 3], np.int64), "target"),
             numpy_helper.from_array(np.zeros(5, np.float32), "b")]
    nodes = [helper.make_node("InstanceNormalization", ["v", "ones", "zeros"], ["vn"]),
             helper.make_node("Identity", ["target"], ["target_id"]),
             helper.make_node("Reshape", ["vn", "target_id"], ["w"]),
             helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["y"])]
    inits += [numpy_helper.from_array(np.ones(5, np.float32), "ones"),
              numpy_helper.from_array(np.zeros(5, np.float32), "zeros")]
    proto = zoo.hand_built(nodes, inits, ["N", 2, 6, 6], ["N", 5, 6, 6])
    assert GraphIndex(proto).shapes.get("w", (None,))[0] is None  # what inference leaves
    model = onnxaom.Model(proto)
    assert [(x.name, x.kernels, x.shape) for x in model.layers()] == [("conv", 5, (5, 6, 6))]
    row = onnxaom.summary(model).layers[0]
    assert (row.params, row.macs) == (5 * 2 * 9 + 5, 5 * 2 * 9 * 36)
    images = rng.normal(size=(6, 2, 6, 6)).astype(np.float32)
    labels = np.array([0, 1, 0, 1, 0, 1])
    stats = onnxaom.collect(model, images, labels, progress=False)
    out = zoo.run(proto, images)[0]
    want = np.stack([(out[labels == c] > 0).sum(axis=0) for c in (0, 1)], axis=1)
    np.testing.assert_array_equal(stats.counts["conv"], want)
