"""Comparing two runs: the cross-model ODM against a brute-force loop, kernel pairing by index
and by the least total distance (a kernel permutation is recovered exactly), refusals, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import numpy_helper

import onnxaom
from onnxaom import LayerNotFoundError, OccurrenceStats, StatsError
from onnxaom.cli import main
from onnxaom.compare import compare, cross_odm

from . import zoo


def brute_cross_odm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((a.shape[0], b.shape[0]))
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            out[i, j] = np.mean(np.abs(a[i] - b[j]))
    return out


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3)),
       kb=st.integers(1, 5), data=st.data())
def test_cross_odm_equals_brute_force(shape, kb, data) -> None:
    elements = st.floats(0, 1, allow_nan=False)
    a = data.draw(hnp.arrays(np.float64, shape, elements=elements))
    b = data.draw(hnp.arrays(np.float64, (kb, *shape[1:]), elements=elements))
    np.testing.assert_allclose(cross_odm(a, b), brute_cross_odm(a, b), atol=1e-12)
    np.testing.assert_allclose(cross_odm(a, a), onnxaom.stats.odm(a), atol=1e-12)


def _stats(proto: onnx.ModelProto, seed: int = 0, n: int = 60) -> OccurrenceStats:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 3, 8, 8)).astype(np.float32)
    labels = np.arange(n) % 3
    return onnxaom.collect(onnxaom.Model(proto), images, labels, progress=False,
                           layers=["conv1", "conv2"])


def _permuted_conv1(proto: onnx.ModelProto, order: np.ndarray) -> onnx.ModelProto:
    """``proto`` with conv1's kernels in ``order`` (and conv2's inputs to match): the same
    function, its conv1 channels permuted."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    inits = {t.name: t for t in model.graph.initializer}
    for name, axis in (("conv1.weight", 0), ("conv1.bias", 0), ("conv2.weight", 1)):
        array = np.take(numpy_helper.to_array(inits[name]), order, axis=axis)
        inits[name].CopyFrom(numpy_helper.from_array(array, name))
    return model


def test_a_run_against_itself_is_identical_at_distance_zero() -> None:
    stats = _stats(zoo.chain())
    result = compare(stats, stats)
    assert [x.layer_a for x in result.layers] == ["conv1", "conv2"]
    for x in result.layers:
        assert x.identical and x.mean_distance == 0.0 and x.max_distance == 0.0
        np.testing.assert_array_equal(x.pairs[:, 0], x.pairs[:, 1])
    assert "counts identical" in result.summary_lines()[1]


