"""Findings time (``analyze_layer``) for wide layers, with and without optimal leaf ordering.

Prints a Markdown table (copy it into benchmarks/RESULTS.md). Run from the repository root:

    .venv/bin/python benchmarks/findings.py [--kernels 512 1024 2048 4096] [--classes 4 10]

Each layer is a dense layer's AOM, (K, C, 1, 1), drawn uniformly at random (seeded): the shape
of AlexNet's and VGG's 4,096-neuron layers, where the clustering's optimal leaf ordering cost
minutes. ``default`` is ``analyze_layer`` as it runs (optimal ordering up to
``OPTIMAL_ORDER_MAX_KERNELS`` kernels); ``optimal order`` forces it at every size (skipped
above ``--optimal-max`` kernels, where it takes too long to wait for).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxaom.findings as findings  # noqa: E402


def timed(aom: np.ndarray, names: tuple[str, ...], limit: int) -> float:
    saved = findings.OPTIMAL_ORDER_MAX_KERNELS
    findings.OPTIMAL_ORDER_MAX_KERNELS = limit
    try:
        start = time.perf_counter()
        findings.analyze_layer("dense", aom, class_names=names)
        return time.perf_counter() - start
    finally:
        findings.OPTIMAL_ORDER_MAX_KERNELS = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--classes", type=int, nargs="+", default=[4, 10])
    parser.add_argument("--optimal-max", type=int, default=2048)
    args = parser.parse_args()
    print(f"optimal leaf ordering up to {findings.OPTIMAL_ORDER_MAX_KERNELS} kernels by default")
    print()
    print("| kernels | classes | default (s) | optimal order (s) |")
    print("|---:|---:|---:|---:|")
    for k in args.kernels:
        for c in args.classes:
            aom = np.random.default_rng(k + c).random((k, c, 1, 1))
            names = tuple(f"class{i}" for i in range(c))
            default = timed(aom, names, findings.OPTIMAL_ORDER_MAX_KERNELS)
            optimal = f"{timed(aom, names, k):.2f}" if k <= args.optimal_max else "not run"
            print(f"| {k:,} | {c} | {default:.2f} | {optimal} |", flush=True)


if __name__ == "__main__":
    main()
