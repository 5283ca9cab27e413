"""experiments/: kernel removal and frozen retraining against torch, the selectors, the tables,
and the reduced (digits) version of experiments/fashion_mnist.py end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxaom_torch")
torchnet = pytest.importorskip("experiments.torchnet")

from onnxaom_torch import PaperMNISTNet  # noqa: E402

from experiments import selection, tables  # noqa: E402 (after the torch skip)


def _net(seed: int = 0) -> PaperMNISTNet:
    torch.manual_seed(seed)
    net = PaperMNISTNet(conv_kernels=(6, 5), hidden=8)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_remove_kernels_equals_zeroing(layer):
    net = _net()
    x = torch.rand(4, 1, 28, 28)
    k = getattr(net, layer).out_channels
    keep = [4, 0, 2] if layer == "conv1" else [3, 1]
    reduced = torchnet.remove_kernels(net, layer, keep)
    assert getattr(reduced, layer).out_channels == len(keep)
    mask = np.zeros(k, dtype=bool)
    mask[keep] = True
    with torch.no_grad(), torchnet.kernel_mask(net, layer, mask):
        zeroed = net(x)
    with torch.no_grad():
        assert torch.allclose(reduced(x), zeroed, atol=1e-5)
    # the features of the reduced model are the kept channels of the unreduced model's
    h = torchnet.prefix_features(net, layer, x)[:, keep]
    torchnet.check_features(reduced, layer, x, h)
    # the source model is untouched
    assert getattr(net, layer).out_channels == k


def test_remove_kernels_rejects_bad_indices():
    with pytest.raises(ValueError, match="distinct kernel indices"):
        torchnet.remove_kernels(_net(), "conv1", [0, 0])
    with pytest.raises(ValueError, match="layer must be"):
        torchnet.remove_kernels(_net(), "fc1", [0])


def test_retrain_suffix_freezes_the_prefix():
    net = _net()
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    conv1 = net.conv1.weight.detach().clone()
    conv2 = net.conv2.weight.detach().clone()
    fc1 = net.fc1.weight.detach().clone()
    h = torchnet.prefix_features(net, "conv1", x)
    torchnet.retrain_suffix(net, "conv1", h, y, torchnet.TrainConfig(batch_size=16, seed=1))
    assert torch.equal(net.conv1.weight, conv1)
    assert not torch.equal(net.conv2.weight, conv2)
    assert not torch.equal(net.fc1.weight, fc1)


def test_retrain_on_features_matches_full_network_training():
    """Training the suffix on cached features takes the same steps as training the whole net
    with the prefix frozen."""
    a, b = _net(), _net()
    x, y = torch.rand(48, 1, 28, 28), torch.randint(0, 10, (48,))
    config = torchnet.TrainConfig(batch_size=16, seed=3)
    torchnet.retrain_suffix(a, "conv2", torchnet.prefix_features(a, "conv2", x), y, config)
    params = torchnet.freeze(b, "conv2")
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    for batch in torch.randperm(len(y), generator=generator).split(config.batch_size):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(b(x[batch]), y[batch]).backward()
        optimizer.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_retrain_suffix_matches_the_adapters_retrain():
    """The experiments' cached-feature retraining takes the same steps as the torch adapter's
    retrain(frozen=...) running the whole network."""
    train = pytest.importorskip("onnxaom_torch.train")
    net = _net()
    x, y = torch.rand(40, 1, 28, 28), torch.randint(0, 10, (40,))
    ours = torchnet.clone(net)
    torchnet.retrain_suffix(ours, "conv1", torchnet.prefix_features(ours, "conv1", x), y,
                            torchnet.TrainConfig(batch_size=16, seed=5))
    theirs = train.retrain(net, (x, y), 1, batch_size=16, seed=5, device="cpu",
                           frozen=["conv1"], progress=False).module
    for (name, pa), pb in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-5), name


def test_remove_kernels_matches_the_adapters_edit(tmp_path):
    edit = pytest.importorskip("onnxaom_torch.edit")
    from onnxaom_torch import export_onnx

    import onnxaom
    from onnxaom.edits import RemoveKernels

    net = _net()
    model = onnxaom.load(export_onnx(net, tmp_path / "net.onnx", input_shape=(1, 1, 28, 28)))
    x = torch.rand(3, 1, 28, 28)
    for layer, keep in (("conv1", [1, 3, 5]), ("conv2", [0, 4])):
        k = getattr(net, layer).out_channels
        removed = [i for i in range(k) if i not in keep]
        adapted = edit.apply_edits(net, model, [RemoveKernels(f"/{layer}/Conv", removed)]).module
        with torch.no_grad():
            assert torch.allclose(adapted(x), torchnet.remove_kernels(net, layer, keep)(x),
                                  atol=1e-5)


def test_proposal_keep_gives_exactly_n(tmp_path):
    from onnxaom_torch import export_onnx

    import onnxaom

    net = _net()
    path = export_onnx(net, tmp_path / "net.onnx", input_shape=(1, 1, 28, 28))
    rng = np.random.default_rng(0)
    stats = onnxaom.collect(str(path), rng.random((60, 1, 28, 28), dtype=np.float32),
                            np.arange(60) % 3, progress=False, provider="cpu")
    findings = onnxaom.analyze(stats)
    pool_stats = onnxaom.collect(str(path), rng.random((60, 1, 28, 28), dtype=np.float32),
                                 np.arange(60) % 3, progress=False, provider="cpu",
                                 probe="pool")
    model = onnxaom.load(path)
    for strategy in selection.STRATEGIES:
        for n in (1, 2, 4):
            kept = selection.proposal_keep(stats, findings, "/conv1/Conv", n, strategy,
                                           model=model, pool_stats=pool_stats)
            assert len(kept) == n and list(kept) == sorted(set(kept))
    assert 1 <= selection.natural_size(stats, findings, "/conv2/Conv") <= 5


def test_random_and_magnitude_selectors():
    assert selection.random_keep(16, 5, seed=0) == selection.random_keep(16, 5, seed=0)
    assert len(set(selection.random_keep(16, 5, seed=1))) == 5
    pytest.importorskip("torch_pruning")
    net = _net()
    with torch.no_grad():
        net.conv1.weight[2].mul_(100.0)  # by far the largest filter
    kept = selection.magnitude_keep(net, "conv1", 2)
    assert len(kept) == 2 and 2 in kept


def test_tables_from_runs():
    runs = []
    for seed in (0, 1):
        runs.append({"stage": "conv1", "seed": seed, "method": "unreduced", "n": 16,
                     "accuracy_before": 0.9, "accuracy": 0.9})
        for method, acc in (("proposal:paper", 0.88), ("magnitude", 0.85), ("random", 0.8)):
            for n in (4, 3):
                runs.append({"stage": "conv1", "seed": seed, "method": method, "n": n,
                             "accuracy_before": acc - 0.1, "accuracy": acc + 0.01 * seed})
    results = {"runs": runs, "stages": {"conv1": {"kernels": 16}},
               "config": {"stage2_from": 5, "epochs": 3, "seeds": [0, 1]},
               "base": {"accuracy": 0.9}, "parameters": {"16x16": 10}}
    table = tables.selection_table(results, "conv1")
    assert "| 16 (unreduced) |" in table and "| 4 |" in table and "| 3 |" in table
    assert "**88.50 ± 0.71**" in table
    checks = tables.target_checks(results, "paper")
    assert [c["met"] for c in checks if "at 4" in c["target"]] == [True]
    assert tables.selection_chart(results).to_dict()["facet"]


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    pytest.importorskip("torch_pruning")  # the L1-magnitude peer
    from experiments import fashion_mnist

    out = tmp_path / "quick"
    assert fashion_mnist.main(["--quick", "--out", str(out), "--no-render"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert 0.5 < results["base"]["accuracy"] <= 1.0
    config = results["config"]
    methods = {f"proposal:{s}" for s in config["strategies"]} | {"magnitude", "random",
                                                                "unreduced"}
    for stage in ("conv1", "conv2"):
        runs = [r for r in results["runs"] if r["stage"] == stage]
        assert {r["method"] for r in runs} == methods
        assert {r["n"] for r in runs} == {*config["counts"], 16}
        assert len(runs) == len(config["seeds"]) * (1 + len(config["counts"]) * (len(methods) - 1))
        for r in runs:
            assert 0.0 <= r["accuracy_before"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
            assert len(r["kept"]) == r["n"] == len(set(r["kept"]))
        # sanity: the reduced, retrained models still classify
        after = np.mean([r["accuracy"] for r in runs])
        assert after > 0.5
    assert len(results["fig8"]) == 10
    for rec in results["fig8"]:
        assert rec["selective"] + rec["not_selective"] == 16
        for key in ("accuracy_all", "accuracy_selective", "accuracy_not_selective"):
            assert 0.0 <= rec[key] <= 1.0
    md = (out / "tables.md").read_text()
    for heading in ("## Pipeline", "## Selection quality: conv1", "## Selection quality: conv2",
                    "## Kernel selectivity experiment", "## Targets"):
        assert heading in md
    assert (out / "base_stats.npz").exists() and (out / "base_findings.json").exists()


def test_base_model_initial_weights_do_not_depend_on_the_process():
    """Base seed 0 is drawn from its seed, not from whatever state torch's global generator is
    in (torch 2.13 can start a process from a random seed)."""
    from experiments import fashion_mnist

    torch.manual_seed(1)
    first = fashion_mnist._initial_model(0).state_dict()
    state = torch.random.get_rng_state()
    torch.manual_seed(2)
    second = fashion_mnist._initial_model(0).state_dict()
    torch.manual_seed(0)
    reference = PaperMNISTNet().state_dict()
    for name, value in first.items():
        assert torch.equal(value, second[name]) and torch.equal(value, reference[name]), name
    torch.manual_seed(1)
    fashion_mnist._initial_model(0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator untouched
    other = fashion_mnist._initial_model(3).state_dict()
    assert not torch.equal(other["conv1.weight"], first["conv1.weight"])


def test_retraining_settings_leave_recorded_runs_resumable():
    """The optional retraining batch size and learning rate, unset, keep the settings digest the
    recorded runs were made with (so --resume accepts their results.json, and reuses their runs
    where their base model is on disk); set, they change it."""
    from experiments.fashion_mnist import Config

    recorded = json.loads(
        (Path(__file__).parents[1] / "experiments/results/results.json").read_text())
    assert Config().key() == recorded["config_key"]
    assert Config(retrain_batch_size=32).key() != Config().key()
    assert Config(retrain_lr=3e-4).key() != Config().key()


def test_resume_without_the_base_model_runs_everything_again(tmp_path):
    """Runs recorded on a base model that is no longer on disk, or that another base model has
    replaced (its weights digest differs), are not reused (they would mix two models in one
    table); runs of the same base model are."""
    pytest.importorskip("torch_pruning")
    from experiments import fashion_mnist

    out = tmp_path / "quick"
    args = ["--quick", "--out", str(out), "--no-render", "--stages", "conv1", "--counts", "3",
            "--strategies", "clusters", "--seeds", "1", "--retrain-batch-size", "16",
            "--retrain-lr", "0.002"]
    assert fashion_mnist.main(args) == 0
    path = out / "results.json"
    results = json.loads(path.read_text())
    assert (results["config"]["retrain_batch_size"], results["config"]["retrain_lr"]) == (16, 0.002)
    for run in results["runs"]:
        run["accuracy"] = -1.0  # a marker: reused runs would keep it
    path.write_text(json.dumps(results))
    assert fashion_mnist.main([*args, "--resume"]) == 0  # base.pt still there: reused
    assert {r["accuracy"] for r in json.loads(path.read_text())["runs"]} == {-1.0}
    base = out / "models" / "base.pt"
    state = torch.load(base)
    state["fc2.bias"] = state["fc2.bias"] + 1.0  # another base model, put in its place
    torch.save(state, base)
    assert fashion_mnist.main([*args, "--resume"]) == 0
    runs = json.loads(path.read_text())["runs"]
    assert runs and all(0.0 <= r["accuracy"] <= 1.0 for r in runs)
    for run in runs:
        run["accuracy"] = -1.0
    path.write_text(json.dumps({**json.loads(path.read_text()), "runs": runs}))
    base.unlink()
    assert fashion_mnist.main([*args, "--resume"]) == 0
    runs = json.loads(path.read_text())["runs"]
    assert runs and all(0.0 <= r["accuracy"] <= 1.0 for r in runs)


def test_charts_render(tmp_path):
    pytest.importorskip("vl_convert")
    from onnxaom.report import render

    results = {"runs": [
        {"stage": "conv1", "seed": s, "method": m, "n": n, "accuracy": 0.8 + 0.01 * s}
        for s in (0, 1) for m in ("proposal:paper", "random") for n in (3, 5)
    ] + [{"stage": "conv1", "seed": 0, "method": "unreduced", "n": 16, "accuracy": 0.9}]}
    path = render(tables.selection_chart(results), tmp_path / "selection.svg")
    assert path.read_text().startswith("<svg")


def test_kernel_mask_on_the_cifar_architecture_equals_zeroed_filters():
    """Masking conv6's kernels after the ReLU equals zeroing their filters and biases (the
    brute-force reference: a zero filter with zero bias gives a zero map, and ReLU(0) = 0)."""
    from onnxaom_torch import PaperCIFARNet

    torch.manual_seed(0)
    net = PaperCIFARNet(in_channels=1, image_size=16, width=6, hidden=8).eval()
    x = torch.rand(5, 1, 16, 16)
    keep = np.array([True, False, True, True, False, False])
    zeroed = PaperCIFARNet(in_channels=1, image_size=16, width=6, hidden=8).eval()
    zeroed.load_state_dict(net.state_dict())
    with torch.no_grad():
        zeroed.conv6.weight[~torch.from_numpy(keep)] = 0.0
        zeroed.conv6.bias[~torch.from_numpy(keep)] = 0.0
        with torchnet.kernel_mask(net, "conv6", keep):
            masked = net(x)
        assert torch.allclose(masked, zeroed(x), atol=1e-6)
        plain = net(x)
        with torchnet.kernel_mask(net, "conv6", np.ones(6, dtype=bool)):
            assert torch.equal(net(x), plain)
        assert not torch.allclose(plain, masked)
        with torchnet.kernel_mask(net, "conv6", keep):
            pass
        assert torch.equal(net(x), plain)  # the hook is gone once the context closes
    with pytest.raises(ValueError, match="one bool per kernel of conv6"), \
            torchnet.kernel_mask(net, "conv6", keep[:3]):
        pass
    with pytest.raises(ValueError, match="conv followed by its ReLU"), \
            torchnet.kernel_mask(net, "fc1", np.ones(8, dtype=bool)):
        pass


def test_fig8_check_thresholds():
    def rec(all_, sel, not_sel):
        return {"accuracy_all": all_, "accuracy_selective": sel, "accuracy_not_selective": not_sel}

    met = tables.fig8_check([rec(0.9, 0.91, 0.7), rec(0.8, 0.79, 0.75)])
    assert met["met"] and met["change_selective"] == pytest.approx(0.0)
    assert met["change_not_selective"] == pytest.approx(-0.125)
    # only-selective costs more than 2 pp: not met, however much the other set drops
    assert not tables.fig8_check([rec(0.9, 0.87, 0.1)])["met"]
    # only-non-selective costs less than 10 pp: not met
    assert not tables.fig8_check([rec(0.9, 0.9, 0.85)])["met"]


@pytest.mark.slow
def test_fig8_quick_run_end_to_end(tmp_path):
    from experiments import fig8

    out = tmp_path / "fig8"
    assert fig8.main(["--quick", "--out", str(out), "--no-render"]) == 0
    results = json.loads((out / "results.json").read_text())
    (rec,) = results["seeds"]
    width = results["config"]["width"]
    assert len(rec["fig8"]) == 10
    for row in rec["fig8"]:
        assert row["selective"] + row["not_selective"] == width
        for key in ("accuracy_all", "accuracy_selective", "accuracy_not_selective"):
            assert 0.0 <= row[key] <= 1.0
    # the class accuracies with all kernels average to the per-class test accuracy
    import onnxaom

    stats = onnxaom.OccurrenceStats.load(out / "stats-seed0.npz")
    s = stats.class_selectivity("/conv6/Conv")
    assert [int((s[:, c] > 0).sum()) for c in range(10)] == [r["selective"] for r in rec["fig8"]]
    md = (out / "tables.md").read_text()
    assert "## Summary over base seeds" in md and "## Base seed 0" in md
    # --resume reuses the trained model: same numbers, no training
    assert fig8.main(["--quick", "--out", str(out), "--no-render", "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())["seeds"][0]
    assert again["fig8"] == rec["fig8"] and again["train"] == rec["train"]


def test_reproducibility_kernel_match_and_table():
    """experiments.reproducibility pairs kernel i with kernel i when the maps are the same, and
    finds a permutation when they are only reordered."""
    from experiments import reproducibility
    from onnxaom.stats import OccurrenceStats

    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(4, 3, 5, 5))
    stats = OccurrenceStats({"c": counts}, np.array([50, 50, 50]), ("a", "b", "c"))
    permuted = OccurrenceStats({"c": counts[[2, 0, 3, 1]]}, np.array([50, 50, 50]),
                               ("a", "b", "c"))
    same = reproducibility._kernel_match(stats, stats, "c")
    assert same["best_match"] == [0, 1, 2, 3] and min(same["same_index_r"]) == 1.0
    moved = reproducibility._kernel_match(stats, permuted, "c")
    assert moved["best_match"] == [1, 3, 0, 2]
    res = {"environment": {"python": "3.11", "torch": "2", "cpu": "x",
                           "initial_seed_of_this_process": 1},
           "base_seed1": {"recorded": {"train_losses": [0.5, 0.4], "accuracy": 0.9},
                          "again": {"train_losses": [0.5001, 0.4], "accuracy": 0.91}},
           "fresh_seed_draw": {"accuracy": 0.9, "kernels": {"conv1": same}}}
    table = reproducibility.tables(res)
    assert "| 1 | 0.500000 | 0.500100 | +0.000100 |" in table and "4 of 4" in table