def test_best_match_recovers_a_permutation_of_kernels() -> None:
    proto = zoo.chain()
    order = np.array([2, 0, 3, 1])
    a, b = _stats(proto), _stats(_permuted_conv1(proto, order))
    x = zoo.random_input(proto, batch=3, seed=4)
    for got, want in zip(zoo.run(_permuted_conv1(proto, order), x), zoo.run(proto, x),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    by_index = compare(a, b).layer("conv1")
    assert not by_index.identical and by_index.mean_distance > 0.05
    best = compare(a, b, match="best").layer("conv1")
    assert best.max_distance == 0.0
    # kernel order[j] of a is kernel j of b
    assert {(int(i), int(j)) for i, j in best.pairs} == {(int(k), j) for j, k in enumerate(order)}
    assert compare(a, b, match="best").layer("conv2").max_distance == 0.0  # conv2 unchanged


def test_best_match_of_unequal_layers_leaves_kernels_unpaired() -> None:
    a = _stats(zoo.chain(kernels=(4, 8)))
    b = _stats(zoo.chain(kernels=(6, 8), seed=1))
    result = compare(a, b, match="best", layers={"conv1": "conv1"})
    layer = result.layer("conv1")
    assert len(layer.pairs) == 4 and len(layer.unmatched_b) == 2 and not layer.unmatched_a
    full = cross_odm(a.aom("conv1"), b.aom("conv1"))
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(full)
    assert layer.distances.sum() == pytest.approx(full[rows, cols].sum())
    assert "unpaired: 0 of" in result.summary_lines()[1]


def test_refusals_name_what_disagrees() -> None:
    a = _stats(zoo.chain(kernels=(4, 8)))
    with pytest.raises(StatsError, match=r"'conv1' \(4 kernels\) and 'conv1' \(6\).*best"):
        compare(a, _stats(zoo.chain(kernels=(6, 8))))
    with pytest.raises(StatsError, match="different sizes"):
        compare(a, a, layers={"conv1": "conv2"})
    with pytest.raises(LayerNotFoundError, match="run b has no layer 'conv9'"):
        compare(a, a, layers={"conv1": "conv9"})
    with pytest.raises(StatsError, match="2 and 1 layers"):
        compare(a, OccurrenceStats({"conv1": a.counts["conv1"]}, a.class_sizes))
    other = OccurrenceStats(dict(a.counts), a.class_sizes, ("cat", "dog", "cow"))
    with pytest.raises(StatsError, match="different classes"):
        compare(a, other)
    with pytest.raises(StatsError, match="match must be one of"):
        compare(a, a, match="hungarian")
    with pytest.raises(StatsError, match="b is a dict"):
        compare(a, dict(a.counts))  # type: ignore[arg-type]


def test_other_settings_are_noted_and_layer_prefers_a_s_names() -> None:
    """Found by a cross-exporter sweep (2026-11-25): runs at another probe point or threshold
    were compared without a word (0.16 mean distance for one network), a run lacking the
    last classes got a message showing the same names on both sides, and ``layer(name)``
    gave the pair where ``name`` was b's layer when a's of that name came later."""
    proto = zoo.bn_kept()
    x = zoo.random_input(proto, batch=30, seed=3)
    y = np.arange(30) % 3
    base = onnxaom.collect(onnxaom.Model(proto), x, y, progress=False)
    raw = onnxaom.collect(onnxaom.Model(proto), x, y, probe="conv", progress=False)
    with pytest.warns(UserWarning, match=r"another probe point \(probe='activation' vs 'conv'"):
        result = compare(base, raw)
    assert len(result.notes) == 1 and result.summary_lines()[1].startswith("note: ")
    assert result.to_dict()["notes"] == list(result.notes)
    assert compare(base, base).notes == ()
    two = OccurrenceStats({n: c[:, :2] for n, c in base.counts.items()}, base.class_sizes[:2])
    with pytest.raises(StatsError, match="3 vs 2 classes.*num_classes="):
        compare(base, two)
    pair = compare(base, base).layers[0]  # generic names, shifted by one layer
    named = onnxaom.Comparison(
        (dataclasses.replace(pair, layer_a="x", layer_b="y"),
         dataclasses.replace(pair, layer_a="y", layer_b="z")), "index", ("0",))
    assert named.layer("y").layer_a == "y" and named.layer("z").layer_b == "z"


def test_classes_without_samples_in_one_run_are_left_out() -> None:
    a = _stats(zoo.chain())
    counts = {name: c.copy() for name, c in a.counts.items()}
    sizes = a.class_sizes.copy()
    for c in counts.values():
        c[:, 2] = 0
    sizes[2] = 0
    result = compare(a, OccurrenceStats(counts, sizes, a.class_names))
    assert result.classes == ("0", "1")
    assert all(x.max_distance == 0.0 and not x.identical for x in result.layers)


def test_cli_compare_prints_and_writes_json(tmp_path: Path, capsys) -> None:
    proto = zoo.chain()
    a = _stats(proto).save(tmp_path / "a.npz")
    b = _stats(_permuted_conv1(proto, np.array([1, 0, 2, 3]))).save(tmp_path / "b.npz")
    out = tmp_path / "cmp.json"
    assert main(["compare", str(a), str(b), "--match", "best", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "conv1 ~ conv1: 4 kernel pairs, mean distance 0.0000" in printed
    written = json.loads(out.read_text())
    assert written["match"] == "best" and written["layers"][0]["pairs"][:2] == [[0, 1], [1, 0]]
    assert main(["compare", str(a), str(b), "--layers", "conv2=conv2"]) == 0
    assert "conv2 ~ conv2" in capsys.readouterr().out
    assert main(["compare", str(a), str(b), "--layers", "conv2"]) == 1
    assert "--layers expects A=B" in capsys.readouterr().err
    assert main(["compare", str(a), str(b), "--json", str(a)]) == 1  # never overwrites an input


@pytest.mark.slow
def test_one_torch_network_through_both_exporters_counts_identically(tmp_path: Path) -> None:
    """The cross-exporter use: legacy and dynamo exports name every layer differently, but
    paired by position they fire identically on real images."""
    torch = pytest.importorskip("torch")
    from onnxaom_torch import PaperMNISTNet

    torch.manual_seed(0)
    net = PaperMNISTNet().eval()
    example = torch.randn(2, 1, 28, 28)
    legacy, dynamo = tmp_path / "legacy.onnx", tmp_path / "dynamo.onnx"
    torch.onnx.export(net, (example,), str(legacy), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    torch.onnx.export(net, (example,), str(dynamo), dynamo=True, input_names=["x"],
                      dynamic_shapes={"x": {0: torch.export.Dim("n")}})
    data = onnxaom.load_spec("digits:28")
    a = onnxaom.collect(onnxaom.load(legacy), data, progress=False)
    b = onnxaom.collect(onnxaom.load(dynamo), data, progress=False)
    assert a.layer_names != b.layer_names
    result = compare(a, b)
    assert len(result.layers) == 4 and all(x.identical for x in result.layers)
