"""Findings (tasks 1-3): hand-built AOMs with known answers, kernel order, JSON, properties."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxaom import LayerNotFoundError, ModelFileNotFoundError, OccurrenceStats, StatsError
from onnxaom.findings import (
    Findings,
    IneffectiveKernel,
    LayerFindings,
    RedundantGroup,
    ShallowSign,
    SimilarClassPair,
    Thresholds,
    TooSmallSigns,
    WeakClass,
    analyze,
    analyze_layer,
    kernel_order,
)
from onnxaom.stats import odm, selectivity

NAMES3 = ("zero", "one", "two")


def per_class(values: list[float], h: int = 2, w: int = 2) -> np.ndarray:
    """One kernel's AOM, shape (C, h, w), constant over positions: values[c] for class c."""
    return np.broadcast_to(np.asarray(values, dtype=np.float64)[:, None, None], (len(values), h, w))


def layer(*kernels: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(k, dtype=np.float64) for k in kernels])


# ------------------------------------------------------------------------------ task 1: ineffective
def test_dead_always_on_and_class_blind_kernels() -> None:
    aom = layer(
        per_class([0.005, 0.0, 0.01]),  # 0: dead (max 0.01 <= 0.01)
        per_class([0.995, 1.0, 0.99]),  # 1: always on (min 0.99 >= 0.99)
        per_class([0.50, 0.52, 0.48]),  # 2: class-blind
        per_class([0.90, 0.10, 0.10]),  # 3: selective for class 0
        per_class([0.10, 0.90, 0.20]),  # 4: selective for class 1
    )
    found = analyze_layer("conv1", aom, class_names=NAMES3).ineffective
    reasons = [(f.kernel, f.reason) for f in found]
    assert reasons == [(0, "dead"), (1, "always_on"), (2, "class_blind")]
    assert found[0].value == pytest.approx(0.01)
    assert found[1].value == pytest.approx(0.99)
    # class spread: max over classes of mean |M[c] - mean_c M| = |0.52 - 0.50| = 0.02
    assert found[2].value == pytest.approx(0.02)


def test_class_blind_is_position_aware() -> None:
    # class 0 fires at the top, class 1 at the bottom: equal means (selectivity 0) yet not blind
    top = np.array([[1.0, 1.0], [0.0, 0.0]])
    kernel = np.stack([top, top[::-1]])  # (C=2, 2, 2)
    aom = layer(kernel, per_class([0.9, 0.1]))
    assert selectivity(aom)[0] == pytest.approx(0.0)
    assert analyze_layer("c", aom, class_names=("a", "b")).ineffective == ()


def test_dead_wins_over_class_blind_and_thresholds_move_the_line() -> None:
    aom = layer(per_class([0.02, 0.02, 0.02]), per_class([0.9, 0.1, 0.1]))
    default = analyze_layer("c", aom, class_names=NAMES3).ineffective
    assert [(f.kernel, f.reason) for f in default] == [(0, "class_blind")]
    looser = analyze_layer("c", aom, class_names=NAMES3, thresholds=Thresholds(dead_below=0.05))
    assert [(f.kernel, f.reason) for f in looser.ineffective] == [(0, "dead")]



def test_a_value_on_a_threshold_falls_on_the_side_its_rule_names() -> None:
    """Occurrence fractions are ratios of counts: 0.60 - 0.55 and 0.55 - 0.50 are 0.05 on
    paper but one side of 0.05 or the other in floating point, and were decided by that."""
    n = 100
    for high, low in ((55, 50), (60, 55), (35, 30)):  # |difference| 0.05: not < 0.05
        aom = layer(per_class([high / n, low / n]), per_class([low / n, high / n]))
        assert analyze_layer("c", aom, class_names=("a", "b")).too_small.similar_pairs == ()
    for first, second in ((60, 70), (30, 40), (20, 30)):  # ODM (0.1 + 0) / 2 = 0.05: grouped
        aom = layer(per_class([first / n, 0.0]), per_class([second / n, 0.0]),
                    per_class([0.1, 0.9]))
        groups = analyze_layer("c", aom, class_names=("a", "b")).redundant_groups
        assert [sorted(g.members) for g in groups] == [[0, 1]], (first, second)
    for low, high in ((25, 35), (50, 60)):  # class spread 0.05: not < 0.05, not class-blind
        aom = layer(per_class([low / n, high / n]), per_class([0.9, 0.1]))
        assert analyze_layer("c", aom, class_names=("a", "b")).ineffective == ()

