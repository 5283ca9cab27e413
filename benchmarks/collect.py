"""Collection speed and memory: in-graph counting vs inference, the plain path, torch hooks.

Prints a Markdown table (copy it into benchmarks/RESULTS.md). Run from the repository root:

    .venv/bin/python benchmarks/collect.py [--threads 2] [--samples 4096] [--profile]

Models: the paper's MNIST architecture (1x28x28, Fashion-MNIST test images, real data) and its
CIFAR architecture (3x32x32; no CIFAR data ships here, so images are random normal: the speed
of dense convolutions does not depend on pixel values). Weights are torch's random init
(seeded); exported with the legacy exporter, opset 17. Every path uses the same thread count
and batch 256, on the CPU. Peak RSS is measured in a fresh subprocess per sample count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH = 256


def build_models(folder: Path) -> dict[str, tuple[Path, tuple[int, int, int]]]:
    import torch
    from onnxaom_torch.architectures import PaperCIFARNet, PaperMNISTNet, export_onnx

    torch.manual_seed(0)
    models = {}
    for name, module, shape in (
        ("mnist", PaperMNISTNet(), (1, 28, 28)),
        ("cifar", PaperCIFARNet(), (3, 32, 32)),
    ):
        path = export_onnx(
            module.eval(), folder / f"{name}.onnx", exporter="legacy", input_shape=(1, *shape)
        )
        models[name] = (path, shape)
    return models


def images_for(name: str, shape: tuple[int, int, int], n: int) -> tuple[np.ndarray, np.ndarray]:
    if name == "mnist":
        from onnxaom.data import load_fashion_mnist

        data = load_fashion_mnist("train")
        reps = -(-n // len(data))
        images = np.concatenate([data.images] * reps)[:n]
        labels = np.concatenate([data.labels] * reps)[:n]
        return np.ascontiguousarray(images), labels
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, 10, n)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


def rate(fn, n: int, repeats: int = 3) -> float:
    """Samples per second of the best of ``repeats`` runs, on the chosen clock.

    "cpu" counts the process's CPU seconds (all threads): on a machine shared with other jobs
    it is far steadier than wall time, and with one thread the two agree on a quiet machine.
    """
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = CLOCK()
        fn()
        best = min(best, CLOCK() - start)
    return n / best


def plain_inference(path: Path, images: np.ndarray, threads: int):
    import onnx

    from onnxaom.runtime import make_session

    session = make_session(onnx.load(str(path)), ["CPUExecutionProvider"], threads=threads)
    name = session.get_inputs()[0].name

    def run() -> None:
        for start in range(0, len(images), BATCH):
            session.run(None, {name: images[start : start + BATCH]})

    return run


def collection(path: Path, images: np.ndarray, labels: np.ndarray, threads: int, method: str):
    """Steady-state counting: the Collector (session) is built once, like the inference session."""
    import onnxaom

    collector = onnxaom.Collector(
        onnxaom.load(path), method=method, threads=threads, provider="cpu", num_classes=10
    )
    collector.update(images[:BATCH], labels[:BATCH])  # builds the session

    def run() -> None:
        for start in range(0, len(images), BATCH):
            collector.update(images[start : start + BATCH], labels[start : start + BATCH])

    return run


def setup_seconds(path: Path, images: np.ndarray, labels: np.ndarray, threads: int) -> float:
    """load + instrument + session + first batch: what collect() pays once per call."""
    import onnxaom

    start = time.perf_counter()
    collector = onnxaom.Collector(
        onnxaom.load(path), threads=threads, provider="cpu", num_classes=10
    )
    collector.update(images[:BATCH], labels[:BATCH])
    return time.perf_counter() - start


def torch_hooks(name: str, images: np.ndarray, labels: np.ndarray, threads: int):
    """What a user would write: forward hooks on every ReLU, counts per class with torch ops."""
    import torch
    from onnxaom_torch.architectures import PaperCIFARNet, PaperMNISTNet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    module = (PaperMNISTNet() if name == "mnist" else PaperCIFARNet()).eval()
    relus = [m for m in module.modules() if isinstance(m, torch.nn.ReLU)]
    counts: dict[int, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def hook(index: int):
        def count(_module, _inputs, output):
            positive = (output > 0).reshape(output.shape[0], -1).float()
            batch = current["onehot"] @ positive
            counts[index] = counts.get(index, 0) + batch.long()

        return count

    for i, relu in enumerate(relus):
        relu.register_forward_hook(hook(i))
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))

    def run() -> None:
        counts.clear()
        with torch.inference_mode():
            for start in range(0, len(images), BATCH):
                y = y_all[start : start + BATCH]
                current["onehot"] = torch.nn.functional.one_hot(y, 10).T.float()
                module(x_all[start : start + BATCH])

    return run


def peak_rss_mib(path: Path, name: str, shape: tuple[int, int, int], n: int, threads: int) -> float:
    code = f"""
