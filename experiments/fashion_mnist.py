"""The paper's MNIST experiments (Sec. V-A and V-C, Fig. 8) on Fashion-MNIST, with onnxaom's
statistics driving the kernel selection, against L1 magnitude (torch-pruning) and random.

Run from the repository root (about 20 minutes on 2 shared CPU cores, one torch thread;
``--quick``: about 15 s)::

    .venv/bin/python -m experiments.fashion_mnist --out experiments/results --seeds 3 --epochs 5
    .venv/bin/python -m experiments.fashion_mnist --quick --out /tmp/quick

Needs torch, the adapter (``onnxaom_torch``) and torch-pruning (``pip install torch-pruning``,
with ``--no-deps`` to keep an installed CPU build of torch).

What it does:

1. Train :class:`onnxaom_torch.PaperMNISTNet` (conv 3x3 x16, conv 3x3 x16, max-pool 2, dense
   128, dense 10) on the training set (``--epochs``, Adam 1e-3, batch 128, seed
   ``--base-seed``: one base model for all seeds). Export it to ONNX (legacy exporter) and
   collect onnxaom's statistics over the whole *training* set (as the paper does);
   :func:`onnxaom.analyze` gives the findings.
2. Fig. 8 (Sec. V-C) on the last conv layer (conv2) of that model: per class c, the kernels with
   mean CSM s^{k,c} > 0 are *selective* for c. Test accuracy on class c with all kernels, with
   only the selective ones (the others' activations zeroed after the ReLU, onnxaom's probe
   point), and with only the non-selective ones.
3. conv1 kept at each of ``--counts`` kernels, chosen by each proposal strategy, by L1 magnitude
   and at random; conv1 frozen, the rest retrained for ``--retrain-epochs`` (1) epoch; test
   accuracy before and after. Each ``--seeds`` seed s retrains with its own batch order (and
   draws its own random selection); the "unreduced" control retrains the full model the same
   way.
4. conv2 likewise, from the model with conv1 reduced to ``--stage2-from`` (5) kernels by the
   ``--pipeline-strategy`` proposal (default "clusters", the best on conv1) and retrained with
   seed s (the paper's order: conv1, then conv2), its statistics collected again; conv1 and
   conv2 frozen, fc1 and fc2 retrained.

Writes to ``--out``: ``results.json`` (every raw number, rewritten after each run; ``--resume``
continues an interrupted run with the same settings), ``tables.md`` (the Markdown tables and the
target checks), ``selection.png/svg`` and ``fig8.png/svg`` (Altair, rendered by vl-convert),
``base_stats.npz`` and ``base_findings.json`` (onnxaom's statistics and findings of the trained
model), and ``models/`` (state dicts to resume from, and the ONNX exports).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnxaom_torch import PaperMNISTNet, export_onnx
from onnxaom_torch.edit import apply_edits
from onnxaom_torch.train import evaluate

import onnxaom
from onnxaom.edits import RemoveKernels
from onnxaom.files import atomic_write_text

from . import selection, tables, torchnet
from .torchnet import TrainConfig

__all__ = ["Config", "cpu_name", "load_data", "main", "run"]

log = logging.getLogger("experiments.fashion_mnist")

#: ONNX node names of the two convs (legacy exporter: named after the module attributes).
ONNX_LAYER = {"conv1": "/conv1/Conv", "conv2": "/conv2/Conv"}


@dataclass(frozen=True)
class Config:
    """Every setting that changes the numbers (stored in results.json)."""

    dataset: str = "fashion-mnist"
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    retrain_epochs: int = 1
    # The retraining's batch size and learning rate; None: those of the base model's training
    # (the recorded runs). Set only to check how much the one-epoch retraining decides the
    # result (experiments/RESULTS.md, section 5).
    retrain_batch_size: int | None = None
    retrain_lr: float | None = None
    base_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    counts: tuple[int, ...] = (8, 6, 5, 4, 3, 2)
    strategies: tuple[str, ...] = ("paper", "clusters", "coverage", "selectivity", "partitions",
                                   "usage", "auto")
    # The strategy of the pipeline (conv1 -> stage2_from, then conv2): "auto", the default of
    # onnxaom.propose (clusters on conv1, usage on conv2; experiments/RESULTS.md). "paper", the
    # paper's order, was the worst at 3-6 kernels of conv1.
    pipeline_strategy: str = "auto"
    stage2_from: int = 5
    stages: tuple[str, ...] = ("conv1", "conv2")
    fig8_layer: str = "conv2"
    # One intra-op thread: on a 2-core machine shared with other jobs, 2 OpenMP threads were
    # 5-10x slower than 1 (oversubscription), e.g. 101 ms vs 10 ms per fc1/fc2 training step.
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls) -> Config:
        """Digits in seconds: the test suite's end-to-end run."""
        return cls(dataset="digits", epochs=12, batch_size=32, seeds=(0, 1), counts=(5, 3),
                   strategies=("paper", "clusters", "usage", "auto"))

    def key(self, stage1_only: bool = False) -> str:
        """Digest of the settings, to refuse resuming a run made with others; ``stage1_only``:
        of those the conv1 runs depend on (not the pipeline strategy, the stages or the conv1
        count conv2 starts from)."""
        return _digest(asdict(self), stage1_only)


