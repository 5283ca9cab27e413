"""How the two counting methods scale with the number of classes. Prints a Markdown table.

    .venv/bin/python benchmarks/classes.py [--threads 1] [--samples 8192]

The in-graph count multiplies a (classes x batch) one-hot matrix by the (batch x K*H*W) mask,
so its cost grows with the classes; the plain path sums the mask rows of each class present in
a batch, whose cost hardly does. ``method="auto"`` switches to the plain path on the CPU above
``onnxaom.collect.GRAPH_MAX_CLASSES`` classes; this table is where that number comes from.
Same models as ``collect.py`` (random seeded weights, legacy export), every layer counted,
labels ``i % classes``, samples per CPU second of this process, best of 2 runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from collect import BATCH, build_models

import onnxaom
from onnxaom.collect import GRAPH_MAX_CLASSES

CLASSES = (10, 32, 64, 100, 128, 256, 512)


def samples_per_second(model: onnxaom.Model, images: np.ndarray, labels: np.ndarray,
                       method: str, threads: int) -> float:
    best = float("inf")
    for _ in range(2):
        start = time.process_time()
        onnxaom.collect(model, images, labels, method=method, threads=threads, progress=False,
                        batch_size=BATCH, layers=[layer.name for layer in model.layers()])
        best = min(best, time.process_time() - start)
    return images.shape[0] / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--models", default="mnist,cifar", help="mnist, cifar or both")
    args = parser.parse_args(argv)
    wanted = args.models.split(",")
    print(f"samples per CPU second, {args.threads} thread(s), {args.samples} samples, batch "
          f"{BATCH}; auto switches to plain above {GRAPH_MAX_CLASSES} classes\n")
    print("| model | classes | in-graph | plain path | in-graph / plain |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, shape) in build_models(Path(tmp)).items():
            if name not in wanted:
                continue
            model = onnxaom.load(path)
            rng = np.random.default_rng(0)
            images = rng.random((args.samples, *shape), dtype=np.float32)
            for classes in CLASSES:
                labels = np.arange(args.samples) % classes
                graph = samples_per_second(model, images, labels, "graph", args.threads)
                plain = samples_per_second(model, images, labels, "plain", args.threads)
                print(f"| {name} | {classes} | {graph:,.0f} | {plain:,.0f} | "
                      f"{graph / plain:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
