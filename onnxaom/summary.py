"""Per-layer size of a model: kernels, parameters and multiply-accumulates, with totals.

Answers "what did the surgery buy?": compare ``summary(model)`` before and after an edit.
MACs are per sample, from ONNX shape inference: a Conv does K * (C_in / group) * kh * kw
multiply-accumulates per output position, a Gemm/MatMul F * K. Layers whose output size is only
known at run time have ``macs=None`` (and count as 0 in the total, which then says so).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper

from .errors import ModelError
from .graph import FLOAT_TYPES, GraphIndex, casts_to_float
from .layers import bias_add, find_layers
from .model import Model, load

__all__ = ["LayerSummary", "ModelSummary", "summary"]


@dataclass(frozen=True)
class LayerSummary:
    """One layer: ``params`` counts its weight and bias elements; ``macs`` is per sample."""

    name: str
    op: str
    kernels: int
    inputs: int | None
    params: int
    macs: int | None
    output_shape: tuple[int | None, ...] | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form of this row."""
        return {"name": self.name, "op": self.op, "kernels": self.kernels, "inputs": self.inputs,
                "params": self.params, "macs": self.macs,
                "output_shape": None if self.output_shape is None else list(self.output_shape)}


@dataclass(frozen=True)
class ModelSummary:
    """A model's layers and totals.

    total_params: elements of every float initializer and constant (not only layers': a QDQ
    model's quantization scales too, a weight-normed layer's ``v`` and ``g``), and of every
    integer one a DequantizeLinear or Cast makes float (quantized weights; not zero points).
    A layer's ``params`` is its effective weight and bias.
    layer_params / total_macs: sums over the layers (MACs of layers with unknown size left out;
    ``macs_complete`` says whether any were). ``layer_params`` can exceed ``total_params``: a
    weight two layers share counts in both, and a weight computed from a smaller constant
    (an ``Expand``) counts at its effective size. file_size / external_size: bytes on disk of the
    model file and its external data files, None for a model not loaded from a file.
    """

    name: str
    opset: int
    nodes: int
    layers: tuple[LayerSummary, ...]
    total_params: int
    layer_params: int
    total_macs: int
    macs_complete: bool
    file_size: int | None
    external_size: int | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: the totals and one entry per layer."""
        return {"name": self.name, "opset": self.opset, "nodes": self.nodes,
                "layers": [layer.to_dict() for layer in self.layers],
                "total_params": self.total_params, "layer_params": self.layer_params,
                "total_macs": self.total_macs, "macs_complete": self.macs_complete,
                "file_size": self.file_size, "external_size": self.external_size}

    def format_table(self) -> str:
        """A plain-text table, one row per layer, then the totals."""
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{self.name}: opset {self.opset}, {self.nodes} nodes, "
                 f"{len(self.layers)} layers",
                 f"{'layer':<{width}}  {'op':<6} {'kernels':>7} {'inputs':>7} {'params':>12} "
                 f"{'MACs':>14}"]
        for layer in self.layers:
            macs = "?" if layer.macs is None else f"{layer.macs:,}"
            inputs = "?" if layer.inputs is None else str(layer.inputs)
            lines.append(f"{layer.name:<{width}}  {layer.op:<6} {layer.kernels:>7} {inputs:>7} "
                         f"{layer.params:>12,} {macs:>14}")
        macs_total = f"{self.total_macs:,}" + ("" if self.macs_complete else " (+ unknown)")
        lines.append(f"{'total':<{width}}  {'':<6} {sum(x.kernels for x in self.layers):>7} "
                     f"{'':>7} {self.layer_params:>12,} {macs_total:>14}")
        lines.append(f"all parameters: {self.total_params:,}")
        if self.file_size is not None:
            size = f"file size: {_human(self.file_size)}"
            if self.external_size:
                size += f" (of which external data: {_human(self.external_size)})"
            lines.append(size)
        return "\n".join(lines)


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n:,} B" if unit == "B" else f"{value:.1f} {unit} ({n:,} B)"
        value /= 1024
    return f"{n:,} B"


def summary(model: Model | str | os.PathLike[str]) -> ModelSummary:
    """The :class:`ModelSummary` of ``model``, a :class:`Model` or a path to load (layers named
    as everywhere in onnxaom)."""
    if isinstance(model, (str, os.PathLike)):
        model = load(model)
    elif not isinstance(model, Model):
        raise ModelError(f"summary expects an onnxaom.Model or a path to an ONNX file, got "
                         f"{type(model).__name__}")
    proto = model.proto
    index = GraphIndex(proto)
    rows: list[LayerSummary] = []
    layers = find_layers(proto, index=index)
    shapes = index.shapes
    weights = [proto.graph.node[layer.node_index].input[1] for layer in layers]
    if any(layer.output not in shapes or None in shapes[layer.output][1:] for layer in layers) \
            or any(index.constant_shape(w) is None and None in shapes.get(w, (None,))
                   for w in weights):
        shapes = index.run_shapes  # sizes inference could not tell
    for layer in layers:
        node = proto.graph.node[layer.node_index]
        # a weight or bias made by nodes (Identity, Cast, weight norm) counts by its shape
        kernels = layer.kernels if layer.op == "Conv" else None
        weight = _weight_shape(index, shapes, node.input[1], kernels)
        bias = [_weight_shape(index, shapes, name, kernels) for name in node.input[2:3] if name]
        params = sum(math.prod(d or 0 for d in shape) for shape in (weight, *bias)
                     if shape is not None) + _bias_after(index, node, layer.kernels)
        out_shape = shapes.get(layer.output)
        inputs, macs = _inputs_and_macs(index, node, weight, out_shape, layer.kernels)
        rows.append(LayerSummary(layer.name, layer.op, layer.kernels, inputs, params, macs,
                                 out_shape))
    # parameters: float constants, and integer ones a model turns into floats (quantized
    # weights: DequantizeLinear's input, a Cast's); not shapes, indices or zero points
    dequantized = {node.input[0] for node in proto.graph.node if node.input and (
        node.op_type == "DequantizeLinear" or (node.op_type == "Cast" and casts_to_float(
            next((a.i for a in node.attribute if a.name == "to"), None))))}
    total_params = 0
    for tensor in proto.graph.initializer:
        if tensor.data_type in FLOAT_TYPES or tensor.name in dequantized:
            total_params += int(np.prod(tensor.dims))
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and (attr.t.data_type in FLOAT_TYPES
                                             or node.output[0] in dequantized):
                    total_params += int(np.prod(attr.t.dims))
    file_size, external_size = _file_sizes(model.path)
    return ModelSummary(
        name=model.name,
        opset=model.opset,
        nodes=len(proto.graph.node),
        layers=tuple(rows),
        total_params=total_params,
        layer_params=sum(r.params for r in rows),
        total_macs=sum(r.macs or 0 for r in rows),
        macs_complete=all(r.macs is not None for r in rows),
        file_size=file_size,
        external_size=external_size,
    )


def _weight_shape(index: GraphIndex, shapes: Mapping[str, tuple[int | None, ...]], name: str,
                  kernels: int | None) -> tuple[int | None, ...] | None:
    """The shape of a layer's weight or bias ``name``: a constant's, else what inference or
    the run gave a computed one; a conv's first dimension (its ``kernels``, which
    :func:`~onnxaom.shapes.fill_unknown` leaves unknown as it would a batch) filled in."""
    shape = index.constant_shape(name) or shapes.get(name) or index.shapes.get(name)
    if shape and shape[0] is None and kernels is not None:
        shape = (kernels, *shape[1:])
    return shape


def _bias_after(index: GraphIndex, node: onnx.NodeProto, kernels: int) -> int:
    """K when the layer's bias is a separate ``Add`` (:func:`onnxaom.layers.bias_add`), else 0."""
    return kernels if bias_add(index, node, kernels) is not None else 0


