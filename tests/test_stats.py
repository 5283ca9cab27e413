"""OccurrenceStats: eqs. 1-4 on hand-worked cases, brute-force checks, merging, persistence."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxaom import LayerNotFoundError, OccurrenceStats, StatsError


def two_by_two() -> OccurrenceStats:
    # kernel 0: all of class 0 positive, none of class 1; kernel 1: half of class 0, all of class 1
    counts = np.array([[[[2]], [[0]]], [[[1]], [[4]]]], dtype=np.int64)  # (K=2, C=2, 1, 1)
    return OccurrenceStats({"conv": counts}, np.array([2, 4]), ("a", "b"), {"model_digest": "x"})


def test_eq1_aom_is_fraction_of_class_samples() -> None:
    aom = two_by_two().aom("conv")
    np.testing.assert_array_equal(aom[:, :, 0, 0], [[1.0, 0.0], [0.5, 1.0]])


def test_eq2_odm_hand_worked() -> None:
    d = two_by_two().odm("conv")
    # (|1 - 0.5| + |0 - 1|) / (C=2 * H*W=1)
    np.testing.assert_allclose(d, [[0.0, 0.75], [0.75, 0.0]])


def test_eq3_csm_two_classes_is_plain_difference() -> None:
    s = two_by_two().csm("conv")[:, :, 0, 0]
    np.testing.assert_allclose(s, [[1.0, -1.0], [-0.5, 0.5]])


def test_eq4_selectivity_counts_ordered_pairs() -> None:
    np.testing.assert_allclose(two_by_two().selectivity("conv"), [4.0, 2.0])


def test_three_classes_hand_worked() -> None:
    # one kernel, 3 classes, 1x2 positions; class sizes 2 each
    m = np.array([[1, 1], [0, 0], [0.5, 0]])  # M[c, w]
    counts = (m * 2).astype(np.int64)[None, :, None, :]  # (1, 3, 1, 2)
    stats = OccurrenceStats({"k": counts}, np.array([2, 2, 2]))
    s = stats.csm("k")[0, :, 0, :]
    np.testing.assert_allclose(s[0], [(1 - 0 + 1 - 0.5) / 2, (1 - 0 + 1 - 0) / 2])
    np.testing.assert_allclose(s[1], [(0 - 1 + 0 - 0.5) / 2, (0 - 1 + 0 - 0) / 2])
    np.testing.assert_allclose(stats.class_selectivity("k")[0], [0.875, -0.625, -0.25])
    np.testing.assert_allclose(stats.selectivity("k"), [2 * (1.5 + 1.125 + 0.375)])


def brute_force(counts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, ...]:
    """Direct loops over the paper's equations."""
    k, c, h, w = counts.shape
    m = np.zeros(counts.shape)
    for ki, ci, hi, wi in itertools.product(range(k), range(c), range(h), range(w)):
        m[ki, ci, hi, wi] = counts[ki, ci, hi, wi] / sizes[ci]
    d = np.zeros((k, k))
    for a, b in itertools.product(range(k), repeat=2):
        d[a, b] = sum(
            abs(m[a, ci, hi, wi] - m[b, ci, hi, wi])
            for ci, hi, wi in itertools.product(range(c), range(h), range(w))
        ) / (c * h * w)
    s = np.zeros(counts.shape)
    for ki, ci, hi, wi in itertools.product(range(k), range(c), range(h), range(w)):
        s[ki, ci, hi, wi] = sum(
            m[ki, ci, hi, wi] - m[ki, di, hi, wi] for di in range(c) if di != ci
        ) / (c - 1)
    sel = np.zeros(k)
    for ki in range(k):
        avg = [s[ki, ci].mean() for ci in range(c)]
        sel[ki] = sum(abs(avg[c0] - avg[c1]) for c0 in range(c) for c1 in range(c) if c0 != c1)
    return m, d, s, sel


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(2, 4), st.integers(1, 3), st.integers(1, 3)),
    data=st.data(),
)
def test_matrices_equal_brute_force(shape: tuple[int, int, int, int], data: st.DataObject) -> None:
    _, c, _, _ = shape
    sizes = data.draw(hnp.arrays(np.int64, (c,), elements=st.integers(1, 20)))
    frac = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(0, 1)))
    counts = np.floor(frac * sizes[None, :, None, None]).astype(np.int64)
    stats = OccurrenceStats({"L": counts}, sizes)
    m, d, s, sel = brute_force(counts, sizes)
    np.testing.assert_allclose(stats.aom("L"), m)
    np.testing.assert_allclose(stats.odm("L"), d, atol=1e-12)
    np.testing.assert_allclose(stats.csm("L"), s, atol=1e-12)
    np.testing.assert_allclose(stats.selectivity("L"), sel, atol=1e-9)


