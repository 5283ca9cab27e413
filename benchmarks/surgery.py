"""Graph-surgery speed, and what pruning buys at inference.

Prints Markdown tables (copy them into benchmarks/RESULTS.md). Run from the repository root:

    .venv/bin/python benchmarks/surgery.py [--threads 2] [--repeats 5]

1. Surgery time: a generated 50-conv residual network (onnx.helper, no torch): a 3x3 stem conv
   (64) then 24 basic blocks (conv-relu-conv + skip, relu) and a final 1x1 conv (128), GAP, Gemm;
   input 3x32x32, 1.8 M parameters. Every conv loses 50% of its kernels (the even indices, so
   that the layers coupled by the 24 residual Adds agree) in one ``remove_kernels`` call: tracing,
   planning, rewriting, exporting and the checker + shape-inference post-conditions included.
   Target: under 2 s. Median of ``--repeats`` runs after one warm-up.
2. Inference: the paper's CIFAR architecture (``PaperCIFARNet``: six 64-kernel 3x3 convs, fc 512;
   torch's seeded random init, legacy exporter, opset 17) before and after removing a random
   50% of the kernels of every conv and of the fc1 neurons. ONNX Runtime CPU provider with
   ``--threads`` intra-op threads, sequential execution, median latency over 200 runs at batch 1
   and 20 runs at batch 64 after warm-up; file sizes as saved.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxaom.model import Model, load  # noqa: E402 (after the path tweak)
from onnxaom.summary import summary  # noqa: E402
from onnxaom.surgery import remove_kernels  # noqa: E402


def residual_net(blocks: int = 24, width: int = 64, seed: int = 0) -> onnx.ModelProto:
    """Stem conv + ``blocks`` basic blocks + a 1x1 conv: 2 * blocks + 2 convs."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []

    def conv(name: str, x: str, c_in: int, c_out: int, k: int = 3) -> str:
        w = rng.normal(0, (c_in * k * k) ** -0.5, (c_out, c_in, k, k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}.weight"))
        inits.append(numpy_helper.from_array(np.zeros(c_out, np.float32), f"{name}.bias"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"],
                                      [f"{name}_out"], name=name, kernel_shape=[k, k],
                                      pads=[k // 2] * 4))
        return f"{name}_out"

    def relu(name: str, x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{name}_out"], name=name))
        return f"{name}_out"

    x = relu("stem_relu", conv("stem", "input", 3, width))
    for b in range(blocks):
        y = relu(f"b{b}_relu1", conv(f"b{b}_conv1", x, width, width))
        y = conv(f"b{b}_conv2", y, width, width)
        nodes.append(helper.make_node("Add", [y, x], [f"b{b}_add_out"], name=f"b{b}_add"))
        x = relu(f"b{b}_relu2", f"b{b}_add_out")
    x = relu("final_relu", conv("final", x, width, 2 * width, k=1))
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap_out"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten"))
    w = rng.normal(0, (2 * width) ** -0.5, (10, 2 * width)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "fc.weight"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fc.bias")]
    nodes.append(helper.make_node("Gemm", ["flat_out", "fc.weight", "fc.bias"], ["logits"],
                                  name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "resnet50conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def bench_surgery(repeats: int) -> list[str]:
    model = Model(residual_net())
    convs = [layer for layer in model.layers() if layer.op == "Conv"]
    removals = {layer.name: list(range(0, layer.kernels, 2)) for layer in convs}
    remove_kernels(model, removals)  # warm-up (imports, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pruned = remove_kernels(model, removals)
        times.append(time.perf_counter() - start)
    before, after = summary(model), summary(pruned)
    kept = [layer.kernels for layer in pruned.layers() if layer.op == "Conv"]
    assert kept == [layer.kernels // 2 for layer in convs]
    return [
        "| network | convs | params before → after | kernels removed | median time | min | "
        "target |",
        "|---|---|---|---|---|---|---|",
        f"| generated residual, 24 blocks | {len(convs)} | {before.total_params:,} → "
        f"{after.total_params:,} | {sum(len(v) for v in removals.values()):,} (50% of every "
        f"conv) | {statistics.median(times):.2f} s | {min(times):.2f} s | < 2 s |",
    ]


def _latency(path: Path, batch: int, runs: int, threads: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    name = session.get_inputs()[0].name
    for _ in range(max(3, runs // 10)):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def bench_cifar(threads: int, folder: Path) -> list[str]:
    import torch
    from onnxaom_torch.architectures import PaperCIFARNet, export_onnx

    torch.manual_seed(0)
    path = export_onnx(PaperCIFARNet().eval(), folder / "cifar.onnx", exporter="legacy",
                       input_shape=(1, 3, 32, 32), opset=17)
    model = load(path)
    rng = np.random.default_rng(0)
    removals = {
        layer.name: sorted(rng.choice(layer.kernels, layer.kernels // 2, replace=False).tolist())
        for layer in model.layers() if layer.op == "Conv" or layer.name == "/fc1/Gemm"
    }
    start = time.perf_counter()
    pruned = remove_kernels(model, removals)
    took = time.perf_counter() - start
    out = pruned.save(folder / "cifar-pruned.onnx")
    before, after = summary(model), summary(load(out))
    rows = [
        f"Pruning took {took:.2f} s. Layers pruned: {', '.join(removals)}.",
        "",
        "| model | params | MACs / sample | file size | latency batch 1 | latency batch 64 |",
        "|---|---|---|---|---|---|",
    ]
    for label, file, s in (("PaperCIFARNet", path, before), ("pruned 50%", out, after)):
        rows.append(
            f"| {label} | {s.total_params:,} | {s.total_macs:,} | "
            f"{file.stat().st_size / 2**20:.2f} MiB | {_latency(file, 1, 200, threads):.3f} ms | "
            f"{_latency(file, 64, 20, threads):.2f} ms |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import onnxruntime as ort

    print(f"Machine: {platform.processor() or platform.machine()}, Python "
          f"{platform.python_version()}, onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
          f"{args.threads} ORT threads.\n")
    print("### Surgery time\n")
    print("\n".join(bench_surgery(args.repeats)))
    print("\n### Pruning the paper's CIFAR architecture by 50%\n")
    with tempfile.TemporaryDirectory() as tmp:
        print("\n".join(bench_cifar(args.threads, Path(tmp))))


if __name__ == "__main__":
    main()
