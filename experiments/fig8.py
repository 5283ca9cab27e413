"""The kernel selectivity experiment (Sec. V-C, Fig. 8) in the paper's own setting: the 6th conv
layer of the paper's CIFAR-10 architecture, trained here on Fashion-MNIST (CIFAR-10 cannot be
had on this machine).

Run from the repository root (about 7 minutes per base seed on 2 CPU cores; ``--quick``: digits,
a narrow model, seconds)::

    .venv/bin/python -m experiments.fig8 --out experiments/results/fig8-cifar-arch \\
        --base-seeds 0,1,2
    .venv/bin/python -m experiments.fig8 --quick --out /tmp/fig8-quick

For each base seed:

1. Train :class:`onnxaom_torch.PaperCIFARNet` (three groups of two 3x3 convs, max-pool and
   dropout 0.25; dense ``--hidden`` with dropout 0.5; dense 10; every conv ``--width`` kernels)
   on the training set: ``--epochs`` epochs, Adam 1e-3, batch 128, the seed drawing the initial
   weights, the batch order and the dropout masks.
2. Export it to ONNX (legacy exporter) and collect onnxaom's statistics of ``--layer`` (conv6,
   the last conv, as the paper) over the whole training set.
3. Per class c, the kernels with mean CSM s^{k,c} > 0 are *selective* for c. Test accuracy on
   class c with all kernels, only the selective ones and only the non-selective ones (the other
   kernels' activations zeroed after the ReLU, onnxaom's probe point; no retraining, as the paper).

Writes to ``--out``: ``results.json`` (every number; rewritten after each base seed),
``tables.md`` (a table per base seed, the summary over seeds and the target check),
``fig8-seed{s}.png/svg`` (the paper's Fig. 8 layout), ``stats-seed{s}.npz`` and ``models/``
(state dicts and ONNX exports; ``--resume`` reuses a trained model with the same settings).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from onnxaom_torch import PaperCIFARNet, export_onnx
from onnxaom_torch.train import evaluate

import onnxaom
from onnxaom.files import atomic_write_text

from . import tables, torchnet
from .fashion_mnist import Data, load_data, selectivity_experiment
from .torchnet import TrainConfig

__all__ = ["Config", "main", "run"]

log = logging.getLogger("experiments.fig8")


@dataclass(frozen=True)
class Config:
    """Every setting that changes the numbers (stored in results.json)."""

    dataset: str = "fashion-mnist"
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    width: int = 64  # the paper's CIFAR-10 model: 64 kernels in every conv
    hidden: int = 512
    layer: str = "conv6"
    base_seeds: tuple[int, ...] = (0,)
    threads: int = 2

    @classmethod
    def quick(cls) -> Config:
        """Digits, a narrow model, seconds: the test suite's end-to-end run."""
        return cls(dataset="digits", epochs=6, batch_size=32, width=8, hidden=32,
                   base_seeds=(0,), threads=1)

    def model_key(self) -> str:
        """Digest of the settings a trained model depends on (not the seeds or threads)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("base_seeds", "threads")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _initial_model(config: Config, seed: int, in_channels: int, image_size: int) -> PaperCIFARNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PaperCIFARNet(in_channels=in_channels, image_size=image_size, width=config.width,
                             hidden=config.hidden)


def _trained_model(config: Config, seed: int, data: Data, models: Path, resume: bool
                   ) -> tuple[PaperCIFARNet, dict[str, Any]]:
    """The base model of ``seed``: loaded when ``resume`` finds one made with these settings."""
    _, in_channels, image_size, _ = data.x_train.shape
    model = _initial_model(config, seed, in_channels, image_size)
    path, info_path = models / f"seed{seed}.pt", models / f"seed{seed}.json"
    if resume and path.exists() and info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("model_key") == config.model_key():
            model.load_state_dict(torch.load(path))
            log.info("base seed %d: trained model reused from %s", seed, path)
            return model.eval(), info
    start = time.perf_counter()
    losses = torchnet.train(model, data.x_train, data.y_train, TrainConfig(
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=seed))
    info = {"model_key": config.model_key(), "train_losses": losses,
            "seconds": time.perf_counter() - start}
    torch.save(model.state_dict(), path)
    info_path.write_text(json.dumps(info))
    return model.eval(), info


def run_seed(config: Config, seed: int, data: Data, out: Path, resume: bool) -> dict[str, Any]:
    """Train (or reuse) one base model, collect its statistics and run Fig. 8 on it."""
    models = out / "models"
    model, info = _trained_model(config, seed, data, models, resume)
    accuracy = evaluate(model, (data.x_test, data.y_test), batch_size=1000,
                        device="cpu").accuracy
    log.info("base seed %d: test accuracy %.4f", seed, accuracy)
    _, in_channels, image_size, _ = data.x_train.shape
    path = export_onnx(model, models / f"seed{seed}.onnx",
                       input_shape=(1, in_channels, image_size, image_size))
    start = time.perf_counter()
    stats = onnxaom.collect(
        str(path), data.x_train.numpy(), data.y_train.numpy(), class_names=data.class_names,
        layers=[f"/{config.layer}/Conv"], provider="cpu", progress=False,
        threads=config.threads, batch_size=500,
    )
    stats_seconds = time.perf_counter() - start
    stats.save(out / f"stats-seed{seed}.npz")
    records = selectivity_experiment(model, stats, data, config.layer)
    return {"base_seed": seed, "accuracy": accuracy, "train": info,
            "statistics_seconds": stats_seconds, "fig8": records,
            "check": tables.fig8_check(records)}


def run(config: Config, out: Path, *, resume: bool = False, render: bool = True
        ) -> dict[str, Any]:
    """Fig. 8 for every base seed; returns (and writes) the results dict."""
    torch.set_num_threads(config.threads)
    (out / "models").mkdir(parents=True, exist_ok=True)
    data = load_data(config.dataset)
    results: dict[str, Any] = {
        "config": asdict(config),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "onnxaom": onnxaom.__version__, "machine": platform.machine(),
                        "cpu_threads": config.threads},
        "data": {"source": data.source, "train": len(data.y_train), "test": len(data.y_test),
                 "classes": list(data.class_names)},
        "seeds": [],
    }
    start = time.perf_counter()
    for seed in config.base_seeds:
        results["seeds"].append(run_seed(config, seed, data, out, resume))
        results["seconds"] = time.perf_counter() - start
        atomic_write_text(out / "results.json", json.dumps(results, indent=1))
        write_outputs(results, out, render=render)
    return results


def summary_table(results: dict[str, Any]) -> str:
    """One row per base seed: test accuracy, mean class accuracy with all kernels and the mean
    change when keeping only the selective / only the non-selective kernels."""
    lines = ["| base seed | test acc. (%) | selective kernels per class | all kernels (%) | "
             "only selective (pp) | only not selective (pp) | classes kept (only selective "
             "≥ all − 2 pp) | Fig. 8 target |",
             "|---:|---:|---|---:|---:|---:|---:|---|"]
    for rec in results["seeds"]:
        rows = rec["fig8"]
        counts = [r["selective"] for r in rows]
        held = sum(r["accuracy_selective"] >= r["accuracy_all"] - 0.02 for r in rows)
        mean_all = statistics.fmean(r["accuracy_all"] for r in rows)
        lines.append(
            f"| {rec['base_seed']} | {100 * rec['accuracy']:.2f} | {min(counts)}–{max(counts)} "
            f"of {rows[0]['selective'] + rows[0]['not_selective']} | {100 * mean_all:.2f} | "
            f"{100 * rec['check']['change_selective']:+.2f} | "
            f"{100 * rec['check']['change_not_selective']:+.2f} | {held} of {len(rows)} | "
            f"{'met' if rec['check']['met'] else '**not met**'} |")
    return "\n".join(lines)


def write_outputs(results: dict[str, Any], out: Path, *, render: bool = True) -> None:
    """tables.md and one Fig. 8 chart (PNG and SVG) per base seed."""
    c = results["config"]
    parts = [f"Data: {results['data']['source']}. Model: the paper's CIFAR-10 architecture, "
             f"{c['width']} kernels per conv, dense {c['hidden']}, trained {c['epochs']} epochs. "
             f"Layer: {c['layer']}. Class accuracy on the test set, in %.", "",
             "## Summary over base seeds", "", summary_table(results)]
    for rec in results["seeds"]:
        parts += ["", f"## Base seed {rec['base_seed']} (test accuracy "
                  f"{100 * rec['accuracy']:.2f}%)", "", tables.fig8_table(rec["fig8"])]
    (out / "tables.md").write_text("\n".join(parts) + "\n")
    if render:
        from onnxaom.charts import selectivity_experiment as fig8_chart
        from onnxaom.report import render as render_chart

        for rec in results["seeds"]:
            chart = fig8_chart(rec["fig8"])
            for suffix in (".png", ".svg"):
                render_chart(chart, out / f"fig8-seed{rec['base_seed']}{suffix}",
                             scale=2.0 if suffix == ".png" else 1.0)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main(argv: Sequence[str] | None = None) -> int:
    first_paragraph = (__doc__ or "").split("\n\n")[0].replace("\n", " ")
    parser = argparse.ArgumentParser(description=first_paragraph or None)
    parser.add_argument("--quick", action="store_true", help="digits, a narrow model: seconds")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/fig8-cifar-arch"))
    parser.add_argument("--base-seeds", type=_ints, default=None, help="e.g. 0,1,2")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--width", type=int, default=None, help="kernels per conv")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layer", default=None, help="conv1 .. conv6 (default conv6)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--resume", action="store_true",
                        help="reuse trained models made with the same settings")
    parser.add_argument("--no-render", action="store_true", help="skip PNG/SVG charts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    config = Config.quick() if args.quick else Config()
    changes = {name: getattr(args, name) for name in
               ("base_seeds", "epochs", "width", "hidden", "layer", "threads")
               if getattr(args, name) is not None}
    if "layer" in changes and changes["layer"] not in {f"conv{i}" for i in range(1, 7)}:
        parser.error(f"--layer must be one of conv1 .. conv6, got {changes['layer']!r}")
    config = Config(**{**asdict(config), **changes})
    run(config, args.out, resume=args.resume, render=not args.no_render)
    print((args.out / "tables.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
