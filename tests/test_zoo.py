"""The test zoo (``zoo``, ``torch_zoo``), the torch adapter's architectures and exporter, and the
default model fixture.

Torch tests skip where torch is missing; dynamo tests skip where onnxscript is missing and are
marked slow: the dynamo exporter's first call in a process spends about 3 s setting up.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest

from . import zoo

REPO = Path(__file__).resolve().parents[1]
OPSETS = (13, 17, 18, 21)
VARIANTS = [  # (fixed_batch, empty_names)
    (None, False),
    (1, False),
    (None, True),
    (1, True),
]


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names`` (after "logits")."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names
    )
    return copy


# --- zoo -----------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", sorted(zoo.BUILDERS))
def test_builder_passes_checker_and_runs(name: str, opset: int) -> None:
    for fixed_batch, empty_names in VARIANTS:
        model = zoo.BUILDERS[name](opset=opset, fixed_batch=fixed_batch, empty_names=empty_names)
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == opset
        dims = model.graph.input[0].type.tensor_type.shape.dim
        assert model.graph.input[0].name == "input"
        if fixed_batch is None:
            assert dims[0].dim_param == "N"
        else:
            assert dims[0].dim_value == fixed_batch
        x = zoo.random_input(model, batch=3)
        (logits,) = zoo.run(model, x)
        assert logits.shape == (x.shape[0], 3)
        assert np.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(zoo.BUILDERS))
def test_names_are_meaningful_unique_or_all_empty(name: str) -> None:
    named = zoo.BUILDERS[name]()
    node_names = [node.name for node in named.graph.node]
    assert all(node_names) and len(set(node_names)) == len(node_names)
    tensors = [out for node in named.graph.node for out in node.output]
    tensors += [init.name for init in named.graph.initializer]
    assert len(set(tensors)) == len(tensors)
    assert named.graph.output[0].name == "logits"

    empty = zoo.BUILDERS[name](empty_names=True)
    assert [node.name for node in empty.graph.node] == [""] * len(node_names)
    assert [list(n.output) for n in empty.graph.node] == [list(n.output) for n in named.graph.node]


@pytest.mark.parametrize("name", sorted(zoo.BUILDERS))
def test_seed_decides_weights(name: str) -> None:
    build = zoo.BUILDERS[name]
    x = zoo.random_input(build())
    np.testing.assert_array_equal(zoo.run(build(seed=3), x)[0], zoo.run(build(seed=3), x)[0])
    assert not np.allclose(zoo.run(build(seed=3), x)[0], zoo.run(build(seed=4), x)[0])


@pytest.mark.parametrize("name", sorted(zoo.BUILDERS))
def test_conv_outputs_mix_positive_and_negative(name: str) -> None:
    model = zoo.BUILDERS[name]()
    convs = [node.output[0] for node in model.graph.node if node.op_type == "Conv"]
    outputs = zoo.run(_with_outputs(model, convs), zoo.random_input(model, batch=8))[1:]
    for conv, value in zip(convs, outputs, strict=True):
        positive = float(np.mean(value > 0))
        assert 0.15 < positive < 0.85, f"{name}: {conv} is positive {positive:.0%} of the time"


@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("opset", [13, 17])
def test_folded_bn_equals_bn_kept(conv_bias: bool, opset: int) -> None:
    kept = zoo.bn_kept(seed=5, opset=opset, conv_bias=conv_bias)
    folded = zoo.folded_bn(seed=5, opset=opset, conv_bias=conv_bias)
    assert "BatchNormalization" in {node.op_type for node in kept.graph.node}
    assert "BatchNormalization" not in {node.op_type for node in folded.graph.node}
    x = zoo.random_input(kept, batch=4)
    np.testing.assert_allclose(zoo.run(folded, x)[0], zoo.run(kept, x)[0], atol=1e-5, rtol=0)
    conv_outputs = [n.output[0] for n in folded.graph.node if n.op_type == "Conv"]
    bn_outputs = [n.output[0] for n in kept.graph.node if n.op_type == "BatchNormalization"]
    folded_values = zoo.run(_with_outputs(folded, conv_outputs), x)[1:]
    kept_values = zoo.run(_with_outputs(kept, bn_outputs), x)[1:]
    for conv, got, expected in zip(conv_outputs, folded_values, kept_values, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=conv)


@pytest.mark.parametrize("target", ["minus_one", "zero"])
@pytest.mark.parametrize("shape_source", ["initializer", "constant"])
def test_reshape_matmul_variants(target: str, shape_source: str) -> None:
    model = zoo.reshape_matmul(target=target, shape_source=shape_source)  # type: ignore[arg-type]
    assert zoo.run(model, zoo.random_input(model, batch=5))[0].shape == (5, 3)
    producers = {node.op_type for node in model.graph.node}
    assert ("Constant" in producers) == (shape_source == "constant")


def test_reshape_matmul_batch_target_needs_fixed_batch() -> None:
    with pytest.raises(ValueError, match="fixed_batch"):
        zoo.reshape_matmul(target="batch")
    model = zoo.reshape_matmul(target="batch", fixed_batch=2)
    shape = onnx.numpy_helper.to_array(
        next(i for i in model.graph.initializer if i.name == "reshape1.shape"))
    assert shape.tolist() == [2, 4 * 8 * 8]


@pytest.mark.parametrize(("opset", "n_inputs"), [(13, 1), (17, 1), (18, 2), (21, 2)])
def test_reduce_mean_axes_follow_opset(opset: int, n_inputs: int) -> None:
    model = zoo.reduce_mean_head(opset=opset)
    node = next(n for n in model.graph.node if n.op_type == "ReduceMean")
    assert len(node.input) == n_inputs
    assert any(a.name == "axes" for a in node.attribute) == (n_inputs == 1)


def test_save_roundtrip_keeps_input_model(tmp_path: Path) -> None:
    model = zoo.chain()
    x = zoo.random_input(model)
    expected = zoo.run(model, x)[0]
    single = zoo.save(model, tmp_path / "single.onnx")
    external = zoo.save(model, tmp_path / "ext.onnx", external_data=True)
    zoo.save(model, tmp_path / "ext.onnx", external_data=True)  # twice: data must not pile up
    assert not (tmp_path / "single.onnx.data").exists()
    data = tmp_path / "ext.onnx.data"
    assert data.stat().st_size == sum(len(i.raw_data) for i in model.graph.initializer)
    assert all(init.raw_data for init in model.graph.initializer)  # model not modified
    for path in (single, external):
        onnx.checker.check_model(str(path), full_check=True)
        np.testing.assert_array_equal(zoo.run(onnx.load(path), x)[0], expected)


# --- torch adapter and torch zoo -----------------------------------------------------------


@pytest.fixture(scope="module")
def adapter() -> ModuleType:
    pytest.importorskip("torch")
    try:
        import onnxaom_torch
    except ImportError:  # source checkout without the package installed
        sys.path.insert(0, str(REPO / "adapters"))
        import onnxaom_torch
    return onnxaom_torch


def _needs_dynamo(exporter: str) -> None:
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")


def _export_and_compare(adapter: ModuleType, module, path: Path, exporter: str,
                        input_shape: tuple[int, ...], **kwargs: object) -> onnx.ModelProto:
    import torch

    written = adapter.export_onnx(module, path, exporter=exporter, input_shape=input_shape,
                                  **kwargs)
    assert written == path
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(path)
    x = torch.rand((3, *input_shape[1:]), generator=torch.Generator().manual_seed(1))
    if model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value"):
        x = x[: input_shape[0]]
    with torch.no_grad():
        expected = module.eval()(x).numpy()
    np.testing.assert_allclose(zoo.run(model, x.numpy())[0], expected, atol=1e-4, rtol=0)
    return model


def test_paper_mnist_net_shapes(adapter: ModuleType) -> None:
    import torch

    net = adapter.PaperMNISTNet()
    assert net.fc1.in_features == 16 * 12 * 12
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    small = adapter.PaperMNISTNet(in_channels=3, num_classes=4, image_size=8,
                                  conv_kernels=(5, 6), hidden=7)
    assert small(torch.zeros(1, 3, 8, 8)).shape == (1, 4)
    with pytest.raises(ValueError, match="image_size"):
        adapter.PaperMNISTNet(image_size=5)


def test_paper_cifar_net_shapes(adapter: ModuleType) -> None:
    import torch

    net = adapter.PaperCIFARNet()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64] * 6
    assert net.fc1.in_features == 64 * 4 * 4
    assert net.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    bn = adapter.PaperCIFARNet(width=8, hidden=16, batch_norm=True)
    assert hasattr(bn, "bn6") and bn.conv1.bias is None


def test_legacy_export_of_mnist_net(adapter: ModuleType, tmp_path: Path) -> None:
    model = _export_and_compare(adapter, adapter.PaperMNISTNet(), tmp_path / "m.onnx", "legacy",
                                (1, 1, 28, 28))
    assert [(n.name, n.op_type) for n in model.graph.node] == [
        ("/conv1/Conv", "Conv"), ("/relu1/Relu", "Relu"), ("/conv2/Conv", "Conv"),
        ("/relu2/Relu", "Relu"), ("/pool/MaxPool", "MaxPool"), ("/flatten/Flatten", "Flatten"),
        ("/fc1/Gemm", "Gemm"), ("/relu3/Relu", "Relu"), ("/fc2/Gemm", "Gemm"),
    ]
    assert model.opset_import[0].version == 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert model.graph.output[0].name == "logits"


def test_export_restores_train_mode_and_validates(adapter: ModuleType, tmp_path: Path) -> None:
    net = adapter.PaperMNISTNet(image_size=8).train()
    adapter.export_onnx(net, tmp_path / "m.onnx", input_shape=(1, 1, 8, 8))
    assert net.training
    with pytest.raises(ValueError, match="exporter"):
        adapter.export_onnx(net, tmp_path / "m.onnx", exporter="jit", input_shape=(1, 1, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        adapter.export_onnx(net, tmp_path / "m.onnx", input_shape=(1, 0, 8, 8))


@pytest.mark.parametrize("external_data", [False, True])
def test_legacy_export_of_cifar_net(adapter: ModuleType, tmp_path: Path,
                                    external_data: bool) -> None:
    net = adapter.PaperCIFARNet()
    path = tmp_path / "c.onnx"
    model = _export_and_compare(adapter, net, path, "legacy", (2, 3, 32, 32),
                                external_data=external_data, dynamic_batch=not external_data)
    assert (tmp_path / "c.onnx.data").exists() == external_data
    assert "Dropout" not in {n.op_type for n in model.graph.node}
    assert [n.name for n in model.graph.node if n.op_type == "Conv"] == [
        f"/conv{i}/Conv" for i in range(1, 7)]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert (batch.dim_value, batch.dim_param) == ((2, "") if external_data else (0, "N"))


@pytest.mark.slow
@pytest.mark.parametrize("dynamic_batch", [True, False])
def test_dynamo_export_of_mnist_net(adapter: ModuleType, tmp_path: Path,
                                    dynamic_batch: bool) -> None:
    _needs_dynamo("dynamo")
    path = tmp_path / "m.onnx"
    model = _export_and_compare(adapter, adapter.PaperMNISTNet(), path, "dynamo", (2, 1, 28, 28),
                                external_data=True, dynamic_batch=dynamic_batch)
    assert (tmp_path / "m.onnx.data").stat().st_size > 1_000_000
    assert path.stat().st_size < 50_000  # the graph and its node metadata; weights outside
    assert model.opset_import[0].version == 18  # export_onnx's default for dynamo
    assert [n.op_type for n in model.graph.node] == [
        "Conv", "Relu", "Conv", "Relu", "MaxPool", "Reshape", "Gemm", "Relu", "Gemm"]
    assert model.graph.node[0].name == "node_conv2d"
    reshape = model.graph.node[5]
    shape = next(i for i in model.graph.initializer if i.name == reshape.input[1])
    batch = -1 if dynamic_batch else 2
    assert onnx.numpy_helper.to_array(shape).tolist() == [batch, 16 * 12 * 12]


@pytest.mark.slow
def test_dynamo_export_of_cifar_net(adapter: ModuleType, tmp_path: Path) -> None:
    _needs_dynamo("dynamo")
    path = tmp_path / "c.onnx"
    model = _export_and_compare(adapter, adapter.PaperCIFARNet(batch_norm=True), path, "dynamo",
                                (2, 3, 32, 32), external_data=True)
    assert (tmp_path / "c.onnx.data").exists()
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 6
    assert "BatchNormalization" not in ops and "Dropout" not in ops  # folded and dropped


@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ["chain_bn", "residual", "depthwise"])
def test_torch_zoo_exports_match(adapter: ModuleType, tmp_path: Path, name: str,
                                 exporter: str) -> None:
    _needs_dynamo(exporter)
    from . import torch_zoo

    module = torch_zoo.TORCH_BUILDERS[name](0)
    _export_and_compare(adapter, module, tmp_path / f"{name}.onnx", exporter, (1, 3, 8, 8))


def test_torch_zoo_is_seeded(adapter: ModuleType) -> None:
    import torch

    from . import torch_zoo

    x = torch.rand(2, 3, 8, 8)
    for build in torch_zoo.TORCH_BUILDERS.values():
        torch.testing.assert_close(build(7)(x), build(7)(x), rtol=0, atol=0)
        assert not torch.allclose(build(7)(x), build(8)(x))


# --- the default model fixture -------------------------------------------------------------


def test_default_model_fixture_matches_its_json() -> None:
    pytest.importorskip("torch")
    meta = json.loads((REPO / "fixtures" / "default_model.json").read_text())
    model_path = REPO / "fixtures" / meta["model_file"]
    assert model_path.stat().st_size < 1_500_000
    onnx.checker.check_model(str(model_path), full_check=True)
    model = onnx.load(model_path)
    graph_input = model.graph.input[0]
    assert graph_input.name == meta["input"]["name"]
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert dims == meta["input"]["shape"]
    assert model.opset_import[0].version == meta["opset"]

    spec = importlib.util.spec_from_file_location("make_default_model",
                                                  REPO / "fixtures" / "make_default_model.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from sklearn.model_selection import train_test_split

    x, y, _ = script.load_data()
    _, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y.numpy(),
                                   random_state=meta["split"]["random_state"])
    assert len(test_idx) == meta["split"]["n_test"]
    (logits,) = zoo.run(model, x[test_idx].numpy())
    accuracy = float(np.mean(logits.argmax(axis=1) == y[test_idx].numpy()))
    assert accuracy == pytest.approx(meta["test_accuracy"], abs=1e-4)
    assert accuracy > 0.95
