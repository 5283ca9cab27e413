"""Layer discovery and probe points on every structure of the zoo."""

from __future__ import annotations

import pytest

import onnxaom
from onnxaom import ModelError

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
