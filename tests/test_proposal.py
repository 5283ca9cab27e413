"""Proposals: the paper's rule on a layer built to have dead, always-on and redundant kernels;
kernel targets and every strategy; overrides; JSON; invariants under hypothesis."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxaom
from onnxaom.edits import RemoveKernels
from onnxaom.errors import LayerNotFoundError, StatsError
from onnxaom.findings import analyze
from onnxaom.proposal import STRATEGIES, Proposal, override, propose, stats_digest
from onnxaom.stats import OccurrenceStats

from . import zoo

SIZE = 10  # samples per class
#: The strategies that need nothing but the statistics ("usage" and "activity" read the model).
MODEL_FREE = tuple(s for s in STRATEGIES if s not in ("usage", "activity"))


def designed_stats() -> OccurrenceStats:
    """Layer "conv" (K=6, C=3, 2x2): 0 dead; 1, 2 alike (selective for class 0, 1 more so);
    3 always on; 4 selective for class 1; 5 for class 2. Layer "fc" (K=4, 1x1) a dense one."""
    conv = np.zeros((6, 3, 2, 2), dtype=np.int64)
    conv[1, 0] = SIZE
    conv[2, 0] = SIZE
    conv[2, 1, 0, 0] = 1  # a little less selective than kernel 1
    conv[3] = SIZE
    conv[4, 1] = SIZE
    conv[4, 0, 1, 1] = 3
    conv[5, 2] = SIZE
    conv[5, 1, 0, 1] = 5
    fc = np.zeros((4, 3, 1, 1), dtype=np.int64)
    fc[:, 0, 0, 0] = [SIZE, 2, 5, 0]
    fc[:, 1, 0, 0] = [0, SIZE, 4, 0]
    fc[:, 2, 0, 0] = [1, 0, SIZE, 0]
    meta = {"model_digest": "abc", "layers": [{"name": "conv", "op": "Conv"},
                                              {"name": "fc", "op": "Gemm"}]}
    return OccurrenceStats({"conv": conv, "fc": fc}, np.full(3, SIZE, dtype=np.int64),
                           metadata=meta)


def test_the_paper_rule_drops_ineffective_and_keeps_one_per_redundant_group():
    stats = designed_stats()
    findings = analyze(stats)
    lf = findings.layer("conv")
    assert set(lf.ineffective_kernels) == {0, 3}
    assert [(g.members, g.representative) for g in lf.redundant_groups] in ([((1, 2), 1)],
                                                                           [((2, 1), 1)])
    proposal = propose(stats, findings, strategy="paper")
    assert proposal.layer_names == ("conv",)  # dense layers only when named
    p = proposal.layer("conv")
    assert p.kept == (1, 4, 5) and p.removed == (0, 2, 3)
    assert "dead" in p.reasons[0] and "always on" in p.reasons[3]
    assert "redundant" in p.reasons[2] and "1" in p.reasons[2]
    assert "representative" in p.reasons[1]
    assert list(proposal) == [RemoveKernels("conv", (0, 2, 3))] == list(proposal.edits)
    assert len(proposal) == 1
    assert proposal.stats_digest == stats_digest(stats) and proposal.model_digest == "abc"


def test_a_kernel_target_follows_the_paper_order():
    stats = designed_stats()
    ranked = propose(stats, keep={"conv": 2}).layer("conv")
    # survivors 1, 4, 5: the least selective of them goes first
    assert len(ranked.kept) == 2 and set(ranked.kept) <= {1, 4, 5}
    assert ranked.target == 2
    # more than the rule keeps: the redundant member comes back before the ineffective ones
    assert propose(stats, keep={"conv": 4}).layer("conv").kept == (1, 2, 4, 5)
    assert propose(stats, keep={"conv": 6}).layer("conv").removed == ()
    assert not list(propose(stats, keep={"conv": 6}))


@pytest.mark.parametrize("strategy", MODEL_FREE)
def test_every_strategy_keeps_the_rules_count_by_default_and_a_target_when_asked(strategy):
    stats = designed_stats()
    assert len(propose(stats, strategy=strategy).layer("conv").kept) == 3
    for n in (1, 2, 5):
        p = propose(stats, strategy=strategy, keep={"conv": n}).layer("conv")
        assert len(p.kept) == n
        assert p.strategy == (strategy if strategy != "auto" else "clusters")  # no model
        assert not set(p.kept) & {0, 3} or n == 5  # ineffective kernels are the last kept


def test_coverage_and_clusters_avoid_the_redundant_pair():
    stats = designed_stats()
    for strategy in ("coverage", "clusters"):
        kept = set(propose(stats, strategy=strategy, keep={"conv": 3}).layer("conv").kept)
        assert kept == {1, 4, 5}, strategy


def test_layers_and_targets_select_what_is_proposed():
    stats = designed_stats()
    both = propose(stats, layers=["conv", "fc"])
    assert both.layer_names == ("conv", "fc")
    only_fc = propose(stats, keep={"fc": 2})
    assert only_fc.layer_names == ("fc",) and len(only_fc.layer("fc").kept) == 2
    assert propose(stats, layers="fc").layer_names == ("fc",)  # one name, as collect takes it


def test_bad_arguments_are_named():
    stats = designed_stats()
    with pytest.raises(StatsError, match="unknown strategy 'magic'.*paper"):
        propose(stats, strategy="magic")
    with pytest.raises(LayerNotFoundError, match="'nope'.*conv, fc"):
        propose(stats, layers=["nope"])
    with pytest.raises(StatsError, match=r"keep\['conv'\].*1\.\.6"):
        propose(stats, keep={"conv": 0})
    with pytest.raises(StatsError, match=r"keep\['conv'\].*1\.\.6"):
        propose(stats, keep={"conv": 7})
    with pytest.raises(StatsError, match="not among the layers"):
        propose(stats, layers=["fc"], keep={"conv": 2})
    with pytest.raises(StatsError, match="OccurrenceStats"):
        propose({"conv": 1})  # type: ignore[arg-type]


def test_override_keeps_removes_and_restricts():
    stats = designed_stats()
    proposal = propose(stats)
    changed = override(proposal, keep={"conv": [3]}, remove={"conv": [5]})
    p = changed.layer("conv")
    assert p.kept == (1, 3, 4) and p.removed == (0, 2, 5)
    assert p.overridden == (3, 5) and p.reasons[3].startswith("designer: keep")
    assert proposal.layer("conv").kept == (1, 4, 5)  # the input is unchanged
    only = override(proposal, only={"conv": [0, 2]}).layer("conv")
    assert only.kept == (0, 2)
    with pytest.raises(StatsError, match="every kernel"):
        override(proposal, only={"conv": [1]}, remove={"conv": [1]})
    with pytest.raises(StatsError, match="both keeps and removes"):
        override(proposal, keep={"conv": [1]}, remove={"conv": [1]})
    with pytest.raises(StatsError, match="not an index"):
        override(proposal, keep={"conv": [6]})
    with pytest.raises(LayerNotFoundError, match="Propose it first"):
        override(proposal, keep={"fc": [0]})


def test_json_round_trip(tmp_path):
    proposal = override(propose(designed_stats(), layers=["conv", "fc"], strategy="coverage"),
                        keep={"fc": [3]})
    path = proposal.to_json(tmp_path / "proposal.json")
    data = json.loads(path.read_text())
    assert data["edits"] == [e.to_dict() for e in proposal.edits]
    assert Proposal.from_json(path) == proposal
    bad = dict(data, layers=[dict(data["layers"][0], kept=[])])
    with pytest.raises(StatsError, match="keeps no kernel"):
        Proposal.from_dict(bad)
    with pytest.raises(StatsError, match="not an onnxaom proposal"):
        Proposal.from_dict({"format": "other"})


def test_a_layer_of_only_dead_kernels_keeps_its_most_selective_one():
    counts = np.zeros((3, 2, 2, 2), dtype=np.int64)
    stats = OccurrenceStats({"conv": counts}, np.array([5, 5]),
                            metadata={"layers": [{"name": "conv", "op": "Conv"}]})
    p = propose(stats, strategy="paper").layer("conv")
    assert p.kept == (0,) and "most selective stays" in p.reasons[0]


@st.composite
def random_stats(draw):
    k = draw(st.integers(1, 7))
    c = draw(st.integers(2, 4))
    h = draw(st.integers(1, 3))
    sizes = np.array(draw(st.lists(st.integers(1, 12), min_size=c, max_size=c)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    counts = (rng.random((k, c, h, h)) * (sizes[None, :, None, None] + 1)).astype(np.int64)
    counts = np.minimum(counts, sizes[None, :, None, None])
    dead = draw(st.lists(st.integers(0, k - 1), max_size=k))
    counts[dead] = 0
    stats = OccurrenceStats({"conv": counts}, sizes,
                            metadata={"layers": [{"name": "conv", "op": "Conv"}]})
    n = draw(st.none() | st.integers(1, k))
    return stats, k, n


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=random_stats(), strategy=st.sampled_from(MODEL_FREE))
def test_proposal_invariants(case, strategy):
    stats, k, n = case
    proposal = propose(stats, strategy=strategy, keep=None if n is None else {"conv": n})
    p = proposal.layer("conv")
    assert p.kept, "never removes every kernel"
    assert sorted(p.kept + p.removed) == list(range(k))
    assert not set(p.kept) & set(p.removed)
    assert sorted(p.order) == list(range(k)) and len(p.reasons) == k
    if n is not None:
        assert len(p.kept) == n
    for edit in proposal:
        assert all(0 <= i < k for i in edit.kernels) and len(edit.kernels) < k
    assert Proposal.from_dict(json.loads(json.dumps(proposal.to_dict()))) == proposal
    flipped = override(proposal, keep={"conv": list(p.removed[:1])})
    assert sorted(flipped.layer("conv").kept + flipped.layer("conv").removed) == list(range(k))


def test_default_strategy_is_the_best_measured_one():
    from onnxaom.proposal import DEFAULT_STRATEGY

    assert DEFAULT_STRATEGY == "auto"
    counts = np.random.default_rng(0).integers(0, 5, size=(6, 3, 2, 2))
    stats = OccurrenceStats({"conv": counts}, np.array([5, 5, 5]),
                            metadata={"layers": [{"name": "conv", "op": "Conv"}]})
    # without the model: clusters everywhere, and the layer says so
    default = propose(stats)
    assert default.strategy == "auto" and default.layer("conv").strategy == "clusters"
    assert default.layer("conv").kept == propose(stats, strategy="clusters").layer("conv").kept


def test_auto_uses_usage_where_a_dense_layer_reads_and_clusters_elsewhere():
    model, stats = _usage_case("pool")
    keep = {"conv1": 2, "conv2": 3}
    auto = propose(stats, keep=keep, model=model)
    assert auto.layer("conv1").strategy == "clusters"  # read by conv2
    assert auto.layer("conv2").strategy == "usage"  # read by fc1
    assert auto.layer("conv1").kept == propose(stats, keep=keep, strategy="clusters",
                                               model=model).layer("conv1").kept
    assert auto.layer("conv2").kept == propose(stats, keep=keep, strategy="usage",
                                               model=model).layer("conv2").kept


# ----------------------------------------------------------------------------- usage
def _usage_case(probe: str):
    import onnxaom

    from . import zoo

    proto = zoo.chain(seed=5, kernels=(4, 8), size=8)  # conv2: 6x6, pooled 3x3, fc1 reads 8*9
    model = onnxaom.Model(proto)
    rng = np.random.default_rng(1)
    images = rng.standard_normal((90, 3, 8, 8)).astype(np.float32)
    stats = onnxaom.collect(model, images, np.arange(90) % 3, probe=probe, progress=False)
    return model, stats


@pytest.mark.parametrize(("probe", "how"), [("pool", "per position"),
                                            ("activation", "per kernel")])
def test_usage_scores_class_specific_occurrence_by_read_mass(probe, how):
    from onnxaom.readers import read_mass

    model, stats = _usage_case(probe)
    mass = read_mass(model, "conv2")
    specific = np.abs(stats.csm("conv2")).sum(axis=1).reshape(8, -1)  # (K, H*W)
    if how == "per position":
        score = (specific * mass.per_position).sum(axis=1)
    else:
        score = specific.sum(axis=1) * mass.per_kernel
    expected = tuple(sorted(np.argsort(-score, kind="stable")[:3].tolist()))
    p = propose(stats, keep={"conv2": 3}, strategy="usage", model=model).layer("conv2")
    assert p.kept == expected and p.strategy == "usage"
    assert all(how in reason for reason in p.reasons)


def test_activity_scores_mean_occurrence_by_read_mass():
    from onnxaom.readers import read_mass

    model, stats = _usage_case("activation")
    score = stats.aom("conv1").reshape(4, -1).mean(axis=1) * read_mass(model, "conv1").per_kernel
    expected = tuple(sorted(np.argsort(-score, kind="stable")[:2].tolist()))
    p = propose(stats, keep={"conv1": 2}, strategy="activity", model=model).layer("conv1")
    assert p.kept == expected and p.strategy == "activity"


def test_activity_without_a_traced_reader_ranks_by_occurrence_alone():
    """The logits layer (or a QDQ model's layers, whose readers' weights are quantized) has no
    reader onnxaom traces: every read mass is 0, and the ranking was the kernel order."""
    from onnxaom.readers import read_mass

    model, stats = _usage_case("activation")
    assert not read_mass(model, "fc2").per_kernel.any()
    occurrence = stats.aom("fc2").reshape(3, -1).mean(axis=1)
    p = propose(stats, keep={"fc2": 1}, strategy="activity", model=model).layer("fc2")
    assert p.kept == (int(np.argmax(occurrence)),)
    assert all("occurrence alone" in reason for reason in p.reasons)


@pytest.mark.parametrize("strategy", ["usage", "activity"])
def test_usage_needs_the_model_the_statistics_come_from(strategy):
    stats = designed_stats()
    with pytest.raises(StatsError, match=f"strategy '{strategy}' .*pass model="):
        propose(stats, strategy=strategy)
    model, _ = _usage_case("pool")
    with pytest.raises(StatsError, match="collected on model"):
        propose(stats, strategy=strategy, model=model)  # stats say model "abc"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), n=st.none() | st.integers(1, 8))
def test_usage_invariants(seed, n):
    import onnxaom

    from . import zoo

    model = onnxaom.Model(zoo.chain(kernels=(4, 8), size=8))
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, 3)
    counts = np.minimum(rng.integers(0, 9, (8, 3, 6, 6)), sizes[None, :, None, None])
    stats = OccurrenceStats({"conv2": counts}, sizes, metadata={
        "model_digest": model.digest, "layers": [{"name": "conv2", "op": "Conv"}]})
    p = propose(stats, strategy="usage", model=model,
                keep=None if n is None else {"conv2": n}).layer("conv2")
    assert p.kept and sorted(p.kept + p.removed) == list(range(8))
    if n is not None:
        assert len(p.kept) == n


def test_partitions_keeps_one_of_a_kernel_and_its_complement():
    """Kernel 1 fires exactly where kernel 0 does not: the plain ODM puts them furthest apart;
    ``partitions`` sees one partition of the input and keeps one of them, and kernel 2."""
    p = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=np.float64)  # (C=2, 4 positions)
    q = np.array([[1, 0, 1, 0], [0.5, 0, 0.5, 0]])
    aom = np.stack([p, 1 - p, q]).reshape(3, 2, 2, 2)
    counts = np.rint(aom * SIZE).astype(np.int64)
    stats = OccurrenceStats({"conv": counts}, np.full(2, SIZE, dtype=np.int64),
                            metadata={"model_digest": "m"})
    assert not analyze(stats).layer("conv").ineffective
    partitions = set(propose(stats, strategy="partitions", keep={"conv": 2}).layer("conv").kept)
    assert 2 in partitions and len(partitions & {0, 1}) == 1


@pytest.mark.parametrize("strategy", ["selectivity", "clusters", "auto"])
def test_coupled_layers_get_one_choice_so_each_keeps_its_target(strategy):
    """conv1 and conv3 meet in a residual Add: the surgery removes a channel from both, so
    separate choices would remove their union (fewer kernels than asked in each)."""
    import warnings

    model = onnxaom.Model(zoo.residual(kernels=6, seed=2))
    x = zoo.random_input(model.proto, batch=60, seed=4)
    labels = np.arange(60) % 3
    stats = onnxaom.collect(model, x, labels, progress=False)
    keep = {"conv1": 3, "conv3": 3}
    proposal = propose(stats, keep=keep, model=model, strategy=strategy)
    assert proposal.layer("conv1").kept == proposal.layer("conv3").kept
    assert any("coupled" in note for note in proposal.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no union beyond what was named
        edited = onnxaom.apply(model, proposal.edits)
    assert {layer.name: layer.kernels for layer in edited.layers()}["conv3"] == 3
    with pytest.raises(StatsError, match="coupled.*conv1=3, conv3=4"):
        propose(stats, keep={"conv1": 3, "conv3": 4}, model=model, strategy=strategy)
    separate = propose(stats, keep=keep, strategy="selectivity")  # no model: not reconciled
    if separate.layer("conv1").removed != separate.layer("conv3").removed:
        with pytest.warns(UserWarning, match="besides the 3 named for it"):
            onnxaom.apply(model, separate.edits)


@pytest.mark.parametrize("strategy", ["selectivity", "coverage", "auto"])
def test_layers_read_by_a_grouped_conv_keep_as_many_kernels_in_each_group(strategy):
    """conv1 (8) feeds conv2 (8 -> 8, group 2), which is grouped itself: the surgery takes
    the same number of channels from each group of 4, so a proposal must too."""
    from .test_surgery import assert_removal_exact, grouped

    proto = grouped()
    model = onnxaom.Model(proto)
    x = zoo.random_input(proto, batch=60, seed=4)
    stats = onnxaom.collect(model, x, np.arange(60) % 3, progress=False)
    for layer, n, kept in (("conv1", 4, 4), ("conv2", 4, 4), ("conv1", 3, 4)):
        proposal = propose(stats, keep={layer: n}, model=model, strategy=strategy)
        chosen = proposal.layer(layer).kept
        assert len(chosen) == kept and sum(i < 4 for i in chosen) == kept // 2
        assert_removal_exact(proto, {layer: list(proposal.layer(layer).removed)})


def test_a_residual_sum_read_by_a_grouped_conv_is_one_balanced_choice():
    """a and b meet in an Add that a grouped conv (group 2) reads: one choice for both, as
    many kernels from each group."""
    from .test_surgery import _Net, assert_removal_exact

    net = _Net()
    a = net.op("Relu", "relu_a", [net.conv("a", "input", 3, 8)])
    x = net.op("Add", "add", [a, net.conv("b", "input", 3, 8)])
    proto = net.head(net.op("Relu", "relu_g", [net.conv("g", x, 8, 8, group=2)]), 8)
    model = onnxaom.Model(proto)
    stats = onnxaom.collect(model, zoo.random_input(proto, batch=60, seed=4),
                            np.arange(60) % 3, progress=False)
    proposal = propose(stats, keep={"a": 3, "b": 3}, model=model, strategy="selectivity")
    kept = proposal.layer("a").kept
    assert kept == proposal.layer("b").kept and len(kept) == 4
    assert sum(i < 4 for i in kept) == 2
    assert_removal_exact(proto, {"a": list(proposal.layer("a").removed),
                                 "b": list(proposal.layer("b").removed)})


def test_a_target_for_a_layer_tied_in_another_channel_order_is_refused():
    """conv1 (4) -> depthwise dw (8, multiplier 2): dw's kernels follow conv1's in pairs."""
    from .test_surgery import depthwise_multiplier

    proto = depthwise_multiplier()
    model = onnxaom.Model(proto)
    stats = onnxaom.collect(model, zoo.random_input(proto, batch=60, seed=4),
                            np.arange(60) % 3, progress=False)
    with pytest.raises(StatsError, match="give the target for 'conv1' instead"):
        propose(stats, keep={"dw": 5}, layers=["conv1", "dw"], model=model,
                strategy="selectivity")  # dw's kernels go in pairs: 5 cannot be
    proposal = propose(stats, keep={"conv1": 3}, layers=["conv1", "dw"], model=model,
                       strategy="selectivity")
    assert len(proposal.layer("dw").kept) == 6  # two per kept conv1 channel


def _dw_chain(channels: int, multiplier: int, groups: int, out: int) -> onnxaom.Model:
    """conv1 (``channels``) -> depthwise dw (``channels * multiplier``) -> pw (1x1, ``out``,
    ``groups`` groups) -> head, each conv followed by a ReLU."""
    from .test_surgery import _Net

    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, channels)])
    x = net.op("Relu", "relu2", [net.conv("dw", x, channels, channels * multiplier,
                                          group=channels)])
    x = net.op("Relu", "relu3", [net.conv("pw", x, channels * multiplier, out, k=1,
                                          group=groups)])
    return onnxaom.Model(net.head(x, out))


def _stats_on(model: onnxaom.Model, seed: int = 4) -> onnxaom.OccurrenceStats:
    return onnxaom.collect(model, zoo.random_input(model.proto, batch=60, seed=seed),
                           np.arange(60) % 3, progress=False)


def _applied_kernels(model: onnxaom.Model, proposal) -> dict[str, int]:
    """Kernels per layer of ``model`` with ``proposal`` applied, which must not warn that a
    layer loses kernels besides those named."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        edited = onnxaom.apply(model, list(proposal.edits))
    return {layer.name: layer.kernels for layer in onnxaom.summary(edited).layers}


