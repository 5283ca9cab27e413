"""What the public API's docstrings promise about its arguments and errors, checked where an
API review (2026-11-25) found the behaviour differing: each case raised a raw exception from
numpy, pathlib or onnxruntime, silently misread an argument, or left files behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxaom
from onnxaom import charts
from onnxaom.session import TuningSession

from . import zoo


@pytest.fixture(scope="module")
def model() -> onnxaom.Model:
    return onnxaom.Model(zoo.bn_kept())


def _pixels(model: onnxaom.Model, n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    shape = zoo.random_input(model.proto, batch=n).shape
    images = np.random.default_rng(0).integers(0, 256, size=shape).astype(np.uint8)
    return images, np.arange(n) % 3


def test_collector_update_scales_8_and_16_bit_pixels_as_collect_does(model) -> None:
    """update() fed uint8 pixels unscaled to the float model (counts off by the thousand)."""
    images, labels = _pixels(model)
    want = onnxaom.collect(model, images, labels, progress=False)
    for batch in (images, images.astype(np.uint16) * 257):  # 16-bit: k * 257 / 65535 = k / 255
        collector = onnxaom.Collector(model)
        collector.update(list(batch[:10]), list(labels[:10]))  # lists are arrays too
        collector.update(batch[10:], labels[10:])
        got = collector.result()
        for name in want.layer_names:
            np.testing.assert_array_equal(got.counts[name], want.counts[name])


def test_a_refused_session_start_leaves_the_folder_as_it_was(tmp_path, model) -> None:
    for folder, exists in ((tmp_path / "new", False), (tmp_path / "empty", True)):
        if exists:
            folder.mkdir()
        with pytest.raises(onnxaom.SessionError, match="accuracy"):
            TuningSession.create(folder, model, accuracy=93.5)  # a percentage by mistake
        assert folder.exists() == exists and (not exists or not any(folder.iterdir()))
        session = TuningSession.create(folder, model, accuracy=0.935)  # the retry works
        assert session.current.accuracy == pytest.approx(0.935)


def test_session_arguments_are_checked_before_anything_is_written(tmp_path, model) -> None:
    session = TuningSession.create(tmp_path / "s", model, accuracy=0.9)
    with pytest.raises(onnxaom.SessionError, match="progress must be JSON"):
        session.set_progress({"x": object()})
    with pytest.raises(onnxaom.SessionError, match="info must be JSON"):
        session.record([onnxaom.RemoveKernels(model.layers()[0].name, (0,))], model,
                       accuracy=0.9, info={"x": object()})
    with pytest.raises(onnxaom.SessionError, match="not an edit"):
        session.record([42], model, accuracy=0.9)
    assert not (tmp_path / "s" / "models" / "step_1.onnx").exists()
    first = model.layers()[0].name
    edited = onnxaom.apply(model, [onnxaom.RemoveKernels(first, (0,))])
    step = session.record([onnxaom.RemoveKernels(first, (0,)).to_dict()], edited,
                          accuracy=0.9)  # edit dicts, as to_dict() writes them
    assert step.edits == (onnxaom.RemoveKernels(first, (0,)),)


def test_a_proposal_applies_only_to_its_own_model(model) -> None:
    images, labels = _pixels(model)
    stats = onnxaom.collect(model, images, labels, progress=False)
    first = model.layers()[0].name
    proposal = onnxaom.propose(stats, keep={first: 2})
    onnxaom.apply(model, proposal)  # its own model
    other = onnxaom.Model(zoo.bn_kept(seed=1))
    with pytest.raises(onnxaom.EditError, match="proposal was made for another model"):
        onnxaom.apply(other, proposal)
    # propose takes the model as a path or a proto too
    assert onnxaom.propose(stats, keep={first: 2}, model=model.proto).edits == proposal.edits


def test_load_and_save_arguments(tmp_path, model) -> None:
    assert onnxaom.load(model.proto).digest == model.digest
    with pytest.raises(onnxaom.ArgumentError, match="load takes a path"):
        onnxaom.load(42)  # type: ignore[arg-type]
    with pytest.raises(onnxaom.ArgumentError, match="external_data must be True, False or None"):
        model.save(tmp_path / "m.onnx", external_data="no")  # type: ignore[arg-type]
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(onnxaom.ArgumentError, match="threads"):
        onnxaom.collect(model, *_pixels(model), threads="2", progress=False)  # type: ignore[arg-type]


def test_edits_json_and_findings_dict_arguments() -> None:
    edit = onnxaom.RemoveKernels("conv", (1,))
    assert onnxaom.edits_from_json(onnxaom.edits_to_json(edit)) == [edit]
    with pytest.raises(onnxaom.EditError, match="takes JSON text"):
        onnxaom.edits_from_json([edit.to_dict()])  # type: ignore[arg-type]
    bad = {"format": "onnxaom.Findings", "version": 1, "layers": [1], "thresholds": {},
           "class_names": []}
    with pytest.raises(onnxaom.StatsError, match="malformed findings"):
        onnxaom.Findings.from_dict(bad)


def test_data_and_chart_arguments(tmp_path, model) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4))
    assert len(onnxaom.load_spec(Path(path))) == 4
    with pytest.raises(onnxaom.DataError, match="seed must be an integer"):
        onnxaom.load_spec("digits").split(0.5, seed="a")  # type: ignore[arg-type]
    stats = onnxaom.collect(model, *_pixels(model), progress=False)
    first = stats.layer_names[0]
    with pytest.raises(onnxaom.ReportError, match="draw onnxaom.OccurrenceStats"):
        charts.odm_heatmap(str(path), first)  # type: ignore[arg-type]
    for page in (0, 2, True):
        with pytest.raises(onnxaom.ReportError, match="page must be a page number from 1 to 1"):
            charts.aom_grid(stats, first, page=page)
    with pytest.raises(onnxaom.ReportError, match="'step', 'params' and 'accuracy'"):
        charts.tuning_history([{"params": 3}])


def test_the_onnx_proto_is_left_alone_by_load(model) -> None:
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    onnxaom.load(proto)
    assert proto == model.proto
