"""Which in-graph counting formulation costs least? Prints a Markdown table.

    .venv/bin/python benchmarks/formulations.py [--threads 1]

Each variant rewrites the mask/reduction nodes that ``onnxaom.instrument.counting_graph``
adds, on the same taps, and is timed on CPU seconds (steady on a shared machine) at ORT's full
optimisation level against plain inference of the same model:

* ``float``: Greater -> Cast(float) -> MatMul(float one-hot) (the naive formulation)
* ``sign``: Sign -> MatMul(float one-hot) (valid only on taps >= 0: after a ReLU)
* ``u8, NCHW reads``: Greater -> Cast(uint8) -> MatMulInteger(uint8 one-hot) on the tap after
  ORT's ReorderOutput back to NCHW (onnxaom 0.1)
* ``u8, no NaN check``: the same without the per-layer NaN check
* ``u8, blocked reads``: the u8 count reading ORT's blocked NCHWc tensors directly
  (``onnxaom.blocked``; what ``collect`` does on the CPU provider)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from collect import BATCH, build_models, images_for

import onnxaom
from onnxaom.blocked import blocked_counting_model
from onnxaom.collect import select_layers
from onnxaom.instrument import ONEHOT_INPUT, counting_graph


def variant(model: onnx.ModelProto, kind: str) -> onnx.ModelProto:
    """Rewrite onnxaom's u8 counting nodes into another formulation."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = []
    float_onehot = "onehot_float"
    for node in m.graph.node:
        name = node.name
        if not name.startswith("onnxaom_"):
            nodes.append(node)
            continue
        if name.endswith("_cast") and kind in ("float", "sign"):
            if kind == "float":
                nodes.append(
                    helper.make_node(
                        "Cast", list(node.input), list(node.output), to=TensorProto.FLOAT, name=name
                    )
                )
            continue
        if name.endswith("_greater") and kind == "sign":
            mask = name.replace("_greater", "_mask")
            nodes.append(helper.make_node("Sign", [node.input[0]], [mask], name=name))
            continue
        if name.endswith("_count") and kind in ("float", "sign"):
            out = node.output[0]
            nodes.append(helper.make_node("MatMul", [float_onehot, node.input[1]], [out + "_f"]))
            nodes.append(helper.make_node("Cast", [out + "_f"], [out], to=TensorProto.INT32))
            continue
        nodes.append(node)
    if kind in ("float", "sign"):
        nodes.insert(
            0, helper.make_node("Cast", [ONEHOT_INPUT], [float_onehot], to=TensorProto.FLOAT)
        )
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def rate(
    model: onnx.ModelProto,
    images: np.ndarray,
    labels: np.ndarray,
    threads: int,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.graph_optimization_level = level
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = {i.name for i in session.get_inputs()}
    image_input = next(n for n in names if n != ONEHOT_INPUT)
    onehot = np.zeros((10, BATCH), np.uint8)
    onehot[labels[:BATCH] % 10, np.arange(BATCH)] = 1

    def run() -> None:
        for start in range(0, len(images), BATCH):
            feeds = {image_input: images[start : start + BATCH]}
            if ONEHOT_INPUT in names:
                feeds[ONEHOT_INPUT] = onehot
            session.run(None, feeds)

    run()
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(
        f"samples per CPU second, {args.threads} thread(s), batch {BATCH}, ORT_ENABLE_ALL; "
        "in brackets: relative to plain inference"
    )
    print()
    print(
        "| model | inference | float | sign | u8, NCHW reads | u8, no NaN check | "
        "u8, blocked reads (onnxaom) |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, shape) in build_models(Path(tmp)).items():
            images, labels = images_for(name, shape, 4096 if name == "mnist" else 1024)
            model = onnxaom.load(path)
            layers = select_layers(model, None, "activation")
            instrumented = counting_graph(model.proto, layers)
            u8 = instrumented.model
            cells = [rate(model.proto, images, labels, args.threads)]
            for graph in (
                variant(u8, "float"),
                variant(u8, "sign"),
                u8,
                counting_graph(model.proto, layers, check_nan=False).model,
            ):
                cells.append(rate(graph, images, labels, args.threads))
            blocked = blocked_counting_model(instrumented, threads=args.threads)
            assert blocked is not None, "no count reads ORT's blocked layout on this machine"
            cells.append(
                rate(
                    blocked[0],
                    images,
                    labels,
                    args.threads,
                    ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                )
            )
            row = [f"{cells[0]:,.0f}"] + [f"{c:,.0f} ({c / cells[0]:.2f}x)" for c in cells[1:]]
            print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
