"""Models whose layers sit inside model-local functions: inlined on load, then analysed and
edited like any other model (counts against brute force, removal against the zeroing oracle)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxaom
from onnxaom.errors import ModelError
from onnxaom.inline import inline_functions
from onnxaom.surgery import plan_removal, remove_kernels

from . import zoo
from .test_collect import brute_force
from .test_surgery import ATOL, zeroed_at_probes

DOMAIN = "blocks"


def _with_ref(node: onnx.NodeProto, name: str, ref: str) -> onnx.NodeProto:
    """``node`` with float attribute ``name`` taken from the function's attribute ``ref``."""
    attribute = node.attribute.add()
    attribute.name, attribute.ref_attr_name = name, ref
    attribute.type = onnx.AttributeProto.FLOAT
    return node


def _block_functions(opset: int = 17) -> list[onnx.FunctionProto]:
    """``Act(a) -> LeakyRelu(a, alpha=@slope)``; ``Block(x, w, b) -> Act(Conv(x, w, b))``."""
    act = helper.make_function(
        DOMAIN, "Act", ["a"], ["b"],
        [_with_ref(helper.make_node("LeakyRelu", ["a"], ["b"], name="leaky"), "alpha", "slope")],
        [helper.make_opsetid("", opset)], attributes=["slope"])
    block = helper.make_function(
        DOMAIN, "Block", ["x", "w", "bias"], ["y"],
        [helper.make_node("Conv", ["x", "w", "bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Act", ["c"], ["y"], domain=DOMAIN, name="act", slope=0.0)],
        [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)])
    return [act, block]


