"""The command line: the demo end to end, analyze, layers, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnxaom
from onnxaom.cli import DEFAULT_MODEL, main

from . import zoo


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "onnxaom", *args], capture_output=True, text=True, check=False
    )


def test_demo_writes_stats_findings_and_report(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "1797 samples" in out
    stats = onnxaom.OccurrenceStats.load(tmp_path / "stats.npz")
    assert stats.num_samples == 1797 and stats.num_classes == 10
    assert stats.counts["/conv1/Conv"].shape == (16, 10, 26, 26)
    assert stats.metadata["preprocessing"]["resize"] == [28, 28]
    findings = json.loads((tmp_path / "findings.json").read_text())
    assert [layer["name"] for layer in findings["layers"]] == list(stats.layer_names)
    assert (tmp_path / "report.html").stat().st_size > 10_000


def test_analyze_npz_data(tmp_path: Path) -> None:
    proto = zoo.chain()
    model_path = zoo.save(proto, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz", x=rng.normal(size=(20, 3, 8, 8)).astype(np.float32), y=np.arange(20) % 3
    )
    out = tmp_path / "out"
    result = run_cli(
        "analyze",
        str(model_path),
        "--data",
        f"npz:{tmp_path / 'd.npz'}",
        "--out",
        str(out),
        "-q",
        "--layers",
        "conv1",
        "conv2",
    )
    assert result.returncode == 0, result.stderr
    stats = onnxaom.OccurrenceStats.load(out / "stats.npz")
    assert stats.layer_names == ("conv1", "conv2") and stats.num_samples == 20


def test_analyze_refuses_a_folder_where_it_would_replace_its_input(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--data npz:DIR/stats.npz --out DIR` replaced the data with counts, and a model saved
    as DIR/stats.npz was overwritten; both exited 0."""
    model_path = zoo.save(zoo.chain(), tmp_path / "stats.npz")
    data = tmp_path / "data" / "stats.npz"
    data.parent.mkdir()
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.normal(size=(6, 3, 8, 8)).astype(np.float32), y=np.arange(6) % 3)
    before = {p: p.read_bytes() for p in (model_path, data)}
    for spec, out in ((f"npz:{data}", data.parent), (str(data), tmp_path)):
        assert main(["analyze", str(model_path), "--data", spec, "--out", str(out), "-q"]) == 1
        assert "one of this command's inputs" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before


