"""Tuning sessions without torch: a runner that applies the ONNX surgery and measures accuracy
with ONNX Runtime drives record / undo / resume, the accept-drop rule and the automatic loop;
damaged folders give errors that name the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import onnxaom
from onnxaom.data import from_arrays
from onnxaom.edits import RemoveKernels, WidenLayer
from onnxaom.errors import ModelFileNotFoundError
from onnxaom.proposal import propose
from onnxaom.session import Artifact, SessionError, TuningSession
from onnxaom.surgery import apply
from onnxaom.tuning import StepOutcome, apply_step, resume_loop, tune

from . import zoo


def _accuracy(model: onnxaom.Model, data: onnxaom.Dataset) -> tuple[float, list[float | None]]:
    logits = zoo.run(model.proto, np.asarray(data.images))[0]
    pred = logits.argmax(axis=1)
    labels = np.asarray(data.labels)
    per_class = [float((pred[labels == c] == c).mean()) if (labels == c).any() else None
                 for c in range(logits.shape[1])]
    return float((pred == labels).mean()), per_class


class SurgeryRunner:
    """Edits with the ONNX surgery, no retraining; accuracy on ``data``."""

    def __init__(self, data: onnxaom.Dataset) -> None:
        self.data = data
        self.runs = 0
        self.forgotten: list[int] = []

    def run(self, session: TuningSession, edits):
        self.runs += 1
        model = apply(session.model(), edits)
        accuracy, per_class = _accuracy(model, self.data)
        note = Artifact(".txt", lambda p: p.write_text(f"run {self.runs}\n"))
        return StepOutcome(model, accuracy, per_class, {"note": note}, {"runs": self.runs})

    def forget(self, step: int) -> None:
        self.forgotten.append(step)


@pytest.fixture
def setup(tmp_path):
    """A zoo chain model, data it classifies perfectly (labels = its own predictions), and a
    session started from it."""
    proto = zoo.chain(seed=3, kernels=(6, 8))
    model = onnxaom.Model(proto)
    x = np.random.default_rng(0).standard_normal((120, 3, 8, 8)).astype(np.float32)
    labels = zoo.run(proto, x)[0].argmax(axis=1)
    data = from_arrays(x, labels, class_names=["a", "b", "c"])
    accuracy, per_class = _accuracy(model, data)
    session = TuningSession.create(tmp_path / "s", model, accuracy=accuracy, per_class=per_class,
                                   config={"note": "test"})
    return session, SurgeryRunner(data), data


def test_a_new_session_records_the_starting_model(setup):
    session, _, _ = setup
    step = session.current
    assert step.index == 0 and step.parent is None and step.edits == ()
    assert step.accuracy == 1.0 and step.params > 0 and step.macs > 0
    assert (session.folder / "models" / "step_0.onnx").is_file()
    data = json.loads((session.folder / "session.json").read_text())
    assert data["format"] == "onnxaom.TuningSession" and data["config"] == {"note": "test"}
    assert session.model().digest == step.model_digest


def test_two_writers_on_one_folder_cannot_drop_each_others_steps(setup):
    """Two processes holding the same session (two `session apply` at once): the second to
    write is refused and nothing of the first is lost or moved aside."""
    session, _, _ = setup
    other = TuningSession.resume(session.folder)
    model = apply(session.model(), [RemoveKernels("conv1", (0,))])
    first = session.record([RemoveKernels("conv1", (0,))], model, accuracy=0.5)
    before = (session.folder / "session.json").read_bytes()
    edits = [RemoveKernels("conv1", (1,))]
    with pytest.raises(SessionError, match="changed by another process"):
        other.record(edits, apply(other.model(), edits), accuracy=0.4)
    with pytest.raises(SessionError, match="changed by another process"):
        other.set_progress({"done": ["x"]})
    assert (session.folder / "session.json").read_bytes() == before
    assert not (session.folder / "models" / "orphaned").exists()
    again = TuningSession.resume(session.folder)
    assert again.current.index == first.index == 1 and len(again.steps) == 2
    again.undo()  # the fresh copy may write; the first one is now stale in its turn
    with pytest.raises(SessionError, match="changed by another process"):
        session.undo()
    assert TuningSession.resume(session.folder).current.index == 0


def test_steps_undo_and_resume(setup):
    session, runner, _ = setup
    first = apply_step(session, runner, [RemoveKernels("conv1", (0, 1))])
    assert first.kept and first.step.index == 1 and first.step.parent == 0
    assert first.step.files["note"].path == "models/step_1.txt"
    assert first.step.params < session.baseline.params
    second = apply_step(session, runner, [WidenLayer("conv2", 2)], label="widen")
    assert second.step.parent == 1 and second.step.label == "widen"
    assert second.step.accuracy == first.step.accuracy  # widening keeps the function
    back = session.undo("testing")
    assert back.index == 1 and session.step(2).status == "undone"
    third = apply_step(session, runner, [RemoveKernels("conv2", (3,))])
    assert third.step.index == 3 and third.step.parent == 1  # indices are never reused
    assert [s.index for s in session.lineage()] == [0, 1, 3]
    again = TuningSession.resume(session.folder)
    assert [s.to_dict() for s in again.steps] == [s.to_dict() for s in session.steps]
    assert again.current.index == 3 and again.step(2).undo_reason == "testing"
    assert [row["step"] for row in again.history()] == [0, 1, 3]
    chart = pytest.importorskip("onnxaom.charts").tuning_history(again.history())
    rows = json.loads(next(iter(chart.to_dict()["datasets"].values())))
    assert [row["step"] for row in rows] == [0, 1, 3]
    assert len(again.history(include_undone=True)) == 4
    table = again.format_table()
    assert "undone: testing" in table and "* " in table and "conv1: remove 2 kernels" in table
    again.undo()
    again.undo()
    with pytest.raises(SessionError, match="nothing to undo"):
        again.undo()


def test_a_step_that_costs_too_much_accuracy_is_undone(setup):
    session, runner, _ = setup
    report = apply_step(session, runner, [RemoveKernels("conv1", (0, 1, 2, 3, 4))],
                        accept_drop=0.5)
    assert not report.kept and report.change_pp is not None and report.change_pp < -0.5
    assert session.current.index == 0 and session.step(1).status == "undone"
    assert "below the baseline" in (session.step(1).undo_reason or "")
    assert runner.forgotten == [1]
    assert "undone" in report.line()


def test_a_rejected_step_is_written_undone_in_one_write(setup, monkeypatch):
    """A crash right after the step's record could leave a step applied that its judgement
    rejects (nothing judged it again): the step is now judged first and recorded undone."""
    session, runner, _ = setup
    writes: list[dict] = []
    real = TuningSession._write

    def spy(self: TuningSession) -> None:
        real(self)
        writes.append(json.loads((self.folder / "session.json").read_text()))

    monkeypatch.setattr(TuningSession, "_write", spy)
    report = apply_step(session, runner, [RemoveKernels("conv1", (0, 1, 2, 3, 4))],
                        accept_drop=0.5)
    assert not report.kept and len(writes) == 1  # no window with the step applied
    assert writes[0]["current"] == 0 and writes[0]["steps"][1]["status"] == "undone"
    assert "below the baseline" in writes[0]["steps"][1]["undo_reason"]
    kept = apply_step(session, runner, [RemoveKernels("conv1", (0,))], accept_drop=100)
    assert kept.kept and len(writes) == 2 and writes[1]["current"] == 2


def test_a_resumes_accept_drop_is_for_that_call_only(setup):
    """`session resume --accept-drop PP` judged every later plain resume with PP too."""
    session, runner, data = setup
    tune(session, runner, data, layers=["conv1", "conv2"], keep={"conv1": 1, "conv2": 1},
         accept_drop=0.5, max_steps=0, progress=False)
    loose = resume_loop(session, runner, data, accept_drop=100.0, max_steps=1, progress=False)
    assert len(loose) == 1 and loose[0].kept and loose[0].change_pp < -0.5
    assert session.progress["accept_drop"] == 0.5  # the session's own
    strict = resume_loop(session, runner, data, max_steps=1, progress=False)
    assert len(strict) == 1 and "more than 0.5 pp" in (strict[0].step.undo_reason or "")

def test_temporary_files_of_interrupted_writes_are_cleared_under_the_lock(setup):
    session, runner, _ = setup
    stale = [session.folder / ".session.json.k3j2.tmp", session.folder / "models" /
             ".step_1.onnx.x9.tmp", session.folder / "models" / ".step_1.pt.q1.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    mine = session.folder / "models" / "notes.tmp"  # not a name the session writes
    mine.write_text("keep")
    apply_step(session, runner, [RemoveKernels("conv1", (0,))])
    assert not any(path.exists() for path in stale) and mine.exists()

def test_a_damaged_model_digest_and_numpy_accuracies(setup):
    """A ``model_digest`` that does not match the step's file is named when the model is read
    (the loop blamed a proposal it made itself); a numpy float32 accuracy is a number."""
    session, runner, _ = setup
    outcome = runner.run(session, [RemoveKernels("conv1", (0,))])
    step = session.record([RemoveKernels("conv1", (0,))], outcome.model,
                          accuracy=np.float32(0.5), per_class=[np.float64(1.0), None, 0])
    assert step.accuracy == 0.5 and step.per_class == (1.0, None, 0.0)
    path = session.folder / "session.json"
    data = json.loads(path.read_text())
    data["steps"][1]["model_digest"] = "f" * 64
    path.write_text(json.dumps(data))
    damaged = TuningSession.resume(session.folder)
    with pytest.raises(SessionError, match=r"step 1's model_digest ffffffffffff does not match "
                                           r"its model models/step_1\.onnx.*its file is the "
                                           r"one recorded"):
        damaged.model()
    os.remove(damaged.path(0))
    with pytest.raises(SessionError, match=r"step_0\.onnx is missing \(model of step 0\)"):
        damaged.model(0)


def test_a_proposal_applied_again_is_named_as_applied(setup):
    """Re-running `session apply` after a crash right after the step was recorded said the
    proposal was for another model and to propose again, inviting a second pruning (a
    crash-safety sweep, 2026-11-25)."""
    session, runner, data = setup
    stats = onnxaom.collect(session.model(), data, progress=False)
    proposal = propose(stats, layers=["conv2"], keep={"conv2": 4})
    first = apply_step(session, runner, proposal)
    with pytest.raises(SessionError, match=rf"applied already: step {first.step.index}, made "
                                           rf"from step 0"):
        apply_step(session, runner, proposal)
    assert runner.runs == 1


def test_statistics_of_another_model_are_refused(setup):
    session, runner, data = setup
    apply_step(session, runner, [RemoveKernels("conv1", (0,))])
    stale = onnxaom.collect(session.model(0), data, progress=False)
    with pytest.raises(SessionError, match="another model"):
        apply_step(session, runner, [RemoveKernels("conv2", (0,))], stats=stale)
    with pytest.raises(SessionError, match="another model"):
        apply_step(session, runner, propose(stale, layers=["conv2"], keep={"conv2": 4}))
    assert runner.runs == 1  # refused before running anything


def test_the_loop_goes_layer_by_layer_and_continues_after_an_interruption(setup):
    session, runner, data = setup
    reports = tune(session, runner, data, keep={"conv1": 5, "conv2": 6}, accept_drop=None,
                   max_steps=1, progress=False)
    assert len(reports) == 1 and reports[0].step.edits[0].layer == "conv1"
    assert session.progress["done"] == ["conv1"]
    resumed = TuningSession.resume(session.folder)
    more = tune(resumed, runner, data, keep={"conv1": 5, "conv2": 6}, accept_drop=None,
                progress=False)
    assert [r.step.edits[0].layer for r in more] == ["conv2"]
    assert [s.parent for s in resumed.steps] == [None, 0, 1]
    assert resumed.step(2).stats_digest is not None
    assert "proposal" in resumed.step(2).info
    assert tune(resumed, runner, data, progress=False) == []  # every layer done


class RenumberingRunner(SurgeryRunner):
    """Like a re-export by an exporter that numbers its nodes: after each edit the first conv
    node is called ``conv_0`` and the second takes the first's old name, ``conv1``."""

    def run(self, session: TuningSession, edits):
        outcome = super().run(session, edits)
        proto = outcome.model.copy_proto()
        renames = {"conv1.weight": "conv_0", "conv2.weight": "conv1"}
        for node in proto.graph.node:
            if node.op_type == "Conv":
                node.name = renames[node.input[1]]
        return StepOutcome(onnxaom.Model(proto), outcome.accuracy, outcome.per_class,
                           outcome.files, outcome.info)


