"""Outputs never land on a command's own inputs, and a write that cannot happen is one clear
error. Cases from an adversarial sweep of the CLI (2026-11-24); several lost data before."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxaom
from onnxaom import ModelError, OutputError
from onnxaom.files import atomic_write_text

from . import zoo


def _digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxaom.cli", *args], capture_output=True,
                          text=True, check=False, cwd=cwd)


@pytest.fixture
def renamed_external(tmp_path: Path) -> tuple[Path, Path]:
    """A model saved with external data as m.onnx + m.onnx.data, then the model file renamed to
    model.onnx: its weights file keeps the name m.onnx.data."""
    folder = tmp_path / "r"
    folder.mkdir()
    onnxaom.Model(zoo.chain(seed=1, kernels=(8, 8))).save(folder / "m.onnx", external_data=True)
    (folder / "m.onnx").rename(folder / "model.onnx")
    return folder / "model.onnx", folder / "m.onnx.data"


def test_an_edit_never_writes_over_the_sources_weights_file(renamed_external) -> None:
    model_path, data = renamed_external
    before = _digest(model_path, data)
    model = onnxaom.load(model_path)
    assert data.resolve() in model.protected
    edited = onnxaom.remove_kernels(model, {"conv1": [0]})
    for target in (model_path, data, model_path.with_name("m.onnx")):
        with pytest.raises(ModelError, match="refusing to overwrite a file of the source model"):
            edited.save(target)
    result = _cli("prune", str(model_path), "--remove", "conv1:0", "-o",
                  str(model_path.with_name("m.onnx")))
    assert result.returncode == 1 and "refusing to overwrite" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _digest(model_path, data) == before
    onnxaom.load(model_path)  # still loads


def test_an_edited_model_never_writes_over_its_source(tmp_path: Path) -> None:
    path = onnxaom.Model(zoo.chain(seed=2)).save(tmp_path / "res.onnx")
    before = _digest(path)
    edited = onnxaom.apply(onnxaom.load(path), [onnxaom.WidenLayer("conv1", 2)])
    with pytest.raises(ModelError, match="refusing to overwrite"):
        edited.save(path)
    os.link(path, tmp_path / "hard.onnx")
    with pytest.raises(ModelError, match="refusing to overwrite"):
        edited.save(tmp_path / "hard.onnx")
    assert _digest(path) == before
    edited.save(tmp_path / "wide.onnx")  # elsewhere is fine


def test_saving_external_data_ignores_the_current_directory(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """onnx's own conversion refused when a file named like the weights file existed in the
    current directory (not beside the model)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.onnx.data").write_bytes(b"unrelated")
    (tmp_path / "sub").mkdir()
    model = onnxaom.Model(zoo.chain(seed=3, kernels=(8, 8)))
    for _ in range(2):  # the second run finds its own earlier output too
        model.save(tmp_path / "sub" / "p.onnx", external_data=True)
    assert (tmp_path / "p.onnx.data").read_bytes() == b"unrelated"
    loaded = onnxaom.load(tmp_path / "sub" / "p.onnx")
    x = zoo.random_input(model.proto)
    np.testing.assert_array_equal(zoo.run(loaded.proto, x)[0], zoo.run(model.proto, x)[0])
    stored = onnx.load(str(tmp_path / "sub" / "p.onnx"), load_external_data=False)
    assert any(t.external_data for t in stored.graph.initializer)