def _digest(config: dict[str, Any], stage1_only: bool = False) -> str:
    # not the strategies: runs are matched one by one (stage, seed, method, n and kept kernels),
    # so adding a strategy reuses every run already made
    conv2_only = ("pipeline_strategy", "stages", "stage2_from")  # settings conv1 runs ignore
    unset = ("retrain_batch_size", "retrain_lr")  # None: as before they existed
    d = {k: v for k, v in config.items()
         if k not in ("threads", "strategies") and not (stage1_only and k in conv2_only)
         and not (k in unset and v is None)}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: tuple[str, ...]
    source: str


def load_data(dataset: str) -> Data:
    """Fashion-MNIST train/test (60,000/10,000), or scikit-learn digits upsampled to 28x28 with a
    stratified 80/20 split (1,437/360, ``random_state=0``, as fixtures/make_default_model.py)."""
    if dataset == "fashion-mnist":
        train, test = onnxaom.load_fashion_mnist("train"), onnxaom.load_fashion_mnist("test")
        pairs = (train.images, train.labels, test.images, test.labels)
        names, source = train.class_names, "Fashion-MNIST (Debian dataset-fashion-mnist)"
    elif dataset == "digits":
        from sklearn.model_selection import train_test_split

        digits = onnxaom.load_digits(size=28)
        tr, te = train_test_split(np.arange(len(digits.labels)), test_size=0.2,
                                  stratify=digits.labels, random_state=0)
        pairs = (digits.images[tr], digits.labels[tr], digits.images[te], digits.labels[te])
        names, source = digits.class_names, "scikit-learn digits, 28x28, 80/20 split"
    else:
        raise ValueError(f"dataset must be 'fashion-mnist' or 'digits', got {dataset!r}")
    xs, ys, xt, yt = (torch.from_numpy(np.array(a)) for a in pairs)
    return Data(xs.float(), ys.long(), xt.float(), yt.long(), tuple(names), source)


# ----------------------------------------------------------------------------- statistics
def pool_statistics_of(model: onnxaom.Model, data: Data, threads: int) -> onnxaom.OccurrenceStats:
    """Statistics of both convs at ``probe="pool"`` (what the layer after the pool reads), for
    the proposal strategy ``"usage"``."""
    return onnxaom.collect(
        model, data.x_train.numpy(), data.y_train.numpy(), class_names=data.class_names,
        layers=list(ONNX_LAYER.values()), provider="cpu", progress=False, threads=threads,
        batch_size=500, probe="pool",
    )