import resource, sys, numpy as np
sys.path.insert(0, {str(ROOT)!r})
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
from collect import images_for, collection
images, labels = images_for({name!r}, {shape!r}, 512)
import onnxaom
from onnxaom.collect import collect
def batches():
    for start in range(0, {n}, 512):
        yield images[: min(512, {n} - start)], labels[: min(512, {n} - start)]
model = onnxaom.load({str(path)!r})
collect(model, batches(), batch_size={BATCH}, progress=False, threads={threads},
        provider="cpu", num_classes=10)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def profile(
    path: Path, images: np.ndarray, labels: np.ndarray, threads: int
) -> list[tuple[str, float]]:
    """Share of ORT's node time per op type for the in-graph counting session (the graph
    ``collect`` runs on CPU: counts reading ORT's blocked layout, opened at the basic level)."""
    import onnxruntime as ort

    import onnxaom
    from onnxaom.blocked import blocked_counting_model
    from onnxaom.collect import select_layers
    from onnxaom.instrument import ONEHOT_INPUT, counting_graph

    model = onnxaom.load(path)
    graph = counting_graph(model.proto, select_layers(model, None, "activation"))
    blocked = blocked_counting_model(graph, threads=threads)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = threads
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    proto = graph.model
    if blocked is not None:
        proto = blocked[0]
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    onehot = np.zeros((10, BATCH), np.uint8)
    onehot[labels[:BATCH] % 10, np.arange(BATCH)] = 1
    for _ in range(5):
        session.run(None, {graph.input_name: images[:BATCH], ONEHOT_INPUT: onehot})
    trace = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"].get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + event["dur"]
    total = sum(per_op.values())
    return sorted(((op, t / total) for op, t in per_op.items()), key=lambda x: -x[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4096, help="samples per timing run")
    parser.add_argument("--profile", action="store_true", help="print an ORT op-time profile")
    parser.add_argument("--rss", action="store_true", help="measure peak RSS at 10k and 60k")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall seconds, or CPU seconds of this process (steadier when shared)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp))
        print(
            f"CPU, {args.threads} threads, batch {BATCH}, {args.samples} samples per run, "
            f"best of 3; samples per {args.clock} second"
        )
        print()
        print(
            "| model | plain inference | in-graph | plain path | torch hooks | "
            "in-graph / inference | in-graph / torch | setup (s) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, (path, shape) in models.items():
            images, labels = images_for(name, shape, args.samples)
            r_inf = rate(plain_inference(path, images, args.threads), args.samples)
            r_graph = rate(collection(path, images, labels, args.threads, "graph"), args.samples)
            r_plain = rate(collection(path, images, labels, args.threads, "plain"), args.samples)
            r_torch = rate(torch_hooks(name, images, labels, args.threads), args.samples)
            setup = setup_seconds(path, images, labels, args.threads)
            print(
                f"| {name} | {r_inf:,.0f} | {r_graph:,.0f} | {r_plain:,.0f} | {r_torch:,.0f} | "
                f"{r_graph / r_inf:.2f}x | {r_graph / r_torch:.2f}x | {setup:.2f} |"
            )
        if args.rss:
            print()
            print("| model | peak RSS 10k (MiB) | peak RSS 60k (MiB) | growth |")
            print("|---|---|---|---|")
            for name, (path, shape) in models.items():
                small = peak_rss_mib(path, name, shape, 10_000, args.threads)
                large = peak_rss_mib(path, name, shape, 60_000, args.threads)
                print(f"| {name} | {small:.0f} | {large:.0f} | {100 * (large / small - 1):+.1f}% |")
        if args.profile:
            for name, (path, shape) in models.items():
                images, labels = images_for(name, shape, BATCH)
                print()
                print(f"ORT profile, in-graph counting session, {name}: share of node time")
                for op, share in profile(path, images, labels, args.threads)[:8]:
                    print(f"  {op:<24} {100 * share:5.1f}%")


if __name__ == "__main__":
    main()
