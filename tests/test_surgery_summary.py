"""``onnxaom.summary``: kernels, parameters and MACs per layer, totals, file size."""

from __future__ import annotations

import json

import onnx
import pytest

import onnxaom
from onnxaom.model import Model
from onnxaom.summary import summary
from onnxaom.surgery import remove_kernels

from . import zoo


def test_chain_counts_by_hand():
    result = summary(Model(zoo.chain()))  # input 3x8x8, conv1 4 (pad 1), conv2 8 (no pad)
    rows = {row.name: row for row in result.layers}
    assert (rows["conv1"].kernels, rows["conv1"].inputs) == (4, 3)
    assert rows["conv1"].params == 4 * 3 * 9 + 4
    assert rows["conv1"].macs == 4 * 3 * 9 * 8 * 8
    assert rows["conv2"].macs == 8 * 4 * 9 * 6 * 6
    assert rows["fc1"].inputs == 8 * 3 * 3 and rows["fc1"].macs == 72 * 16
    assert rows["fc2"].params == 16 * 3 + 3
    assert result.layer_params == sum(r.params for r in result.layers) == result.total_params
    assert result.total_macs == sum(r.macs or 0 for r in result.layers)
    assert result.macs_complete and result.file_size is None
    assert result.opset == 17 and result.nodes == 9


def test_grouped_and_matmul_layers():
    rows = {row.name: row for row in summary(Model(zoo.depthwise())).layers}
    assert (rows["dwconv2"].inputs, rows["dwconv2"].params) == (4, 4 * 9 + 4)
    assert rows["dwconv2"].macs == 4 * 1 * 9 * 8 * 8
    rows = {row.name: row for row in summary(Model(zoo.reshape_matmul())).layers}
    assert rows["matmul1"].inputs == 4 * 64 and rows["matmul1"].macs == 256 * 16


def test_pruning_shrinks_the_totals():
    model = Model(zoo.chain())
    before = summary(model)
    after = summary(remove_kernels(model, {"conv2": [0, 1, 2, 3]}))
    rows = {row.name: row for row in after.layers}
    assert rows["conv2"].kernels == 4 and rows["fc1"].inputs == 36
    assert after.total_params < before.total_params
    assert after.total_macs < before.total_macs


def test_unknown_spatial_size_gives_unknown_macs():
    proto = zoo.reduce_mean_head()
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    result = summary(Model(proto))
    assert all(row.macs is None for row in result.layers if row.op == "Conv")
    assert not result.macs_complete
    assert "?" in result.format_table() and "(+ unknown)" in result.format_table()


def test_file_size_counts_external_data(tmp_path):
    proto = zoo.chain(kernels=(16, 16), hidden=64)
    path = zoo.save(proto, tmp_path / "m.onnx", external_data=True)
    result = summary(onnxaom.load(path))
    assert summary(path) == summary(str(path)) == result  # a path is loaded
    with pytest.raises(onnxaom.ModelError, match="got int"):
        summary(3)  # type: ignore[arg-type]
    data = (tmp_path / "m.onnx.data").stat().st_size
    assert result.external_size == data
    assert result.file_size == path.stat().st_size + data
    assert "external data" in result.format_table()


def test_to_dict_is_json_and_the_table_has_every_layer():
    result = summary(Model(zoo.concat()))
    data = json.loads(json.dumps(result.to_dict()))
    assert [row["name"] for row in data["layers"]] == ["conv1a", "conv1b", "conv2", "fc"]
    table = result.format_table()
    for name in ("conv1a", "conv1b", "conv2", "fc", "total", "all parameters"):
        assert name in table
    with pytest.raises(AttributeError):
        result.total_params = 0  # type: ignore[misc]


def test_summary_counts_constant_nodes():
    proto = zoo.reshape_matmul(shape_source="constant")
    assert any(n.op_type == "Constant" for n in proto.graph.node)
    floats = sum(int(onnx.numpy_helper.to_array(t).size) for t in proto.graph.initializer
                 if t.data_type == onnx.TensorProto.FLOAT)
    assert summary(Model(proto)).total_params == floats  # the int64 shape is not a parameter


def test_a_matmul_layers_bias_is_the_add_after_it():
    """tf2onnx writes a Keras Dense as MatMul + Add(bias): the bias counts with the layer."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(6, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="dense"),
             helper.make_node("Add", ["m", "b"], ["y"])]
    summary = onnxaom.summary(onnxaom.Model(zoo.hand_built(nodes, inits, ["N", 6], ["N", 3])))
    assert summary.layers[0].params == 6 * 3 + 3 == summary.layer_params == summary.total_params


@pytest.mark.parametrize("made_by", ["Identity", "Cast", "weight_norm"])
def test_a_weight_made_by_nodes_counts_by_its_shape(made_by):
    """A conv weight that nodes compute (an Identity or a Cast in front of it, weight norm
    g * v / ||v||) counts all its values, as an initializer weight does (only the bias was
    counted: 4 of 40)."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    v = rng.normal(size=(4, 1, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    if made_by == "Identity":
        inits.append(numpy_helper.from_array(v, "raw"))
        nodes = [helper.make_node("Identity", ["raw"], ["w"])]
    elif made_by == "Cast":
        inits.append(numpy_helper.from_array(v.astype(np.float16), "raw"))
        nodes = [helper.make_node("Cast", ["raw"], ["w"], to=onnx.TensorProto.FLOAT)]
    else:
        inits += [numpy_helper.from_array(v, "v"),
                  numpy_helper.from_array(np.ones((4, 1, 1, 1), np.float32), "g")]
        nodes = [helper.make_node("ReduceL2", ["v"], ["norm"], axes=[1, 2, 3], keepdims=1),
                 helper.make_node("Div", ["v", "norm"], ["unit"]),
                 helper.make_node("Mul", ["g", "unit"], ["w"])]
    nodes += [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1] * 4),
              helper.make_node("Relu", ["c"], ["y"])]
    rows = summary(Model(zoo.hand_built(nodes, inits, ["N", 1, 6, 6], ["N", 4, 6, 6]))).layers
    assert (rows[0].name, rows[0].params, rows[0].macs) == ("conv", 4 * 9 + 4, 4 * 9 * 36)


def test_a_conv_bias_written_as_an_add_counts_with_the_layer():
    """CNTK's files (MNIST-8) add a conv's bias as a (K, 1, 1) constant after it, as tf2onnx
    does a Dense's: both count with their layer (only the MatMul's did)."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros((4, 1, 1), np.float32), "b"),
             numpy_helper.from_array(np.float32(0.5), "half")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("Add", ["c", "b"], ["cb"]),
             helper.make_node("Relu", ["cb"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2"),
             helper.make_node("Add", ["c2", "half"], ["y"])]
    inits.append(numpy_helper.from_array(rng.normal(size=(2, 4, 1, 1)).astype(np.float32),
                                         "w2"))
    rows = summary(Model(zoo.hand_built(nodes, inits, ["N", 1, 6, 6], ["N", 2, 6, 6]))).layers
    assert [r.params for r in rows] == [4 * 9 + 4, 2 * 4]  # a scalar shift is no bias