def _pool_stats_if_needed(model: onnxaom.Model, data: Data, config: Config
                          ) -> onnxaom.OccurrenceStats | None:
    """Pool-probe statistics when a strategy that reads them (usage, auto) is run."""
    if {"usage", "auto"} & set(config.strategies):
        return pool_statistics_of(model, data, config.threads)
    return None


def statistics_of(model: PaperMNISTNet, data: Data, folder: Path, name: str, threads: int
                  ) -> tuple[onnxaom.OccurrenceStats, onnxaom.Findings, float, onnxaom.Model]:
    """Export ``model`` to ``folder/name.onnx`` and collect onnxaom's statistics of both convs
    over the training set; returns (stats, findings, seconds, the ONNX model)."""
    path = export_onnx(model, folder / f"{name}.onnx", input_shape=(1, 1, 28, 28))
    start = time.perf_counter()
    stats = onnxaom.collect(
        str(path), data.x_train.numpy(), data.y_train.numpy(), class_names=data.class_names,
        layers=list(ONNX_LAYER.values()), provider="cpu", progress=False, threads=threads,
        batch_size=500,
    )
    findings = onnxaom.analyze(stats)
    return stats, findings, time.perf_counter() - start, onnxaom.load(path)


def layer_summary(stats: onnxaom.OccurrenceStats, findings: onnxaom.Findings, layer: str
                  ) -> dict[str, Any]:
    """What the proposal saw in one layer, for results.json."""
    lf = findings.layer(ONNX_LAYER[layer])
    return {
        "selectivity": [round(float(v), 6) for v in stats.selectivity(ONNX_LAYER[layer])],
        "ineffective": [f.to_dict() for f in lf.ineffective],
        "redundant_groups": [g.to_dict() for g in lf.redundant_groups],
        "natural_size": selection.natural_size(stats, findings, ONNX_LAYER[layer]),
    }


# ----------------------------------------------------------------------------- Fig. 8
def selectivity_experiment(model: torch.nn.Module, stats: onnxaom.OccurrenceStats, data: Data,
                           layer: str) -> list[dict[str, Any]]:
    """Per class: kernels selective (s^{k,c} > 0) and not, and the class's test accuracy with all
    kernels, only the selective ones and only the non-selective ones. ``layer`` is the torch
    conv's name (``"conv2"``); its statistics are those of ONNX node ``/{layer}/Conv`` (the
    legacy exporter's name); the other kernels are zeroed after its ReLU
    (:func:`torchnet.kernel_mask`)."""
    s = stats.class_selectivity(f"/{layer}/Conv")  # (K, C), from the training set
    records = []
    y = data.y_test.numpy()
    for c, name in enumerate(data.class_names):
        x = data.x_test[y == c]
        selective = s[:, c] > 0
        rec: dict[str, Any] = {"class": name, "selective": int(selective.sum()),
                               "not_selective": int((~selective).sum()),
                               "samples": len(x)}
        labels = torch.full((len(x),), c, dtype=torch.long)
        rec["accuracy_all"] = evaluate(model, (x, labels), device="cpu").accuracy
        for key, keep in (("selective", selective), ("not_selective", ~selective)):
            with torchnet.kernel_mask(model, layer, keep):
                rec[f"accuracy_{key}"] = evaluate(model, (x, labels), device="cpu").accuracy
        records.append(rec)
    return records