# ------------------------------------------------------------------------------ task 1: redundant
def test_near_identical_kernels_grouped_with_most_selective_as_representative() -> None:
    aom = layer(
        per_class([0.10, 0.90, 0.10]),  # 0: far from the others
        per_class([0.80, 0.20, 0.20]),  # 1
        per_class([0.20, 0.20, 0.90]),  # 2: far
        per_class([0.82, 0.18, 0.20]),  # 3: like 1, a little more selective
    )
    found = analyze_layer("c", aom, class_names=NAMES3)
    assert len(found.redundant_groups) == 1
    group = found.redundant_groups[0]
    assert set(group.members) == {1, 3}
    assert group.representative == 3
    assert group.mean_distance == pytest.approx((0.02 + 0.02 + 0.0) / 3)
    assert group.mean_distance == pytest.approx(odm(aom)[1, 3])
    s = selectivity(aom)
    assert group.selectivities == tuple(s[list(group.members)])
    # members are listed in kernel order, and sit next to each other in it
    order = list(found.kernel_order)
    positions = sorted(order.index(m) for m in group.members)
    assert [order.index(m) for m in group.members] == positions
    assert positions[1] - positions[0] == 1


def test_identical_kernels_tie_goes_to_lowest_index() -> None:
    k = per_class([0.7, 0.1, 0.3])
    aom = layer(per_class([0.1, 0.9, 0.1]), k, per_class([0.2, 0.1, 0.9]), k, k)
    groups = analyze_layer("c", aom, class_names=NAMES3).redundant_groups
    assert len(groups) == 1
    assert groups[0].members == (1, 3, 4)
    assert groups[0].representative == 1
    assert groups[0].mean_distance == 0.0


def test_redundancy_distance_cuts_the_tree() -> None:
    aom = layer(per_class([0.80, 0.20, 0.20]), per_class([0.70, 0.30, 0.20]))  # ODM 0.0667
    assert analyze_layer("c", aom, class_names=NAMES3).redundant_groups == ()
    loose = Thresholds(redundancy_distance=0.1)
    assert len(analyze_layer("c", aom, class_names=NAMES3, thresholds=loose).redundant_groups) == 1


# ------------------------------------------------------------------------------ task 2: too small
def test_class_pair_alike_in_every_kernel() -> None:
    aom = layer(
        per_class([0.9, 0.2, 0.2]),
        per_class([0.1, 0.6, 0.62]),
        per_class([0.3, 0.95, 0.95]),
    )
    pairs = analyze_layer("c", aom, class_names=NAMES3).too_small.similar_pairs
    assert len(pairs) == 1
    assert (pairs[0].classes, pairs[0].names, pairs[0].kernel) == ((1, 2), ("one", "two"), 1)
    assert pairs[0].value == pytest.approx(0.02)  # kernel 1 separates them best: |0.6 - 0.62|


def test_weak_class_ignores_ineffective_kernels() -> None:
    aom = layer(
        per_class([0.95, 0.10, 0.40]),
        per_class([0.10, 0.90, 0.50]),  # best for class "two": 0.5
        per_class([1.00, 1.00, 1.00]),  # always on: would otherwise cover class "two"
    )
    weak = analyze_layer("c", aom, class_names=NAMES3).too_small.weak_classes
    assert weak == (WeakClass(2, "two", 0.5, 1),)


def test_weak_class_uses_best_position() -> None:
    kernel = np.zeros((2, 2, 2))
    kernel[0, 0, 0] = 0.9  # class a: one position at 0.9, mean 0.225
    kernel[1] = 0.8  # class b: 0.8 everywhere
    found = analyze_layer("c", layer(kernel), class_names=("a", "b"))
    assert found.too_small.weak_classes == ()
    assert not found.too_small.raised