def test_a_depthwise_conv_with_a_multiplier_keeps_whole_channels():
    """dw (8 kernels, multiplier 2) alone: the surgery removes an input channel's two kernels
    together, so the proposal keeps whole pairs (5 asked -> 6) and the applied model keeps
    exactly the kernels the proposal names. Before, it kept 5 and the model only 2 or 4."""
    from .test_surgery import depthwise_multiplier

    proto = depthwise_multiplier()
    model = onnxaom.Model(proto)
    stats = onnxaom.collect(model, zoo.random_input(proto, batch=60, seed=4),
                            np.arange(60) % 3, progress=False)
    for keep, expected in ((5, 6), (4, 4), (1, 2)):
        for strategy in ("selectivity", "clusters", "paper"):
            proposal = propose(stats, keep={"dw": keep}, layers=["dw"], model=model,
                               strategy=strategy)
            kept = proposal.layer("dw").kept
            assert len(kept) == expected
            assert all(k ^ 1 in kept for k in kept)  # pairs (0, 1), (2, 3), ...
            if expected != keep:
                assert any("whole units of 2" in n and f"{keep} asked" in n
                           for n in proposal.notes)
            assert _applied_kernels(model, proposal)["dw"] == expected
    # listed first, dw leads and conv1 follows its whole pairs
    proposal = propose(stats, keep={"dw": 4}, layers=["dw", "conv1"], model=model,
                       strategy="selectivity")
    assert len(proposal.layer("dw").kept) == 4 and len(proposal.layer("conv1").kept) == 2