# ----------------------------------------------------------------------------- runs
class Recorder:
    """results.json, rewritten atomically after each run; resumes from a previous file."""

    def __init__(self, out: Path, config: Config, resume: bool) -> None:
        self.path = out / "results.json"
        self.results: dict[str, Any] = {"config": asdict(config), "config_key": config.key(),
                                        "runs": [], "stages": {}}
        self.previous: dict[tuple[str, int, str, int], dict[str, Any]] = {}
        #: the weights digest of the base model the previous runs were made on (None: unknown)
        self.previous_base: str | None = None
        if resume and self.path.exists():
            old = json.loads(self.path.read_text())
            self.previous_base = old.get("base", {}).get("weights_digest")
            if _digest(old["config"]) == config.key():
                runs = old["runs"]
            elif _digest(old["config"], stage1_only=True) == config.key(stage1_only=True):
                runs = [r for r in old["runs"] if r["stage"] == "conv1"]  # conv2: new pipeline
            else:
                raise SystemExit(f"{self.path} was made with other settings; drop --resume or "
                                 f"use another --out")
            self.previous = {(r["stage"], r["seed"], r["method"], r["n"]): r for r in runs}
            log.info("resuming: %d runs already done", len(self.previous))

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.results, indent=1))


def _parameters(k1: int, k2: int) -> int:
    return sum(p.numel() for p in PaperMNISTNet(conv_kernels=(k1, k2)).parameters())


def _accuracy(model: torch.nn.Module, data: Data) -> float:
    return evaluate(model, (data.x_test, data.y_test), batch_size=1000, device="cpu").accuracy


def reduce_stage(
    base: PaperMNISTNet, base_onnx: onnxaom.Model, stage: str, seed: int,
    stats: onnxaom.OccurrenceStats,
    findings: onnxaom.Findings, features: torch.Tensor, data: Data, config: Config,
    recorder: Recorder, before_cache: dict[tuple[int, ...], float],
    keep_model: tuple[str, int] | None = None,
    pool_stats: onnxaom.OccurrenceStats | None = None,
) -> PaperMNISTNet | None:
    """Every (method, n) of one stage for one seed; returns the model of ``keep_model`` (method,
    n) after retraining, if asked. ``before_cache``: test accuracy right after removal by kept
    kernels, shared by the seeds that reduce the same ``base``.

    Kernels are removed by the torch adapter (:func:`onnxaom_torch.edit.apply_edits`, checked
    against onnxaom's ONNX surgery of ``base_onnx``); the frozen part is computed once
    (``features``: :func:`torchnet.prefix_features` of ``base``) and the rest retrained on it."""
    k = getattr(base, stage).out_channels
    jobs: list[tuple[str, int, tuple[int, ...], str]] = [("unreduced", k, tuple(range(k)), "-")]
    for n in config.counts:
        for strategy in config.strategies:
            kept = selection.proposal_keep(stats, findings, ONNX_LAYER[stage], n, strategy,
                                           model=base_onnx, pool_stats=pool_stats)
            jobs.append((f"proposal:{strategy}", n, kept, "onnxaom.proposal"))
        jobs.append(("magnitude", n, selection.magnitude_keep(base, stage, n), "torch-pruning"))
        jobs.append(("random", n, selection.random_keep(k, n, seed, salt=1 + torchnet.STAGES
                                                        .index(stage)), "numpy"))
    done: dict[tuple[int, ...], dict[str, Any]] = {}
    kept_model = None
    for method, n, kept, impl in jobs:
        want_model = keep_model == (method, n)
        old = recorder.previous.get((stage, seed, method, n))
        if old is not None and tuple(old["kept"]) == kept and not want_model:
            recorder.results["runs"].append(old)
            done.setdefault(kept, old)
            continue
        if kept in done and not want_model:  # same kernels, same seed: the same retraining
            run = {**done[kept], "method": method, "impl": impl, "same_as": done[kept]["method"]}
            recorder.results["runs"].append(run)
            recorder.save()
            continue
        removed = tuple(i for i in range(k) if i not in kept)
        if removed:
            edit = apply_edits(base, base_onnx, [RemoveKernels(ONNX_LAYER[stage], removed)])
            model = edit.module
            difference = edit.difference
        else:
            model, difference = torchnet.clone(base), 0.0
        if kept not in before_cache:  # no retraining yet: the same for every seed
            before_cache[kept] = _accuracy(model, data)
        before = before_cache[kept]
        h = features[:, list(kept)].contiguous()
        torchnet.check_features(model, stage, data.x_train[:16], h[:16])
        info = torchnet.retrain_suffix(model, stage, h, data.y_train, TrainConfig(
            epochs=config.retrain_epochs, seed=seed,
            batch_size=config.batch_size if config.retrain_batch_size is None
            else config.retrain_batch_size,
            lr=config.lr if config.retrain_lr is None else config.retrain_lr))
        del h
        run = {"stage": stage, "seed": seed, "method": method, "n": n, "kept": list(kept),
               "impl": impl, "accuracy_before": before, "accuracy": _accuracy(model, data),
               "edit_check_difference": difference,
               "loss": info["loss"], "seconds": round(info["seconds"], 2)}
        log.info("%s seed %d %-22s n=%2d kept=%s: %.4f -> %.4f (%.1f s)", stage, seed, method, n,
                 list(kept), before, run["accuracy"], info["seconds"])
        done.setdefault(kept, run)
        recorder.results["runs"].append(run)
        recorder.save()
        if want_model:
            kept_model = model
    return kept_model