def function_model(*, seed: int = 0, function_opset: int = 17) -> onnx.ModelProto:
    """Two calls of ``Block`` (4 then 6 kernels), global average pool, Gemm to 3 classes."""
    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.normal(size=(4, 1, 3, 3)), "b1": rng.normal(size=4) * 0.1,
        "w2": rng.normal(size=(6, 4, 3, 3)) * 0.5, "b2": rng.normal(size=6) * 0.1,
        "fc_w": rng.normal(size=(3, 6)), "fc_b": rng.normal(size=3),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    nodes = [
        helper.make_node("Block", ["image", "w1", "b1"], ["y1"], domain=DOMAIN, name="block1"),
        helper.make_node("Block", ["y1", "w2", "b2"], ["y2"], domain=DOMAIN, name="block2"),
        helper.make_node("GlobalAveragePool", ["y2"], ["gap"]),  # unnamed on purpose
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "blocks",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(
        graph, functions=_block_functions(function_opset),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    if function_opset == 17:  # the checker rejects a function of another opset; onnx converts it
        onnx.checker.check_model(model)
    return model


def test_layers_inside_functions_are_found_and_named_by_call_path() -> None:
    model = onnxaom.Model(function_model())
    assert [layer.name for layer in model.layers()] == ["block1/conv", "block2/conv", "fc"]
    assert [layer.kernels for layer in model.layers()] == [4, 6, 3]
    assert not model.proto.functions
    names = [node.name for node in model.proto.graph.node]
    assert names == ["block1/conv", "block1/act/leaky", "block2/conv", "block2/act/leaky",
                     "", "flatten", "fc"]


def test_inlined_model_computes_the_same_outputs() -> None:
    proto = function_model()
    x = zoo.random_input(proto, batch=4, seed=2)
    want = zoo.run(proto, x)
    got = zoo.run(onnxaom.Model(proto).proto, x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_counts_inside_functions_equal_brute_force() -> None:
    model = onnxaom.Model(function_model())
    rng = np.random.default_rng(3)
    images = rng.normal(size=(23, 1, 8, 8)).astype(np.float32)
    labels = (np.arange(23) % 3).astype(np.int64)
    stats = onnxaom.collect(model, images, labels, batch_size=5, progress=False,
                            layers=["block1/conv", "block2/conv"])
    expected = brute_force(model.proto, model.layers()[:2], images, labels)
    assert stats.layer_names == tuple(expected)
    for name, counts in expected.items():
        np.testing.assert_array_equal(stats.counts[name], counts, err_msg=name)


def test_removal_inside_a_function_equals_the_zeroing_oracle(tmp_path) -> None:
    proto = function_model()
    model = onnxaom.Model(proto)
    removals = {"block1/conv": [0, 2], "block2/conv": [5]}
    edited = remove_kernels(model, removals)
    plan = plan_removal(model, removals)
    x = zoo.random_input(proto, batch=3, seed=1)
    want = zoo.run(zeroed_at_probes(model.proto, plan.removed), x)
    for g, w in zip(zoo.run(edited.proto, x), want, strict=True):
        np.testing.assert_allclose(g, w, rtol=ATOL, atol=ATOL)
    saved = onnxaom.load(edited.save(tmp_path / "edited.onnx"))
    assert [layer.kernels for layer in saved.layers()] == [2, 5, 3]
    onnx.checker.check_model(saved.proto)


def test_a_function_of_another_opset_is_converted_as_it_is_inlined() -> None:
    """onnx inlines a function importing another opset only by converting it, which needs the
    type of each input of the call (given from the initializers and shape inference)."""
    proto = function_model(function_opset=13)
    model = onnxaom.Model(proto)
    assert [layer.name for layer in model.layers()] == ["block1/conv", "block2/conv", "fc"]
    assert not model.proto.graph.value_info  # the types given for the conversion are dropped
    x = zoo.random_input(proto, batch=2, seed=0)
    for g, w in zip(zoo.run(model.proto, x), zoo.run(proto, x), strict=True):
        np.testing.assert_array_equal(g, w)


def test_a_function_with_layers_onnx_cannot_convert_is_refused_with_its_opset(monkeypatch):
    real = onnx.inliner.inline_local_functions

    def no_conversion(model, convert_version=False):
        if convert_version:
            raise RuntimeError("Type unknown for w1")
        return real(model, convert_version)

    monkeypatch.setattr(onnx.inliner, "inline_local_functions", no_conversion)
    with pytest.raises(ModelError, match=r"blocks\.Block \(imports ai\.onnx 13; the model "
                                         r"imports 17\)"):
        onnxaom.Model(function_model(function_opset=13))


def test_a_default_attribute_of_a_function_is_kept() -> None:
    """ONNX Runtime applies a function's attribute default where the call leaves it out;
    onnx.inliner drops it, so it is spelled out on the call first."""
    proto = function_model()
    act = next(f for f in proto.functions if f.name == "Act")
    act.attribute_proto.append(helper.make_attribute("slope", 0.5))
    block = next(f for f in proto.functions if f.name == "Block")
    call = next(n for n in block.node if n.op_type == "Act")
    del call.attribute[:]  # slope from the default
    model = onnxaom.Model(proto)
    leaky = [n for n in model.proto.graph.node if n.op_type == "LeakyRelu"]
    assert [helper.get_attribute_value(n.attribute[0]) for n in leaky] == [0.5, 0.5]
    x = zoo.random_input(proto, batch=2, seed=0)
    for g, w in zip(zoo.run(model.proto, x), zoo.run(proto, x), strict=True):
        np.testing.assert_array_equal(g, w)


def test_a_model_that_calls_no_function_is_left_as_it_is() -> None:
    proto = zoo.chain()
    assert inline_functions(proto) is proto
    unused = onnx.ModelProto()
    unused.CopyFrom(proto)
    unused.functions.extend(_block_functions())
    assert inline_functions(unused) is unused


def test_a_function_with_layers_that_cannot_be_inlined_is_refused_by_name(monkeypatch) -> None:
    monkeypatch.setattr(onnx.inliner, "inline_local_functions",
                        lambda model, convert_version=False: model)
    with pytest.raises(ModelError, match=r"cannot be inlined.*blocks\.Block"):
        onnxaom.Model(function_model())


def test_a_call_left_in_place_without_layers_is_logged(monkeypatch, caplog) -> None:
    """A function that holds no layer may stay a call: nothing inside it is analysed."""
    real = onnx.inliner.inline_local_functions
    proto = function_model()

    def inline_block_only(model, convert_version=False):
        act = next(f for f in model.functions if f.name == "Act")
        inlined = real(model, convert_version)
        inlined.functions.append(act)  # pretend the Act calls could not be inlined
        for node in inlined.graph.node:
            if node.op_type == "LeakyRelu":
                node.op_type, node.domain = "Act", DOMAIN
                del node.attribute[:]
                node.attribute.append(helper.make_attribute("slope", 0.0))
        return inlined

    monkeypatch.setattr(onnx.inliner, "inline_local_functions", inline_block_only)
    with caplog.at_level(logging.WARNING, logger="onnxaom.inline"):
        model = onnxaom.Model(proto)
    assert "blocks.Act" in caplog.text
    assert [layer.name for layer in model.layers()][-1] == "fc"


def test_torch_modules_exported_as_functions_count_as_the_plain_export(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, 3, padding=1)
            self.bn = nn.BatchNorm2d(cout)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b1, self.b2 = Block(1, 4), Block(4, 5)
            self.fc = nn.Linear(5 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(self.b2(self.b1(x)).flatten(1))

    torch.manual_seed(0)
    net = Net().eval()
    example = torch.randn(2, 1, 8, 8)
    paths = {}
    for name, functions in (("plain", False), ("functions", {Block})):
        paths[name] = tmp_path / f"{name}.onnx"
        torch.onnx.export(net, (example,), str(paths[name]), dynamo=False, opset_version=17,
                          export_modules_as_functions=functions, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
    assert onnx.load(str(paths["functions"])).functions
    rng = np.random.default_rng(0)
    images = rng.random((40, 1, 8, 8), dtype=np.float32)
    labels = np.arange(40) % 10
    stats = {name: onnxaom.collect(onnxaom.load(path), images, labels, progress=False,
                                   batch_size=16) for name, path in paths.items()}
    assert len(stats["functions"].layer_names) == len(stats["plain"].layer_names) == 3
    for plain, inlined in zip(stats["plain"].layer_names, stats["functions"].layer_names,
                              strict=True):
        np.testing.assert_array_equal(stats["plain"].counts[plain],
                                      stats["functions"].counts[inlined], err_msg=inlined)


def test_calls_to_functions_the_model_lost_are_named_when_no_conv_is_left() -> None:
    """onnx's version converter keeps function calls but drops the functions: the convs are
    gone, and the refusal names the calls."""
    proto = function_model()
    del proto.functions[:]
    model = onnxaom.Model(proto)
    assert [layer.name for layer in model.layers()] == ["fc"]
    images = np.zeros((3, 1, 8, 8), np.float32)
    with pytest.raises(ModelError, match=r"no 2-D Conv layer.*blocks\.Block; a function"):
        onnxaom.collect(model, images, np.arange(3), progress=False)
