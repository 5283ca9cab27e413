"""Graph forms that torch's exporters write and that were read or edited wrongly, found by a
random-architecture fuzzer and a sweep of dense-prediction models (2026-11-25). Each model is
a small torch module exported for real; each edit is checked in ONNX Runtime against the
original model with the removed channels zeroed at the probe, or refused with an EditError.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxaom

from . import zoo

torch = pytest.importorskip("torch")
nn = torch.nn


def _dynamo(module, tmp_path: Path, *, size: int = 12, opset: int = 18,
            optimize: bool = False) -> onnxaom.Model:
    path = tmp_path / f"m{opset}{int(optimize)}.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(2, 1, size, size),), dynamo=True,
                          opset_version=opset, optimize=optimize).save(str(path))
    return onnxaom.load(path)


def _legacy(module, *, size: int = 12, opset: int = 13) -> onnxaom.Model:
    buffer = io.BytesIO()
    torch.onnx.export(module.eval(), (torch.randn(2, 1, size, size),), buffer, dynamo=False,
                      opset_version=opset, input_names=["input"],
                      dynamic_axes={"input": {0: "N"}})
    return onnxaom.Model(onnx.load_from_string(buffer.getvalue()))


def _same_outputs(a: onnxaom.Model, b: onnxaom.Model, atol: float = 1e-5) -> None:
    x = zoo.random_input(a.proto, batch=3, seed=1)
    for got, want in zip(zoo.run(b.proto, x), zoo.run(a.proto, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=atol, atol=atol)


class _ReLU6Norm(nn.Module):
    """conv -> ReLU6 -> BN -> padded conv (bias-less: a zero bias the exporter writes)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU6()
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.bias.uniform_(-1, 1)

    def forward(self, x):
        x = self.bn(self.act(self.c1(x)))
        x = torch.sigmoid(self.c2(x))
        return self.fc(torch.relu(self.c3(x)).mean((2, 3)))


def test_castlike_of_an_activation_is_a_cast(tmp_path) -> None:
    """dynamo=True, optimize=False writes ReLU6 as Clip(x, CastLike(0, x), CastLike(6, x)) and
    a bias-less conv's zero bias as Expand(CastLike(0, x), Shape(W)): x had three readers, so
    the chain stopped before the Clip (insertion refused, removal refused), and the bias
    fold into c3 was refused at the CastLike."""
    model = _dynamo(_ReLU6Norm(), tmp_path)
    assert not [n for n in model.proto.graph.node if n.op_type == "CastLike"]
    first = model.layers()[0]
    assert first.chain == ("Clip",)
    deeper = onnxaom.apply(model, [onnxaom.InsertLayer(after=first.name)])
    _same_outputs(model, deeper)
    for layer in model.layers()[:2]:  # through ReLU6 -> BN -> padded conv; Sigmoid -> c3
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the chain-end fallback, named
            edited = onnxaom.remove_kernels(model, {layer.name: [1]})
        assert edited.layer(layer.name).kernels == 3