def run(config: Config, out: Path, *, resume: bool = False, render: bool = True
        ) -> dict[str, Any]:
    """The whole experiment; returns (and writes) the results dict."""
    if "conv2" in config.stages and (config.pipeline_strategy not in config.strategies
                                     or config.stage2_from not in config.counts):
        raise ValueError(f"conv2 starts from conv1 kept at {config.stage2_from} by "
                         f"{config.pipeline_strategy!r}: add them to counts {config.counts} "
                         f"and strategies {config.strategies}")
    torch.set_num_threads(config.threads)
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    models.mkdir(exist_ok=True)
    start = time.perf_counter()
    recorder = Recorder(out, config, resume)
    res = recorder.results
    res["environment"] = {"python": platform.python_version(), "torch": torch.__version__,
                          "onnxaom": onnxaom.__version__, "machine": platform.machine(),
                          "cpu": cpu_name(),
                          "cpu_threads": config.threads, "torch_pruning": _tp_version()}
    data = load_data(config.dataset)
    res["data"] = {"source": data.source, "train": len(data.y_train), "test": len(data.y_test),
                   "classes": list(data.class_names)}

    # 1. the trained model and its statistics
    base_path = models / "base.pt"
    base = _initial_model(config.base_seed)
    loaded = resume and base_path.exists()
    if loaded:
        base.load_state_dict(torch.load(base_path))
        base_info: dict[str, Any] = dict(json.loads((models / "base.json").read_text()))
    else:
        t0 = time.perf_counter()
        losses = torchnet.train(base, data.x_train, data.y_train, TrainConfig(
            epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
            seed=config.base_seed))
        base_info = {"train_losses": losses, "seconds": time.perf_counter() - t0}
        torch.save(base.state_dict(), base_path)
        (models / "base.json").write_text(json.dumps(base_info))
    base.eval()
    base_info["weights_digest"] = digest = weights_digest(base)
    # earlier runs are reused only on the base model they were made on: the one on disk, whose
    # weights digest (where recorded) matches; reusing others would mix two models in a table
    if recorder.previous and not (loaded and recorder.previous_base in (None, digest)):
        why = (f"made on another base model (weights {str(recorder.previous_base)[:12]})"
               if loaded else f"not made on a base model on disk ({base_path} was trained)")
        log.warning("the %d runs in results.json were %s: they are run again",
                    len(recorder.previous), why)
        recorder.previous.clear()
    base_info["accuracy"] = _accuracy(base, data)
    res["base"] = base_info
    log.info("trained model: test accuracy %.4f", base_info["accuracy"])
    stats, findings, secs, base_onnx = statistics_of(base, data, models, "base", config.threads)
    stats.save(out / "base_stats.npz")
    findings.to_json(out / "base_findings.json")
    res["statistics"] = {"base": {"seconds": secs, "findings": findings.summary_lines(),
                                  **{st: layer_summary(stats, findings, st)
                                     for st in config.stages}}}
    res["parameters"] = {f"{a}x{b}": _parameters(a, b)
                         for a in (*config.counts, 16, config.stage2_from)
                         for b in (*config.counts, 16)}

    # 2. Fig. 8 on the last conv layer of the trained model
    res["fig8_layer"] = config.fig8_layer
    res["fig8"] = selectivity_experiment(base, stats, data, config.fig8_layer)
    recorder.save()

    # 3. conv1, every seed; keep the pipeline model of each seed for stage 2
    res["stages"]["conv1"] = {"kernels": base.conv1.out_channels}
    pipeline = (f"proposal:{config.pipeline_strategy}", config.stage2_from)
    keep_model = pipeline if "conv2" in config.stages else None
    stage2_bases: dict[int, PaperMNISTNet] = {}
    features = torchnet.prefix_features(base, "conv1", data.x_train)
    before: dict[tuple[int, ...], float] = {}
    pool_stats = _pool_stats_if_needed(base_onnx, data, config)  # once: the same base model
    for seed in config.seeds:
        path = models / f"stage2_base_seed{seed}.pt"
        model = reduce_stage(base, base_onnx, "conv1", seed, stats, findings, features, data,
                             config, recorder, before, keep_model=keep_model,
                             pool_stats=pool_stats)
        if model is not None:
            torch.save(model.state_dict(), path)
            stage2_bases[seed] = model
        elif path.exists():
            m = PaperMNISTNet(conv_kernels=(config.stage2_from, base.conv2.out_channels))
            m.load_state_dict(torch.load(path))
            stage2_bases[seed] = m.eval()
    del features

    # 4. conv2 from conv1 reduced by the pipeline strategy, per seed
    if "conv2" in config.stages:
        res["stages"]["conv2"] = {"kernels": base.conv2.out_channels,
                                  "from_conv1": config.stage2_from}
        for seed in config.seeds:
            base2 = stage2_bases[seed]
            stats2, findings2, secs, onnx2 = statistics_of(base2, data, models,
                                                           f"stage2_seed{seed}", config.threads)
            res["statistics"][f"stage2_seed{seed}"] = {
                "seconds": secs, "conv2": layer_summary(stats2, findings2, "conv2")}
            features = torchnet.prefix_features(base2, "conv2", data.x_train)
            reduce_stage(base2, onnx2, "conv2", seed, stats2, findings2, features, data, config,
                         recorder, {}, pool_stats=_pool_stats_if_needed(onnx2, data, config))
            del features

    res["seconds"] = time.perf_counter() - start
    recorder.save()
    write_outputs(res, out, render=render)
    return res


