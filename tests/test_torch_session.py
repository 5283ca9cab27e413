"""The torch runner in a tuning session on sklearn digits (8x8): two steps, the paper's freezing,
undo, resume from the folder (modules rebuilt from factory + edits + state dicts), the command
line's resume, and damaged folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

import onnxaom
from onnxaom.cli import main
from onnxaom.edits import RemoveKernels
from onnxaom.errors import OutputError
from onnxaom.proposal import propose
from onnxaom.session import SessionError, TuningSession

torch = pytest.importorskip("torch")
architectures = pytest.importorskip("onnxaom_torch.architectures")
runner_module = pytest.importorskip("onnxaom_torch.runner")
train_module = pytest.importorskip("onnxaom_torch.train")
mapping_module = pytest.importorskip("onnxaom_torch.mapping")
torch_zoo = pytest.importorskip("tests.torch_zoo")
TorchRunner = runner_module.TorchRunner

FACTORY = "onnxaom_torch.architectures:PaperMNISTNet"
KWARGS = {"image_size": 8, "conv_kernels": [6, 6], "hidden": 16}
DATA = {"spec": "digits", "train_fraction": 0.4, "seed": 0}  # small training set: fast


@pytest.fixture(scope="module")
def data():
    return onnxaom.load_digits().split(0.4, seed=0)


@pytest.fixture(scope="module")
def trained(data):
    module = architectures.PaperMNISTNet(**KWARGS)
    return train_module.retrain(module, data[0], 2, lr=3e-3, seed=0, progress=False,
                                device="cpu").module


def make_runner(data, **options):
    train, test = data
    return TorchRunner(train, test, factory=FACTORY, factory_kwargs=KWARGS, epochs=1,
                       device="cpu", progress=False, **options)


def states_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_steps_undo_and_resume(tmp_path, data, trained):
    runner = make_runner(data)
    session = runner.start(tmp_path / "s", trained, data=DATA)
    start = session.current
    assert start.accuracy is not None and len(start.per_class) == 10
    assert set(start.files) == {"onnx", "torch"}
    assert session.config["runner"]["factory"] == FACTORY

    first = runner.apply(session, [RemoveKernels("/conv1/Conv", (0, 2))])
    assert first.kept and first.step.info["frozen"] == ["conv1"]
    one = runner.module(session)
    kept = [1, 3, 4, 5]
    assert torch.equal(one.conv1.weight.detach(), trained.conv1.weight.detach()[kept])

    stats = onnxaom.collect(session.model(), data[0], layers=["/conv2/Conv"], progress=False)
    proposal = propose(stats, keep={"/conv2/Conv": 4})
    second = runner.apply(session, proposal, stats=stats)
    assert second.step.info["frozen"] == ["conv1", "conv2"]  # "upto": the paper's freezing
    assert second.step.stats_digest == proposal.stats_digest
    two = runner.module(session)
    assert torch.equal(two.conv1.weight, one.conv1.weight)
    assert two.conv2.out_channels == 4 and not torch.equal(two.fc1.weight[:, :4],
                                                           one.fc1.weight[:, :4])
    assert session.current.params < first.step.params < start.params

    session.undo("try another")
    assert session.current.index == 1
    assert states_equal(runner.module(session).state_dict(), one.state_dict())

    fresh = make_runner(data)
    resumed = fresh.resume(tmp_path / "s")  # rebuilt from the files alone
    assert resumed.current.index == 1
    assert states_equal(fresh.module(resumed).state_dict(), one.state_dict())
    assert states_equal(fresh.module(resumed, 2).state_dict(), two.state_dict())
    mapping_module.map_layers(fresh.module(resumed, 2), resumed.model(2))  # files agree

    table = resumed.format_table()
    assert "undone: try another" in table and "/conv1/Conv: remove 2 kernels" in table


def test_bad_factories_and_damaged_weights_are_named(tmp_path, data, trained):
    wrong = make_runner(data)
    wrong.factory_kwargs = {**KWARGS, "hidden": 8}
    with pytest.raises(mapping_module.ModuleMismatchError, match="does not build the module"):
        wrong.start(tmp_path / "bad", trained)
    assert not (tmp_path / "bad").exists()

    runner = make_runner(data)
    session = runner.start(tmp_path / "s", trained, data=DATA)
    runner.apply(session, [RemoveKernels("/conv2/Conv", (1,))])
    with pytest.raises(mapping_module.ModuleMismatchError, match=r"step_0\.pt"):
        wrong.resume(tmp_path / "s")
    weights = tmp_path / "s" / "models" / "step_1.pt"
    weights.write_bytes(b"garbage")
    with pytest.raises(SessionError, match=r"models/step_1\.pt .*corrupt"):
        make_runner(data).resume(tmp_path / "s")
    weights.unlink()
    with pytest.raises(SessionError, match=r"models/step_1\.pt .*missing"):
        make_runner(data).resume(tmp_path / "s")
    no_factory = TorchRunner(*data, progress=False)  # takes the factory from the config
    weights_less = TuningSession.resume(tmp_path / "s", verify=False)
    with pytest.raises(SessionError, match=r"step_1\.pt is missing"):
        no_factory.module(weights_less)
    renamed = make_runner(data)  # the factory's keywords changed since the session started
    renamed.factory_kwargs = {**KWARGS, "no_such_keyword": 1}
    with pytest.raises(SessionError, match="factory .* failed with keyword arguments"):
        renamed.module(TuningSession.resume(tmp_path / "s", verify=False), 0)


def test_a_damaged_edit_record_and_a_full_disk_are_named(tmp_path, data, trained, monkeypatch):
    """A recorded edit that cannot be replayed names session.json and the step (it read as a
    fault in the user's own edits); torch.save failing (a full disk raises RuntimeError, not
    OSError) is a one-line OutputError, with nothing recorded."""
    runner = make_runner(data)
    session = runner.start(tmp_path / "s", trained, data=DATA)
    runner.apply(session, [RemoveKernels("/conv2/Conv", (1,))])
    path = tmp_path / "s" / "session.json"
    record = json.loads(path.read_text())
    record["steps"][1]["edits"][0]["layer"] = "/nope/Conv"
    path.write_text(json.dumps(record))
    with pytest.raises(SessionError, match=r"session\.json: step 1's recorded edits cannot be "
                                           r"replayed on step 0's model.*'/nope/Conv'"):
        make_runner(data).module(TuningSession.resume(tmp_path / "s"))

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    fresh = make_runner(data)
    other = fresh.start(tmp_path / "t", trained, data=DATA)
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputError, match=r"cannot write .*step_1\.pt: torch\.save failed"):
        fresh.apply(other, [RemoveKernels("/conv2/Conv", (1,))])
    assert len(TuningSession.resume(tmp_path / "t").steps) == 1


def test_the_command_line_continues_and_shows_a_session(tmp_path, data, trained, capsys):
    runner = make_runner(data)
    runner.start(tmp_path / "s", trained, data=DATA,
                 loop={"keep": {"/conv1/Conv": 4, "/conv2/Conv": 5}, "accept_drop": 100})
    assert main(["session", "resume", str(tmp_path / "s"), "--max-steps", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "step 1: /conv1/Conv: remove 2 kernels" in out and "kept" in out
    assert main(["session", "resume", str(tmp_path / "s"), "--epochs", "0", "-q",
                 "--accept-drop", "100"]) == 0
    out = capsys.readouterr().out
    assert "step 2: /conv2/Conv: remove 1 kernel" in out
    session = TuningSession.resume(tmp_path / "s")
    assert session.step(2).info["epochs"] == 0 and session.progress["done"] == [
        "/conv1/Conv", "/conv2/Conv"]
    assert main(["session", "resume", str(tmp_path / "s"), "-q"]) == 0
    assert "nothing left to do" in capsys.readouterr().out
    assert main(["session", "show", str(tmp_path / "s")]) == 0
    shown = capsys.readouterr().out
    assert "/conv2/Conv: remove 1 kernel" in shown and shown.count("applied") == 3
    assert main(["session", "show", str(tmp_path / "s"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["steps"]) == 3

    edits = tmp_path / "edits.json"
    edits.write_text(json.dumps([RemoveKernels("/fc1/Gemm", (0, 1)).to_dict()]))
    assert main(["session", "apply", str(tmp_path / "s"), str(edits), "--epochs", "0", "-q",
                 "--accept-drop", "0"]) == 0
    line = capsys.readouterr().out
    assert "step 3" in line
    assert TuningSession.resume(tmp_path / "s").step(3).params < session.step(2).params

    (tmp_path / "s" / "session.json").write_text("{")
    assert main(["session", "show", str(tmp_path / "s")]) == 1
    assert "session.json is corrupt" in capsys.readouterr().err


def test_sessions_from_python_data_cannot_resume_on_the_command_line(tmp_path, data, trained,
                                                                     capsys):
    x = np.asarray(data[1].images)
    y = np.asarray(data[1].labels)
    runner = TorchRunner((x, y), (x, y), factory=FACTORY, factory_kwargs=KWARGS,
                         progress=False, device="cpu")
    runner.start(tmp_path / "s", trained)
    assert main(["session", "resume", str(tmp_path / "s"), "-q"]) == 1
    assert "no data spec" in capsys.readouterr().err


def test_runner_options_are_checked_when_made_and_when_read_from_a_session(tmp_path, data,
                                                                           trained):
    from onnxaom_torch.runner import runner_from_session

    for bad in ({"optimizer": "lion"}, {"epochs": "many"}, {"lr": 0}, {"batch_size": 0},
                {"opset": 0}, {"opset": 6}, {"device": "foo"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TorchRunner(*data, **bad)
    runner = make_runner(data)
    session = runner.start(tmp_path / "s", trained, data=DATA)
    path = session.folder / "session.json"
    state = json.loads(path.read_text())
    state["config"]["runner"]["optimizer"] = "lion"
    path.write_text(json.dumps(state))
    with pytest.raises(SessionError, match="runner options .* not valid.*lion"):
        runner_from_session(TuningSession.resume(session.folder, verify=False), *data)


def _remove_from_trained(tmp_path, data, name: str):
    """A session on ``tests.torch_zoo:<name>`` trained one epoch, then kernels 0 and 2 of
    /conv1/Conv removed with one epoch of retraining: (runner, session, module, step)."""
    runner = TorchRunner(data[0], data[1], factory=f"tests.torch_zoo:{name}", epochs=1,
                         device="cpu", progress=False)
    module = train_module.retrain(getattr(torch_zoo, name)(), data[0], 1, seed=0,
                                  progress=False, device="cpu").module
    session = runner.start(tmp_path / "s", module)
    return runner, session, module, runner.apply(session, [RemoveKernels("/conv1/Conv", (0, 2))])


def test_upto_freezes_the_norm_in_front_of_a_pre_activation_conv(tmp_path, data):
    """"upto" keeps the frozen part computing what it did: the batch norm that runs before the
    last frozen layer (a pre-activation block's BN, in no layer's chain) is frozen too."""
    runner, session, module, step = _remove_from_trained(tmp_path, data, "PreActConcat")
    assert step.step.info["frozen"] == ["conv0", "conv1", "bn"]
    before, after = module.bn.running_mean, runner.module(session).bn.running_mean
    assert torch.equal(before, after)


def test_a_per_channel_group_norm_is_frozen_with_its_layer(tmp_path, data):
    """A GroupNorm with one channel a group follows conv1's removal (sliced) and is frozen
    with conv1: its weight and bias, conv1's per-channel affine, do not train."""
    runner, session, module, step = _remove_from_trained(tmp_path, data, "GroupNormNet")
    assert step.step.info["frozen"] == ["conv1", "norm"]
    edited = runner.module(session)
    assert edited.norm.num_groups == edited.norm.num_channels == 4
    for name in ("weight", "bias"):
        kept = getattr(module.norm, name).detach()[[1, 3, 4, 5]]
        assert torch.equal(getattr(edited.norm, name).detach(), kept)


