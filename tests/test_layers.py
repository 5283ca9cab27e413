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
