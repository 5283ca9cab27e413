"""Quantized models: QDQ models are read (their layers are float ops between QuantizeLinear and
DequantizeLinear), their quantized weights are counted but not edited; QOperator models are
refused (tests/test_layers.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxaom
from onnxaom.errors import EditError

from . import zoo

SCALE = 0.05


def qdq_model(*, bn_between: bool, quantized_weights: bool) -> onnx.ModelProto:
    """input (N, 2, 6, 6) -> conv (4 kernels, pad 1) [-> Q/DQ -> BN] -> Q/DQ (uint8, zero
    point 0: the ReLU quantize_static folds away) -> flatten -> fc (3): a QDQ model, the weights
    float or int8 behind a per-channel DequantizeLinear."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (4, 2, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(np.float32(SCALE), "s"),
             numpy_helper.from_array(np.uint8(0), "zp"),
             numpy_helper.from_array(rng.normal(0, 0.3, 4).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 0.2, (4 * 36, 3)).astype(np.float32), "fw"),
             numpy_helper.from_array(np.zeros(3, np.float32), "fb")]
    nodes = []
    if quantized_weights:
        scale = (np.abs(w).max(axis=(1, 2, 3)) / 127).astype(np.float32)
        inits += [numpy_helper.from_array(np.round(w / scale[:, None, None, None])
                                          .astype(np.int8), "wq"),
                  numpy_helper.from_array(scale, "ws"),
                  numpy_helper.from_array(np.zeros(4, np.int8), "wzp")]
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["w"], axis=0,
                                      name="w_dq"))
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    nodes.append(helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1] * 4))
    x = "c"
    if bn_between:
        inits += [numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), n)
                  for n in ("g", "v")]
        inits += [numpy_helper.from_array(rng.normal(0, 0.3, 4).astype(np.float32), n)
                  for n in ("beta", "m")]
        nodes += [helper.make_node("QuantizeLinear", [x, "s", "zp"], ["cq"], name="q0"),
                  helper.make_node("DequantizeLinear", ["cq", "s", "zp"], ["cd"], name="dq0"),
                  helper.make_node("BatchNormalization", ["cd", "g", "beta", "m", "v"], ["bn"],
                                   name="bn")]
        x = "bn"
    nodes += [helper.make_node("QuantizeLinear", [x, "s", "zp"], ["aq"], name="q1"),
              helper.make_node("DequantizeLinear", ["aq", "s", "zp"], ["act"], name="dq1"),
              helper.make_node("Flatten", ["act"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fw", "fb"], ["y"], name="fc")]
    return zoo.hand_built(nodes, inits, ["N", 2, 6, 6], ["N", 3], opset=13)


@pytest.mark.parametrize("bn_between", [False, True])
def test_a_qdq_layer_is_read_where_the_next_layer_reads_it(bn_between):
    """The probe is the dequantized activation, DQ(Q(.)), through a batch norm left between
    two Q/DQ pairs: what the deployed model computes, where before the Q/DQ pair cut the chain
    and the raw conv output was counted (activations under half a quantization step count
    there but are 0 here)."""
    proto = qdq_model(bn_between=bn_between, quantized_weights=False)
    layer = onnxaom.Model(proto).layers()[0]
    assert layer.probe == "act" and layer.chain == (
        ("QuantizeLinear", "DequantizeLinear", "BatchNormalization") if bn_between else ()
    ) + ("QuantizeLinear", "DequantizeLinear")
    rng = np.random.default_rng(1)
    images = rng.normal(0, 0.3, (12, 2, 6, 6)).astype(np.float32)
    labels = np.arange(12) % 3
    stats = onnxaom.collect(onnxaom.Model(proto), images, labels, progress=False)
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in ("act", "c"))
    _, act, raw = zoo.run(probe, images)
    want = np.stack([(act[labels == c] > 0).sum(axis=0) for c in range(3)], axis=1)
    np.testing.assert_array_equal(stats.counts["conv"], want)
    if not bn_between:
        assert ((raw > 0) & (act == 0)).sum() > 0  # the raw output's count would differ


def test_quantized_weights_are_counted_and_not_edited():
    """int8 weights behind a DequantizeLinear: the layer is found and its parameters counted,
    but an edit is refused naming the DequantizeLinear (it would store them as floats)."""
    model = onnxaom.Model(qdq_model(bn_between=False, quantized_weights=True))
    assert [(x.name, x.kernels) for x in model.layers()] == [("conv", 4), ("fc", 3)]
    summary = onnxaom.summary(model)
    assert summary.layers[0].params == 4 * 2 * 9 + 4
    floats = 1 + 4 + 4 * 36 * 3 + 3 + 4  # scale, bias, fc weight and bias, weight scales
    assert summary.total_params == floats + 4 * 2 * 9
    with pytest.raises(EditError, match=r"'conv' \(Conv\) has quantized weights \(node 'w_dq' "
                                        r"\(DequantizeLinear\)\)"):
        onnxaom.remove_kernels(model, {"conv": [0]})
    with pytest.raises(EditError, match="has quantized weights"):
        onnxaom.apply(model, onnxaom.WidenLayer("conv", 2))


def test_weights_cast_from_integers_are_not_edited_into_floats():
    """A weight stored as int8 and made float by Cast and Mul (a hand-rolled weight-only
    quantization): an edit would fold it into a float initializer, so it is refused."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-100, 100, (4, 2, 3, 3)).astype(np.int8),
                                     "wq"),
             numpy_helper.from_array(np.float32(0.01), "ws")]
    nodes = [helper.make_node("Cast", ["wq"], ["wf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["wf", "ws"], ["w"], name="scale"),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    inits.append(numpy_helper.from_array(rng.normal(size=(3, 4, 1, 1)).astype(np.float32),
                                         "w2"))
    model = onnxaom.Model(zoo.hand_built(nodes, inits, ["N", 2, 5, 5], ["N", 3, 3, 3]))
    assert onnxaom.summary(model).total_params == 4 * 2 * 9 + 1 + 3 * 4
    with pytest.raises(EditError, match=r"node 'cast' \(Cast\) casts integers"):
        onnxaom.remove_kernels(model, {"conv": [0]})


def test_a_cast_between_integer_types_on_a_weights_path_is_no_quantization():
    """A weight reshaped to a target cast from int32 to int64 (tf2onnx writes such casts on
    shapes) is a float weight: only a Cast to a float type dequantizes."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=4 * 2 * 9).astype(np.float32), "flat_w"),
             numpy_helper.from_array(np.array([4, 2, 3, 3], np.int32), "shape32"),
             numpy_helper.from_array(rng.normal(size=(3, 4, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Cast", ["shape32"], ["shape"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["flat_w", "shape"], ["w"]),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    model = onnxaom.Model(zoo.hand_built(nodes, inits, ["N", 2, 5, 5], ["N", 3, 3, 3]))
    edited = onnxaom.remove_kernels(model, {"conv": [0]})
    assert edited.layer("conv").kernels == 3
    assert onnxaom.summary(model).total_params == 4 * 2 * 9 + 3 * 4  # not the int32 shape


def test_qdq_counts_do_not_depend_on_the_counting_graph():
    """Found by a counting fuzzer (2026-11-25): ONNX Runtime's Q/DQ fusions quantise a conv's
    float bias to int32 only where the conv's output has the readers its pattern wants, so
    the in-graph count (more readers) and the plain one disagreed, and so did a layer counted
    alone and with the others. Q/DQ models now run node by node, as the ONNX spec defines
    them: a bias of 0.4 at a bias scale of 1 stays 0.4."""
    f32 = np.float32
    inits = [
        numpy_helper.from_array(np.array(1.0, f32), "xs"),
        numpy_helper.from_array(np.array(0, np.uint8), "xz"),
        numpy_helper.from_array(np.ones((2, 1, 1, 1), np.int8), "wq"),
        numpy_helper.from_array(np.array(1.0, f32), "ws"),
        numpy_helper.from_array(np.array(0, np.int8), "wz"),
        numpy_helper.from_array(np.array([0.4, -0.4], f32), "b"),
        numpy_helper.from_array(np.ones((1, 2, 1, 1), f32), "w2"),
        numpy_helper.from_array(np.array(0.05, f32), "ys"),
        numpy_helper.from_array(np.array(128, np.uint8), "yz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="qx"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dqx"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dqw"),
        helper.make_node("Conv", ["xd", "wd", "b"], ["c"], name="conv"),
        helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"], name="qc"),
        helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["cd"], name="dqc"),
        helper.make_node("Relu", ["cd"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    proto = zoo.hand_built(nodes, inits, ["N", 1, 2, 2], ["N", 1, 2, 2], opset=13)
    model = onnxaom.load(proto)
    images, labels = np.zeros((4, 1, 2, 2), f32), np.array([0, 0, 1, 1])  # output = the bias
    for probe in ("conv", "activation"):
        counts = [onnxaom.collect(model, images, labels, probe=probe, method=method,
                                  layers=layers, progress=False).counts["conv"]
                  for method in ("graph", "plain") for layers in (None, ["conv"])]
        for other in counts[1:]:
            np.testing.assert_array_equal(other, counts[0])
        assert counts[0][:, :, 0, 0].tolist() == [[2, 2], [0, 0]]