def test_the_loop_finds_its_layers_by_weight_name_when_node_names_shift(setup):
    session, _, data = setup
    runner = RenumberingRunner(data)
    tune(session, runner, data, keep={"conv1": 5, "conv2": 6}, accept_drop=None, max_steps=1,
         progress=False)
    assert session.progress["weights"] == {"conv1": "conv1.weight", "conv2": "conv2.weight"}
    more = tune(TuningSession.resume(session.folder), runner, data,
                keep={"conv1": 5, "conv2": 6}, accept_drop=None, progress=False)
    (step,) = [r.step for r in more]
    assert step.info["loop_layer"] == "conv2"
    assert step.edits[0].layer == "conv1"  # conv2's node, under the name it has now
    kept = {layer.name: layer.kernels for layer in TuningSession.resume(
        session.folder).model().layers()}
    assert kept["conv_0"] == 5 and kept["conv1"] == 6  # conv1 once, then conv2


def test_a_step_recorded_just_before_a_crash_is_judged_not_repeated(setup):
    session, runner, data = setup
    # the loop recorded conv1's step, then crashed before judging it and noting its progress
    apply_step(session, runner, [RemoveKernels("conv1", (0, 1, 2, 3, 4))],
               info={"loop_layer": "conv1"})
    assert session.current.index == 1
    reports = tune(TuningSession.resume(session.folder), runner, data, layers=["conv1"],
                   accept_drop=0.5, progress=False)
    resumed = TuningSession.resume(session.folder)
    assert len(resumed.steps) == 2 and runner.runs == 1  # conv1 was not edited again
    assert resumed.current.index == 0 and resumed.step(1).status == "undone"
    assert len(reports) == 1 and not reports[0].kept
    assert resumed.progress["done"] == ["conv1"]


