"""Binding a model's extra inputs to constants (``onnxaom.bind_inputs``, ``analyze --bind``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxaom
from onnxaom import DataError, ModelError
from onnxaom.cli import main
from onnxaom.collect import collect

from . import zoo


def _with_inputs(proto: onnx.ModelProto, *extra: onnx.ValueInfoProto,
                 nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """``proto`` (zoo.chain) with graph inputs ``extra`` and ``nodes`` that end in ``x_in``,
    which conv1 reads in place of the image input."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    model.graph.input.extend(extra)
    conv1 = next(n for n in model.graph.node if n.name == "conv1")
    conv1.input[0] = "x_in"
    old = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([*nodes, *old])
    onnx.checker.check_model(model)
    return model


def _scaled_chain() -> onnx.ModelProto:
    """zoo.chain whose images are first multiplied by a second input ``scale`` of shape (1,)."""
    scale = helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1])
    return _with_inputs(zoo.chain(), scale,
                        nodes=[helper.make_node("Mul", ["input", "scale"], ["x_in"], name="mul")])


def _flagged_chain() -> onnx.ModelProto:
    """zoo.chain whose images are negated where an int64 scalar input ``flip`` is nonzero."""
    flip = helper.make_tensor_value_info("flip", TensorProto.INT64, [])
    nodes = [
        helper.make_node("Cast", ["flip"], ["flip_b"], to=TensorProto.BOOL, name="cast"),
        helper.make_node("Neg", ["input"], ["neg"], name="neg"),
        helper.make_node("Where", ["flip_b", "neg", "input"], ["x_in"], name="where"),
    ]
    return _with_inputs(zoo.chain(), flip, nodes=nodes)


def _data(n: int = 21) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return (rng.normal(size=(n, 3, 8, 8)).astype(np.float32),
            (np.arange(n) % 3).astype(np.int64))


def test_bound_counts_equal_the_plain_model_on_the_same_images() -> None:
    """Exact: binding scale = -1 (or flip = 1) counts what the one-input model counts on the
    negated images; binding scale = 1 (flip = 0) what it counts on the images."""
    images, labels = _data()
    plain = onnxaom.Model(zoo.chain())
    for proto, name, same, negated in ((_scaled_chain(), "scale", [1.0], [-1.0]),
                                       (_flagged_chain(), "flip", 0, 1)):
        model = onnxaom.Model(proto)
        for value, feed in ((same, images), (negated, -images)):
            got = collect(onnxaom.bind_inputs(model, {name: value}), images, labels,
                          progress=False)
            want = collect(plain, feed, labels, progress=False)
            assert got.layer_names == want.layer_names
            for layer in want.layer_names:
                assert got.counts[layer].dtype == np.int64
                np.testing.assert_array_equal(got.counts[layer], want.counts[layer],
                                              err_msg=f"{name}={value} {layer}")


def test_unbound_extra_input_is_refused_with_the_way_out() -> None:
    images, labels = _data()
    with pytest.raises(ModelError, match=r"it has 2: input, scale; bind .*bind_inputs"):
        collect(onnxaom.Model(_scaled_chain()), images, labels, progress=False)


def test_bad_bindings_name_the_input(tmp_path: Path) -> None:
    model = onnxaom.Model(_scaled_chain())
    with pytest.raises(ModelError, match=r"no graph input 'gain' to bind; its inputs: input, "
                                         r"scale"):
        onnxaom.bind_inputs(model, {"gain": [1.0]})
    with pytest.raises(DataError, match=r"input 'scale' has shape \(1\); the value to bind "
                                        r"has shape \(2,\)"):
        onnxaom.bind_inputs(model, {"scale": [1.0, 2.0]})
    with pytest.raises(DataError, match=r"input 'scale' takes FLOAT; the value to bind is "
                                        r"<U3, not numbers"):
        onnxaom.bind_inputs(model, {"scale": ["one"]})
    flagged = onnxaom.Model(_flagged_chain())
    with pytest.raises(DataError, match=r"input 'flip' takes INT64; the value to bind holds "
                                        r"values that are not whole numbers"):
        onnxaom.bind_inputs(flagged, {"flip": 0.5})
    with pytest.raises(DataError, match=r"holds values beyond the range of float32"):
        onnxaom.bind_inputs(model, {"scale": [1e300]})
    # values that convert without change are taken: 1.0 for an integer, an int for a float
    assert onnxaom.bind_inputs(flagged, {"flip": 1.0}).bound_inputs == {"flip": 1}
    assert onnxaom.bind_inputs(model, {"scale": [2]}).bound_inputs == {"scale": [2.0]}
    with pytest.raises(ModelError, match="no inputs named"):
        onnxaom.bind_inputs(model, {})


def test_an_input_on_the_batch_axis_cannot_be_bound() -> None:
    """A second per-sample input (it shares the image input's symbolic batch axis) is refused:
    a constant cannot follow the batch size."""
    proto = zoo.chain()
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert batch
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, [batch, 3, 8, 8])
    model = onnxaom.Model(_with_inputs(
        proto, mask, nodes=[helper.make_node("Mul", ["input", "mask"], ["x_in"], name="m")]))
    with pytest.raises(ModelError, match=rf"input 'mask' has the batch axis '{batch}' of input "
                                         r"'input': it takes one value a sample"):
        onnxaom.bind_inputs(model, {"mask": np.ones((1, 3, 8, 8), np.float32)})