def test_whole_channels_and_equal_groups_together():
    """dw (8 kernels, multiplier 2) read by a 1x1 conv of 2 groups: whole pairs, and as many
    from each group of 4. 5 asked -> 3 a group -> whole pairs: 4 a group, all 8 kept; 2 asked
    -> one pair a group. Before, the group balancing split the pairs again (6 proposed, 4 left
    by the surgery, with its warning)."""
    model = _dw_chain(4, 2, groups=2, out=8)
    stats = _stats_on(model)
    for keep, expected in ((5, 8), (2, 4), (4, 4)):
        for strategy in ("selectivity", "clusters"):
            proposal = propose(stats, keep={"dw": keep}, layers=["dw"], model=model,
                               strategy=strategy)
            kept = proposal.layer("dw").kept
            assert len(kept) == expected and all(k ^ 1 in kept for k in kept)
            assert sum(k < 4 for k in kept) == expected // 2
            if expected < 8:
                assert _applied_kernels(model, proposal)["dw"] == expected


def test_units_that_cross_the_groups_of_a_reader_are_kept_whole_and_balanced():
    """dw (6 kernels, multiplier 2: pairs {0,1} {2,3} {4,5}) read by a conv of 2 groups of 3:
    {2,3} crosses the groups. The proposal keeps whole pairs, as many kernels from each group:
    3 asked -> {0,1,4,5}; 1 asked -> {2,3}. Before, it split pairs and the applied model kept
    fewer kernels than proposed."""
    model = _dw_chain(3, 2, groups=2, out=6)
    for seed in range(3):
        stats = _stats_on(model, seed)
        for strategy in ("selectivity", "clusters", "paper"):
            for keep, expected in ((3, (0, 1, 4, 5)), (1, (2, 3))):
                proposal = propose(stats, keep={"dw": keep}, layers=["dw"], model=model,
                                   strategy=strategy)
                assert proposal.layer("dw").kept == expected
                assert not any("split the units" in n for n in proposal.notes)
                assert _applied_kernels(model, proposal)["dw"] == len(expected)