# ------------------------------------------------------------------------------ task 3: shallow
def test_every_kernel_firing_for_every_class_raises_the_shallow_sign() -> None:
    aom = layer(
        per_class([0.9, 0.8, 0.7]),
        per_class([0.6, 0.9, 0.9]),
        per_class([0.7, 0.7, 0.95]),
        per_class([0.8, 0.6, 0.6]),
    )
    sign = analyze_layer("last", aom, class_names=NAMES3, last_conv=True).shallow
    assert sign == ShallowSign(4, 3, 2, (0, 1, 2, 3), 1.0, True)


def test_class_specific_kernels_raise_no_shallow_sign() -> None:
    aom = layer(per_class([0.9, 0.1, 0.1]), per_class([0.1, 0.9, 0.1]), per_class([0.1, 0.2, 0.9]))
    sign = analyze_layer("last", aom, class_names=NAMES3, last_conv=True).shallow
    assert sign is not None
    assert sign.unspecific == ()
    assert not sign.raised
    assert analyze_layer("mid", aom, class_names=NAMES3).shallow is None


def test_many_classes_is_a_fraction_of_classes() -> None:
    aom = np.full((2, 10, 1, 1), 0.1)
    aom[0, :3] = 0.9  # fires for 3 of 10 classes
    t = Thresholds(many_classes=0.3, unspecific_fraction=0.5)
    sign = analyze_layer(
        "x", aom, class_names=[str(i) for i in range(10)], thresholds=t, last_conv=True
    ).shallow
    assert sign is not None
    assert (sign.min_classes, sign.unspecific, sign.raised) == (3, (0,), True)


# ------------------------------------------------------------------------------ kernel order
def test_kernel_order_small_cases_and_identical_rows() -> None:
    assert kernel_order(np.full((1, 2, 3, 3), 0.4)).tolist() == [0]
    assert kernel_order(layer(per_class([0.1, 0.2]), per_class([0.9, 0.8]))).tolist() == [0, 1]
    assert kernel_order(np.full((2, 2, 1, 1), 0.4)).tolist() == [0, 1]
    assert kernel_order(np.full((6, 3, 2, 2), 0.4)).tolist() == list(range(6))
    order = kernel_order(np.full((6, 3, 2, 2), 0.4))
    assert order.dtype == np.int64
    assert order.shape == (6,)


def test_kernel_order_puts_similar_kernels_together_and_is_repeatable() -> None:
    a, b = per_class([0.9, 0.1, 0.1]), per_class([0.1, 0.1, 0.9])
    aom = layer(a, b, a, b, a, b)
    order = kernel_order(aom).tolist()
    assert order == [0, 2, 4, 1, 3, 5]
    rng = np.random.default_rng(3)
    noisy = rng.random((12, 4, 3, 3))
    noisy[5] = noisy[2]
    first = kernel_order(noisy)
    for _ in range(5):
        np.testing.assert_array_equal(kernel_order(noisy.copy()), first)
    assert sorted(first.tolist()) == list(range(12))


def test_kernel_order_matches_layer_findings_and_ignores_empty_classes() -> None:
    rng = np.random.default_rng(7)
    aom = rng.random((7, 3, 2, 2))
    with_empty = np.concatenate([aom, np.full((7, 1, 2, 2), np.nan)], axis=1)
    found = analyze_layer("c", with_empty, class_names=(*NAMES3, "none"))
    assert found.kernel_order == tuple(kernel_order(aom).tolist())
    assert found.kernel_order == tuple(kernel_order(with_empty).tolist())
    assert found.skipped_classes == ("none",)
    assert found == analyze_layer("c", with_empty, class_names=(*NAMES3, "none"))