def random_stats(seed: int, sizes: list[int], meta: dict | None = None) -> OccurrenceStats:
    rng = np.random.default_rng(seed)
    most = np.asarray(sizes)[None, :, None, None] + 1  # a count is at most its class's size
    counts = {
        "a": rng.integers(0, most, size=(3, len(sizes), 2, 2)),
        "b": rng.integers(0, most, size=(5, len(sizes), 1, 1)),
    }
    return OccurrenceStats(counts, np.array(sizes), metadata=meta or {"model_digest": "d"})


def test_counts_no_collection_can_make_are_refused() -> None:
    """A count above its class's size, or negative, gave AOMs of 3.0 or -0.67 and an ODM of 2
    without a sign (and later an error about passing CSMs)."""
    sizes = np.array([3, 3, 0])
    with pytest.raises(StatsError, match=r"layer 'L' exceed the size of class 'b': 4 of its 3"):
        OccurrenceStats({"L": np.array([1, 4, 0]).reshape(1, 3, 1, 1)}, sizes, ("a", "b", "c"))
    with pytest.raises(StatsError, match=r"class 'c': 1 of its 0"):  # an empty class counts 0
        OccurrenceStats({"L": np.array([1, 1, 1]).reshape(1, 3, 1, 1)}, sizes, ("a", "b", "c"))
    with pytest.raises(StatsError, match=r"layer 'L' must be >= 0"):
        OccurrenceStats({"L": np.array([1, -2, 0]).reshape(1, 3, 1, 1)}, sizes)
    with pytest.raises(StatsError, match=r"class_sizes must be >= 0"):
        OccurrenceStats({}, np.array([3, -1]))
    ok = OccurrenceStats({"L": np.array([3, 0, 0]).reshape(1, 3, 1, 1)}, sizes)
    assert ok.counts["L"].max() == 3
    one = OccurrenceStats({"L": np.array([1, 0]).reshape(1, 2, 1, 1)}, np.array([3, 0]),
                          ("a", "b"))
    with pytest.raises(StatsError, match=r"at least 2 classes with samples; 1 of the 2 classes "
                                         r"have any \(a\)"):  # it said "the statistics have 1"
        one.selectivity("L")

def test_merge_adds_counts_exactly() -> None:
    x, y = random_stats(0, [4, 5]), random_stats(1, [2, 3])
    merged = x + y
    for name in ("a", "b"):
        np.testing.assert_array_equal(merged.counts[name], x.counts[name] + y.counts[name])
        assert merged.counts[name].dtype == np.int64
    np.testing.assert_array_equal(merged.class_sizes, [6, 8])
    assert merged.metadata["num_samples"] == 14


def test_merge_pads_classes_seen_only_in_one_run() -> None:
    x, y = random_stats(0, [4, 5]), random_stats(1, [2, 3, 7])
    merged = x + y
    assert merged.num_classes == 3
    np.testing.assert_array_equal(merged.counts["a"][:, 2], y.counts["a"][:, 2])


def test_sum_of_runs_merges_them() -> None:
    runs = [random_stats(i, [2, 3]) for i in range(3)]
    total = sum(runs)
    assert isinstance(total, OccurrenceStats)
    np.testing.assert_array_equal(total.counts["a"], sum(r.counts["a"] for r in runs))
    with pytest.raises(TypeError):
        1 + runs[0]  # only 0, sum()'s start, stands for "no statistics yet"