def test_a_follower_read_by_a_grouped_conv_balances_its_lead():
    """conv1 (4) -> dw (8, multiplier 2) -> pw (1x1, 2 groups), both proposed: dw follows
    conv1's channels, and pw needs as many of dw's kernels from each half, so conv1 keeps one
    channel from each half of its 4. Before, dw was re-chosen after following conv1 and the
    surgery refused the proposal."""
    model = _dw_chain(4, 2, groups=2, out=8)
    for seed in range(3):
        stats = _stats_on(model, seed)
        for strategy in ("selectivity", "paper", "clusters"):
            proposal = propose(stats, keep={"conv1": 2}, layers=["conv1", "dw"], model=model,
                               strategy=strategy)
            conv1, dw = proposal.layer("conv1").kept, proposal.layer("dw").kept
            assert len(conv1) == 2 and sum(k < 2 for k in conv1) == 1
            assert dw == tuple(sorted(i for k in conv1 for i in (2 * k, 2 * k + 1)))
            assert not any("refuses" in n for n in proposal.notes)
            kernels = _applied_kernels(model, proposal)
            assert (kernels["conv1"], kernels["dw"]) == (2, 4)


def test_a_balanced_choice_of_whole_units_is_searched_for_briefly():
    from onnxaom.proposal_fit import _balanced_units

    rank = {i: i for i in range(12)}
    pairs = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]  # blocks of 3 and 4 cut them
    assert _balanced_units(pairs, rank, blocks=2, size=6, least=2) == [0, 1, 6, 7]
    assert _balanced_units(pairs[:3], rank, blocks=2, size=3, least=1) == [2, 3]
    triples = [[0, 1, 2], [3, 4, 5]]  # blocks of 2: only both together are balanced
    assert _balanced_units(triples, rank, blocks=3, size=2, least=1) == [0, 1, 2, 3, 4, 5]
    many = [[i, i + 1] for i in range(0, 600, 2)]  # deeper than the search goes
    assert _balanced_units(many, {i: i for i in range(600)}, blocks=3, size=200, least=1) is None