def test_unwritable_outputs_are_one_clear_error(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model = onnxaom.Model(zoo.chain(seed=4))
    with pytest.raises(OutputError, match="is a folder"):
        model.save(tmp_path)
    with pytest.raises(OutputError, match="is a folder"):
        atomic_write_text(tmp_path, "x")

    def refuse(*_args: object, **_kwargs: object) -> object:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # root ignores a read-only folder
    with pytest.raises(OutputError, match=r"cannot write .*out\.txt: Permission denied"):
        atomic_write_text(tmp_path / "out.txt", "x")
    monkeypatch.setattr(tempfile, "TemporaryDirectory", refuse)
    with pytest.raises(OutputError, match=r"cannot write .*m\.onnx: Permission denied"):
        model.save(tmp_path / "m.onnx")


def test_propose_and_render_refuse_to_write_over_their_inputs(tmp_path: Path) -> None:
    model_path = onnxaom.Model(zoo.chain(seed=5, kernels=(6, 8))).save(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((30, 3, 8, 8)).astype(np.float32)
    stats = onnxaom.collect(onnxaom.load(model_path), x, np.arange(30) % 3, progress=False)
    stats_path = stats.save(tmp_path / "stats.npz")
    before = _digest(model_path, stats_path)
    for target in (stats_path, model_path):
        result = _cli("session", "propose", str(stats_path), "--keep", "conv1=3", "--model",
                      str(model_path), "-o", str(target))
        assert result.returncode == 1, result.stderr
        assert "is one of this command's inputs" in result.stderr
    result = _cli("render", str(stats_path), "--view", "odm", "-o", str(stats_path))
    assert result.returncode == 1 and "is one of this command's inputs" in result.stderr
    assert _digest(model_path, stats_path) == before
    result = _cli("render", str(stats_path), "--view", "aom", "--page", "5", "-o",
                  str(tmp_path / "a.svg"))
    assert result.returncode == 1 and "--page 5: layer 'conv1' has 6 kernels" in result.stderr
    result = _cli("render", str(stats_path), "--scale", "0", "-o", str(tmp_path / "a.png"))
    assert result.returncode == 2 and "--scale: expected a number > 0" in result.stderr


def test_a_failed_analysis_leaves_the_earlier_results_whole(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    from onnxaom import job

    model_path = onnxaom.Model(zoo.chain(seed=6)).save(tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((24, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(24) % 3)
    out = tmp_path / "out"
    job.run_analysis(model_path, f"npz:{tmp_path / 'd.npz'}", out, progress=False)
    files = [out / "stats.npz", out / "findings.json", out / "report.html"]
    before = _digest(*files)
    np.savez(tmp_path / "d.npz", x=x[::-1].copy(), y=np.arange(24) % 2)  # other results

    def fail(*_args: object) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "_write_report", fail)
    with pytest.raises(KeyboardInterrupt):
        job.run_analysis(model_path, f"npz:{tmp_path / 'd.npz'}", out, progress=False)
    assert _digest(*files) == before
    assert sorted(p.name for p in out.iterdir()) == ["findings.json", "report.html", "stats.npz"]


def test_statistics_files_that_are_not_statistics_are_named(tmp_path: Path) -> None:
    text = tmp_path / "notes.npz"
    text.write_text("not statistics")
    with pytest.raises(onnxaom.StatsError, match=r"notes\.npz is not an onnxaom statistics "
                                                  r"file \(not an \.npz archive\)"):
        onnxaom.OccurrenceStats.load(text)
    with pytest.raises(onnxaom.StatsError, match="is a folder"):
        onnxaom.OccurrenceStats.load(tmp_path)


def test_the_weights_file_gets_the_model_files_permissions(tmp_path: Path) -> None:
    model = onnxaom.Model(zoo.chain(seed=7, kernels=(8, 8)))
    path = model.save(tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    assert data.stat().st_mode & 0o777 == path.stat().st_mode & 0o777


def test_the_job_report_draws_the_layers_that_fit_its_tile_budget(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """Past REPORT_MAX_TILES kernel x class tiles (a 1,000-class model made GB-sized reports),
    the later layers get no views, a note says which and how to draw them, and their findings
    stay in the report."""
    from onnxaom import job

    model_path = onnxaom.Model(zoo.chain(seed=7)).save(tmp_path / "m.onnx")
    x = np.random.default_rng(2).standard_normal((30, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(30) % 3)
    stats = onnxaom.collect(onnxaom.load(model_path), x, np.arange(30) % 3, progress=False)
    sizes = [stats.counts[n].shape[0] * 3 for n in stats.layer_names]  # conv1 12, conv2 24, ...
    assert job.report_layers(stats, budget=sizes[0] + sizes[1]) == (
        list(stats.layer_names[:2]), list(stats.layer_names[2:]))
    assert job.report_layers(stats, budget=1) == ([], list(stats.layer_names))  # none fits
    monkeypatch.setattr(job, "REPORT_MAX_TILES", sizes[0])
    job.run_analysis(model_path, f"npz:{tmp_path / 'd.npz'}", tmp_path / "out", progress=False)
    html = (tmp_path / "out" / "report.html").read_text()
    assert f"{len(sizes) - 1} of {len(sizes)} layers have no views here" in html
    assert "id='layer-0'" in html and "id='layer-1'" not in html
    assert "onnxaom render STATS.npz --layer NAME" in html


def test_the_large_report_warning_names_the_report_written(tmp_path: Path, monkeypatch,
                                                           caplog) -> None:
    """analyze warned with the path of its scratch copy (OUT/.onnxaom-XXXX/report.html,
    gone by then), not OUT/report.html."""
    import logging

    from onnxaom import job, report

    model_path = onnxaom.Model(zoo.chain(seed=8)).save(tmp_path / "m.onnx")
    x = np.random.default_rng(3).standard_normal((12, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(12) % 3)
    monkeypatch.setattr(report, "LARGE_REPORT_BYTES", 1000)
    with caplog.at_level(logging.WARNING, logger="onnxaom.report"):
        job.run_analysis(model_path, f"npz:{tmp_path / 'd.npz'}", tmp_path / "out",
                         progress=False)
    warned = [r.getMessage() for r in caplog.records if "MB (every kernel" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(str(tmp_path / "out" / "report.html"))