# ------------------------------------------------------------------------------ input checks
@pytest.mark.parametrize(
    ("aom", "names", "match"),
    [
        (np.zeros((2, 3, 4)), NAMES3, "shape"),
        (np.zeros((0, 3, 1, 1)), NAMES3, "empty"),
        (np.full((2, 3, 1, 1), 1.5), NAMES3, r"\[0, 1\]"),
        (np.zeros((2, 3, 1, 1)), ("a", "b"), "class names"),
        (
            np.concatenate([np.zeros((2, 1, 1, 1)), np.full((2, 2, 1, 1), np.nan)], 1),
            NAMES3,
            "at least 2 classes",
        ),
        (np.where(np.eye(2, 3)[:, :, None, None] > 0, np.nan, 0.5), NAMES3, "outside whole"),
        (np.full((2, 3, 1, 1), np.inf), NAMES3, "infinite"),
    ],
)
def test_bad_aoms_raise_stats_error(aom: np.ndarray, names: tuple[str, ...], match: str) -> None:
    with pytest.raises(StatsError, match=match):
        analyze_layer("conv9", aom, class_names=names)


@pytest.mark.parametrize(
    "name",
    [
        "dead_below",
        "always_above",
        "class_blind_below",
        "redundancy_distance",
        "class_pair_below",
        "weak_class_below",
        "fires_above",
        "many_classes",
        "unspecific_fraction",
    ],
)
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.1", True])
def test_invalid_thresholds_name_the_parameter(name: str, value: object) -> None:
    with pytest.raises(StatsError, match=name):
        Thresholds(**{name: value})  # type: ignore[arg-type]


def test_threshold_edges_and_consistency() -> None:
    Thresholds(dead_below=0.0, always_above=1.0, redundancy_distance=0.0, many_classes=1.0)
    with pytest.raises(StatsError, match="must be below always_above"):
        Thresholds(dead_below=0.5, always_above=0.5)
    with pytest.raises(StatsError, match="fires_above"):
        Thresholds(fires_above=0.0)
    with pytest.raises(StatsError, match="bogus"):
        Thresholds.from_dict({"bogus": 0.1})
    assert Thresholds.from_dict(Thresholds().to_dict()) == Thresholds()
    assert isinstance(StatsError("x"), ValueError)


# ------------------------------------------------------------------------------ JSON
def sample_findings() -> Findings:
    aom = layer(
        per_class([0.0, 0.0, 0.0]),
        per_class([0.8, 0.2, 0.2]),
        per_class([0.81, 0.2, 0.21]),
        per_class([0.1, 0.5, 0.5]),
    )
    return Findings(
        (
            analyze_layer("conv1", aom, class_names=NAMES3),
            analyze_layer("conv2", aom[:, :, :1, :1], class_names=NAMES3, last_conv=True),
        ),
        Thresholds(redundancy_distance=0.04),
        NAMES3,
    )


def test_json_round_trip(tmp_path: Path) -> None:
    findings = sample_findings()
    assert findings.layer("conv1").ineffective_kernels == (0,)
    assert findings.layer("conv2").shallow is not None
    data = json.loads(json.dumps(findings.to_dict(), allow_nan=False))
    assert Findings.from_dict(data) == findings
    path = findings.to_json(tmp_path / "findings.json")
    assert path == tmp_path / "findings.json"
    assert [p.name for p in tmp_path.iterdir()] == ["findings.json"]  # no temporary left over
    assert Findings.from_json(path) == findings


def test_every_record_round_trips_on_its_own() -> None:
    records: list[Any] = [
        IneffectiveKernel(3, "class_blind", 0.01),
        RedundantGroup((4, 1), 1, 0.02, (1.5, 2.0)),
        SimilarClassPair((0, 2), ("a", "c"), 0.03, 5),
        WeakClass(1, "b", 0.0, None),
        TooSmallSigns((SimilarClassPair((0, 1), ("a", "b"), 0.0, 0),), ()),
        ShallowSign(4, 3, 2, (0, 2), 0.5, True),
        Thresholds(),
    ]
    for record in records:
        text = json.dumps(record.to_dict())
        assert type(record).from_dict(json.loads(text)) == record