def test_layers_lists_probe_points(capsys) -> None:
    assert main(["layers", str(DEFAULT_MODEL)]) == 0
    out = capsys.readouterr().out
    assert "/conv1/Conv" in out and "/relu1/Relu_output_0" in out
    assert main(["layers", str(DEFAULT_MODEL), "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)
    assert layers[0]["shape"] == [16, 26, 26]


def test_user_mistakes_are_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    for args in (
        ["layers", str(tmp_path / "missing.onnx")],
        ["layers", str(bad)],
        ["analyze", str(DEFAULT_MODEL), "--data", "nonsense:1", "--out", str(tmp_path / "o")],
        ["analyze", str(DEFAULT_MODEL), "--data", "digits", "--out", str(tmp_path / "o"), "-q"],
        [
            "analyze",
            str(DEFAULT_MODEL),
            "--data",
            "digits:28",
            "--out",
            str(tmp_path / "o"),
            "--layers",
            "nope",
            "-q",
        ],
        ["analyze", str(DEFAULT_MODEL), "--data", "digits:28", "--out",
         str(bad / "sub"), "-q"],  # under a file: refused before the data is read
    ):
        result = run_cli(*args)
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxaom: error:"), result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()  # nothing written, not even an empty folder


def test_analyze_a_folder_reads_the_models_channels_and_resizes(tmp_path: Path) -> None:
    """zoo.chain takes (N, 3, 8, 8): grayscale PNGs of 6x6 are read as RGB and resized."""
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(2)
    for cls in ("a", "b", "c"):
        (tmp_path / "set" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, size=(6, 6), dtype=np.uint8)
            image_module.fromarray(pixels, mode="L").save(tmp_path / "set" / cls / f"{i}.png")
    model_path = zoo.save(zoo.chain(), tmp_path / "m.onnx")
    folder = f"folder:{tmp_path / 'set'}"
    args = ["analyze", str(model_path), "--data", folder, "--out", str(tmp_path / "o"), "-q"]
    result = run_cli(*args)  # 6x6 images for an 8x8 model: one clear line
    assert result.returncode == 1 and "expects (N, 3, 8, 8)" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_cli(*args, "--resize", "8,8")
    assert result.returncode == 0, result.stderr
    stats = onnxaom.OccurrenceStats.load(tmp_path / "o" / "stats.npz")
    assert stats.num_samples == 9 and stats.class_names == ("a", "b", "c")
    assert stats.metadata["preprocessing"]["resize"] == [8, 8]
    result = run_cli(*args, "--resize", "8,x")
    assert result.returncode == 2 and "expected H,W" in result.stderr


def test_bad_usage_exits_2() -> None:
    assert run_cli().returncode == 2
    assert run_cli("analyze", "m.onnx").returncode == 2  # --data and --out missing
    with pytest.raises(SystemExit) as info:
        main(["layers", "m.onnx", "--probe", "elsewhere"])
    assert info.value.code == 2


def test_help_mentions_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("layers", "analyze", "demo"):
        assert command in result.stdout


def test_allow_empty_classes_on_the_command_line(tmp_path: Path) -> None:
    model_path = zoo.save(zoo.chain(), tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.where(np.arange(20) % 2 == 0, 0, 2))  # no class 1
    args = ["analyze", str(model_path), "--data", f"npz:{tmp_path / 'd.npz'}", "--out",
            str(tmp_path / "o"), "-q"]
    result = run_cli(*args)
    assert result.returncode == 1 and "--allow-empty-classes" in result.stderr
    result = run_cli(*args, "--allow-empty-classes")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("onnxaom: warning: ") for line in lines), lines
    assert not any("undefined AOMs" in line for line in lines), lines  # said once, by collect
    stats = onnxaom.OccurrenceStats.load(tmp_path / "o" / "stats.npz")
    assert not np.isnan(stats.odm("conv1")).any()  # eq. 2 over the classes with samples


def test_a_folder_is_read_with_a_channels_last_models_channels(tmp_path: Path) -> None:
    """A Keras-style (N, H, W, C) input of 3 channels: grayscale PNGs are read as RGB for it,
    as for the (N, C, H, W) form, and counted (fed transposed)."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxaom.data import load_spec
    from onnxaom.job import _input_channels

    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            image_module.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8),
                                   mode="L").save(tmp_path / cls / f"{i}.png")
    weight = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
         helper.make_node("Conv", ["nchw", "w"], ["c"], name="conv1", pads=[1] * 4),
         helper.make_node("Relu", ["c"], ["y"], name="relu1")],
        "nhwc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], [weight])
    model = onnxaom.Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert _input_channels(model) == 3
    assert _input_channels(onnxaom.Model(zoo.chain())) == 3  # (N, 3, 8, 8)
    rgba = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "rgba",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 3])]))
    assert _input_channels(onnxaom.Model(rgba)) is None  # 4 channels, 3 wide: not NHWC
    dataset = load_spec(f"folder:{tmp_path}", channels=_input_channels(model))
    stats = onnxaom.collect(model, dataset, progress=False)
    assert stats.counts["conv1"].shape == (4, 2, 8, 8) and stats.num_samples == 4


def test_an_out_folder_that_cannot_be_written_fails_before_collecting(tmp_path: Path, capsys,
                                                                     monkeypatch) -> None:
    """An existing --out on a read-only file system (simulated: as root a chmod does not stop
    writes) is one line naming it, before the collection, not a traceback after it."""
    import errno

    import onnxaom.job

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    def collect(*args, **kwargs):
        raise AssertionError("collected before finding that --out cannot be written")

    import types

    # the job's own tempfile only: the test process keeps the real module
    monkeypatch.setattr(onnxaom.job, "tempfile", types.SimpleNamespace(
        TemporaryDirectory=read_only))
    monkeypatch.setattr(onnxaom.job, "collect", collect)
    assert main(["demo", "--out", str(tmp_path), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"--out {tmp_path}: cannot write in this folder (Read-only file system)" in err
    assert "Traceback" not in err