def test_merge_of_other_layers_names_the_layers_that_differ() -> None:
    x = random_stats(0, [1, 1])
    y = OccurrenceStats({"a": x.counts["a"], "c": x.counts["b"]}, x.class_sizes,
                        metadata={"model_digest": "d", "layers": ["a", "c"]})
    with pytest.raises(StatsError, match="only the first has 'b'; only the second has 'c'"):
        x + y


def test_merge_refuses_other_model() -> None:
    with pytest.raises(StatsError, match="model_digest"):
        random_stats(0, [1, 1]) + random_stats(1, [1, 1], {"model_digest": "other"})


def test_merge_refuses_other_class_names() -> None:
    x = OccurrenceStats({"a": np.zeros((1, 2, 1, 1), np.int64)}, np.array([1, 1]), ("cat", "dog"))
    y = OccurrenceStats({"a": np.zeros((1, 2, 1, 1), np.int64)}, np.array([1, 1]), ("dog", "cat"))
    with pytest.raises(StatsError, match="class names"):
        x + y


def test_save_load_round_trip(tmp_path) -> None:
    stats = random_stats(3, [2, 2], {"model_digest": "d", "layers": [{"name": "a/b"}]})
    path = stats.save(tmp_path / "s.npz")
    back = OccurrenceStats.load(path)
    assert back.layer_names == stats.layer_names
    assert back.class_names == stats.class_names
    assert dict(back.metadata) == json.loads(json.dumps(dict(stats.metadata)))
    for name in stats.layer_names:
        np.testing.assert_array_equal(back.counts[name], stats.counts[name])
        assert back.counts[name].dtype == np.int64
    assert not list(tmp_path.glob(".onnxaom-*"))  # no temporary file left behind


def test_load_rejects_other_npz(tmp_path) -> None:
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(StatsError, match="x.npz"):
        OccurrenceStats.load(tmp_path / "x.npz")


def test_results_are_read_only() -> None:
    stats = two_by_two()
    with pytest.raises(ValueError):
        stats.counts["conv"][0, 0, 0, 0] = 5
    with pytest.raises(TypeError):
        stats.counts["new"] = np.zeros(1)  # type: ignore[index]


def test_read_only_arrays_and_nested_metadata_cannot_be_changed_back() -> None:
    """Found by an API review (2026-11-25): ``setflags(write=True)`` undid the read-only flag of
    the counts, and ``metadata["preprocessing"]["scale"] = ...`` changed the statistics in
    place; both left the cached digest stale."""
    stats = random_stats(0, [3, 4], {"model_digest": "d", "preprocessing": {"scale": 0.5},
                                     "layers": [{"name": "a"}]})
    digest = stats.digest
    for array in (stats.counts["a"], stats.class_sizes):
        with pytest.raises(ValueError):
            array.setflags(write=True)
    stats.metadata["preprocessing"]["scale"] = 1.0
    stats.metadata["layers"].append({"name": "z"})
    assert stats.metadata["preprocessing"] == {"scale": 0.5}
    assert stats.metadata["layers"] == [{"name": "a"}]
    assert dict(stats.metadata)["preprocessing"] == {"scale": 0.5}
    assert json.loads(json.dumps(dict(stats.metadata)))["layers"] == [{"name": "a"}]
    assert stats.digest == digest == random_stats(0, [3, 4], {
        "model_digest": "d", "preprocessing": {"scale": 0.5}}).digest


def test_statistics_pickle_copy_and_compare_by_content() -> None:
    """``pickle`` failed on the read-only mappings (multiprocessing, joblib), and ``==`` raised
    numpy's "truth value of an array is ambiguous"."""
    import copy
    import pickle

    stats = random_stats(1, [2, 5])
    for again in (pickle.loads(pickle.dumps(stats)), copy.deepcopy(stats)):  # noqa: S301
        assert again == stats and hash(again) == hash(stats)
        assert again.metadata == stats.metadata and again.layer_names == stats.layer_names
        np.testing.assert_array_equal(again.counts["b"], stats.counts["b"])
        # made again through the constructor: pickle keeps no WRITEABLE flag (a review)
        assert not again.counts["b"].flags.writeable and not again.class_sizes.flags.writeable
    assert stats in [stats] and stats != random_stats(2, [2, 5]) and stats != "stats"
    assert len({stats, copy.deepcopy(stats)}) == 1