def test_bad_findings_files(tmp_path: Path) -> None:
    good = sample_findings().to_dict()
    with pytest.raises(StatsError, match="format"):
        Findings.from_dict({"layers": []})
    with pytest.raises(StatsError, match="version"):
        Findings.from_dict({**good, "version": 99})
    with pytest.raises(StatsError, match="malformed"):
        Findings.from_dict({**good, "layers": [{"name": "conv1"}]})
    with pytest.raises(StatsError, match="reason"):
        IneffectiveKernel.from_dict({"kernel": 0, "reason": "sleepy", "value": 0.0})
    with pytest.raises(ModelFileNotFoundError):
        sample_findings().to_json(tmp_path / "missing" / "f.json")
    with pytest.raises(ModelFileNotFoundError):
        Findings.from_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StatsError, match="cannot read"):
        Findings.from_json(tmp_path / "bad.json")
    with pytest.raises(LayerNotFoundError, match="conv1, conv2"):
        sample_findings().layer("conv3")


def test_summary_lines_say_it_in_words() -> None:
    lines = sample_findings().summary_lines()
    text = "\n".join(lines)
    assert "conv1: 1 of 4 kernels ineffective (1 dead): kernels 0" in text
    assert "conv1: kernels 2, 1 behave alike (keep 2, the most selective" in text  # kernel order
    assert "'one'/'two'" in text
    assert "conv2 (last conv layer)" in text
    assert all(isinstance(line, str) and "\n" not in line for line in lines)
    quiet = Findings(
        (
            analyze_layer(
                "q", layer(per_class([0.9, 0.1]), per_class([0.1, 0.9])), class_names=("a", "b")
            ),
        )
    )
    assert quiet.summary_lines() == ["q: 2 kernels, nothing to report"]


# ------------------------------------------------------------------------------ analyze(stats)
def random_stats(
    shapes: dict[str, tuple[int, int, int]], sizes: tuple[int, ...], seed: int = 0
) -> OccurrenceStats:
    rng = np.random.default_rng(seed)
    size = np.array(sizes, dtype=np.int64)
    counts = {
        name: rng.integers(0, size[None, :, None, None] + 1, size=(k, len(sizes), h, w))
        for name, (k, h, w) in shapes.items()
    }
    return OccurrenceStats(counts, size, tuple(f"class{i}" for i in range(len(sizes))))


def test_analyze_real_stats() -> None:
    stats = random_stats({"conv1": (4, 5, 5), "conv2": (6, 3, 3), "fc": (5, 1, 1)}, (20, 30, 25))
    findings = analyze(stats)
    assert findings.layer_names == ("conv1", "conv2", "fc")
    assert analyze(stats, layers="conv2").layer_names == ("conv2",)  # one name, not its letters
    assert findings.class_names == stats.class_names
    assert [lf.shallow is not None for lf in findings.layers] == [False, True, False]
    for lf in findings.layers:
        direct = analyze_layer(
            lf.name, stats.aom(lf.name), class_names=stats.class_names, last_conv=lf.name == "conv2"
        )
        assert lf == direct
        assert sorted(lf.kernel_order) == list(range(stats.counts[lf.name].shape[0]))
        s = stats.selectivity(lf.name)
        for g in lf.redundant_groups:
            assert g.selectivities == pytest.approx(tuple(s[list(g.members)]))
    assert Findings.from_dict(json.loads(json.dumps(findings.to_dict()))) == findings
    assert len(findings.summary_lines()) >= 3


def test_no_shallow_sign_when_the_models_last_conv_was_not_collected() -> None:
    """Statistics of conv1 alone (collect(layers=[conv1])) do not make conv1 the last conv:
    collect records the model's last Conv, and the sign is measured only there."""
    import onnxaom

    from . import zoo

    model = onnxaom.Model(zoo.chain())
    convs = [layer.name for layer in model.layers() if layer.op == "Conv"]
    images = zoo.random_input(model.proto, batch=12, seed=0)
    labels = np.arange(12) % 3
    first = onnxaom.collect(model, images, labels, layers=convs[:1], progress=False)
    assert first.metadata["last_conv"] == convs[-1]
    assert analyze(first).layer(convs[0]).shallow is None
    everything = onnxaom.collect(model, images, labels, progress=False)
    assert analyze(everything).layer(convs[-1]).shallow is not None
    hand_made = OccurrenceStats(first.counts, first.class_sizes)  # no metadata: as before
    assert analyze(hand_made).layer(convs[0]).shallow is not None


