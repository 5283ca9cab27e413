"""The surgery subcommands: prune, widen, deepen, summary (through ``onnxaom.cli.main``)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

import onnxaom
from onnxaom.cli_surgery import add_parsers, parse_indices, parse_removal
from onnxaom.errors import EditError
from onnxaom.surgery import METADATA_KEY

from . import zoo
from .test_surgery import assert_same_function, zeroed_at_probes

cli = pytest.importorskip("onnxaom.cli")


@pytest.fixture
def model_path(tmp_path):
    return zoo.save(zoo.residual(), tmp_path / "res.onnx")


def _main(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_writes_the_pruned_model_and_reports_coupled_layers(model_path, tmp_path, capsys):
    before = model_path.read_bytes()
    out = tmp_path / "pruned.onnx"
    code, stdout, _ = _main(["prune", model_path, "--remove", "conv3:0,2", "--remove",
                             "conv2:1", "-o", out], capsys)
    assert code == 0
    assert "conv1: 4 -> 2 kernels" in stdout and "conv3: 4 -> 2 kernels" in stdout
    assert "conv2: 4 -> 3 kernels" in stdout and f"wrote {out}" in stdout
    assert model_path.read_bytes() == before
    pruned = onnxaom.load(out)
    meta = {p.key: p.value for p in pruned.proto.metadata_props}
    assert [e["layer"] for e in json.loads(meta[METADATA_KEY])] == ["conv3", "conv2"]
    oracle = zeroed_at_probes(onnxaom.load(model_path).proto,
                              {"conv1": [0, 2], "conv3": [0, 2], "conv2": [1]})
    assert_same_function(oracle, pruned.proto)


def test_prune_refuses_coupled_layers_on_request(model_path, tmp_path, capsys):
    code, _, err = _main(["prune", model_path, "--remove", "conv3:0", "--coupled", "refuse",
                          "-o", tmp_path / "x.onnx"], capsys)
    assert code == 1 and "'conv1'" in err and err.count("\n") == 1
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("argv", [
    ["--remove", "conv1:0"],
    ["--remove", "conv1:0", "--external-data", "yes"],
])
def test_commands_refuse_to_overwrite_the_input(model_path, capsys, argv):
    before = model_path.read_bytes()
    code, _, err = _main(["prune", model_path, *argv, "-o", model_path], capsys)
    assert code == 1 and "refusing to overwrite the input model" in err
    code, _, err = _main(["widen", model_path, "--layer", "conv2", "--add", "1", "-o",
                          model_path.with_name(model_path.name + ".data")], capsys)
    assert code == 1 and "overwrite the input model's files" in err
    assert model_path.read_bytes() == before


def test_widen_and_deepen_keep_the_function(model_path, tmp_path, capsys):
    wide, deep = tmp_path / "wide.onnx", tmp_path / "deep.onnx"
    code, stdout, _ = _main(["widen", model_path, "--layer", "conv2", "--add", "3", "--sources",
                             "0,0,1", "-o", wide], capsys)
    assert code == 0 and "conv2: 4 -> 7 kernels" in stdout
    code, stdout, _ = _main(["deepen", wide, "--after", "conv2", "--kernel-size", "1", "-o",
                             deep], capsys)
    assert code == 0 and "conv2_deep: new layer, 7 kernels" in stdout
    assert_same_function(onnxaom.load(model_path).proto, onnxaom.load(deep).proto)
    code, _, err = _main(["deepen", model_path, "--after", "conv3", "-o", tmp_path / "x.onnx"],
                         capsys)
    assert code == 1 and "ReLU" in err


def test_external_data_follows_the_input_or_the_flag(tmp_path, capsys):
    path = zoo.save(zoo.chain(kernels=(16, 16), hidden=64), tmp_path / "m.onnx",
                    external_data=True)
    _main(["prune", path, "--remove", "conv1:0-3", "-o", tmp_path / "a.onnx"], capsys)
    assert (tmp_path / "a.onnx.data").exists()
    _main(["prune", path, "--remove", "conv1:0-3", "--external-data", "no", "-o",
           tmp_path / "b.onnx"], capsys)
    assert not (tmp_path / "b.onnx.data").exists()
    x = zoo.random_input(zoo.chain(kernels=(16, 16), hidden=64))
    np.testing.assert_allclose(zoo.run(onnxaom.load(tmp_path / "a.onnx").proto, x)[0],
                               zoo.run(onnxaom.load(tmp_path / "b.onnx").proto, x)[0])


def test_summary_prints_a_table_or_json(model_path, capsys):
    code, stdout, _ = _main(["summary", model_path], capsys)
    assert code == 0 and "conv1" in stdout and "total" in stdout and "file size" in stdout
    code, stdout, _ = _main(["summary", model_path, "--json"], capsys)
    data = json.loads(stdout)
    assert [row["name"] for row in data["layers"]] == ["conv1", "conv2", "conv3", "fc"]
    assert data["file_size"] == model_path.stat().st_size


def test_bad_removal_specs_are_user_errors(model_path, tmp_path, capsys):
    for spec in ("conv1", "conv1:", "conv1:a", "conv1:3-1", ":1"):
        code, _, err = _main(["prune", model_path, "--remove", spec, "-o", tmp_path / "x.onnx"],
                             capsys)
        assert code == 1 and err.startswith("onnxaom: error:"), spec
    code, _, err = _main(["prune", model_path, "--remove", "conv9:0", "-o",
                          tmp_path / "x.onnx"], capsys)
    assert code == 1 and "no layer 'conv9'" in err


def test_parsers():
    assert parse_indices("0,3,5") == [0, 3, 5]
    assert parse_indices("0-3, 7") == [0, 1, 2, 3, 7]
    assert parse_removal("/conv1/Conv:1,2") == ("/conv1/Conv", [1, 2])
    assert parse_removal("a:b:0") == ("a:b", [0])
    with pytest.raises(EditError):
        parse_indices("1,,2")
    with pytest.raises(EditError, match=r"range '0-1000000000' .* names 1,000,000,001 kernels"):
        parse_indices("0-1000000000")  # refused before a billion ints are made
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    args = parser.parse_args(["widen", "m.onnx", "--layer", "c", "--add", "2", "-o", "o.onnx"])
    assert (args.init, args.coupled, args.external_data) == ("net2net", "propagate", "auto")


def test_prune_from_a_proposal_file(tmp_path, capsys):
    """analyze -> session propose -o -> prune --proposal: the model the proposal's statistics
    came from loses what the proposal removes (the same bytes as the API's edit); another
    model, or a proposal that removes nothing, is refused; --remove and --proposal exclude
    each other."""
    proto = zoo.chain()
    path = zoo.save(proto, tmp_path / "m.onnx")
    model = onnxaom.load(path)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(30, 3, 8, 8)).astype(np.float32)
    stats = onnxaom.collect(model, images, np.arange(30) % 3, progress=False)
    proposal = onnxaom.propose(stats, keep={"conv1": 2, "conv2": 5}, model=model)
    proposal_path = proposal.to_json(tmp_path / "proposal.json")
    out = tmp_path / "pruned.onnx"
    code, stdout, _ = _main(["prune", path, "--proposal", proposal_path, "-o", out], capsys)
    assert code == 0, stdout
    assert "conv1: 4 -> 2 kernels" in stdout and "conv2: 8 -> 5 kernels" in stdout
    want = onnxaom.apply(model, proposal)
    assert onnxaom.load(out).digest == want.digest
    other = zoo.save(zoo.chain(seed=1), tmp_path / "other.onnx")
    code, _, err = _main(["prune", other, "--proposal", proposal_path, "-o",
                          tmp_path / "o.onnx"], capsys)
    assert code == 1 and "was made for another model" in err and "other.onnx" in err
    nothing = onnxaom.propose(stats, keep={"conv1": 4}, model=model).to_json(
        tmp_path / "nothing.json")
    code, _, err = _main(["prune", path, "--proposal", nothing, "-o", tmp_path / "n.onnx"],
                         capsys)
    assert code == 1 and "removes no kernels" in err
    for argv in (["--proposal", proposal_path, "--remove", "conv1:0"], []):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([str(a) for a in ["prune", path, *argv, "-o", tmp_path / "x.onnx"]])
        assert exit_info.value.code == 2
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("argv", [
    ["widen", "--layer", "conv1", "--add", "0"],
    ["widen", "--layer", "conv1", "--add", "1", "--noise", "-1"],
    ["widen", "--layer", "conv1", "--add", "1", "--seed", "-3"],
    ["deepen", "--after", "conv1", "--kernel-size", "0"],
])
def test_numbers_out_of_range_are_usage_errors_naming_the_option(model_path, tmp_path, capsys,
                                                                 argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([argv[0], str(model_path), *argv[1:], "-o", str(tmp_path / "o.onnx")])
    assert exit_info.value.code == 2
    option = next(a for a in reversed(argv) if a.startswith("--"))
    assert f"argument {option}: expected" in capsys.readouterr().err


def test_a_negative_kernel_index_says_indices_count_from_zero(model_path, tmp_path, capsys):
    code, _, err = _main(["prune", model_path, "--remove", "conv1:-1", "-o",
                          tmp_path / "o.onnx"], capsys)
    assert code == 1 and "indices count from 0" in err