def test_consistent_targets_for_layers_coupled_through_a_multiplier_are_accepted():
    """conv1 (4) -> dw (8, multiplier 2): conv1=3 and dw=6 agree (3 channels, 2 kernels each)
    and were refused as "they keep the same kernels". dw and a 1x1 side conv (8) merged by an
    Add: 7 each is 8 each in whole channels, and was refused as "another channel order"."""
    from .test_surgery import _Net, depthwise_multiplier

    model = onnxaom.Model(depthwise_multiplier())
    proposal = propose(_stats_on(model), keep={"conv1": 3, "dw": 6}, layers=["conv1", "dw"],
                       model=model, strategy="selectivity")
    assert len(proposal.layer("conv1").kept) == 3 and len(proposal.layer("dw").kept) == 6
    net = _Net()
    x = net.op("Relu", "relu1", [net.conv("conv1", "input", 3, 4)])
    merged = net.op("Add", "add", [net.conv("dw", x, 4, 8, group=4),
                                   net.conv("side", x, 4, 8, k=1)])
    model = onnxaom.Model(net.head(net.op("Relu", "relu2", [merged]), 8))
    proposal = propose(_stats_on(model), keep={"dw": 5, "side": 5}, layers=["dw", "side"],
                       model=model, strategy="selectivity")
    assert proposal.layer("dw").kept == proposal.layer("side").kept
    assert len(proposal.layer("dw").kept) == 6
    assert len(proposal.notes) == len(set(proposal.notes))
    assert _applied_kernels(model, proposal)["side"] == 6