def test_shallow_sign_on_the_last_conv_even_when_its_map_is_one_position() -> None:
    """probe="pool" leaves the last conv a 1x1 map here: the sign is still measured there (the
    layer collect recorded), not on the earlier conv that has more positions."""
    import onnxaom

    from . import zoo

    model = onnxaom.Model(zoo.chain(size=4))
    images = zoo.random_input(model.proto, batch=30, seed=0)
    stats = onnxaom.collect(model, images, np.arange(30) % 3, probe="pool", progress=False)
    last = stats.metadata["last_conv"]
    assert stats.counts[last].shape[2:] == (1, 1)
    assert [lf.name for lf in analyze(stats).layers if lf.shallow is not None] == [last]


def test_analyze_layer_selection_and_last_layer_rules() -> None:
    stats = random_stats({"conv1": (4, 5, 5), "conv2": (6, 3, 3), "fc": (5, 1, 1)}, (20, 30, 25))
    only = analyze(stats, layers=["fc", "conv1"])
    assert only.layer_names == ("conv1", "fc")  # model order
    assert all(lf.shallow is None for lf in only.layers)  # conv2, the last conv, not asked for
    with pytest.raises(LayerNotFoundError, match="conv1, conv2, fc"):
        analyze(stats, layers=["conv7"])
    dense = random_stats({"fc1": (4, 1, 1), "fc2": (3, 1, 1)}, (10, 10))
    assert [lf.shallow is not None for lf in analyze(dense).layers] == [False, True]
    with pytest.raises(StatsError, match="Thresholds"):
        not_thresholds: Any = {"dead_below": 0.1}
        analyze_layer(
            "c", np.zeros((1, 2, 1, 1)), class_names=("a", "b"), thresholds=not_thresholds
        )


def test_analyze_leaves_out_classes_without_samples_with_a_note() -> None:
    stats = random_stats({"conv1": (4, 3, 3), "conv2": (3, 2, 2)}, (20, 0, 25))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the NaN warning of stats.aom is replaced by the note
        findings = analyze(stats)
    for lf in findings.layers:
        assert lf.skipped_classes == ("class1",)
        assert all(1 not in p.classes for p in lf.too_small.similar_pairs)
        assert all(w.class_index != 1 for w in lf.too_small.weak_classes)
    notes = [line for line in findings.summary_lines() if line.startswith("note")]
    assert notes == ["note (conv1, conv2): classes with no samples (NaN AOM) were left out: class1"]
    one_class = random_stats({"conv1": (2, 2, 2)}, (0, 5))
    with pytest.raises(StatsError, match="at least 2 classes"):
        analyze(one_class)


# ------------------------------------------------------------------------------ properties
LEVELS = [0.0, 0.25, 0.5, 0.75, 1.0]  # few values: many ties and identical rows
aoms = st.tuples(
    st.integers(1, 7), st.integers(2, 4), st.integers(1, 3), st.integers(1, 3)
).flatmap(
    lambda shape: st.one_of(
        hnp.arrays(np.float64, shape, elements=st.sampled_from(LEVELS)),
        hnp.arrays(np.float64, shape, elements=st.floats(0.0, 1.0)),
    )
)


@settings(max_examples=60, deadline=None)
@given(aoms)
def test_kernel_order_is_a_deterministic_permutation(aom: np.ndarray) -> None:
    order = kernel_order(aom)
    assert sorted(order.tolist()) == list(range(aom.shape[0]))
    np.testing.assert_array_equal(kernel_order(aom.copy()), order)