def test_unknown_layer_names_the_known_ones() -> None:
    with pytest.raises(LayerNotFoundError, match="conv"):
        two_by_two().aom("nope")


def test_empty_class_gives_nan_with_warning() -> None:
    stats = OccurrenceStats({"a": np.zeros((1, 2, 1, 1), np.int64)}, np.array([3, 0]))
    with pytest.warns(RuntimeWarning, match="no samples"):
        aom = stats.aom("a")
    assert np.isnan(aom[0, 1]).all() and not np.isnan(aom[0, 0]).any()


def test_csm_needs_two_classes() -> None:
    stats = OccurrenceStats({"a": np.zeros((1, 1, 1, 1), np.int64)}, np.array([3]))
    with pytest.raises(StatsError, match="2 classes"):
        stats.csm("a")


def test_bad_construction() -> None:
    with pytest.raises(StatsError, match="shape"):
        OccurrenceStats({"a": np.zeros((1, 3, 1, 1), np.int64)}, np.array([1, 1]))
    with pytest.raises(StatsError, match="integers"):
        OccurrenceStats({"a": np.zeros((1, 2, 1, 1))}, np.array([1, 1]))


@settings(max_examples=30, deadline=None)
@given(aom=hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 3),
                                            st.integers(1, 3), st.integers(1, 3)),
                      elements=st.floats(0, 1)))
def test_mirrored_odm_equals_brute_force(aom: np.ndarray) -> None:
    from onnxaom.stats import mirrored_odm

    k = aom.shape[0]
    want = np.array([[min(np.mean(np.abs(aom[i] - aom[j])), np.mean(np.abs(aom[i] - (1 - aom[j]))))
                      for j in range(k)] for i in range(k)])
    got = mirrored_odm(aom)
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(got, got.T, atol=1e-12)


def test_mirrored_odm_puts_a_kernel_and_its_complement_together() -> None:
    from onnxaom.stats import mirrored_odm, odm

    garment = np.array([[[[1.0, 0.0], [1.0, 0.0]]], [[[0.0, 1.0], [0.0, 1.0]]]])  # (K=2, C=1, 2, 2)
    background = 1.0 - garment
    aom = np.concatenate([garment[:1], background[:1]])
    assert odm(aom)[0, 1] == 1.0
    assert mirrored_odm(aom)[0, 1] == 0.0


