"""``onnxaom session propose / show / undo`` (no torch needed): output, files, overrides and
the one-line errors of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

import onnxaom
from onnxaom.cli import main
from onnxaom.cli_session import parse_keep, parse_override
from onnxaom.data import from_arrays
from onnxaom.errors import StatsError
from onnxaom.proposal import Proposal
from onnxaom.session import TuningSession
from onnxaom.surgery import apply

from . import zoo


@pytest.fixture
def stats_file(tmp_path):
    proto = zoo.chain(seed=3, kernels=(6, 8))
    x = np.random.default_rng(0).standard_normal((90, 3, 8, 8)).astype(np.float32)
    data = from_arrays(x, np.arange(90) % 3)
    stats = onnxaom.collect(onnxaom.Model(proto), data, progress=False)
    return stats.save(tmp_path / "stats.npz"), proto


def test_propose_prints_and_writes_the_proposal(stats_file, tmp_path, capsys):
    path, _ = stats_file
    out = tmp_path / "proposal.json"
    assert main(["session", "propose", str(path), "--keep", "conv1=4", "--keep", "conv2=5",
                 "--override", "conv1:keep=0", "--override", "conv2:only=1,2", "-o",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "conv1: keep" in printed and f"wrote {out}" in printed
    proposal = Proposal.from_json(out)
    assert 0 in proposal.layer("conv1").kept and proposal.layer("conv2").kept == (1, 2)
    assert main(["session", "propose", str(path), "--strategy", "coverage", "--layers",
                 "conv2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["strategy"] == "coverage" and [p["layer"] for p in data["layers"]] == ["conv2"]


@pytest.mark.parametrize(("args", "message"), [
    (["--keep", "conv1"], "LAYER=N"),
    (["--keep", "conv1=0"], "LAYER=N"),
    (["--override", "conv1:drop=1"], "LAYER:ACTION=INDICES"),
    (["--override", "conv1:keep=99"], "not an index"),
    (["--layers", "nope"], "no statistics for layer 'nope'"),
])
def test_propose_errors_are_one_line(stats_file, capsys, args, message):
    path, _ = stats_file
    assert main(["session", "propose", str(path), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_parsers():
    assert parse_keep("/conv1/Conv=5") == ("/conv1/Conv", 5)
    assert parse_override("/conv1/Conv:remove=0-2,7") == ("/conv1/Conv", "remove", [0, 1, 2, 7])
    with pytest.raises(StatsError):
        parse_override("conv1=3")


def test_show_and_undo(stats_file, tmp_path, capsys):
    _, proto = stats_file
    model = onnxaom.Model(proto)
    session = TuningSession.create(tmp_path / "s", model, accuracy=0.9)
    edited = apply(model, [onnxaom.edits.RemoveKernels("conv1", (0,))])
    session.record([onnxaom.edits.RemoveKernels("conv1", (0,))], edited, accuracy=0.8)
    assert main(["session", "show", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "90.00%" in out and "-10.00 pp" in out and "conv1: remove 1 kernel" in out
    assert main(["session", "undo", str(tmp_path / "s"), "--reason", "too costly"]) == 0
    assert "undid step 1; current step is 0" in capsys.readouterr().out
    assert TuningSession.resume(tmp_path / "s").step(1).undo_reason == "too costly"
    assert main(["session", "undo", str(tmp_path / "s")]) == 1
    assert "nothing to undo" in capsys.readouterr().err
    assert main(["session", "show", str(tmp_path / "missing")]) == 1
    assert "not found" in capsys.readouterr().err
    (tmp_path / "s" / "models" / "step_1.onnx").unlink()
    assert main(["session", "show", str(tmp_path / "s")]) == 1
    assert "step_1.onnx" in capsys.readouterr().err
    assert main(["session", "show", str(tmp_path / "s"), "--no-verify"]) == 0
