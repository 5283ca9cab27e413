"""Surgery on models exported by both torch exporters: removal against the zeroing oracle (and,
for the paper's MNIST net, against torch with the kernels zeroed by a forward hook), widen and
deepen against the unedited export.

Dynamo exports are marked slow: the exporter's first call in a process takes seconds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxaom
from onnxaom.edits import InsertLayer, RemoveKernels, WidenLayer
from onnxaom.surgery import apply, remove_kernels

from . import zoo
from .test_surgery import assert_removal_exact, assert_same_function, editable_layers

torch = pytest.importorskip("torch")
architectures = pytest.importorskip("onnxaom_torch.architectures")
torch_zoo = pytest.importorskip("tests.torch_zoo")

EXPORTERS = ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)]


def _modules():
    return {
        "chain_bn": (lambda: torch_zoo.TORCH_BUILDERS["chain_bn"](0), (2, 3, 8, 8)),
        "residual": (lambda: torch_zoo.TORCH_BUILDERS["residual"](0), (2, 3, 8, 8)),
        "depthwise": (lambda: torch_zoo.TORCH_BUILDERS["depthwise"](0), (2, 3, 8, 8)),
        "mnist": (lambda: torch_zoo.reinit(architectures.PaperMNISTNet(conv_kernels=(4, 6),
                                                                       hidden=8), 0),
                  (2, 1, 28, 28)),
        "cifar_bn": (lambda: torch_zoo.reinit(architectures.PaperCIFARNet(
            width=4, hidden=8, image_size=16, batch_norm=True), 0), (2, 3, 16, 16)),
    }


def _export(tmp_path: Path, name: str, exporter: str, dynamic_batch: bool = True,
            external_data: bool = False) -> onnxaom.Model:
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        pytest.skip("the dynamo exporter needs onnxscript")
    build, shape = _modules()[name]
    path = tmp_path / f"{name}-{exporter}.onnx"
    architectures.export_onnx(build(), path, exporter=exporter, input_shape=shape,
                              dynamic_batch=dynamic_batch, external_data=external_data,
                              opset=18)
    return onnxaom.load(path)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["chain_bn", "residual", "depthwise", "mnist", "cifar_bn"])
def test_exported_models_take_every_edit_exactly(tmp_path, name, exporter):
    model = _export(tmp_path, name, exporter)
    proto = model.proto
    for layer in model.layers():
        if layer.name not in editable_layers(proto):
            continue
        assert_removal_exact(proto, {layer.name: [0, layer.kernels - 1]})
        assert_same_function(proto, apply(model, WidenLayer(layer.name, add=2)).proto)
        if layer.chain and layer.chain[-1] == "Relu":
            assert_same_function(proto, apply(model, InsertLayer(layer.name)).proto)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_fixed_batch_reshape_is_updated(tmp_path, exporter):
    model = _export(tmp_path, "mnist", exporter, dynamic_batch=False)
    conv2 = model.layers()[1].name
    assert_removal_exact(model.proto, {conv2: [1, 3]}, batch=2)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_pruned_export_matches_torch_with_the_kernels_zeroed(tmp_path, exporter):
    build, shape = _modules()["mnist"]
    module = build()
    path = tmp_path / "mnist.onnx"
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        pytest.skip("the dynamo exporter needs onnxscript")
    architectures.export_onnx(module, path, exporter=exporter, input_shape=shape)
    model = onnxaom.load(path)
    conv1, conv2, fc1 = (layer.name for layer in model.layers()[:3])
    pruned = remove_kernels(model, {conv1: [0, 2], conv2: [5], fc1: [1, 2, 3]})
    masks = {"relu1": [0, 2], "relu2": [5], "relu3": [1, 2, 3]}

    def zero(channels):
        def hook(_module, _inputs, output):
            output = output.clone()
            output[:, channels] = 0
            return output
        return hook

    handles = [getattr(module, name).register_forward_hook(zero(ch))
               for name, ch in masks.items()]
    x = np.random.default_rng(0).standard_normal((5, *shape[1:])).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    for handle in handles:
        handle.remove()
    np.testing.assert_allclose(zoo.run(pruned.proto, x)[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_node_metadata_and_value_info_survive(tmp_path, exporter):
    model = _export(tmp_path, "cifar_bn", exporter)
    proto = model.proto
    layer = model.layers()[2].name
    edited = apply(model, [WidenLayer(layer, add=1), InsertLayer(layer)]).proto
    before = {n.name: list(n.metadata_props) for n in proto.graph.node}
    after = {n.name: list(n.metadata_props) for n in edited.graph.node}
    assert all(after[name] == props for name, props in before.items())
    assert {v.name for v in edited.graph.value_info} >= {v.name for v in proto.graph.value_info}
    assert edited.opset_import == proto.opset_import and edited.ir_version == proto.ir_version


def test_external_data_export_keeps_big_weights_external(tmp_path):
    model = _export(tmp_path, "mnist", "legacy", external_data=True)
    assert model.external_data
    conv2 = model.layers()[1].name
    pruned = remove_kernels(model, {conv2: [0, 1, 2]})
    out = pruned.save(tmp_path / "pruned.onnx")
    assert (tmp_path / "pruned.onnx.data").stat().st_size > 1024
    reloaded = onnxaom.load(out)
    assert reloaded.external_data
    assert_same_function(pruned.proto, reloaded.proto)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_external_data_export_of_a_model_with_only_small_weights(tmp_path, exporter):
    """Every tensor under onnx's 1 KiB threshold: no .data file is written, and the legacy
    export no longer fails setting the mode of the file that is not there."""
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        pytest.skip("the dynamo exporter needs onnxscript")
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                 torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))
    path = architectures.export_onnx(module, tmp_path / "small.onnx", exporter=exporter,
                                     input_shape=(1, 3, 4, 4), external_data=True)
    assert [x.kernels for x in onnxaom.load(path).layers()] == [4, 3]


class _ChannelLayerNorm(torch.nn.Module):
    """conv -> LayerNorm over channels (permuted channels-last, ConvNeXt's LayerNorm2d) -> conv
    -> mean -> Linear: torch.export cannot make the batch of a size-1 example dynamic."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.LayerNorm(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        x = self.norm(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def test_a_dynamo_export_with_a_dynamic_batch_from_a_batch_of_one(tmp_path):
    """input_shape (1, ...) with a dynamic batch: the dynamo export failed on this model
    ("Invalid ranges [2:1]"); the example is made a batch of 2."""
    if importlib.util.find_spec("onnxscript") is None:
        pytest.skip("the dynamo exporter needs onnxscript")
    module = _ChannelLayerNorm().eval()
    path = architectures.export_onnx(module, tmp_path / "ln.onnx", exporter="dynamo",
                                     input_shape=(1, 3, 8, 8))
    model = onnxaom.load(path)
    assert model.proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    x = zoo.random_input(model.proto, batch=3)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(zoo.run(model.proto, x)[0], want, rtol=1e-4, atol=1e-5)


class _ViewFlatten(torch.nn.Module):
    """The common PyTorch flatten idiom ``x.view(x.size(0), -1)``: with a dynamic batch, the
    legacy exporter computes the target as Concat(Unsqueeze(Gather(Shape(x), 0)), [-1]), and
    with ``channels`` also a literal channel count, ``x.view(x.size(0), C, -1)``."""

    def __init__(self, channels: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6 * 8 * 8, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        if self.channels:
            x = x.view(x.size(0), 6, -1)
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("channels", [False, True])
def test_flatten_with_a_computed_batch_target(tmp_path, opset, channels):
    module = torch_zoo.reinit(_ViewFlatten(channels), 0).eval()
    path = tmp_path / "view.onnx"
    torch.onnx.export(module, torch.zeros(2, 3, 8, 8), str(path), dynamo=False,
                      opset_version=opset, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    model = onnxaom.load(path)
    assert any(n.op_type == "Shape" for n in model.proto.graph.node)
    conv2 = model.layers()[1].name
    assert_removal_exact(model.proto, {conv2: [1, 3]})
    assert_same_function(model.proto, apply(model, WidenLayer(conv2, add=2)).proto)


class _ChannelsLast(torch.nn.Module):
    """Keras-style head, as tf2onnx writes it: the feature map goes channels last (NHWC) and is
    flattened there, so fc reads features in (h, w, channel) order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6 * 8 * 8, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1))


@pytest.mark.parametrize("dynamic", [False, True])
def test_channels_last_flatten_takes_every_edit_exactly(tmp_path, dynamic):
    module = torch_zoo.reinit(_ChannelsLast(), 0).eval()
    path = tmp_path / "nhwc.onnx"
    torch.onnx.export(module, torch.zeros(2, 3, 8, 8), str(path), dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}} if dynamic else None)
    model = onnxaom.load(path)
    assert any(n.op_type == "Transpose" for n in model.proto.graph.node)
    conv2 = model.layers()[1].name
    assert_removal_exact(model.proto, {conv2: [0, 4]}, batch=2)
    assert_same_function(model.proto, apply(model, WidenLayer(conv2, add=2)).proto)
    from onnxaom.readers import read_mass

    mass = read_mass(model, conv2)
    weight = module.fc.weight.detach().abs().numpy().reshape(3, 8 * 8, 6)  # (out, h*w, channel)
    np.testing.assert_allclose(mass.per_position, weight.sum(axis=0).T, rtol=1e-5)


class ReflectPadNet(torch.nn.Module):
    """Reflect padding (the legacy exporter computes its Pad amounts, so shape inference loses
    H and W after it) and a ``view(x.size(0), -1)`` head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.c2 = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.c2(torch.relu(self.c1(x)))), 2)
        return self.fc(x.view(x.size(0), -1))


def test_sizes_shape_inference_cannot_tell_come_from_one_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = architectures.export_onnx(ReflectPadNet().eval(), tmp_path / "reflect.onnx",
                                     input_shape=(1, 3, 8, 8))
    model = onnxaom.load(path)
    c2 = model.layers()[1]
    assert c2.shape[1:] == (None, None)  # inference alone does not know
    assert_removal_exact(model.proto, {c2.name: [0, 4]})
    facts = onnxaom.summary(model)
    assert facts.macs_complete
    assert {row.name: row.macs for row in facts.layers}[c2.name] == 6 * 4 * 9 * 8 * 8


class ReflectPaddedSecond(torch.nn.Module):
    """conv1 -> ReLU -> conv2 with reflect padding (its Pad amounts are computed from constants
    by ConstantOfShape, Concat, Slice, Transpose, ... in the legacy export) -> flatten head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = torch.nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
        self.fc = torch.nn.Linear(6 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.c2(torch.relu(self.c1(x)))), 1))


@pytest.mark.parametrize("exporter, dynamic", [
    ("legacy", True), pytest.param("dynamo", True, marks=pytest.mark.slow)])
def test_a_conv_read_through_a_computed_pad_is_editable(tmp_path: Path, exporter, dynamic):
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        pytest.skip("the dynamo exporter needs onnxscript")
    torch.manual_seed(0)
    path = architectures.export_onnx(ReflectPaddedSecond().eval(), tmp_path / "m.onnx",
                                     exporter=exporter, input_shape=(1, 3, 8, 8))
    model = onnxaom.load(path)
    c1, c2 = (layer.name for layer in model.layers()[:2])
    assert_removal_exact(model.proto, {c1: [0, 2]})
    assert_removal_exact(model.proto, {c2: [1]})


@pytest.mark.slow
def test_an_unoptimised_dynamo_export_with_a_dynamic_batch_flattens_editably(tmp_path: Path):
    """``dynamo=True, optimize=False``: the flatten's target is
    ``Concat(Reshape(Squeeze(Shape(x, 0, 1)), [-1]), [-1])``."""
    if importlib.util.find_spec("onnxscript") is None:
        pytest.skip("the dynamo exporter needs onnxscript")
    torch.manual_seed(0)
    module = ReflectPaddedSecond().eval()
    path = tmp_path / "noopt.onnx"
    torch.onnx.export(module, (torch.zeros(2, 3, 8, 8),), str(path), dynamo=True,
                      optimize=False, dynamic_shapes=({0: torch.export.Dim("batch")},))
    model = onnxaom.load(path)
    for layer in model.layers()[:2]:
        assert_removal_exact(model.proto, {layer.name: [0]})


def test_an_unfolded_legacy_export_of_reflect_padding_is_editable(tmp_path: Path) -> None:
    """``do_constant_folding=False``: the Pad amounts are Gather/Mul/Sub/ConstantOfShape/...
    of constants, read as constants."""
    torch.manual_seed(0)
    path = tmp_path / "nofold.onnx"
    torch.onnx.export(ReflectPaddedSecond().eval(), (torch.zeros(1, 3, 8, 8),), str(path),
                      dynamo=False, do_constant_folding=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    model = onnxaom.load(path)
    for layer in model.layers()[:2]:
        assert_removal_exact(model.proto, {layer.name: [1]})


class LinearSqueezeExcite(torch.nn.Module):
    """An SE block written with ``nn.Linear`` and views whose sizes come from ``x.size()``: the
    legacy exporter computes both reshape targets as ``Concat(Unsqueeze(Gather(Shape(x), 0)),
    Unsqueeze(Gather(Shape(x), 1)), ...)``. ``gate_width_from`` other than ``"x"`` takes the
    gate's channel count from the image input instead (3 channels, as conv1 has); ``squeeze``
    ``"view"`` squeezes with ``x.view(b, c, h * w).mean(2)``."""

    def __init__(self, gate_width_from: str = "x", squeeze: str = "pool") -> None:
        super().__init__()
        self.gate_width_from, self.squeeze = gate_width_from, squeeze
        self.conv1 = torch.nn.Conv2d(3, 3 if gate_width_from != "x" else 6, 3, padding=1)
        width = self.conv1.out_channels
        self.fc1 = torch.nn.Linear(width, 2)
        self.fc2 = torch.nn.Linear(2, width)
        self.conv2 = torch.nn.Conv2d(width, 5, 3, padding=1)
        self.fc = torch.nn.Linear(5 * 8 * 8, 3)

    def forward(self, image):
        x = torch.relu(self.conv1(image))
        b, c, h, w = x.size()
        if self.squeeze == "view":  # the target's h * w is a product of sizes
            y = x.view(b, c, h * w).mean(2)
        else:
            y = torch.nn.functional.adaptive_avg_pool2d(x, 1).view(b, c)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(y))))
        width = c if self.gate_width_from == "x" else image.size(1)
        x = x * gate.view(b, width, 1, 1)
        x = torch.relu(self.conv2(x))
        return self.fc(x.view(x.size(0), -1))


def _export_se(tmp_path: Path, opset: int, dynamic: bool, gate_width_from: str = "x",
               squeeze: str = "pool") -> onnxaom.Model:
    module = torch_zoo.reinit(LinearSqueezeExcite(gate_width_from, squeeze), 0).eval()
    path = tmp_path / f"se-{opset}-{dynamic}-{squeeze}.onnx"
    torch.onnx.export(module, torch.zeros(2, 3, 8, 8), str(path), dynamo=False,
                      opset_version=opset, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}} if dynamic else None)
    return onnxaom.load(path)


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("squeeze", ["pool", "view"])
def test_an_se_block_viewed_with_sizes_of_its_input_is_editable(tmp_path, opset, dynamic,
                                                                squeeze):
    model = _export_se(tmp_path, opset, dynamic, squeeze=squeeze)
    if dynamic:
        assert any(n.op_type == "Gather" for n in model.proto.graph.node)
    conv1, fc1, fc2 = (layer.name for layer in model.layers()[:3])
    # the gate's neurons are coupled to conv1's kernels by the Mul; its width follows them
    plan = onnxaom.surgery.plan_removal(model, {conv1: [1, 3]})
    assert plan.removed == {conv1: (1, 3), fc2: (1, 3)}
    assert_removal_exact(model.proto, {conv1: [1, 3]}, batch=2)
    assert_removal_exact(model.proto, {fc1: [0]}, batch=2)
    assert_same_function(model.proto, apply(model, WidenLayer(conv1, add=2)).proto)


def test_a_view_whose_channel_count_comes_from_another_tensor_is_refused(tmp_path):
    model = _export_se(tmp_path, 13, True, gate_width_from="input")
    conv1 = model.layers()[0].name
    with pytest.raises(onnxaom.EditError, match=r"takes the size of its channel axis from "
                                                r"tensor 'input' \(axis 1\)"):
        remove_kernels(model, {conv1: [0]})


def test_tensors_whose_rank_inference_loses_get_their_shapes_from_one_run(tmp_path):
    """At opset 11 ONNX does not propagate shape values, so everything after the SE block's
    computed ``view(b, c)`` has no shape at all; one run gives it, the batch left symbolic."""
    from onnxaom.graph import GraphIndex
    from onnxaom.shapes import fill_unknown

    model = _export_se(tmp_path, 11, True)
    inferred = GraphIndex(model.proto).shapes
    gate = next(n.output[0] for n in model.proto.graph.node if n.name == "/fc2/Gemm")
    shape_of = next(n.output[0] for n in model.proto.graph.node if n.op_type == "Shape")
    assert gate not in inferred
    filled = fill_unknown(model.proto, inferred)
    assert filled[gate] == (None, 6)
    assert filled[shape_of] == (4,)


def test_summary_counts_the_macs_of_layers_after_a_lost_rank(tmp_path):
    summary = onnxaom.summary(_export_se(tmp_path, 11, True))
    assert summary.macs_complete
    assert summary.layers[3].macs == 5 * 6 * 9 * 8 * 8  # conv2: K x C x 3 x 3 x H x W


class UpsampledSkip(torch.nn.Module):
    """A decoder step as FPNs and U-Nets write it: ``F.interpolate(b, size=a.shape[-2:])``,
    whose Resize sizes every exporter computes from ``Shape`` (the channel entry from the
    resized tensor's own shape), then concatenated with the skip ``a``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.c3 = torch.nn.Conv2d(10, 5, 3, padding=1)
        self.fc = torch.nn.Linear(5, 3)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        b = torch.relu(self.c2(a))
        up = torch.nn.functional.interpolate(b, size=a.shape[-2:], mode="nearest")
        return self.fc(torch.relu(self.c3(torch.cat([a, up], 1))).mean((2, 3)))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_resize_to_sizes_computed_from_shapes_passes_channels(tmp_path, exporter):
    path = tmp_path / "upsampled.onnx"
    architectures.export_onnx(torch_zoo.reinit(UpsampledSkip(), 0).eval(), path,
                              exporter=exporter, input_shape=(2, 3, 8, 8), opset=18)
    model = onnxaom.load(path)
    resize = next(n for n in model.proto.graph.node if n.op_type == "Resize")
    assert resize.input[3] not in {t.name for t in model.proto.graph.initializer}
    c1, c2 = (layer.name for layer in model.layers()[:2])
    assert_removal_exact(model.proto, {c2: [0, 5]})
    assert_removal_exact(model.proto, {c1: [1]})
    assert_same_function(model.proto, apply(model, WidenLayer(c2, add=2)).proto)


class _DenseLayer(torch.nn.Module):
    """norm1 -> relu -> conv1 (1x1, no bias) -> norm2 -> relu -> conv2 (3x3): ``grow``
    channels, concatenated to the input."""

    def __init__(self, width: int, grow: int = 4) -> None:
        super().__init__()
        self.norm1, self.conv1 = torch.nn.BatchNorm2d(width), torch.nn.Conv2d(width, 8, 1,
                                                                              bias=False)
        self.norm2 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, grow, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv2(torch.relu(self.norm2(self.conv1(torch.relu(self.norm1(x))))))
        return torch.cat([x, y], 1)


class TinyDenseNet(torch.nn.Module):
    """DenseNet's structure at toy size: conv0 -> norm0 -> relu0, two dense layers, a
    transition (norm -> relu -> 1x1 conv -> avg pool), and norm5 -> relu -> global pool ->
    Linear. A removed channel reaches the BN-ReLU of every later layer, which turns it into a
    constant: the 1x1 convs and the Linear take it into their biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.norm0 = torch.nn.BatchNorm2d(6)
        self.layer1, self.layer2 = _DenseLayer(6), _DenseLayer(10)
        self.norm_t = torch.nn.BatchNorm2d(14)
        self.conv_t = torch.nn.Conv2d(14, 5, 1, bias=False)
        self.norm5, self.fc = torch.nn.BatchNorm2d(5), torch.nn.Linear(5, 3)

    def forward(self, x):
        x = self.layer2(self.layer1(torch.relu(self.norm0(self.conv0(x)))))
        x = torch.nn.functional.avg_pool2d(self.conv_t(torch.relu(self.norm_t(x))), 2)
        x = torch.relu(self.norm5(x))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_densenet_layers_whose_removed_channels_a_later_batch_norm_shifts_are_editable(
        tmp_path, exporter):
    path = tmp_path / "dense.onnx"
    architectures.export_onnx(torch_zoo.reinit(TinyDenseNet(), 0).eval(), path,
                              exporter=exporter, input_shape=(2, 3, 8, 8), opset=18)
    model = onnxaom.load(path)
    convs = [layer for layer in model.layers() if layer.op == "Conv"]
    assert len(convs) == 6
    for layer in convs:
        edited = assert_removal_exact(model.proto, {layer.name: [0, layer.kernels - 1]})
        assert onnxaom.summary(edited).total_params < onnxaom.summary(model).total_params


def test_a_constant_channel_read_by_a_padded_conv_is_refused():
    """conv1 -> ReLU -> pool -> BN (after the probe, shifts a removed channel to a constant)
    -> conv2: without padding conv2 takes the constant into its bias; with padding the channel
    is not constant at the borders, so the removal is refused."""
    from .test_surgery import _Net

    for pads, exact in ((0, True), (1, False)):
        net = _Net()
        x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4)])
        x = net.op("MaxPool", "pool", [x], kernel_shape=[2, 2], strides=[2, 2])
        x = net.bn("bn", x, 4, shift=True)
        x = net.op("Relu", "relu2", [net.conv("conv2", x, 4, 5, k=3, pads=pads)])
        proto = net.head(x, 5)
        if exact:
            assert_removal_exact(proto, {"conv1": [1, 2]})
        else:
            with pytest.raises(onnxaom.EditError, match=r"'bn' \(BatchNormalization\) \(a batch "
                                                        r"norm after the probe\) shifts .* "
                                                        r"\(it pads its input"):
                remove_kernels(onnxaom.Model(proto), {"conv1": [1]})


def test_apply_steps_reports_each_steps_bias_folds():
    """The removal's plan carries what it added to the biases of the layers that read a
    removed channel as a constant (the torch adapter applies the same shifts), one value per
    output channel of the reader before the step; a removal with no constant carries none."""
    from onnxaom.surgery import RemovalPlan
    from onnxaom.surgery.apply import apply_steps

    from .test_surgery import _Net

    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4)])
    x = net.op("MaxPool", "pool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = net.bn("bn", x, 4, shift=True)
    x = net.op("Relu", "relu2", [net.conv("conv2", x, 4, 5, k=1)])
    model = onnxaom.Model(net.head(x, 5))
    edited, (shifted, plain) = apply_steps(model, [RemoveKernels("conv1", (1,)),
                                                   WidenLayer("conv1", 6)])
    assert isinstance(shifted, RemovalPlan) and set(shifted.folds) == {"conv2"}
    assert shifted.folds["conv2"].shape == (5,) and np.any(shifted.folds["conv2"] != 0)
    assert isinstance(plain, dict) and edited.layer("conv1").kernels == 4 - 1 + 6
    _, (unshifted,) = apply_steps(model, RemoveKernels("conv2", (0,)))
    assert isinstance(unshifted, RemovalPlan) and not unshifted.folds


@pytest.mark.parametrize("head", ["reduce_mean_gemm_row_bias", "gap_gemm_beta0",
                                  "matmul_add", "matmul_no_bias", "varying_add"])
def test_constant_channels_through_a_dense_head(head):
    """conv1 -> ReLU -> pool -> BN (shifts a removed channel to a constant) -> ReLU, then a
    head: ReduceMean over H, W (the dynamo exporter's global pool) into a Gemm whose C is
    (1, N); a global pool into a Gemm with beta = 0, or into a MatMul + Add(bias); or an Add of
    a constant that varies over positions, which makes the channel no longer constant
    (refused, naming the Add)."""
    from onnx import helper

    from .test_surgery import _Net

    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4)])
    x = net.op("MaxPool", "pool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = net.op("Relu", "relu2", [net.bn("bn", x, 4, shift=True)])
    w = net.rng.normal(0, 0.5, (3, 4)).astype(np.float32)
    if head == "varying_add":
        x = net.op("Add", "a", [x, net.const("ramp", np.arange(4 * 16, dtype=np.float32)
                                             .reshape(1, 4, 4, 4) / 64)])
        x = net.op("Relu", "relu3", [net.conv("conv2", x, 4, 5, k=1)])
        proto = net.head(x, 5)
        with pytest.raises(onnxaom.EditError, match=r"node 'a' \(Add\) maps the zeroed channels "
                                                    r"to values that vary over positions"):
            remove_kernels(onnxaom.Model(proto), {"conv1": [1]})
        return
    if head == "matmul_no_bias":  # tf2onnx drops a Dense's all-zero bias: one is made
        x = net.op("Flatten", "flat", [net.op("GlobalAveragePool", "gap", [x])], axis=1)
        net.nodes.append(helper.make_node("MatMul", [x, net.const("fc.w", w.T.copy())],
                                          ["logits"], name="fc"))
        graph = helper.make_graph(
            net.nodes, "head", [helper.make_tensor_value_info("input", 1, ["N", 3, 8, 8])],
            [helper.make_tensor_value_info("logits", 1, ["N", 3])], net.inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                  ir_version=8)
        edited = assert_removal_exact(proto, {"conv1": [0, 2]})
        assert [n.op_type for n in edited.proto.graph.node][-2:] == ["MatMul", "Add"]
        return
    if head == "matmul_add":  # tf2onnx's Dense: the bias is an Add after the MatMul
        x = net.op("Flatten", "flat", [net.op("GlobalAveragePool", "gap", [x])], axis=1)
        bias = net.rng.normal(0, 0.1, (3,)).astype(np.float32)
        x = net.op("MatMul", "fc", [x, net.const("fc.w", w.T.copy())])
        net.nodes.append(helper.make_node("Add", [x, net.const("fc.b", bias)], ["logits"],
                                          name="fc_bias"))
        attrs: dict[str, float] = {}
    elif head == "reduce_mean_gemm_row_bias":
        x = net.op("ReduceMean", "mean", [x], axes=[2, 3], keepdims=0)
        bias, attrs = net.rng.normal(0, 0.1, (1, 3)).astype(np.float32), {}
    else:
        x = net.op("Flatten", "flat", [net.op("GlobalAveragePool", "gap", [x])], axis=1)
        bias, attrs = net.rng.normal(0, 0.1, (3,)).astype(np.float32), {"beta": 0.0}
    if head != "matmul_add":
        net.nodes.append(helper.make_node("Gemm", [x, net.const("fc.w", w),
                                                   net.const("fc.b", bias)],
                                          ["logits"], name="fc", transB=1, **attrs))
    graph = helper.make_graph(
        net.nodes, "head", [helper.make_tensor_value_info("input", 1, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", 1, ["N", 3])], net.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    edited = assert_removal_exact(proto, {"conv1": [0, 2]})
    new_bias = next(onnx.numpy_helper.to_array(t) for t in edited.proto.graph.initializer
                    if t.name == "fc.b")
    assert not np.allclose(new_bias.ravel(), bias.ravel() * (1.0 if attrs == {} else 0.0))


def test_a_constant_channel_read_by_a_padded_depthwise_conv_goes_with_its_kernel():
    """conv1 -> ReLU -> pool -> BN (shifts removed channels to constants) -> ReLU -> padded
    depthwise conv: the depthwise kernel tied to a removed channel goes with it, so its
    padding does not matter and the removal is exact."""
    from .test_surgery import _Net

    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4)])
    x = net.op("MaxPool", "pool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = net.op("Relu", "relu2", [net.bn("bn", x, 4, shift=True)])
    x = net.op("Relu", "relu3", [net.conv("dw", x, 4, 4, group=4)])
    proto = net.head(net.op("Relu", "relu4", [net.conv("pw", x, 4, 5, k=1)]), 5)
    plan = onnxaom.surgery.plan_removal(onnxaom.Model(proto), {"conv1": [1, 2]})
    assert plan.removed == {"conv1": (1, 2), "dw": (1, 2)}
    assert_removal_exact(proto, {"conv1": [1, 2]})


def test_the_layers_command_shows_sizes_inference_lost(tmp_path, capsys):
    """``onnxaom layers`` fills H and W that shape inference lost (after the opset-11 SE
    block's computed view) from one run."""
    from onnxaom.cli import main

    model = _export_se(tmp_path, 11, True)
    assert model.layers()[3].shape == (5, None, None)
    assert main(["layers", str(model.path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("/conv2/Conv"))
    assert "5x8x8" in row


def test_a_target_with_a_product_of_run_time_sizes_is_refused_naming_the_entry(tmp_path):
    """``x.view(b, c, h * w)`` with a dynamic image size: ``h * w`` is only known at run time,
    so the reshape cannot be checked; the refusal says which entry."""
    model = _export_se(tmp_path, 17, True, squeeze="view")
    proto = model.copy_proto()
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    dynamic = onnxaom.Model(proto)
    with pytest.raises(onnxaom.EditError, match=r"has a computed target shape \(entry 2 is "
                                                r"computed in a way the surgery does not read"):
        remove_kernels(dynamic, {model.layers()[0].name: [0]})


def test_filling_shapes_retries_without_the_outputs_of_unknown_rank(tmp_path, monkeypatch):
    """An output of unknown rank may not be a tensor (a sequence) and fail the run; the sizes
    of the tensors whose rank is known are then filled from a second run without them."""
    from onnxaom import shapes as shapes_module
    from onnxaom.graph import GraphIndex

    torch.manual_seed(0)
    path = architectures.export_onnx(ReflectPadNet().eval(), tmp_path / "reflect.onnx",
                                     input_shape=(1, 3, 8, 8))
    model = onnxaom.load(path)
    inferred = dict(GraphIndex(model.proto).shapes)
    relu = model.layers()[0].probe
    del inferred[relu]  # taken for a tensor of unknown rank, whose run fails
    real = shapes_module._run_for_shapes
    asked: list[bool] = []

    def fails_with_it(proto, names, feed):
        asked.append(relu in names)
        return None if relu in names else real(proto, names, feed)

    monkeypatch.setattr(shapes_module, "_run_for_shapes", fails_with_it)
    filled = shapes_module.fill_unknown(model.proto, inferred)
    assert asked == [True, False]
    assert relu not in filled
    assert filled[model.layers()[1].probe][2:] == (8, 8)


class GhostSlice(torch.nn.Module):
    """GhostNet's module: a primary conv, a cheap depthwise conv on it, both concatenated and
    sliced to the output width, ``cat(...)[:, :out]``, here every channel (a Slice [0:8] on the
    channel axis in the legacy export)."""

    def __init__(self) -> None:
        super().__init__()
        self.primary = torch.nn.Conv2d(3, 4, 1)
        self.cheap = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.head = torch.nn.Conv2d(8, 5, 3)
        self.fc = torch.nn.Linear(5, 3)

    def forward(self, x):
        a = torch.relu(self.primary(x))
        y = torch.cat([a, torch.relu(self.cheap(a))], 1)[:, :8]
        return self.fc(torch.relu(self.head(y)).mean((2, 3)))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_slice_that_keeps_every_channel_passes_them_on(tmp_path, exporter):
    """A Slice of the channel axis from 0 past the last channel keeps every channel, before and
    after a removal (ONNX clamps its bounds): it no longer refuses the removal (21 of 24
    sampled convs of GhostNet's legacy export were refused). A widening raises its end to the
    new count."""
    path = tmp_path / "ghost.onnx"
    architectures.export_onnx(torch_zoo.reinit(GhostSlice(), 0).eval(), path,
                              exporter=exporter, input_shape=(2, 3, 8, 8), opset=18)
    model = onnxaom.load(path)
    if exporter == "legacy":
        assert any(n.op_type == "Slice" for n in model.proto.graph.node)
    for layer in [x for x in model.layers() if x.op == "Conv"]:
        assert_removal_exact(model.proto, {layer.name: [1]})
    for layer in model.layers()[:2]:  # widened, the slice takes the new channels too
        widened = apply(model, WidenLayer(layer.name, 2))
        assert_same_function(model.proto, widened.proto)
