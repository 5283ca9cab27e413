"""Graph forms ONNX Runtime runs but the library did not read right, put in normal form when a
Model is made: sparse initializers, nodes out of order, stale stored shapes. Each is checked
against the plain model: same layers, same counts, same summary, edits exact."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxaom
from onnxaom.errors import ModelError
from onnxaom.normalize import dense_array, normalize

from . import zoo
from .test_surgery import assert_removal_exact


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _with_sparse(proto: onnx.ModelProto, names: list[str], coordinates: bool) -> onnx.ModelProto:
    """``proto`` with the initializers ``names`` stored as sparse initializers."""
    out = _copy(proto)
    keep = []
    for tensor in out.graph.initializer:
        if tensor.name not in names:
            keep.append(tensor)
            continue
        array = numpy_helper.to_array(tensor)
        array = np.where(np.abs(array) < 0.2, 0, array).astype(array.dtype)  # really sparse
        nonzero = np.flatnonzero(array)
        indices = np.stack(np.unravel_index(nonzero, array.shape), axis=1) if coordinates \
            else nonzero
        out.graph.sparse_initializer.append(helper.make_sparse_tensor(
            numpy_helper.from_array(array.reshape(-1)[nonzero], tensor.name),
            numpy_helper.from_array(indices.astype(np.int64), f"{tensor.name}_indices"),
            list(array.shape)))
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    return out


def _dense_twin(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The plain model with the same zeroed weights as :func:`_with_sparse`."""
    out = _copy(proto)
    for tensor in out.graph.initializer:
        if tensor.name in names:
            array = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(
                np.where(np.abs(array) < 0.2, 0, array).astype(array.dtype), tensor.name))
    return out


@pytest.mark.parametrize("coordinates", [False, True])
def test_sparse_weights_are_read_dense(coordinates: bool) -> None:
    names = ["conv1.weight", "conv2.weight"]
    proto = zoo.chain()
    sparse = _with_sparse(proto, names, coordinates)
    dense = _dense_twin(proto, names)
    for s in sparse.graph.sparse_initializer:
        expected = numpy_helper.to_array(next(t for t in dense.graph.initializer
                                              if t.name == s.values.name))
        np.testing.assert_array_equal(dense_array(s), expected)
    model = onnxaom.Model(sparse)
    assert not model.proto.graph.sparse_initializer
    assert [x.name for x in model.layers()] == [x.name for x in onnxaom.Model(dense).layers()]
    images = zoo.random_input(proto, batch=20, seed=3)
    labels = np.arange(20) % 3
    got = onnxaom.collect(model, images, labels, progress=False)
    want = onnxaom.collect(onnxaom.Model(dense), images, labels, progress=False)
    for name in want.layer_names:
        np.testing.assert_array_equal(got.counts[name], want.counts[name], err_msg=name)
    assert_removal_exact(model.proto, {"conv1": [0, 2]})
    edited = onnxaom.remove_kernels(model, {"conv2": [1]})
    x = zoo.random_input(proto, batch=2, seed=0)
    for g, w in zip(zoo.run(edited.proto, x), zoo.run(
            onnxaom.remove_kernels(onnxaom.Model(dense), {"conv2": [1]}).proto, x), strict=True):
        np.testing.assert_array_equal(g, w)


def test_nodes_out_of_order_are_sorted_and_edits_stay_exact() -> None:
    proto = zoo.depthwise()
    reversed_ = _copy(proto)
    nodes = list(reversed_.graph.node)[::-1]
    del reversed_.graph.node[:]
    reversed_.graph.node.extend(nodes)
    with pytest.warns(UserWarning, match="not in topological order"):
        model = onnxaom.Model(reversed_)
    assert [n.name for n in model.proto.graph.node] == [n.name for n in proto.graph.node]
    plain = onnxaom.Model(proto)
    assert [(x.name, x.shape) for x in model.layers()] == [(x.name, x.shape)
                                                           for x in plain.layers()]
    # the depthwise conv's tie to conv1 is seen again: removing conv1's kernels removes its own
    assert_removal_exact(model.proto, {"conv1": [1, 3]})