def test_a_layer_merged_with_a_grouped_conv_keeps_as_many_from_each_group():
    """a (8) + g (8, a conv of 2 groups) merged by an Add: removing a's kernels removes g's,
    and g must lose as many from each group, so a's proposal keeps equal halves (5 asked ->
    3 of each 4). Before, only the layers reading a were looked at, and the surgery refused."""
    from .test_surgery import _Net

    net = _Net()
    x = net.op("Relu", "relu0", [net.conv("conv0", "input", 3, 4)])
    merged = net.op("Add", "add", [net.conv("a", x, 4, 8), net.conv("g", x, 4, 8, group=2)])
    model = onnxaom.Model(net.head(net.op("Relu", "relu1", [merged]), 8))
    stats = _stats_on(model)
    for strategy in ("selectivity", "clusters"):
        proposal = propose(stats, keep={"a": 5}, layers=["a"], model=model, strategy=strategy)
        kept = proposal.layer("a").kept
        assert len(kept) == 6 and sum(k < 4 for k in kept) == 3
        assert not any("refuses" in n for n in proposal.notes)
        kernels = _applied_kernels(model, proposal)
        assert kernels["a"] == kernels["g"] == 6


def test_a_grouped_conv_behind_a_depthwise_conv_groups_the_layer_before_it():
    """conv1 (8) -> depthwise dw (8) -> pw (1x1, 2 groups): removing a conv1 kernel removes a
    dw kernel and a pw input channel, so conv1 keeps as many from each half (5 -> 3 + 3)."""
    model = _dw_chain(8, 1, groups=2, out=6)
    proposal = propose(_stats_on(model), keep={"conv1": 5}, layers=["conv1"], model=model,
                       strategy="selectivity")
    kept = proposal.layer("conv1").kept
    assert len(kept) == 6 and sum(k < 4 for k in kept) == 3
    assert not any("refuses" in n for n in proposal.notes)
    assert _applied_kernels(model, proposal)["conv1"] == 6