class FunctionalReluNet(torch.nn.Module):
    """Two convs whose ReLUs are functional: an insertion after conv1 wraps it as conv1.body."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 6, 3)
        self.conv2 = torch.nn.Conv2d(6, 6, 3)
        self.fc = torch.nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


def test_tune_finds_a_layer_an_insertion_wrapped(tmp_path, data):
    """After InsertLayer wrapped conv1 (its weight is now conv1.body.weight, its node
    /conv1/body/Conv), tune still reduces it; it used to skip it as gone."""
    train, test = data
    module = train_module.retrain(FunctionalReluNet(), train, 1, seed=0, progress=False,
                                  device="cpu").module
    runner = TorchRunner(train, test, factory=FunctionalReluNet, epochs=0, device="cpu",
                         progress=False)
    session = runner.start(tmp_path / "s", module)
    runner.apply(session, [onnxaom.edits.InsertLayer(after="/conv1/Conv")])
    assert "/conv1/body/Conv" in [layer.name for layer in session.model().layers()]
    reports = runner.tune(session, train, keep={"/conv1/Conv": 3, "/conv2/Conv": 3},
                          accept_drop=None)
    assert [report.step.label for report in reports] == [
        "/conv1/body/Conv: remove 3 kernels", "/conv2/Conv: remove 3 kernels"]
    from onnxaom.tuning import _unwrapped

    assert _unwrapped("conv1.body.weight") == _unwrapped("conv1.weight") == "conv1.weight"
    assert _unwrapped("body.conv1.weight") == "body.conv1.weight"  # a module named body
