"""Counting in ORT's blocked NCHWc layout gives the brute-force counts, on real sessions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import onnxaom
from onnxaom import ModelError
from onnxaom.blocked import NCHWC_DOMAIN, BlockedTap, block_size, blocked_counting_model
from onnxaom.collect import collect, select_layers
from onnxaom.instrument import counting_graph

from . import zoo
from .test_collect import STRUCTURES, brute_force, data_for


def to_blocked(nchw: np.ndarray, block: int, junk: int) -> np.ndarray:
    """(C, K, P) counts -> (C, Kp*P) in ORT's blocked column order, padding channels = junk."""
    classes, channels, positions = nchw.shape
    padded = -(-channels // block) * block
    full = np.full((classes, padded, positions), junk, nchw.dtype)
    full[:, :channels] = nchw
    blocked = full.reshape(classes, padded // block, block, positions).transpose(0, 1, 3, 2)
    return blocked.reshape(classes, padded * positions)


@settings(max_examples=60, deadline=None)
@given(
    classes=st.integers(1, 4),
    channels=st.integers(1, 40),
    positions=st.integers(1, 12),
    block=st.sampled_from([4, 8, 16]),
    seed=st.integers(0, 2**16),
)
def test_restore_inverts_the_blocked_order(classes, channels, positions, block, seed) -> None:
    rng = np.random.default_rng(seed)
    nchw = rng.integers(0, 1000, (classes, channels, positions), dtype=np.int32)
    restored = BlockedTap(block, channels).restore(to_blocked(nchw, block, junk=-7))
    np.testing.assert_array_equal(restored, nchw.reshape(classes, channels * positions))


def test_restore_rejects_columns_that_do_not_fit() -> None:
    with pytest.raises(ModelError, match="not the 16 padded channels"):
        BlockedTap(16, 10).restore(np.zeros((2, 17), np.int32))
    # a multiple of the padded channels, but not for the positions the layer has
    with pytest.raises(ModelError, match="times its positions"):
        BlockedTap(16, 10, positions=4).restore(np.zeros((2, 32 * 4), np.int32))
    assert BlockedTap(16, 10, positions=4).restore(np.zeros((2, 64), np.int32)).shape == (2, 40)


def test_block_size_is_found_from_ort_itself() -> None:
    # every x86-64 ORT build has NCHWc kernels: 8 channels a block with AVX2, 16 with AVX-512
    assert block_size() in (4, 8, 16)


def test_counts_read_blocked_tensors_not_reorders() -> None:
    proto = zoo.chain(kernels=(3, 20), channels=5, size=12)
    model = onnxaom.Model(proto)
    layers = select_layers(model, None, "activation")
    blocked = blocked_counting_model(counting_graph(proto, layers))
    assert blocked is not None
    optimized, taps = blocked
    assert [tap is not None for tap in taps] == [True, True, False, False]  # convs, not Gemms
    assert [tap.channels for tap in taps if tap is not None] == [3, 20]
    producers = {out: node for node in optimized.graph.node for out in node.output}
    for i, tap in enumerate(taps):
        greater = next(n for n in optimized.graph.node if n.output[0] == f"onnxaom_{i}_positive")
        source = producers[greater.input[0]]
        if tap is not None:  # an NCHWc op of ORT's, no ReorderOutput in between
            assert source.domain == NCHWC_DOMAIN and source.op_type != "ReorderOutput"


@pytest.mark.parametrize("structure", STRUCTURES)
def test_blocked_counts_equal_brute_force(structure: str) -> None:
    proto = getattr(zoo, structure)()
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=29, classes=3, seed=2)
    stats = collect(model, images, labels, batch_size=8, progress=False)
    conv_names = {layer.name for layer in model.layers() if layer.op == "Conv"}
    assert set(stats.metadata["blocked_layers"]) == conv_names
    expected = brute_force(proto, model.layers(), images, labels)
    for name, counts in expected.items():
        np.testing.assert_array_equal(stats.counts[name], counts, err_msg=name)


@pytest.mark.parametrize("kernels", [(3, 20), (16, 33), (1, 5)])
def test_padding_channels_are_dropped(kernels: tuple[int, int]) -> None:
    # with a negative threshold the zero padding channels would count: they must not show
    proto = zoo.chain(kernels=kernels, channels=5, size=12)
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=23, classes=3)
    stats = collect(model, images, labels, batch_size=8, threshold=-0.5, progress=False)
    assert stats.metadata["blocked_layers"] == ["conv1", "conv2"]
    expected = brute_force(proto, model.layers(), images, labels, threshold=-0.5)
    for name, counts in expected.items():
        np.testing.assert_array_equal(stats.counts[name], counts, err_msg=name)


@pytest.mark.parametrize("probe", ["conv", "pool"])
def test_other_probe_points_read_blocked(probe: str) -> None:
    proto = zoo.chain(kernels=(6, 10))
    model = onnxaom.Model(proto)
    layers = model.layers(probe=probe)
    images, labels = data_for(proto, n=19, classes=2)
    stats = collect(model, images, labels, batch_size=7, probe=probe, progress=False)
    assert stats.metadata["blocked_layers"]
    expected = brute_force(proto, [x for x in layers if x.name in stats.counts], images, labels)
    for name, counts in expected.items():
        np.testing.assert_array_equal(stats.counts[name], counts, err_msg=name)


def test_blocked_reads_can_be_switched_off_and_agree() -> None:
    proto = zoo.residual()
    images, labels = data_for(proto, n=40, classes=4)
    on = collect(onnxaom.Model(proto), images, labels, batch_size=16, progress=False)
    off = collect(
        onnxaom.Model(proto), images, labels, batch_size=16, progress=False, blocked_reads=False
    )
    assert on.metadata["blocked_layers"] and off.metadata["blocked_layers"] == []
    for name in on.counts:
        np.testing.assert_array_equal(on.counts[name], off.counts[name], err_msg=name)


def test_fixed_batch_model_reads_blocked() -> None:
    proto = zoo.bn_kept(fixed_batch=1)
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=11, classes=3)
    stats = collect(model, images, labels, batch_size=4, progress=False)
    assert stats.metadata["blocked_layers"]
    expected = brute_force(proto, model.layers(), images, labels)
    for name, counts in expected.items():
        np.testing.assert_array_equal(stats.counts[name], counts, err_msg=name)


def test_nan_check_still_names_the_layer_when_reading_blocked() -> None:
    proto = zoo.chain()
    for init in proto.graph.initializer:
        if init.name == "conv2.bias":
            values = onnx.numpy_helper.to_array(init).copy()
            values[1] = np.nan
            init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    images, labels = data_for(proto, n=8, classes=2)
    with pytest.raises(ModelError, match="conv2"):
        collect(onnxaom.Model(proto), images, labels, progress=False)
