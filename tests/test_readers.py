"""Read mass: the L1 of the next layers' weights that read each kernel, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

import onnxaom
from onnxaom import LayerNotFoundError
from onnxaom.readers import read_mass

from . import zoo


def weights(proto, name: str) -> np.ndarray:
    init = next(t for t in proto.graph.initializer if t.name == name)
    return np.abs(numpy_helper.to_array(init).astype(np.float64))


def test_conv_read_by_a_conv_and_by_a_flattened_gemm() -> None:
    proto = zoo.chain(kernels=(4, 8), size=8)  # conv2 out 6x6, pooled 3x3, fc1 reads 8*9
    model = onnxaom.Model(proto)
    conv1 = read_mass(model, "conv1")
    np.testing.assert_allclose(conv1.per_kernel, weights(proto, "conv2.weight").sum(axis=(0, 2, 3)))
    assert conv1.per_position is None and conv1.readers == ("conv2",)
    conv2 = read_mass(model, "conv2")
    fc1 = weights(proto, "fc1.weight")  # (hidden, 8 * 9), Gemm transB=1
    assert conv2.per_position is not None
    np.testing.assert_allclose(conv2.per_position, fc1.sum(axis=0).reshape(8, 9))
    np.testing.assert_allclose(conv2.per_kernel, conv2.per_position.sum(axis=1))
    assert conv2.readers == ("fc1",)


def test_last_layer_has_no_reader() -> None:
    mass = read_mass(onnxaom.Model(zoo.chain()), "fc2")
    assert mass.readers == () and not mass.per_kernel.any()


def test_concat_offsets_and_matmul_readers() -> None:
    proto = zoo.concat(kernels=(4, 6, 8))
    model = onnxaom.Model(proto)
    w = weights(proto, "conv2.weight").sum(axis=(0, 2, 3))  # reads concat(conv1a, conv1b)
    np.testing.assert_allclose(read_mass(model, "conv1a").per_kernel, w[:4])
    np.testing.assert_allclose(read_mass(model, "conv1b").per_kernel, w[4:])
    proto = zoo.reshape_matmul(kernels=4)
    mass = read_mass(onnxaom.Model(proto), "conv1")
    matmul = next(
        np.abs(numpy_helper.to_array(t)) for t in proto.graph.initializer if "matmul1" in t.name
    )
    assert mass.per_position is not None
    np.testing.assert_allclose(mass.per_position.reshape(-1), matmul.sum(axis=1), rtol=1e-6)


def test_grouped_readers_read_one_channel_each() -> None:
    proto = zoo.depthwise(kernels=(4, 8))
    mass = read_mass(onnxaom.Model(proto), "dwconv2")
    # pwconv3 (1x1, group 1) reads dwconv2's channels
    np.testing.assert_allclose(
        mass.per_kernel, weights(proto, "pwconv3.weight").sum(axis=(0, 2, 3))
    )
    # conv1's kernels are tied to dwconv2's (they go together): the depthwise filters that read
    # them and what reads dwconv2 both count
    conv1 = read_mass(onnxaom.Model(proto), "conv1")
    dw = weights(proto, "dwconv2.weight").sum(axis=(1, 2, 3))
    np.testing.assert_allclose(conv1.per_kernel, dw + mass.per_kernel)


def test_residual_coupled_kernels_share_their_readers() -> None:
    model = onnxaom.Model(zoo.residual())
    a, b = read_mass(model, "conv1"), read_mass(model, "conv3")
    np.testing.assert_allclose(a.per_kernel, b.per_kernel)
    assert set(a.readers) == {"conv2", "fc"}


def test_unknown_layer_is_named() -> None:
    with pytest.raises(LayerNotFoundError, match="nope"):
        read_mass(onnxaom.Model(zoo.chain()), "nope")