@settings(max_examples=60, deadline=None)
@given(aoms, st.sampled_from([0.0, 0.05, 0.2, 0.5]))
def test_groups_partition_a_subset_with_the_most_selective_representative(
    aom: np.ndarray, distance: float
) -> None:
    found = analyze_layer(
        "c",
        aom,
        class_names=[str(i) for i in range(aom.shape[1])],
        thresholds=Thresholds(redundancy_distance=distance),
    )
    k = aom.shape[0]
    s = selectivity(aom)
    d = odm(aom)
    seen: set[int] = set()
    order = list(found.kernel_order)
    for g in found.redundant_groups:
        assert len(g.members) >= 2
        assert not seen & set(g.members)
        seen |= set(g.members)
        assert set(g.members) <= set(range(k))
        assert g.representative in g.members
        best = max(s[list(g.members)])
        assert s[g.representative] == pytest.approx(best, rel=1e-9, abs=1e-12)
        better = [m for m in g.members if m < g.representative]
        assert all(s[m] < best - 1e-12 for m in better)  # ties go to the lowest index
        positions = [order.index(m) for m in g.members]
        assert positions == sorted(positions)  # members follow the display order
        assert not set(g.members) & set(found.ineffective_kernels)
        assert g.mean_distance <= distance + 1e-12  # average linkage: mean pair distance <= cut
    # identical effective kernels always share a group (ineffective ones are reported as such)
    effective = set(range(k)) - set(found.ineffective_kernels)
    for i in sorted(effective):
        for j in sorted(effective):
            if i < j and d[i, j] == 0.0:
                assert any({i, j} <= set(g.members) for g in found.redundant_groups)


@settings(max_examples=40, deadline=None)
@given(aoms)
def test_layer_findings_round_trip_through_json(aom: np.ndarray) -> None:
    found = analyze_layer(
        "c", aom, class_names=[str(i) for i in range(aom.shape[1])], last_conv=True
    )
    text = json.dumps(found.to_dict(), allow_nan=False)
    assert LayerFindings.from_dict(json.loads(text)) == found


def test_large_layers_keep_the_clusterings_own_leaf_order(monkeypatch) -> None:
    """Above OPTIMAL_ORDER_MAX_KERNELS the order is the linkage's leaf order (optimal ordering
    costs about the cube of the kernel count): still a deterministic permutation, with the
    same clusters and redundant groups."""
    import onnxaom.findings as findings_module

    rng = np.random.default_rng(0)
    aom = rng.random((12, 3, 2, 2))
    aom[5] = aom[2]  # one redundant pair
    small = analyze_layer("fc", aom, class_names=NAMES3)
    monkeypatch.setattr(findings_module, "OPTIMAL_ORDER_MAX_KERNELS", 4)
    large = analyze_layer("fc", aom, class_names=NAMES3)
    assert sorted(large.kernel_order) == list(range(12))
    assert list(large.kernel_order) == list(analyze_layer("fc", aom, class_names=NAMES3)
                                            .kernel_order)
    assert sorted(g.members for g in large.redundant_groups) == \
        sorted(g.members for g in small.redundant_groups)
    assert any(set(g.members) >= {2, 5} for g in large.redundant_groups)


@settings(max_examples=80, deadline=None)
@given(aoms, st.sampled_from([0.05, 0.2, 0.5, 1.0]))
def test_similar_pairs_equal_a_brute_force_reference(aom: np.ndarray, below: float) -> None:
    """Task 2's class pairs against the definition, pair by pair and kernel by kernel: the
    largest mean |M[k, a] - M[k, b]| over kernels, below the threshold, reached first by the
    lowest kernel (a tie to rounding is a tie)."""
    k, c = aom.shape[:2]
    found = analyze_layer("c", aom, class_names=[str(i) for i in range(c)],
                          thresholds=Thresholds(class_pair_below=below)).too_small.similar_pairs
    want = []
    for a in range(c):
        for b in range(a + 1, c):
            diff = [float(np.abs(aom[kernel, a] - aom[kernel, b]).mean()) for kernel in range(k)]
            best = max(diff)
            if best < below - 1e-9:
                first = min(j for j in range(k) if diff[j] >= best - 1e-12)
                want.append(((a, b), first, best))
    assert [(p.classes, p.kernel) for p in found] == [(w[0], w[1]) for w in want]
    np.testing.assert_allclose([p.value for p in found], [w[2] for w in want], atol=1e-12)