def test_resume_refuses_damaged_folders_naming_the_file(setup, tmp_path):
    session, runner, _ = setup
    apply_step(session, runner, [RemoveKernels("conv1", (0,))])
    folder = session.folder
    json_file = folder / "session.json"
    good = json_file.read_text()

    json_file.write_text(good[: len(good) // 2])
    with pytest.raises(SessionError, match=r"session\.json is corrupt"):
        TuningSession.resume(folder)
    json_file.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(SessionError, match="not an onnxaom tuning session"):
        TuningSession.resume(folder)
    data = json.loads(good)
    data["current"] = 7
    json_file.write_text(json.dumps(data))
    with pytest.raises(SessionError, match="current step 7"):
        TuningSession.resume(folder)
    data = json.loads(good)
    data["steps"][1]["edits"] = [{"edit": "Nope"}]
    json_file.write_text(json.dumps(data))
    with pytest.raises(SessionError, match="step 1 is malformed"):
        TuningSession.resume(folder)
    data = json.loads(good)
    data["steps"][1]["accuracy"] = 97.5  # a percentage
    json_file.write_text(json.dumps(data))
    with pytest.raises(SessionError, match=r"step 1 is malformed.*\[0, 1\]"):
        TuningSession.resume(folder)
    data = json.loads(good)
    data["steps"][1]["stats_digest"] = ["ab", "cd"]  # `session show` used to crash on it
    json_file.write_text(json.dumps(data))
    with pytest.raises(SessionError, match="step 1 is malformed.*stats_digest must be a string"):
        TuningSession.resume(folder)
    data = json.loads(good)
    data["progress"] = {"layers": 5}
    json_file.write_text(json.dumps(data))
    with pytest.raises(SessionError, match="progress 'layers' must be a list"):
        TuningSession.resume(folder)
    for key, value, message in (  # the loop met these as tracebacks mid-way
            ("data", {"train_fraction": "x"}, r"config data 'train_fraction' must be a number"),
            ("loop", {"batch_size": "abc"}, r"config loop 'batch_size' must be an integer"),
            ("loop", {"keep": {"conv1": -1}}, r"config loop 'keep'\['conv1'\] must be a kernel"),
            ("data", {"train_fraction": 1.0}, r"config data 'train_fraction' must be a number"),
            ("loop", {"accept_drop": "x"}, r"config loop 'accept_drop' must be a number"),
            ("loop", {"relative_to": "mom"}, r"config loop 'relative_to' must be 'baseline'"),
            ("loop", {"layers": "/conv1/Conv"}, r"config loop 'layers' must be a JSON list"),
            ("data", {"spec": 5}, r"config data 'spec' must be a data spec string"),
            ("runner", {"factory_kwargs": [1]}, r"config runner 'factory_kwargs' must be a JSON "
                                                r"object"),
            ("runner", {"factory": 3}, r"config runner 'factory' must be a string")):
        data = json.loads(good)
        data["config"][key] = value
        json_file.write_text(json.dumps(data))
        with pytest.raises(SessionError, match=r"session\.json: " + message):
            TuningSession.resume(folder)
    data = json.loads(good)
    data["progress"] = {"keep": {"conv1": "x"}}
    json_file.write_text(json.dumps(data))
    with pytest.raises(SessionError, match=r"progress 'keep'\['conv1'\] must be a kernel count"):
        TuningSession.resume(folder)
    for key, value in (("data", {"test_spec": "digits", "train_fraction": 1.0}),  # unused
                       ("data", {"seed": 0.0}), ("loop", {"batch_size": 256.0, "keep": {"c": 0}})):
        data = json.loads(good)
        data["config"][key] = value
        json_file.write_text(json.dumps(data))
        TuningSession.resume(folder)  # what session start or a hand-written config holds
    json_file.unlink()
    json_file.mkdir()
    with pytest.raises(SessionError, match="cannot be read"):
        TuningSession.resume(folder)
    json_file.rmdir()
    json_file.write_text(good)

    model_file = folder / "models" / "step_1.onnx"
    saved = model_file.read_bytes()
    model_file.write_bytes(saved[:-10])
    with pytest.raises(SessionError, match=r"models/step_1\.onnx .*step 1.* is corrupt"):
        TuningSession.resume(folder)
    model_file.unlink()
    with pytest.raises(SessionError, match=r"models/step_1\.onnx .*is missing"):
        TuningSession.resume(folder)
    model_file.write_bytes(saved)
    assert TuningSession.resume(folder).current.index == 1
    assert json_file.read_text() == good  # resuming writes nothing

    with pytest.raises(ModelFileNotFoundError, match="not found"):
        TuningSession.resume(tmp_path / "nowhere")
    half = tmp_path / "half"
    (half / "models").mkdir(parents=True)
    with pytest.raises(SessionError, match="half-written"):
        TuningSession.resume(half)
    with pytest.raises(SessionError, match="not an empty folder"):
        TuningSession.create(folder, session.model(), accuracy=1.0)


def test_files_of_an_interrupted_step_are_moved_aside_not_overwritten(setup):
    session, runner, _ = setup
    orphan = session.folder / "models" / "step_1.onnx"
    orphan.write_bytes(b"left by a crash")
    report = apply_step(session, runner, [RemoveKernels("conv1", (0,))])
    assert report.step.index == 1
    aside = session.folder / "models" / "orphaned" / "step_1.onnx.0"
    assert aside.read_bytes() == b"left by a crash"
    TuningSession.resume(session.folder)


def test_a_crash_while_writing_a_step_leaves_the_previous_session(setup, monkeypatch):
    session, runner, _ = setup
    before = (session.folder / "session.json").read_text()

    def boom(path: Path) -> None:
        path.write_text("partial")
        raise OSError("disk full")

    outcome = runner.run(session, [RemoveKernels("conv1", (0,))])
    with pytest.raises(OSError, match="disk full"):
        session.record([RemoveKernels("conv1", (0,))], outcome.model, accuracy=0.5,
                       files={"big": Artifact(".bin", boom)})
    assert (session.folder / "session.json").read_text() == before
    assert not any(p.name.endswith(".tmp") for p in (session.folder / "models").iterdir())
    resumed = TuningSession.resume(session.folder)
    assert len(resumed.steps) == 1 and len(session.steps) == 1
    assert os.path.exists(session.folder / "models" / "step_1.onnx")  # orphan, moved later
    apply_step(resumed, runner, [RemoveKernels("conv1", (0,))])
    assert (session.folder / "models" / "orphaned" / "step_1.onnx.0").exists()


def test_bad_values_are_refused(setup):
    session, runner, _ = setup
    outcome = runner.run(session, [RemoveKernels("conv1", (0,))])
    with pytest.raises(SessionError, match="fraction, not a percentage"):
        session.record([RemoveKernels("conv1", (0,))], outcome.model, accuracy=97.0)
    with pytest.raises(SessionError, match="at least one edit"):
        session.record([], outcome.model, accuracy=0.5)
    with pytest.raises(SessionError, match="accept_drop"):
        apply_step(session, runner, [RemoveKernels("conv1", (0,))], accept_drop=-1)
    with pytest.raises(SessionError, match="no step 9"):
        session.step(9)
    with pytest.raises(SessionError, match="suffix"):
        Artifact("pt", lambda p: None)
    assert len(session.steps) == 1


def test_the_loop_skips_a_layer_a_coupled_step_already_shrank_below_its_target(tmp_path):
    """conv1 and conv3 meet in a residual Add: conv1's step takes conv3 down to 3 kernels too,
    so conv3's target of 4 is already met; the loop goes on (it used to stop for good)."""
    proto = zoo.residual(kernels=6, seed=3)
    model = onnxaom.Model(proto)
    x = np.random.default_rng(0).standard_normal((90, 3, 8, 8)).astype(np.float32)
    data = from_arrays(x, np.arange(90) % 3, class_names=["a", "b", "c"])
    session = TuningSession.create(tmp_path / "s", model, accuracy=1.0)
    runner = SurgeryRunner(data)
    reports = tune(session, runner, data, layers=["conv1", "conv3"],
                   keep={"conv1": 3, "conv3": 4}, accept_drop=None, progress=False)
    assert len(reports) == 1 and session.progress["done"] == ["conv1", "conv3"]
    kernels = {layer.name: layer.kernels for layer in session.model().layers()}
    assert kernels["conv1"] == kernels["conv3"] == 3
    with pytest.raises(onnxaom.StatsError, match="kernel count in 1..6"):
        tune(TuningSession.create(tmp_path / "t", model, accuracy=1.0), runner, data,
             layers=["conv1"], keep={"conv1": 9}, accept_drop=None, progress=False)


def test_the_loop_skips_a_layer_whose_removal_the_surgery_refuses(tmp_path, caplog):
    """conv1 -> ReLU -> pool -> BN (shifts removed channels) -> padded conv2: removing conv1's
    kernels is refused; the loop says so, skips conv1 for good and tunes conv2."""
    from .test_surgery import post_probe_bn

    model = onnxaom.Model(post_probe_bn(shift=True))
    x = np.random.default_rng(0).standard_normal((90, 3, 8, 8)).astype(np.float32)
    data = from_arrays(x, np.arange(90) % 3)
    session = TuningSession.create(tmp_path / "s", model, accuracy=1.0)
    runner = SurgeryRunner(data)
    with caplog.at_level("WARNING", logger="onnxaom.tuning"):
        reports = tune(session, runner, data, keep={"conv1": 2, "conv2": 3}, accept_drop=None,
                       progress=False)
    assert [r.step.edits[0].layer for r in reports] == ["conv2"]
    assert "layer conv1 skipped: the surgery refuses" in caplog.text
    resumed = TuningSession.resume(session.folder)
    assert resumed.progress["done"] == ["conv1", "conv2"]
    assert "'bn'" in resumed.progress["refused"]["conv1"]
    assert tune(resumed, runner, data, progress=False) == []