def test_an_unoptimised_group_norm_and_uneven_split_are_edited(tmp_path) -> None:
    """GroupNorm(C, C) with optimize=False computes its affine shape with Range (refused as a
    computed tensor); an uneven torch.split is SplitToSequence + SequenceAt (a raw numpy
    ValueError from the shapes' fill, then an insertion refused as a surgery bug: inference
    gave both parts one invented channel dim)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.c1 = nn.Conv2d(1, 4, 3, padding=1)
            self.gn = nn.GroupNorm(4, 4)
            self.c2 = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(7, 3)

        def forward(self, x):
            x = torch.relu(self.gn(self.c1(x)))
            a, b = torch.split(x, [1, 3], 1)
            x = torch.cat([torch.relu(self.c2(a)), b], 1)
            return self.fc(x.mean((2, 3)))

    model = _dynamo(Net(), tmp_path)
    names = [layer.name for layer in model.layers()]
    widened = onnxaom.apply(model, [onnxaom.WidenLayer(names[1], 2, init="zeros")])
    _same_outputs(model, widened)
    deeper = onnxaom.apply(model, [onnxaom.InsertLayer(after=names[1])])
    _same_outputs(model, deeper)
    removed = onnxaom.remove_kernels(model, {names[1]: [0]})
    assert removed.layer(names[1]).kernels == 3
    with pytest.raises(onnxaom.EditError, match="SplitToSequence"):
        onnxaom.apply(model, [onnxaom.WidenLayer(names[0], 1, init="zeros")])


def test_refuse_mode_sees_a_depthwise_conv_tied_to_named_layers() -> None:
    """c0 + b(a(c0)) -> depthwise: naming c0 and b with coupled='refuse' was refused as
    coupled to the depthwise conv, which the README calls tied, not coupled."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(2)
            self.c0 = nn.Conv2d(1, 4, 3, padding=1)
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            x0 = torch.relu(self.c0(x))
            s = x0 + self.b(torch.relu(self.a(x0)))
            return self.fc(torch.relu(self.dw(s)).mean((2, 3)))

    model = _legacy(Net())
    for names in (["/c0/Conv", "/b/Conv"], ["/b/Conv", "/c0/Conv"]):
        step = [onnxaom.RemoveKernels(n, [1], coupled="refuse") for n in names]
        edited = onnxaom.apply(model, step)
        assert edited.layer("/dw/Conv").kernels == 3
    with pytest.raises(onnxaom.EditError, match="coupled to layer"):
        onnxaom.apply(model, [onnxaom.RemoveKernels("/c0/Conv", [1], coupled="refuse")])

    class Branches(nn.Module):
        """A + B (coupled by the Add); E is depthwise on B alone (tied to B)."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(5)
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.e = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            s = torch.relu(self.stem(x))
            b = self.b(s)
            merged = torch.relu(self.a(s) + b)
            side = torch.relu(self.e(b))
            return self.fc(torch.cat([merged, side], 1).mean((2, 3)))

    branches = _legacy(Branches())
    # naming A and E does not excuse B, coupled to A (a review caught the first fix doing so)
    with pytest.raises(onnxaom.EditError, match=r"coupled to layer\(s\) '/b/Conv'"):
        onnxaom.apply(branches, [onnxaom.RemoveKernels("/a/Conv", [1], coupled="refuse"),
                                 onnxaom.RemoveKernels("/e/Conv", [1], coupled="refuse")])
    onnxaom.apply(branches, [onnxaom.RemoveKernels("/a/Conv", [1], coupled="refuse"),
                             onnxaom.RemoveKernels("/b/Conv", [1], coupled="refuse")])


def test_the_default_proposal_leaves_out_a_layer_the_surgery_cannot_edit() -> None:
    """A segmentation head (a conv whose channels are the graph's output) was proposed by
    default, so the whole proposal could not be applied."""

    class Seg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(3)
            self.c1 = nn.Conv2d(1, 6, 3, padding=1)
            self.c2 = nn.Conv2d(6, 6, 3, padding=1)
            self.head = nn.Conv2d(6, 3, 1)

        def forward(self, x):
            return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))))

    model = _legacy(Seg())
    x = np.random.default_rng(2).standard_normal((30, 1, 12, 12)).astype(np.float32)
    stats = onnxaom.collect(model, x, np.arange(30) % 3, progress=False)
    proposal = onnxaom.propose(stats, model=model)
    assert [p.layer for p in proposal.layers] == ["/c1/Conv", "/c2/Conv"]
    assert any("'/head/Conv' left out" in note and "graph output" in note
               for note in proposal.notes)
    onnxaom.apply(model, proposal)
    assert [p.layer for p in onnxaom.propose(stats).layers][-1] == "/head/Conv"  # no model


def _counts_at(model: onnxaom.Model, tensor: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Brute force: (K, C, H, W) counts of ``tensor`` > 0, from ONNX Runtime."""
    proto = model.copy_proto()
    proto.graph.output.append(onnx.helper.make_tensor_value_info(tensor, 1, None))
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = session.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else len(x)  # a fixed batch: run in chunks of it
    values = np.concatenate([session.run([tensor], {session.get_inputs()[0].name: x[i:i + step]})
                             [0] for i in range(0, len(x), step)]) > 0
    return np.stack([values[y == c].sum(axis=0) for c in range(int(y.max()) + 1)], axis=1)


def test_constants_computed_by_the_exporter_keep_the_chain(tmp_path) -> None:
    """Found by a counting fuzzer (2026-11-25): without constant folding, nn.GroupNorm's affine
    weight is Unsqueeze(weight, Range(...)) and nn.PReLU's slope a Reshape of the weight; the
    chain stopped there, so a Conv -> GroupNorm -> ReLU layer was counted before its affine
    and ReLU (372 of 512 counts wrong), and a PReLU layer at the raw conv output."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(6)
            self.c1 = nn.Conv2d(1, 4, 3, padding=1)
            self.gn = nn.GroupNorm(2, 4)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1)
            self.act = nn.PReLU(4)
            self.fc = nn.Linear(4, 3)
            with torch.no_grad():
                self.gn.weight.uniform_(0.5, 2)
                self.gn.bias.uniform_(-1, 1)
                self.act.weight.uniform_(0.1, 0.3)

        def forward(self, x):
            x = torch.relu(self.gn(self.c1(x)))
            return self.fc(self.act(self.c2(x)).mean((2, 3)))

    x = np.random.default_rng(7).standard_normal((24, 1, 12, 12)).astype(np.float32)
    y = np.arange(24) % 3
    for model in (_dynamo(Net(), tmp_path, optimize=False), _dynamo(Net(), tmp_path,
                                                                      optimize=True)):
        first, second = model.layers()[:2]
        assert first.chain[-3:] == ("Mul", "Add", "Relu") and second.chain == ("PRelu",)
        stats = onnxaom.collect(model, x, y, progress=False)
        for layer in (first, second):
            np.testing.assert_array_equal(stats.counts[layer.name],
                                          _counts_at(model, layer.probe, x, y))


def test_the_pool_probe_reads_through_value_keeping_ops(tmp_path) -> None:
    """probe="pool" fell back to the activation, silently, where an exporter put an op between
    the activation and the pool: a zero Pad (AvgPool2d with padding, legacy opset 9) or a
    Mul by 1 (nn.ELU with optimize=False)."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ELU(), nn.AvgPool2d(2, padding=1),
                        nn.Conv2d(4, 2, 3))
    for model in (_legacy(net, opset=9), _dynamo(net, tmp_path, optimize=False)):
        layer = model.layers("pool")[0]
        assert layer.probe_kind == "pool" and layer.chain[-1] == "AveragePool"
        x = np.random.default_rng(8).standard_normal((12, 1, 12, 12)).astype(np.float32)
        y = np.arange(12) % 2
        stats = onnxaom.collect(model, x, y, probe="pool", progress=False)
        np.testing.assert_array_equal(stats.counts[layer.name],
                                      _counts_at(model, layer.probe, x, y))


def test_a_parameter_viewed_per_channel_is_a_constant(tmp_path) -> None:
    """A review (2026-11-25): dynamo with optimize=False writes ``b.view(1, -1, 1, 1)`` as a
    Reshape to a Concat of Constants, which the layer scan did not fold: the layer was read
    at the conv output (4,113 counts where the optimised export gave 3,453)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(9)
            self.c1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
            self.b = nn.Parameter(torch.linspace(-0.5, 0.5, 4))
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            x = torch.relu(self.c1(x) + self.b.view(1, -1, 1, 1))
            return self.fc(x.mean((2, 3)))

    x = np.random.default_rng(10).standard_normal((12, 1, 12, 12)).astype(np.float32)
    y = np.arange(12) % 3
    counts = []
    for optimize in (False, True):
        model = _dynamo(Net(), tmp_path, optimize=optimize)
        layer = model.layers()[0]
        assert layer.chain == ("Add", "Relu")
        counts.append(onnxaom.collect(model, x, y, progress=False).counts[layer.name])
    np.testing.assert_array_equal(counts[0], counts[1])