def test_binding_copies_and_never_writes_over_the_source(tmp_path: Path) -> None:
    path = zoo.save(_scaled_chain(), tmp_path / "two.onnx")
    before = path.read_bytes()
    source = onnxaom.load(path)
    bound = onnxaom.bind_inputs(path, {"scale": np.array([2.0])})  # a path works too
    assert [i.name for i in bound.proto.graph.input] == ["input"]
    assert [i.name for i in source.proto.graph.input] == ["input", "scale"]
    with pytest.raises(ModelError, match="refusing to overwrite a file of the source model"):
        bound.save(path)
    saved = bound.save(tmp_path / "bound.onnx")
    assert path.read_bytes() == before
    again = onnxaom.load(saved)
    onnx.checker.check_model(again.proto)
    assert [i.name for i in again.proto.graph.input] == ["input"]


def test_cli_analyze_bind(tmp_path: Path, capsys) -> None:
    path = zoo.save(_scaled_chain(), tmp_path / "two.onnx")
    images, labels = _data()
    np.savez(tmp_path / "d.npz", x=images, y=labels)
    np.save(tmp_path / "scale.npy", np.array([-1.0], np.float32))
    data = f"npz:{tmp_path / 'd.npz'}"
    want = collect(onnxaom.Model(zoo.chain()), -images, labels, progress=False)
    for value in ("[-1.0]", str(tmp_path / "scale.npy")):
        out = tmp_path / f"out{len(value)}"
        assert main(["analyze", str(path), "--data", data, "--out", str(out), "-q",
                     "--bind", f"scale={value}"]) == 0
        got = onnxaom.OccurrenceStats.load(out / "stats.npz")
        for layer in want.layer_names:
            np.testing.assert_array_equal(got.counts[layer], want.counts[layer])
    capsys.readouterr()
    out = str(tmp_path / "bad")
    with pytest.raises(SystemExit) as exit_info:  # parsed with the options: a usage error
        main(["analyze", str(path), "--data", data, "--out", out, "--bind", "scale=one"])
    assert exit_info.value.code == 2
    assert "'scale=one': give a number, a JSON array" in capsys.readouterr().err
    assert main(["analyze", str(path), "--data", data, "--out", str(tmp_path / "scalar"), "-q",
                 "--bind", "scale=-1"]) == 0  # a number for a (1,) input
    missing = tmp_path / "no.npy"
    assert main(["analyze", str(path), "--data", data, "--out", out,
                 "--bind", f"scale={missing}"]) == 1
    assert f"--bind scale={missing}: no such file" in capsys.readouterr().err
    assert main(["analyze", str(path), "--data", data, "--out", out, "-q"]) == 1
    assert "--bind NAME=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", str(path), "--data", data, "--out", out, "--bind", "scale"])
    assert exit_info.value.code == 2
    assert not Path(out).exists()


def test_an_input_with_a_default_takes_the_value_bound() -> None:
    """An input backed by an initializer of its name (a default ORT lets one feed) is bound
    like any other: the default is replaced (it was refused as 'no graph input')."""
    proto = _scaled_chain()
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1.0], np.float32),
                                                                "scale"))
    images, labels = _data()
    bound = onnxaom.bind_inputs(onnxaom.Model(proto), {"scale": [-1.0]})
    assert [t.name for t in bound.proto.graph.initializer].count("scale") == 1
    got = collect(bound, images, labels, progress=False)
    want = collect(onnxaom.Model(zoo.chain()), -images, labels, progress=False)
    for layer in want.layer_names:
        np.testing.assert_array_equal(got.counts[layer], want.counts[layer])


def test_statistics_of_a_bound_model_serve_the_model_file(tmp_path: Path, capsys) -> None:
    """Statistics collected with inputs bound record the model file's digest, its name and the
    values, so that propose (with the file as model=) and prune --proposal take the file the
    user has; merging with statistics of other bound values is refused."""
    path = zoo.save(_scaled_chain(), tmp_path / "two.onnx")
    source = onnxaom.load(path)
    images, labels = _data()
    bound = onnxaom.bind_inputs(source, {"scale": [-1.0]})
    assert bound.name == "two.onnx" and bound.source_digest == source.digest != bound.digest
    stats = collect(bound, images, labels, progress=False)
    assert stats.metadata["model_digest"] == source.digest
    assert stats.metadata["bound_inputs"] == {"scale": [-1.0]}
    assert stats.metadata["model_name"] == "two.onnx"
    proposal = onnxaom.propose(stats, keep={"conv1": 2}, model=source)
    assert onnxaom.propose(stats, keep={"conv1": 2}, model=bound).to_dict() == proposal.to_dict()
    proposal_path = proposal.to_json(tmp_path / "p.json")
    assert main(["prune", str(path), "--proposal", str(proposal_path), "-o",
                 str(tmp_path / "pruned.onnx")]) == 0
    assert onnxaom.load(tmp_path / "pruned.onnx").layer("conv1").kernels == 2
    other = collect(onnxaom.bind_inputs(source, {"scale": [2.0]}), images, labels,
                    progress=False)
    with pytest.raises(onnxaom.StatsError, match="bound_inputs"):
        stats + other
