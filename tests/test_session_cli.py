"""``onnxaom session propose / show / undo`` (no torch needed): output, files, overrides and
the one-line errors of bad input; ``session start`` (torch, skipped without it): a session
trained from scratch or from saved weights that ``show``, ``apply`` and ``resume`` continue, and
the inputs it refuses before writing anything."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_propose_usage_reads_the_model_given(stats_file, tmp_path, capsys):
    path, proto = stats_file
    model_path = onnxaom.Model(proto).save(tmp_path / "model.onnx")
    assert main(["session", "propose", str(path), "--strategy", "usage", "--model",
                 str(model_path), "--keep", "conv2=3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["strategy"] == "usage" and len(data["layers"][0]["kept"]) == 3
    for strategy in ("usage", "activity"):  # the option's name, not the Python keyword
        assert main(["session", "propose", str(path), "--strategy", strategy]) == 1
        err = capsys.readouterr().err
        assert f"--strategy {strategy} reads" in err and "--model MODEL.onnx" in err


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


def test_undo_is_the_way_out_of_a_step_whose_file_is_damaged(stats_file, tmp_path, capsys):
    """The undone step's model file is corrupt: undo goes back all the same (it refused,
    asking to restore the file); a damaged file of the step it goes back to still refuses."""
    _, proto = stats_file
    model = onnxaom.Model(proto)
    session = TuningSession.create(tmp_path / "s", model, accuracy=0.9)
    for kernel in (0, 1):
        edit = [onnxaom.edits.RemoveKernels("conv1", (0,))]
        model = apply(model, edit)
        session.record(edit, model, accuracy=0.8 - kernel / 10)
    (tmp_path / "s" / "models" / "step_2.onnx").write_bytes(b"damaged")
    assert main(["session", "undo", str(tmp_path / "s")]) == 0
    assert "undid step 2; current step is 1" in capsys.readouterr().out
    (tmp_path / "s" / "models" / "step_0.onnx").write_bytes(b"damaged")
    assert main(["session", "undo", str(tmp_path / "s")]) == 1
    assert "step_0.onnx" in capsys.readouterr().err
    assert TuningSession.resume(tmp_path / "s", verify=False).current.index == 1


# ---------------------------------------------------------------------- session start (torch)
FACTORY = "onnxaom_torch.architectures:PaperMNISTNet"
KWARGS = {"image_size": 8, "conv_kernels": [6, 6], "hidden": 16}  # sklearn digits are 8x8
SMALL = ["--data", "digits", "--train-fraction", "0.4", "--device", "cpu", "-q"]  # fast


def start_args(folder, *extra: str, kwargs=KWARGS) -> list[str]:
    return ["session", "start", str(folder), "--factory", FACTORY, "--factory-kwargs",
            json.dumps(kwargs), *SMALL, *extra]


@pytest.fixture
def torch_runner():
    pytest.importorskip("torch")
    return pytest.importorskip("onnxaom_torch.runner")


def test_the_parser_knows_no_torch():
    code = ("import sys; from onnxaom.cli import build_parser; build_parser().parse_args("
            "['session', 'start', 'd', '--factory', 'a:b', '--data', 'digits', "
            "'--train-epochs', '1']); assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr


def test_start_from_scratch_then_show_apply_and_resume(tmp_path, torch_runner, capsys):
    folder = tmp_path / "s"
    assert main(start_args(folder, "--train-epochs", "1", "--epochs", "0", "--seed", "3",
                           "--loop-layers", "/conv1/Conv", "--accept-drop", "100")) == 0
    out = capsys.readouterr().out
    assert "start" in out and "960" in out and f"started a tuning session in {folder}" in out
    session = TuningSession.resume(folder)
    assert session.config["data"] == {
        "spec": "digits", "train_fraction": 0.4, "seed": 0,
        "preprocessing": onnxaom.load_digits().preprocessing.to_dict()}
    assert session.config["loop"] == {"layers": ["/conv1/Conv"], "accept_drop": 100.0}
    runner = session.config["runner"]
    assert (runner["factory"], runner["factory_kwargs"]) == (FACTORY, KWARGS)
    assert (runner["epochs"], runner["seed"], runner["device"]) == (0, 3, "cpu")
    assert session.current.accuracy is not None and set(session.current.files) == {"onnx",
                                                                                    "torch"}

    again = tmp_path / "again"  # the same seed starts from the same trained module
    assert main(start_args(again, "--train-epochs", "1", "--seed", "3")) == 0
    assert TuningSession.resume(again).current.model_digest == session.current.model_digest

    assert main(["session", "show", str(folder)]) == 0
    assert "start" in capsys.readouterr().out
    edits = tmp_path / "edits.json"
    edits.write_text(json.dumps([onnxaom.edits.RemoveKernels("/conv2/Conv", (0,)).to_dict()]))
    assert main(["session", "apply", str(folder), str(edits), "-q"]) == 0
    assert "step 1: /conv2/Conv: remove 1 kernel" in capsys.readouterr().out
    assert main(["session", "resume", str(folder), "-q"]) == 0  # the recorded loop: conv1 only
    resumed = TuningSession.resume(folder)
    assert resumed.progress["layers"] == ["/conv1/Conv"]
    assert resumed.progress["done"] == ["/conv1/Conv"] and resumed.progress["accept_drop"] == 100
    assert resumed.step(1).info["epochs"] == 0


def test_apply_judges_a_step_by_the_sessions_accept_drop(tmp_path, torch_runner, capsys):
    """A session started with --accept-drop 0: a step applied by hand that costs accuracy is
    undone, as `session apply --help` says (it used to be kept: apply ignored the session's
    value); --accept-drop on apply still overrides it."""
    folder = tmp_path / "s"
    assert main(start_args(folder, "--train-epochs", "8", "--epochs", "0",
                           "--accept-drop", "0")) == 0
    edits = tmp_path / "edits.json"
    edits.write_text(json.dumps([onnxaom.edits.RemoveKernels("/conv2/Conv",
                                                             (0, 1, 2, 3, 4)).to_dict()]))
    capsys.readouterr()
    assert main(["session", "apply", str(folder), str(edits), "-q"]) == 0
    assert "undone" in capsys.readouterr().out
    session = TuningSession.resume(folder)
    assert session.current.index == 0 and session.step(1).status == "undone"
    assert main(["session", "apply", str(folder), str(edits), "-q", "--accept-drop", "100"]) == 0
    assert TuningSession.resume(folder).current.index == 2


def test_reloaded_data_must_have_the_recorded_preprocessing():
    """A session made when a spec loaded with other pixel values is refused, not retrained on
    differently scaled data (the default scaling of uint8 arrays changed once)."""
    from onnxaom.tuning import load_session_data

    recorded = onnxaom.Preprocessing(layout="NHW").to_dict()  # digits, unscaled
    with pytest.raises(onnxaom.SessionError, match=r"data spec 'digits' now loads with "
                                                   r"preprocessing .*made with"):
        load_session_data({"data": {"spec": "digits", "preprocessing": recorded}})
    same = onnxaom.load_digits().preprocessing.to_dict()
    train, test = load_session_data({"data": {"spec": "digits", "preprocessing": same}})
    assert len(train) + len(test) == 1797


def test_start_from_saved_weights(tmp_path, torch_runner, capsys):
    torch = pytest.importorskip("torch")
    from onnxaom_torch.architectures import PaperMNISTNet

    torch.manual_seed(1)
    module = PaperMNISTNet(**KWARGS)
    torch.save(module.state_dict(), tmp_path / "w.pt")
    folder = tmp_path / "s"
    assert main(start_args(folder, "--weights", str(tmp_path / "w.pt"), "--test-data", "digits",
                           "--loop-strategy", "coverage", "--freeze", "none")) == 0
    assert f"started a tuning session in {folder}" in capsys.readouterr().out
    session = TuningSession.resume(folder)
    digits = onnxaom.load_digits().preprocessing.to_dict()
    assert session.config["data"] == {"spec": "digits", "train_fraction": 0.4, "seed": 0,
                                      "test_spec": "digits", "preprocessing": digits}
    assert session.config["loop"] == {"strategy": "coverage"}
    assert session.config["runner"]["freeze"] == "none"
    train = onnxaom.load_digits()
    rebuilt = torch_runner.TorchRunner(train, train, progress=False).module(session)
    loaded = rebuilt.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in module.state_dict().items())


def test_freeze_choices_are_the_runners(torch_runner):
    from onnxaom.cli_session import FREEZE_CHOICES

    assert FREEZE_CHOICES == torch_runner.FREEZE_POLICIES


@pytest.mark.parametrize(("args", "message"), [
    (["--weights", "{tmp}/missing.pt"], "weights file not found: {tmp}/missing.pt"),
    (["--weights", "{tmp}/other.pt"], "does not fit the module built by"),
    (["--weights", "{tmp}/junk.pt"], "cannot be read as a torch state dict"),
    (["--train-epochs", "1", "--factory", "nope"], "is written 'package.module:Name'"),
    (["--train-epochs", "1", "--factory", "no_such_module:Net"],
     "cannot import the module factory 'no_such_module:Net'"),
    (["--train-epochs", "1", "--factory", "onnxaom_torch.architectures:Nope"],
     "cannot import the module factory"),
    (["--train-epochs", "1", "--factory-kwargs", "{image_size: 8}"], "--factory-kwargs is not"),
    (["--train-epochs", "1", "--factory-kwargs", "[8]"], "must be a JSON object"),
    (["--train-epochs", "1", "--factory-kwargs", '{"size": 8}'], "failed with keyword arg"),
    (["--train-epochs", "1", "--factory-kwargs", "{}"], "does not take inputs of shape (1, 1, 8"),
    (["--train-epochs", "1", "--factory-kwargs", '{"image_size": 8, "num_classes": 3}'],
     "C >= 10"),
    (["--train-epochs", "1", "--train-fraction", "1.5"], "fraction must be strictly between"),
    (["--train-epochs", "1", "--data", "npz:{tmp}/none.npz"], "none.npz"),
])
def test_start_refuses_bad_input_writing_nothing(tmp_path, torch_runner, capsys, args,
                                                 message):
    torch = pytest.importorskip("torch")
    from onnxaom_torch.architectures import PaperMNISTNet

    torch.save(PaperMNISTNet(**{**KWARGS, "hidden": 8}).state_dict(), tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    folder = tmp_path / "s"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(start_args(folder) + args) == 1
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err and err.count("\n") == 1
    assert not folder.exists()


def test_start_refuses_a_used_folder_before_training(tmp_path, stats_file, capsys):
    _, proto = stats_file
    TuningSession.create(tmp_path / "s", onnxaom.Model(proto), accuracy=0.9)
    before = sorted(p.name for p in (tmp_path / "s").rglob("*"))
    assert main(start_args(tmp_path / "s", "--train-epochs", "1")) == 1
    err = capsys.readouterr().err
    assert "holds a tuning session (continue it with `onnxaom session resume" in err
    assert err.count("\n") == 1 and sorted(p.name for p in (tmp_path / "s").rglob("*")) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(start_args(tmp_path / "other", "--weights", "w.pt")) == 1
    assert "exists and is not an empty folder" in capsys.readouterr().err


def test_start_without_torch_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxaom_torch.runner", None)  # as if torch were missing
    assert main(start_args(tmp_path / "s", "--train-epochs", "1")) == 1
    err = capsys.readouterr().err
    assert "pip install 'onnxaom[torch]'" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args", [
    [],  # neither --weights nor --train-epochs
    ["--weights", "w.pt", "--train-epochs", "1"],  # both
    ["--train-epochs", "0"],
    ["--train-epochs", "1", "--lr", "0"],
    ["--train-epochs", "1", "--accept-drop", "-1"],
    ["--train-epochs", "1", "--freeze", "all"],
    ["--train-epochs", "1", "--seed", "-1"],
    ["--train-epochs", "1", "--split-seed", "-1"],
    ["--train-epochs", "1", "--opset", "3"],
])
def test_start_usage_errors_exit_2(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as exc:
        main(start_args(tmp_path / "s", *args))
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err and not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, message", [
    (["--device", "foo"], "unknown device 'foo'"),
    (["--loop-layers", "/nope/Conv"], "loop layers '/nope/Conv' are not layers"),
])
def test_start_refuses_a_bad_device_or_loop_layer_in_one_line(tmp_path, torch_runner, capsys,
                                                             monkeypatch, args, message):
    """Refused before training and before a session is written, in one line; they used to
    end in a traceback, or to fail only at `session resume` (a loop layer: after training)."""
    import onnxaom_torch.train

    def no_training(*_args, **_kwargs):
        raise AssertionError("trained before refusing")

    monkeypatch.setattr(onnxaom_torch.train, "retrain", no_training)
    assert main(start_args(tmp_path / "s", "--train-epochs", "1", *args)) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_resume_max_steps_below_one_is_a_usage_error(tmp_path, capsys, steps):
    with pytest.raises(SystemExit) as exc:
        main(["session", "resume", str(tmp_path / "s"), "--max-steps", steps])
    assert exc.value.code == 2 and "--max-steps" in capsys.readouterr().err


@pytest.mark.parametrize("action", ["apply", "resume"])
@pytest.mark.parametrize("option, value", [("--epochs", "-1"), ("--epochs", "1.5"),
                                           ("--accept-drop", "-0.5"), ("--accept-drop", "nan")])
def test_apply_and_resume_validate_training_options_like_start(tmp_path, capsys, action,
                                                                option, value):
    args = ["session", action, str(tmp_path / "s")]
    if action == "apply":
        args.append(str(tmp_path / "p.json"))
    with pytest.raises(SystemExit) as exc:
        main([*args, option, value])
    assert exc.value.code == 2 and option in capsys.readouterr().err


def test_apply_with_an_edits_path_it_cannot_read_says_so_in_one_line(tmp_path, capsys):
    """A folder, bytes that are not UTF-8, a missing file: one line each (the first two used
    to end in a traceback)."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe[]")
    for name, message in (("folder", "cannot read edits file"),
                          ("binary.json", "cannot read edits file"),
                          ("missing.json", "edits file not found")):
        assert main(["session", "apply", str(tmp_path / "s"), str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