def test_a_class_without_samples_is_left_out_of_eqs_2_to_4() -> None:
    """With allow_empty_classes the empty class's AOM is NaN; the ODM, the other classes' CSM
    and the selectivity are those of the classes with samples, not NaN everywhere."""
    import warnings

    rng = np.random.default_rng(8)
    counts = rng.integers(0, 6, size=(5, 4, 2, 3)).astype(np.int64)
    sizes = np.array([6, 6, 0, 6])
    counts[:, 2] = 0
    with_empty = OccurrenceStats({"l": counts}, sizes, ("a", "b", "gone", "d"))
    without = OccurrenceStats({"l": counts[:, [0, 1, 3]]}, sizes[[0, 1, 3]], ("a", "b", "d"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the NaN AOM is announced
        np.testing.assert_allclose(with_empty.odm("l"), without.odm("l"))
        np.testing.assert_allclose(with_empty.selectivity("l"), without.selectivity("l"))
        csm_ = with_empty.csm("l")
        assert np.isnan(csm_[:, 2]).all()
        np.testing.assert_allclose(csm_[:, [0, 1, 3]], without.csm("l"))
        cs = with_empty.class_selectivity("l")
        assert np.isnan(cs[:, 2]).all()
        np.testing.assert_allclose(cs[:, [0, 1, 3]], without.class_selectivity("l"))


def test_class_names_must_be_distinct() -> None:
    """Repeated names drew two classes' tiles in one column of the grids."""
    with pytest.raises(StatsError, match=r"repeated: \['same'\]"):
        OccurrenceStats({"a": np.zeros((1, 3, 1, 1), np.int64)}, np.array([1, 1, 1]),
                        ("same", "same", "other"))


def test_constructor_edge_cases_are_named_or_normalised(tmp_path) -> None:
    """Class names are strings (as collect makes them); numpy metadata is saved; a layer
    without kernels or positions and metadata JSON cannot hold are refused up front."""
    counts = np.ones((2, 3, 2, 2), np.int64) * np.array([1, 0, 1])[None, :, None, None]
    stats = OccurrenceStats({"L": counts}, np.array([1, 0, 1]), class_names=(1, 2, 3),
                            metadata={"num_samples": np.int64(2), "sizes": np.arange(2)})
    assert stats.class_names == ("1", "2", "3")
    with pytest.warns(RuntimeWarning):
        assert np.isnan(stats.aom("L")[:, 1]).all()
    loaded = OccurrenceStats.load(stats.save(tmp_path / "s.npz"))
    assert loaded.metadata["num_samples"] == 2 and loaded.metadata["sizes"] == [0, 1]
    with pytest.raises(StatsError, match=r"layer 'L' have shape \(0, 3, 2, 2\): a layer needs"):
        OccurrenceStats({"L": np.zeros((0, 3, 2, 2), np.int64)}, np.array([1, 1, 1]))
    with pytest.raises(StatsError, match="metadata must be JSON-able"):
        OccurrenceStats({"L": counts}, np.array([1, 0, 1]), metadata={"when": object()})


def test_load_refuses_a_newer_format_and_an_npz_that_is_not_statistics(tmp_path) -> None:
    stats = OccurrenceStats({"L": np.ones((2, 2, 1, 1), np.int64)}, np.array([1, 1]))
    with np.load(stats.save(tmp_path / "v.npz")) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(str(arrays["header"]))
    header["version"] = 99
    arrays["header"] = np.array(json.dumps(header))
    np.savez(tmp_path / "v99.npz", **arrays)
    with pytest.raises(StatsError, match=r"v99.npz was written by a newer onnxaom \(format "
                                         r"version 99; this one reads up to 1\)"):
        OccurrenceStats.load(tmp_path / "v99.npz")
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    with pytest.raises(StatsError, match=r"plain.npz is not an onnxaom statistics file \(an "
                                         r"\.npz without its header\)"):
        OccurrenceStats.load(tmp_path / "plain.npz")


def test_the_digest_survives_a_save_with_numpy_metadata(tmp_path) -> None:
    """A numpy scalar threshold went into the digest as its str ('0.3') before saving and as
    the float it is saved as after loading: findings were refused on their own statistics."""
    stats = OccurrenceStats({"L": np.ones((2, 2, 1, 1), np.int64)}, np.array([1, 1]),
                            metadata={"threshold": np.float32(0.3), "probe": "activation"})
    assert OccurrenceStats.load(stats.save(tmp_path / "s.npz")).digest == stats.digest


def test_metadata_is_a_json_copy_the_caller_cannot_change() -> None:
    """The metadata was copied one level deep: changing the caller's nested dict changed the
    statistics (and left their cached digest stale)."""
    preprocessing = {"scale": 1 / 255, "resize": (28, 28)}
    stats = OccurrenceStats({"L": np.ones((2, 2, 1, 1), np.int64)}, np.array([1, 1]),
                            metadata={"preprocessing": preprocessing})
    digest = stats.digest
    preprocessing["scale"] = 1.0
    assert stats.metadata["preprocessing"] == {"scale": 1 / 255, "resize": [28, 28]}
    assert OccurrenceStats(dict(stats.counts), stats.class_sizes,
                           metadata=stats.metadata).digest == digest