def _inputs_and_macs(index: GraphIndex, node: onnx.NodeProto,
                     weight: tuple[int | None, ...] | None,
                     out_shape: tuple[int | None, ...] | None,
                     kernels: int) -> tuple[int | None, int | None]:
    if weight is None or any(d is None for d in weight):
        return None, None
    dims = [int(d) for d in weight if d is not None]
    if node.op_type == "Conv":
        group = int(index.attribute(node, "group", 1))  # type: ignore[call-overload]
        inputs = dims[1] * group
        if out_shape is None or len(out_shape) < 3 or any(d is None for d in out_shape[2:]):
            return inputs, None
        positions = int(np.prod([int(d) for d in out_shape[2:] if d is not None]))
        return inputs, kernels * dims[1] * int(np.prod(dims[2:])) * positions
    if node.op_type == "Gemm":
        inputs = dims[1] if index.attribute(node, "transB", 0) else dims[0]
        return inputs, inputs * kernels
    inputs = dims[0]  # MatMul (F, K)
    return inputs, inputs * kernels


def _file_sizes(path: Path | None) -> tuple[int | None, int | None]:
    if path is None or not path.exists():
        return None, None
    size = path.stat().st_size
    try:
        header = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # the file changed since loading; report what is there
        return size, None
    locations = {
        entry.value
        for tensor in external_data_helper._get_all_tensors(header)
        if external_data_helper.uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    external = 0
    for location in locations:
        data = path.parent / location
        if data.exists():
            external += os.path.getsize(data)
    return size + external, external