def test_a_cycle_is_refused_naming_a_node() -> None:
    proto = zoo.chain()
    cyclic = _copy(proto)
    relu1 = next(n for n in cyclic.graph.node if n.name == "relu1")
    conv2 = next(n for n in cyclic.graph.node if n.name == "conv2")
    relu1.input[0] = conv2.output[0]  # relu1 <- conv2 <- relu1
    with pytest.raises(ModelError, match="cycle through node 'relu1'|cycle through node 'conv2'"):
        onnxaom.Model(cyclic)


def test_stale_stored_shapes_are_replaced_with_a_warning() -> None:
    proto = zoo.chain()
    plain = onnxaom.Model(proto)
    stale = onnx.shape_inference.infer_shapes(proto)
    for value in stale.graph.value_info:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4:
            dims[2].dim_value = dims[3].dim_value = 28  # as if the model took 28x28 images
    with pytest.warns(UserWarning, match=r"stored intermediate shape\(s\) contradict"):
        model = onnxaom.Model(stale)
    assert [(x.name, x.shape) for x in model.layers()] == [(x.name, x.shape)
                                                           for x in plain.layers()]
    assert onnxaom.summary(model).total_macs == onnxaom.summary(plain).total_macs
    images = zoo.random_input(proto, batch=9, seed=1)
    got = onnxaom.collect(model, images, np.arange(9) % 3, progress=False)
    want = onnxaom.collect(plain, images, np.arange(9) % 3, progress=False)
    for name in want.layer_names:
        np.testing.assert_array_equal(got.counts[name], want.counts[name], err_msg=name)


def test_a_model_in_normal_form_is_returned_as_it_is() -> None:
    proto = onnx.shape_inference.infer_shapes(zoo.residual())  # consistent value_info kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert normalize(proto) is proto


def test_a_subgraph_name_that_an_outer_node_also_produces_is_not_a_cycle() -> None:
    """A branch of an If computes a local tensor named like one an outer node writes later:
    the branch does not read the outer one, so the graph is in order as it is."""
    proto = zoo.chain()
    model = _copy(proto)
    nodes = list(model.graph.node)
    at = next(i for i, n in enumerate(nodes) if n.name == "relu1")

    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Identity", ["relu1_out"], ["shadow"], name=f"{name}_local"),
             helper.make_node("Identity", ["shadow"], [f"{name}_out"], name=f"{name}_id")],
            name, [], [helper.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT,
                                                     None)])

    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    gate = helper.make_node("If", ["cond"], ["gated"], name="gate",
                            then_branch=branch("then"), else_branch=branch("else"))
    conv2 = next(n for n in nodes if n.name == "conv2")
    conv2.input[0] = "gated"
    later = helper.make_node("Identity", ["logits_raw"], ["shadow"], name="outer_shadow")
    last = nodes[-1]
    last.output[0] = "logits_raw"
    nodes = [*nodes[:at + 1], gate, *nodes[at + 1:], later,
             helper.make_node("Identity", ["shadow"], ["logits"], name="out")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    x = zoo.random_input(proto, batch=2, seed=0)
    np.testing.assert_allclose(zoo.run(model, x)[0], zoo.run(proto, x)[0], rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert normalize(model) is model


def test_a_constant_node_with_a_sparse_value_is_read_dense() -> None:
    proto = zoo.chain()
    sparse = _with_sparse(proto, ["conv1.weight"], coordinates=False)
    tensor = sparse.graph.sparse_initializer[0]
    del sparse.graph.sparse_initializer[:]
    const = helper.make_node("Constant", [], ["conv1.weight"], name="w_const")
    const.attribute.append(helper.make_attribute("sparse_value", tensor))
    nodes = [const, *sparse.graph.node]
    del sparse.graph.node[:]
    sparse.graph.node.extend(nodes)
    model = onnxaom.Model(sparse)
    assert model.layers()[0].name == "conv1"
    assert_removal_exact(model.proto, {"conv1": [1]})