def _initial_model(base_seed: int) -> PaperMNISTNet:
    """The untrained base model, its weights drawn from ``torch.manual_seed(base_seed)``
    without changing the global generator.

    Base seed 0 was once drawn from the global generator as the process had it. torch 2.13
    here starts each process from a random seed, so that gave another base model on every run,
    and the recorded base model 0 (experiments/RESULTS.md, sections 1-3) cannot be drawn again;
    it is now seeded like every other base seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(base_seed)
        return PaperMNISTNet()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names, shapes, float32 bytes), hex: which base model a
    run was made on, so that --resume never mixes runs of two."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        array = value.detach().cpu().contiguous().numpy()
        h.update(f"{name}{tuple(array.shape)}{array.dtype}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``: two CPUs round
    training differently (experiments/RESULTS.md, section 5)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _tp_version() -> str | None:
    try:
        import torch_pruning

        return str(getattr(torch_pruning, "__version__", "unknown"))
    except ImportError:
        return None


def write_outputs(results: dict[str, Any], out: Path, *, render: bool = True) -> None:
    """tables.md and the charts (PNG and SVG) from the results dict."""
    strategy = results["config"]["pipeline_strategy"]
    parts = [f"Data: {results['data']['source']}; trained model: test accuracy "
             f"{100 * results['base']['accuracy']:.2f}% after {results['config']['epochs']} "
             f"epochs. Seeds: {results['config']['seeds']}. Test accuracy in %, mean ± sample "
             f"sd over seeds.", "", "## Pipeline (Sec. V-A), proposal strategy "
             f"`{strategy}`", "", tables.pipeline_table(results, strategy)]
    for stage in results["stages"]:
        parts += ["", f"## Selection quality: {stage}, after one frozen retraining epoch", "",
                  tables.selection_table(results, stage), "",
                  f"## Selection quality: {stage}, right after removal (no retraining)", "",
                  tables.selection_table(results, stage, key="accuracy_before")]
    parts += ["", f"## Kernel selectivity experiment (Fig. 8), {results['fig8_layer']}", "",
              tables.fig8_table(results["fig8"])]
    for strat in results["config"]["strategies"]:
        parts += ["", f"## Targets, proposal strategy `{strat}`", "",
                  tables.checks_table(tables.target_checks(results, strat))]
    (out / "tables.md").write_text("\n".join(parts) + "\n")
    if render:
        from onnxaom.charts import selectivity_experiment as fig8_chart
        from onnxaom.report import render as render_chart

        charts = {"selection": tables.selection_chart(results),
                  "fig8": fig8_chart(results["fig8"])}
        for name, chart in charts.items():
            for suffix in (".png", ".svg"):
                render_chart(chart, out / f"{name}{suffix}", scale=2.0 if suffix == ".png"
                             else 1.0)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main(argv: Sequence[str] | None = None) -> int:
    first_paragraph = (__doc__ or "").split("\n\n")[0].replace("\n", " ")
    parser = argparse.ArgumentParser(description=first_paragraph or None)
    parser.add_argument("--quick", action="store_true",
                        help="digits, few epochs, counts 5,3, 2 seeds: seconds")
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (0..S-1)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the base model")
    parser.add_argument("--counts", type=_ints, default=None, help="kernels kept, e.g. 8,6,5")
    parser.add_argument("--strategies", default=None, help="proposal strategies, comma-separated")
    parser.add_argument("--pipeline-strategy", default=None)
    parser.add_argument("--stage2-from", type=int, default=None)
    parser.add_argument("--base-seed", type=int, default=None,
                        help="seed of the base model (initial weights and batch order)")
    parser.add_argument("--stages", default=None,
                        help="layers to reduce, comma-separated: conv1,conv2 (default) or conv1")
    parser.add_argument("--retrain-batch-size", type=int, default=None,
                        help="batch size of the one-epoch retraining (default: the base model's)")
    parser.add_argument("--retrain-lr", type=float, default=None,
                        help="learning rate of the retraining (default: the base model's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-render", action="store_true", help="skip PNG/SVG charts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    config = Config.quick() if args.quick else Config()
    changes: dict[str, Any] = {}
    if args.seeds is not None:
        changes["seeds"] = tuple(range(args.seeds))
    for name in ("epochs", "counts", "pipeline_strategy", "stage2_from", "threads", "base_seed",
                 "retrain_batch_size", "retrain_lr"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.strategies is not None:
        changes["strategies"] = tuple(s for s in args.strategies.split(",") if s)
    if args.stages is not None:
        changes["stages"] = tuple(s for s in args.stages.split(",") if s)
        if changes["stages"] not in (("conv1",), ("conv1", "conv2")):
            parser.error(f"--stages must be conv1,conv2 or conv1 (conv2 starts from a reduced "
                         f"conv1), got {args.stages!r}")
    config = Config(**{**asdict(config), **changes})
    run(config, args.out, resume=args.resume, render=not args.no_render)
    print((args.out / "tables.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
