"""Where a kernel is read when its activation does not keep the sign of its input, when
per-channel ops follow the activation, and when a normalisation across channels follows the
layer; and the surgery on those graphs. Cases from an adversarial sweep (2026-11-24): each of
them counted wrongly, silently, before.

Every count is checked against a brute-force reference: the intended tensor, taken from ONNX
Runtime as a graph output, compared with > 0 element by element.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxaom
from onnxaom.layers import channel_mixing_reader
from onnxaom.surgery.apply import apply_steps

from . import zoo
from .test_surgery import assert_removal_exact

K = 4  # kernels of the first conv
RNG = np.random.default_rng(11)
W1 = RNG.normal(size=(K, 2, 3, 3)).astype(np.float32)
B1 = RNG.normal(size=K).astype(np.float32)
W2 = RNG.normal(size=(3, K, 3, 3)).astype(np.float32)


def _model(ops: list[tuple[str, dict, dict]], opset: int = 17,
           pads2: int = 1) -> onnx.ModelProto:
    """input (N, 2, 6, 6) -> conv1 (K kernels) -> ``ops`` -> conv2 (padding ``pads2``) ->
    ReduceMean -> logits.

    ``ops``: (op type, constant inputs after the first {name: array}, attributes)."""
    inits = [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(B1, "b1"),
             numpy_helper.from_array(W2, "w2")]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4)]
    tensor = "c1"
    for i, (op, consts, attrs) in enumerate(ops):
        names = []
        for key, value in consts.items():
            names.append(f"{op}{i}_{key}")
            inits.append(numpy_helper.from_array(np.asarray(value, np.float32), names[-1]))
        out = f"t{i}"
        nodes.append(helper.make_node(op, [tensor, *names], [out], name=f"{op}{i}", **attrs))
        tensor = out
    nodes.append(helper.make_node("Conv", [tensor, "w2"], ["c2"], name="conv2",
                                  pads=[pads2] * 4))
    if opset >= 18:  # ReduceMean's axes became an input
        inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "mean_axes"))
        nodes.append(helper.make_node("ReduceMean", ["c2", "mean_axes"], ["logits"], keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceMean", ["c2"], ["logits"], axes=[2, 3], keepdims=0))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _bn(shift: float = 0.7) -> tuple[str, dict, dict]:
    scale = np.linspace(0.5, 2.0, K)
    return ("BatchNormalization", {"scale": scale, "bias": np.full(K, shift), "mean": np.zeros(K),
                                   "var": np.ones(K)}, {})


def _counts_of(proto: onnx.ModelProto, tensor: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Brute force: (K, C, H, W) counts of ``tensor`` > 0, from ORT with it as an output."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    model.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run([tensor], {"input": x})[0] > 0
    return np.stack([values[y == c].sum(axis=0) for c in range(int(y.max()) + 1)], axis=1)


def _data() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(5).normal(size=(24, 2, 6, 6)).astype(np.float32)
    return x, np.arange(24) % 3


SIGN_CASES = {
    # activation: (ops, the tensor that must be read)
    "relu": ([("Relu", {}, {})], "t0"),
    "leaky 0.1": ([("LeakyRelu", {}, {"alpha": 0.1})], "t0"),
    "leaky -0.5": ([("LeakyRelu", {}, {"alpha": -0.5})], "c1"),
    "prelu >= 0": ([("PRelu", {"slope": np.array([0.1, 0.0, 0.2, 0.3]).reshape(K, 1, 1)}, {})],
                   "t0"),
    "prelu mixed": ([("PRelu", {"slope": np.array([-0.5, 0.25, -2.0, 0.1]).reshape(K, 1, 1)},
                      {})], "c1"),
    "elu -1": ([("Elu", {}, {"alpha": -1.0})], "c1"),
    "clip never positive": ([("Clip", {"min": np.array(-2.0), "max": np.array(-0.1)}, {})],
                            "c1"),
    "clip -1..1": ([("Clip", {"min": np.array(-1.0), "max": np.array(1.0)}, {})], "t0"),
    "bn then prelu mixed": ([_bn(), ("PRelu", {"slope": np.array([-0.5, 0.25, -2.0, 0.1])
                                               .reshape(K, 1, 1)}, {})], "t0"),
    "relu then bn": ([("Relu", {}, {}), _bn()], "t0"),
    "relu then add": ([("Relu", {}, {}), ("Add", {"b": np.full((K, 1, 1), 0.3)}, {})], "t0"),
    "instance norm then relu": ([("InstanceNormalization", {"scale": np.linspace(0.5, 2, K),
                                                            "bias": np.full(K, -0.2)}, {}),
                                 ("Relu", {}, {})], "t1"),
}


@pytest.mark.parametrize("case", list(SIGN_CASES))
def test_the_probe_is_where_greater_than_zero_means_found(case: str) -> None:
    ops, want = SIGN_CASES[case]
    proto = _model(ops)
    layer = onnxaom.Model(proto).layer("conv1")
    assert layer.probe == want
    x, y = _data()
    stats = onnxaom.collect(onnxaom.Model(proto), x, y, layers=["conv1"], progress=False)
    np.testing.assert_array_equal(stats.counts["conv1"], _counts_of(proto, want, x, y))


def test_per_channel_ops_after_the_activation_are_not_read_but_are_removed_with_it() -> None:
    """Conv -> ReLU -> BN: counted at the ReLU (the BN's shift would turn every off position
    on). A removed kernel is zero at the ReLU, and the BN's shift of its channel goes into
    conv2's bias where that is exact (conv2 without padding), so that removing a dead kernel
    changes nothing; before a padded conv2 the channel is removed after the BN instead (the
    shift dropped), with a warning."""
    proto = _model([("Relu", {}, {}), _bn(shift=0.7)])
    layer = onnxaom.Model(proto).layer("conv1")
    assert (layer.probe, layer.chain, layer.channel_end) == ("t0", ("Relu",), "t1")
    x, y = _data()
    relu_on = _counts_of(proto, "t0", x, y)
    assert (relu_on < _counts_of(proto, "t1", x, y)).any()  # the BN output would count more
    for kernels in ([0], [1, 3], [K - 1]):
        with pytest.warns(UserWarning, match="removed at the end of their per-channel chains"):
            assert_removal_exact(proto, {"conv1": kernels}, point="chain end")
    unpadded = _model([("Relu", {}, {}), _bn(shift=0.7)], pads2=0)
    for kernels in ([0], [1, 3], [K - 1]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # exact: no fallback
            assert_removal_exact(unpadded, {"conv1": kernels})
    plan = apply_steps(onnxaom.Model(unpadded), [onnxaom.RemoveKernels("conv1", (1,))])[1][0]
    assert plan.removed_at == "probe" and set(plan.folds) == {"conv2"}
    # an identity layer + ReLU after the ReLU leaves the function unchanged
    model = onnxaom.Model(proto)
    deeper = onnxaom.apply(model, [onnxaom.InsertLayer(after="conv1", kernel_size=3)])
    session = ort.InferenceSession
    before = session(proto.SerializeToString()).run(None, {"input": x})[0]
    after = session(deeper.proto.SerializeToString()).run(None, {"input": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["leaky -0.5", "prelu mixed", "instance norm then relu"])
def test_removal_through_the_new_chains_is_exact(case: str) -> None:
    proto = _model(SIGN_CASES[case][0])
    for kernels in ([0], [1, 2], [K - 1]):
        assert_removal_exact(proto, {"conv1": kernels})


MIXING_CASES = {
    # ops after conv1: (ops, opset, the tensor that must be read, the norm named)
    "group norm, relu": ([("GroupNormalization", {"scale": np.ones(2), "bias": np.zeros(2)},
                           {"num_groups": 2}), ("Relu", {}, {})], 18, "t1",
                         "'GroupNormalization0' (GroupNormalization)"),
    "group norm, affine, relu": ([("GroupNormalization", {"scale": np.ones(2),
                                                          "bias": np.zeros(2)},
                                   {"num_groups": 2}),
                                  ("Mul", {"w": np.linspace(0.5, 2, K).reshape(K, 1, 1)}, {}),
                                  ("Add", {"b": np.full((K, 1, 1), -0.3)}, {}),
                                  ("Relu", {}, {})], 18, "t3",
                                 "'GroupNormalization0' (GroupNormalization)"),
    "layer norm over C, H, W, relu": ([("LayerNormalization",
                                        {"scale": np.full((K, 6, 6), 1.5),
                                         "bias": np.full((K, 6, 6), 0.2)}, {"axis": 1}),
                                       ("Relu", {}, {})], 17, "t1",
                                      "'LayerNormalization0' (LayerNormalization)"),
    "bn, group norm, relu": ([_bn(), ("GroupNormalization", {"scale": np.ones(2),
                                                             "bias": np.zeros(2)},
                                      {"num_groups": 2}), ("Relu", {}, {})], 18, "t2",
                             "'GroupNormalization1' (GroupNormalization)"),
    "relu, group norm": ([("Relu", {}, {}), ("GroupNormalization", {"scale": np.ones(2),
                                                                    "bias": np.zeros(2)},
                                             {"num_groups": 2})], 18, "t0", None),
}


@pytest.mark.parametrize("case", list(MIXING_CASES))
def test_a_normalisation_across_channels_is_read_through_to_its_activation(
        case: str, caplog: pytest.LogCaptureFixture) -> None:
    ops, opset, want, named = MIXING_CASES[case]
    proto = _model(ops, opset=opset)
    model = onnxaom.Model(proto)
    layer = model.layer("conv1")
    assert layer.probe == want
    assert channel_mixing_reader(proto, layer) == named
    x, y = _data()
    with caplog.at_level(logging.INFO, logger="onnxaom.collect"):
        stats = onnxaom.collect(model, x, y, layers=["conv1"], progress=False)
    np.testing.assert_array_equal(stats.counts["conv1"], _counts_of(proto, want, x, y))
    assert (named is not None) == ("normalisation group" in caplog.text)
    assert model.layer("conv1", probe="conv").probe == "c1"
    plain = _model([("Relu", {}, {})])
    assert channel_mixing_reader(plain, onnxaom.Model(plain).layer("conv1")) is None


def test_removal_through_a_group_norm_is_refused_naming_it() -> None:
    proto = _model(MIXING_CASES["group norm, relu"][0], opset=18)
    with pytest.raises(onnxaom.EditError, match="GroupNormalization0"):
        onnxaom.remove_kernels(onnxaom.Model(proto), {"conv1": [0]})


@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_a_torch_group_norm_is_read_at_its_relu(tmp_path, exporter: str) -> None:
    """nn.GroupNorm as the exporters write it (legacy: Reshape -> InstanceNormalization ->
    Reshape -> Mul -> Add) is read through to the ReLU after it."""
    torch = pytest.importorskip("torch")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    from onnxaom_torch.architectures import export_onnx

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(2, K, 3, padding=1)
            self.norm = torch.nn.GroupNorm(2, K)
            self.conv2 = torch.nn.Conv2d(K, 3, 3, padding=1)

        def forward(self, x):
            return self.conv2(torch.relu(self.norm(self.conv1(x)))).mean(dim=(2, 3))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.5, 0.5)
    path = export_onnx(net, tmp_path / "gn.onnx", exporter=exporter, input_shape=(1, 2, 6, 6),
                       opset=17 if exporter == "legacy" else 18)
    model = onnxaom.load(path)
    conv1 = model.layers()[0]
    relu = next(n for n in model.proto.graph.node if n.op_type == "Relu")
    assert conv1.probe == relu.output[0] and conv1.chain[-1] == "Relu"
    x, y = _data()
    stats = onnxaom.collect(model, x, y, layers=[conv1.name], progress=False)
    np.testing.assert_array_equal(stats.counts[conv1.name],
                                  _counts_of(model.proto, relu.output[0], x, y))


def _token_model(opset: int) -> onnx.ModelProto:
    """conv -> (N, C, H*W) with a computed Reshape target (as legacy exports of
    ``x.flatten(2)`` at old opsets have it) -> transpose -> a Linear on the channels (per
    token) -> flatten -> Gemm."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(W1, "w1"),
             numpy_helper.from_array(np.array([0], np.int64), "s0"),
             numpy_helper.from_array(np.array([2], np.int64), "s2"),
             numpy_helper.from_array(np.array([-1], np.int64), "m1"),
             numpy_helper.from_array(rng.normal(size=(K, 7)).astype(np.float32), "lin"),
             numpy_helper.from_array(rng.normal(size=(5, 36 * 7)).astype(np.float32), "head")]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Shape", ["r1"], ["sh"]),
             helper.make_node("Slice", ["sh", "s0", "s2"], ["nc"]),
             helper.make_node("Concat", ["nc", "m1"], ["target"], axis=0),
             helper.make_node("Reshape", ["r1", "target"], ["tokens"]),
             helper.make_node("Transpose", ["tokens"], ["tt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["tt", "lin"], ["emb"], name="lin"),
             helper.make_node("Flatten", ["emb"], ["flat"]),
             helper.make_node("Gemm", ["flat", "head"], ["logits"], name="head", transB=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


@pytest.mark.parametrize("opset", [11, 13])
def test_a_per_token_matmul_of_unknown_rank_is_not_a_layer(opset: int) -> None:
    """Its (N, T, K) output is not K neurons: counting it crashed, and removing its 'neurons'
    wrote a head of the wrong width."""
    model = onnxaom.Model(_token_model(opset))
    assert [layer.name for layer in model.layers()] == ["conv1", "head"]
    x, y = _data()
    stats = onnxaom.collect(model, x, y, progress=False)
    assert stats.layer_names == ("conv1", "head")
    with pytest.raises(onnxaom.LayerNotFoundError, match="no layer 'lin'"):
        onnxaom.remove_kernels(model, {"lin": [0]})


def test_a_matmul_after_a_computed_two_axis_reshape_is_still_a_layer() -> None:
    """PyTorch's ``x.view(x.size(0), -1)`` at an old opset: the target is computed, but it has
    two entries, so the MatMul after it reads (N, F) features."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(W1, "w1"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "m1"),
             numpy_helper.from_array(rng.normal(size=(K * 36, 5)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Shape", ["r1"], ["sh"]),
             helper.make_node("Gather", ["sh", "zero"], ["n"], axis=0),
             helper.make_node("Concat", ["n", "m1"], ["target"], axis=0),
             helper.make_node("Reshape", ["r1", "target"], ["flat"]),
             helper.make_node("MatMul", ["flat", "fc"], ["logits"], name="fc")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    proto.ir_version = 7
    assert [layer.name for layer in onnxaom.Model(proto).layers()] == ["conv1", "fc"]


TO_NHWC = ("Transpose", {}, {"perm": [0, 2, 3, 1]})
TO_NCHW = ("Transpose", {}, {"perm": [0, 3, 1, 2]})
SCALE, SHIFT = np.linspace(0.5, 2.0, K), np.array([0.3, -0.4, 0.1, -0.2])


def _channels_last_chain(scale: np.ndarray = SCALE, shift: np.ndarray = SHIFT
                         ) -> onnx.ModelProto:
    """conv1 -> Transpose to NHWC -> Mul, Add of one constant per channel (the last axis) ->
    Relu -> Transpose back -> conv2: a chain as converters that keep Keras' layout write it."""
    return _model([TO_NHWC, ("Mul", {"s": scale}, {}), ("Add", {"b": shift}, {}),
                   ("Relu", {}, {}), TO_NCHW])


@pytest.mark.parametrize("method", ["graph", "plain"])
def test_a_channels_last_chain_is_read_at_its_relu_in_nchw_order(method: str) -> None:
    """Found by a cross-exporter sweep (2026-11-25): the chain stopped at the Transpose, so the
    layer was read at the raw conv output, before its bias and ReLU (396 of 512 counts
    wrong), and compare() called a faithful port different."""
    proto = _channels_last_chain()
    layer = onnxaom.Model(proto).layer("conv1")
    assert (layer.probe, layer.chain) == ("t3", ("Transpose", "Mul", "Add", "Relu"))
    assert layer.probe_perm == (0, 3, 1, 2) and layer.shape == (K, 6, 6)
    assert layer.to_dict()["probe_perm"] == [0, 3, 1, 2]
    x, y = _data()
    stats = onnxaom.collect(onnxaom.Model(proto), x, y, layers=["conv1"], method=method,
                            progress=False)
    want = _counts_of(proto, "t3", x, y).transpose(3, 1, 0, 2)  # (H, C, W, K) -> (K, C, H, W)
    np.testing.assert_array_equal(stats.counts["conv1"], want)
    # the same network written channels first counts the same
    first = _model([("Mul", {"s": SCALE.reshape(K, 1, 1)}, {}),
                    ("Add", {"b": SHIFT.reshape(K, 1, 1)}, {}), ("Relu", {}, {})])
    np.testing.assert_array_equal(
        stats.counts["conv1"],
        onnxaom.collect(onnxaom.Model(first), x, y, layers=["conv1"], progress=False)
        .counts["conv1"])


def test_removal_through_a_channels_last_chain_is_exact() -> None:
    proto = _channels_last_chain()
    x = zoo.random_input(proto, batch=3, seed=1)
    for kernels in ([0], [1, 3], [K - 1]):
        edited = onnxaom.remove_kernels(onnxaom.Model(proto), {"conv1": kernels})
        off = np.isin(np.arange(K), kernels)
        zeroed = _channels_last_chain(np.where(off, 0.0, SCALE), np.where(off, 0.0, SHIFT))
        np.testing.assert_allclose(zoo.run(edited.proto, x)[0], zoo.run(zeroed, x)[0],
                                   rtol=1e-5, atol=1e-5)
        assert edited.layer("conv1").kernels == K - len(kernels)


def test_a_channels_last_chain_refuses_insertion_and_a_bare_transpose_ends_it() -> None:
    with pytest.raises(onnxaom.EditError, match=r"InsertLayer\(after='conv1'\).*transposed"):
        onnxaom.apply(onnxaom.Model(_channels_last_chain()),
                      [onnxaom.InsertLayer(after="conv1")])
    # nothing per-channel after the Transposes: read at the conv, as before
    bare = onnxaom.Model(_model([TO_NHWC, TO_NCHW])).layer("conv1")
    assert (bare.probe, bare.chain, bare.probe_perm) == ("c1", (), ())
    # a Transpose that moves the batch axis ends the chain
    batch_moved = _model([("Transpose", {}, {"perm": [1, 0, 2, 3]}), ("Relu", {}, {}),
                          ("Transpose", {}, {"perm": [1, 0, 2, 3]})])
    assert onnxaom.Model(batch_moved).layer("conv1").probe == "c1"


@pytest.mark.parametrize(("pads", "pooled"), [([0, 0, 0, 0, 0, 0, 1, 1], True),
                                              ([0, 1, 0, 0, 0, 1, 0, 0], False),
                                              ([0, 0, -1, 0, 0, 0, 0, 0], False)])
def test_the_pool_probe_reads_through_a_zero_pad_of_h_and_w_only(pads, pooled) -> None:
    """A review (2026-11-25): the pool probe, once it read through a zero Pad, also read
    through one that pads the channels (and then could not count: 6 channels for 4 kernels)
    or crops."""
    rng = np.random.default_rng(12)
    inits = [numpy_helper.from_array(rng.normal(size=(K, 1, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(pads, np.int64), "pads")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Pad", ["r", "pads"], ["p"], name="pad", mode="constant"),
             helper.make_node("MaxPool", ["p"], ["y"], name="pool", kernel_shape=[2, 2],
                              strides=[2, 2])]
    proto = zoo.hand_built(nodes, inits, ["N", 1, 8, 8], None, opset=13)
    layer = onnxaom.Model(proto).layer("conv", probe="pool")
    assert (layer.probe, layer.probe_kind) == (("y", "pool") if pooled else ("r", "activation"))
    x = rng.normal(size=(10, 1, 8, 8)).astype(np.float32)
    onnxaom.collect(onnxaom.Model(proto), x, np.arange(10) % 2, probe="pool", progress=False)
