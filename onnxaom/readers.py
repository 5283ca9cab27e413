"""How strongly the layers after a layer read each of its kernels.

For a layer L with K kernels, the *read mass* of kernel k is the L1 norm of the weights of the
next layers (Conv, Gemm, MatMul) that multiply k's output: ``sum |W[:, k, :, :]|`` for a Conv
reading L (group by group for grouped and depthwise convs), the columns ``k*P .. (k+1)*P - 1``
of a Gemm or MatMul reading L after a channel-major Flatten (P positions a channel), summed over
every reader. A kernel whose output no layer reads (or only through an op the channel tracing
does not follow) has read mass 0.

Where every reader sees kernel k as P positions (a Flatten into a fully-connected layer), the
mass is also given per position, shape (K, P), in the flattened tensor's (h, w) order: for the
paper's MNIST network, conv2 -> max-pool -> flatten -> fc1, that is the 12 x 12 grid of the
pooled map (statistics collected with ``probe="pool"`` have exactly that grid).

The channels are traced with the surgery's channel graph (:mod:`onnxaom.surgery.channels`), so
the same ops are followed as when kernels are removed: per-channel chains, pools, Flatten and
Reshape, Concat offsets, residual Adds. Channels that can only be removed together share their
read mass: those a residual Add couples, and a depthwise conv's kernels with the channels they
are tied to (removing one removes what the other's readers read).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .model import Model
from .surgery.channels import ChannelGraph, Flow, NodeRecord, Segment, build
from .surgery.gsio import import_graph

__all__ = ["ReadMass", "read_mass", "read_masses"]


@dataclass(frozen=True)
class ReadMass:
    """The read mass of a layer's kernels (see the module docstring).

    per_kernel: float64 array of shape (K,). per_position: float64 array of shape (K, P) when
    every reader sees each kernel as the same P > 1 positions, else None. readers: names of the
    layers that read the layer, in graph order.
    """

    layer: str
    per_kernel: np.ndarray
    per_position: np.ndarray | None
    readers: tuple[str, ...]


def read_mass(model: Model, layer: str) -> ReadMass:
    """The read mass of ``layer``'s kernels in ``model`` (raises LayerNotFoundError)."""
    return read_masses(model, [layer])[layer]


def read_masses(model: Model, layers: Sequence[str]) -> dict[str, ReadMass]:
    """:func:`read_mass` of several layers, tracing the model's channels once."""
    cg = build(import_graph(model.proto), model.proto)
    return {name: _layer_mass(cg, name) for name in layers}


def _layer_mass(cg: ChannelGraph, layer: str) -> ReadMass:
    target = cg.layer(layer)
    classes = np.array([cg.slots.find(int(s)) for s in target.slots])
    k = len(classes)
    per_kernel = np.zeros(k)
    positions: dict[int, np.ndarray] = {}  # inner size -> (K, inner) mass
    channel_level = False
    readers: list[str] = []
    for record in cg.records:
        if record.layer is None or record.layer is target or not record.ins:
            continue
        if record.ins[0] is None:
            continue
        flow = record.ins[0]
        mass = _input_mass(cg, record, flow)
        if mass is None:
            continue
        read = False
        offset = 0
        segments = flow.segments
        if flow.outer > 1:  # channels-last features: put them in channel-major order
            mass = mass.reshape(flow.outer, flow.period).T.ravel()
            segments = tuple(Segment(seg.slots, seg.inner * flow.outer) for seg in segments)
        for segment in segments:
            for slot in segment.slots.tolist():
                hits = np.flatnonzero(classes == cg.slots.find(int(slot)))
                chunk = mass[offset : offset + segment.inner]
                offset += segment.inner
                if hits.size == 0:
                    continue
                read = True
                per_kernel[hits] += chunk.sum()
                if segment.inner > 1:
                    grid = positions.setdefault(segment.inner, np.zeros((k, segment.inner)))
                    grid[hits] += chunk
                else:
                    channel_level = True
        if read:
            readers.append(record.layer.layer.name)
    per_position = None
    if len(positions) == 1 and not channel_level:
        per_position = next(iter(positions.values()))
    return ReadMass(layer, per_kernel, per_position, tuple(readers))


def _input_mass(cg: ChannelGraph, record: NodeRecord, flow: Flow) -> np.ndarray | None:
    """L1 of the weights that read each position of the layer node's data input along the
    flow's axis, shape (flow.size,); None where the weights are not constant or do not fit."""
    node = record.node
    if len(node.inputs) < 2:
        return None
    weights = cg.const(node.inputs[1])
    if weights is None:
        return None
    w = np.abs(np.asarray(weights, dtype=np.float64))
    if node.op == "Conv" and w.ndim >= 3 and flow.axis == 1:
        groups = int(node.attrs.get("group", 1))
        per_group_in, out = w.shape[1], w.shape[0]
        if groups < 1 or out % groups or per_group_in * groups != flow.size:
            return None
        per_group_out = out // groups
        summed = w.reshape(groups, per_group_out, per_group_in, -1).sum(axis=(1, 3))
        return np.asarray(summed.reshape(-1))
    if node.op == "Gemm" and w.ndim == 2 and flow.rank == 2 and flow.axis == 1:
        if int(node.attrs.get("transA", 0)):
            return None
        mass = w.sum(axis=0) if int(node.attrs.get("transB", 0)) else w.sum(axis=1)
        return mass if mass.shape[0] == flow.size else None
    if node.op == "MatMul" and w.ndim == 2 and flow.axis == flow.rank - 1:
        mass = w.sum(axis=1)
        return mass if mass.shape[0] == flow.size else None
    return None