def test_a_proposal_names_the_coupled_layers_its_edits_also_change():
    model = onnxaom.Model(zoo.residual(kernels=6, seed=2))
    stats = onnxaom.collect(model, zoo.random_input(model.proto, batch=60, seed=4),
                            np.arange(60) % 3, progress=False)
    proposal = propose(stats, keep={"conv1": 3}, model=model, strategy="selectivity")
    assert any("also change" in note and "conv3 (loses 3)" in note for note in proposal.notes)


def test_a_proposal_the_surgery_would_refuse_says_why():
    """conv1 -> ReLU -> pool -> BN (after the probe, shifting zeros) -> conv2, as DenseNet's
    BN-ReLU-Conv after a concat: removing conv1's kernels is refused by the surgery, and the
    proposal, dry-run on its traced graph, says so; conv2's proposal has no such note."""
    from .test_surgery import post_probe_bn

    proto = post_probe_bn(shift=True)
    model = onnxaom.Model(proto)
    stats = onnxaom.collect(model, zoo.random_input(proto, batch=60, seed=4),
                            np.arange(60) % 3, progress=False)
    refused = propose(stats, keep={"conv1": 2}, model=model)
    assert any(n.startswith("the surgery refuses these edits: ") and "'bn'" in n
               for n in refused.notes)
    fine = propose(stats, keep={"conv2": 3}, model=model)
    assert not any("refuses" in n for n in fine.notes)
    onnxaom.apply(model, list(fine.edits))


