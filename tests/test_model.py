"""Model loading and saving: external data, atomic writes, refusing to overwrite, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxaom
from onnxaom import ModelError, ModelFileNotFoundError
from onnxaom.cli import DEFAULT_MODEL as FIXTURE


def tiny_conv(k: int = 8, big: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    cin = 64 if big else 1
    w = rng.normal(size=(k, cin, 3, 3)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ],
        "g",
        [x],
        [y],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime reads (newer onnx writes IR versions it can't)
    model.metadata_props.add(key="author", value="test")
    return model


def run(model: onnxaom.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        model.proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


def test_external_data_loads_and_saves_external(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save_model(tiny_conv(big=True), src, save_as_external_data=True, location="m.onnx.data")
    model = onnxaom.load(src)
    assert model.external_data
    out = model.save(tmp_path / "copy.onnx")
    assert (tmp_path / "copy.onnx.data").stat().st_size > 64 * 8 * 9 * 4 - 1
    assert out.stat().st_size < 4096  # weights are not inline
    again = onnxaom.load(out)
    x = np.random.default_rng(1).normal(size=(2, 64, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(run(again, x), run(model, x))
    assert again.digest == model.digest


def test_digest_is_the_same_for_inline_and_external_weights(tmp_path: Path) -> None:
    inline = onnxaom.load(onnxaom.load(FIXTURE).save(tmp_path / "inline.onnx",
                                                     external_data=False))
    external = onnxaom.load(inline.save(tmp_path / "external.onnx", external_data=True))
    assert external.external_data and not inline.external_data
    assert external.digest == inline.digest == onnxaom.load(FIXTURE).digest


def test_save_keeps_metadata_and_refuses_to_overwrite_source(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save_model(tiny_conv(), src)
    before = src.read_bytes()
    model = onnxaom.load(src)
    with pytest.raises(ModelError, match="refusing to overwrite"):
        model.save(src)
    assert src.read_bytes() == before
    out = onnxaom.load(model.save(tmp_path / "b.onnx"))
    assert {p.key: p.value for p in out.proto.metadata_props} == {"author": "test"}
    assert not list(tmp_path.glob(".onnxaom-*"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileNotFoundError, match="nope.onnx"):
        onnxaom.load(tmp_path / "nope.onnx")


def test_not_an_onnx_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a protobuf\n" * 10)
    with pytest.raises(ModelError, match="bad.onnx"):
        onnxaom.load(bad)


def test_missing_external_data_names_the_file(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save_model(tiny_conv(big=True), src, save_as_external_data=True, location="m.onnx.data")
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ModelFileNotFoundError, match="m.onnx"):
        onnxaom.load(src)


def test_layer_lookup_names_known_layers(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save_model(tiny_conv(), src)
    model = onnxaom.load(src)
    assert model.layer("conv").probe == "y"
    with pytest.raises(onnxaom.LayerNotFoundError, match="conv"):
        model.layer("conv9")


def test_save_to_missing_folder(tmp_path: Path) -> None:
    model = onnxaom.Model(tiny_conv())
    with pytest.raises(ModelFileNotFoundError, match="does not exist"):
        model.save(tmp_path / "no" / "m.onnx")


def test_replacing_a_model_with_external_data_never_pairs_it_with_other_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saving over a model with external data writes the new weights under a fresh name, the
    model file last, then removes the old weights; a crash before the model file is replaced
    leaves the old pair as it was."""
    import os

    src = tmp_path / "m.onnx"
    onnx.save_model(tiny_conv(big=True), src, save_as_external_data=True, location="m.onnx.data")
    model = onnxaom.load(src)
    x = np.random.default_rng(1).normal(size=(2, 64, 6, 6)).astype(np.float32)
    out = tmp_path / "out.onnx"
    model.save(out)
    assert sorted(p.name for p in tmp_path.glob("out.onnx*")) == ["out.onnx", "out.onnx.data"]
    model.save(out)  # over itself: the weights go to a fresh file, the old one is removed
    files = sorted(p.name for p in tmp_path.glob("out.onnx*"))
    assert len(files) == 2 and files[0] == "out.onnx" and files[1] != "out.onnx.data"
    np.testing.assert_array_equal(run(onnxaom.load(out), x), run(model, x))

    real_replace = os.replace

    def crash_on_the_model(a, b):
        if Path(b) == out:
            raise OSError(28, "No space left on device")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", crash_on_the_model)
    with pytest.raises(onnxaom.OnnxaomError, match="cannot write"):
        onnxaom.Model(model.proto, external_data=True).save(out)
    monkeypatch.undo()
    np.testing.assert_array_equal(run(onnxaom.load(out), x), run(model, x))  # old pair intact
    assert sorted(p.name for p in tmp_path.glob("out.onnx*")) == files  # nothing left over


def test_replacing_a_model_keeps_a_weights_file_other_models_may_read(tmp_path: Path) -> None:
    """Two model files reading one ``shared.data``: saving another model over one of them
    leaves the shared weights (their name is not one onnxaom gives that model's weights), so
    the other still loads; weights named for the replaced model go with it."""
    onnx.save_model(tiny_conv(big=True), tmp_path / "a.onnx", save_as_external_data=True,
                    location="shared.data")
    (tmp_path / "b.onnx").write_bytes((tmp_path / "a.onnx").read_bytes())
    x = np.random.default_rng(1).normal(size=(2, 64, 6, 6)).astype(np.float32)
    want = run(onnxaom.load(tmp_path / "a.onnx"), x)
    onnxaom.Model(tiny_conv()).save(tmp_path / "b.onnx")
    assert (tmp_path / "shared.data").is_file()
    np.testing.assert_array_equal(run(onnxaom.load(tmp_path / "a.onnx"), x), want)

    onnx.save_model(tiny_conv(big=True), tmp_path / "c.onnx", save_as_external_data=True,
                    location="c.onnx.data")
    onnxaom.Model(tiny_conv()).save(tmp_path / "c.onnx")
    assert not (tmp_path / "c.onnx.data").exists()


def test_layers_are_found_once_per_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The proto is fixed, so the layers are traced once per probe (finding them can take an
    ONNX Runtime run); a caller editing the returned list does not change the next one."""
    import onnxaom.layers as layers_module

    calls: list[str] = []
    find = layers_module.find_layers

    def counting(proto: onnx.ModelProto, **kwargs: object) -> object:
        calls.append(str(kwargs.get("probe")))
        return find(proto, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(layers_module, "find_layers", counting)
    model = onnxaom.load(FIXTURE)
    first = model.layers()
    names = [layer.name for layer in first]
    first.clear()
    assert names and [layer.name for layer in model.layers()] == names
    model.layer(names[0])
    model.layers(probe="conv")
    model.layers(probe="conv")
    assert calls == ["activation", "conv"]