def test_a_proposal_says_when_the_removal_falls_back_to_the_chain_end():
    """conv1 -> ReLU -> BN -> padded conv2: not exact at the probe, so the surgery removes
    after the BN, with a warning; the proposal says that, not that the surgery refuses (as it
    wrongly did when the fallback came in)."""
    from .test_probe_chain import _bn, _model

    proto = _model([("Relu", {}, {}), _bn(shift=0.7)])
    model = onnxaom.Model(proto)
    stats = onnxaom.collect(model, zoo.random_input(proto, batch=60, seed=4),
                            np.arange(60) % 3, layers=["conv1"], progress=False)
    proposal = propose(stats, keep={"conv1": 2}, model=model)
    assert not any("refuses" in n for n in proposal.notes)
    assert any("per-channel chains instead" in n for n in proposal.notes)
    with pytest.warns(UserWarning, match="per-channel chains"):
        onnxaom.apply(model, list(proposal.edits))
    assert onnxaom.surgery.plan_removal(model, {"conv1": [0]}).removed_at is None  # not run


def test_findings_of_other_statistics_are_refused() -> None:
    """Only the kernel count was compared: findings with another dead kernel (or of other
    classes) were used, removing a kernel that fires for every sample as "dead". Findings
    record their statistics' digest; those without (files written before) are measured."""
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 11, (4, 3, 2, 2))
    stats = OccurrenceStats({"conv": counts}, np.full(3, 10), ("x", "y", "z"))
    dead = counts.copy()
    dead[0] = 0
    other = OccurrenceStats({"conv": dead}, np.full(3, 10), ("x", "y", "z"))
    with pytest.raises(StatsError, match=r"findings were made from other statistics"):
        propose(stats, analyze(other), strategy="paper")

    def undigested(findings):
        return dataclasses.replace(findings, stats_digest=None)

    with pytest.raises(StatsError, match=r"findings for layer 'conv' call kernel 0 dead, unlike "
                                         r"these statistics"):
        propose(stats, undigested(analyze(other)), strategy="paper")
    renamed = OccurrenceStats({"conv": counts}, np.full(3, 10), ("p", "q", "r"))
    with pytest.raises(StatsError, match=r"findings are of classes \['p', 'q', 'r'\]"):
        propose(stats, undigested(analyze(renamed)), strategy="paper")
    with pytest.raises(StatsError, match=r"do not call kernel 0 dead, unlike these statistics"):
        propose(other, undigested(analyze(stats)), strategy="paper")  # kernel 0 was kept
    assert propose(stats, analyze(stats), strategy="paper").to_dict() == \
        propose(stats, strategy="paper").to_dict()


def test_override_with_the_model_says_what_the_surgery_makes_of_it():
    """A hand override is kept as given; with ``model=`` a rehearsal of the surgery adds its
    warning (a split pair of a multiplier depthwise conv loses both kernels) or its refusal
    (a grouped reader losing unequal numbers per group; every channel of conv1 gone) to the
    notes."""
    model = _dw_chain(4, 2, groups=2, out=8)
    stats = _stats_on(model)
    proposal = propose(stats, keep={"dw": 4}, layers=["dw"], model=model, strategy="selectivity")
    assert not any(n.startswith("after the override") for n in proposal.notes)
    split = override(proposal, only={"dw": [0, 1, 2, 4, 5, 6]}, model=model)
    assert split.layer("dw").kept == (0, 1, 2, 4, 5, 6)  # the designer's choice stands
    assert any(n.startswith("after the override: layer 'dw' loses kernels [2, 6]")
               for n in split.notes)
    for only in ([0, 1, 2, 3, 4, 5], [0, 2, 4, 6]):
        refused = override(proposal, only={"dw": only}, model=model)
        assert any(n.startswith("after the override: the surgery refuses")
                   for n in refused.notes), only
    plain = override(proposal, only={"dw": [0, 1, 4, 5]}, model=model)  # whole pairs, even
    assert plain.notes == ()  # applies cleanly: the earlier notes described another choice
    mended = override(split, only={"dw": [0, 1, 4, 5]}, model=model)  # a second override
    assert mended.notes == ()  # the first one's warning no longer applies
    nothing = override(refused, only={"dw": list(range(8))}, model=model)
    assert nothing.notes == () and not list(nothing.edits)
    assert override(proposal, only={"dw": [0, 2, 4, 6]}).notes == proposal.notes  # no model
    other = onnxaom.Model(zoo.chain())
    with pytest.raises(StatsError, match="pass the model it was made for"):
        override(proposal, only={"dw": [0, 1]}, model=other)
