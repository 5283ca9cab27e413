"""Counting activations where ONNX Runtime keeps them: in its blocked channel layout (NCHWc).

At ``ORT_ENABLE_ALL`` ONNX Runtime's CPU provider runs convolutions, pooling and element-wise
ops in a blocked layout: an activation of logical shape (N, K, H, W) is stored as
(N, Kp / b, H, W, b), with ``b`` channels a block (8 with AVX2, 16 with AVX-512; found out at
run time, :func:`block_size`) and Kp = K rounded up to a multiple of ``b`` (the extra channels
come from zero filters). An op that does not know the layout reads the tensor only after a
``ReorderOutput`` node has copied it back to NCHW: a full read and write of the activation, the
largest single cost of in-graph counting on cheap convolutions (benchmarks/RESULTS.md).

The count does not need the NCHW order. ``Greater -> Cast -> Reshape(N, -1) -> MatMulInteger``
treats every value of a sample alike, so it can read the blocked tensor as it lies and give the
same counts with the columns in blocked order ``(k // b, h, w, k % b)``;
:meth:`BlockedTap.restore` puts them back in ``(k, h, w)`` order and drops the padding channels.

:func:`blocked_counting_session` does this on the graph ORT itself optimised: it lets ORT save
its optimised counting graph, points each count's ``Greater`` at the blocked tensor where the
only thing between them is a ``ReorderOutput`` to NCHW, and opens that graph. Anything else
(another provider, no blocked tap, an ORT that saves or names things differently) falls back to
the plain counting graph, which gives the same counts, only slower.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .errors import ModelError
from .instrument import Instrumented, count_prefix, positive_tensor
from .runtime import make_session

log = logging.getLogger(__name__)

NCHWC_DOMAIN = "com.microsoft.nchwc"
CPU = ["CPUExecutionProvider"]


@dataclass(frozen=True)
class BlockedTap:
    """A layer counted in blocked layout: ``block`` channels a block, ``channels`` real ones,
    ``positions`` (H*W) a channel when known (then every batch's column count is checked)."""

    block: int
    channels: int
    positions: int | None = None

    @property
    def padded_channels(self) -> int:
        return -(-self.channels // self.block) * self.block

    def restore(self, counts: np.ndarray) -> np.ndarray:
        """(C, Kp*H*W) counts in blocked column order -> (C, K*H*W) in (k, h, w) order."""
        classes, columns = counts.shape
        padded = self.padded_channels
        expected = None if self.positions is None else padded * self.positions
        if columns % padded or (expected is not None and columns != expected):
            raise ModelError(
                f"blocked-layout counts have {columns} columns, not the {padded} padded "
                f"channels of a {self.channels}-channel tap times its positions; a shape "
                f"stored in the model (value_info) may be wrong for the tap (drop them: del "
                f"model.graph.value_info[:] in onnx), else count with blocked_reads=False"
            )
        positions = columns // padded
        blocked = counts.reshape(classes, padded // self.block, positions, self.block)
        nchw = blocked.transpose(0, 1, 3, 2).reshape(classes, padded, positions)
        return nchw[:, : self.channels].reshape(classes, self.channels * positions)


@functools.cache
def block_size() -> int | None:
    """Channels per block of ORT's NCHWc layout on this CPU, or None when it cannot be told.

    Found out by reordering a known tensor with ORT's own ``ReorderInput``: 64 channels (a
    multiple of every block size MLAS uses) at two positions.
    """
    channels, positions = 64, 2
    values = np.arange(channels * positions, dtype=np.float32).reshape(1, channels, 1, positions)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(values.shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("ReorderInput", ["x"], ["y"], domain=NCHWC_DOMAIN)
    model = helper.make_model(
        helper.make_graph([node], "onnxaom_block_size", [x], [y]),
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(NCHWC_DOMAIN, 1)],
    )
    model.ir_version = 7
    try:
        session = make_session(model, CPU, threads=1, optimization="disable")
        out = np.asarray(session.run(None, {"x": values})[0]).ravel()
    except Exception as exc:  # no NCHWc kernels in this build: count in NCHW
        log.debug("ORT's NCHWc layout is not available (%s)", exc)
        return None
    for block in (4, 8, 16, 32, 64):
        expected = values.reshape(1, channels // block, block, 1, positions)
        if out.shape == values.ravel().shape and np.array_equal(
            out, expected.transpose(0, 1, 3, 4, 2).ravel()
        ):
            return block
    log.debug("ORT's NCHWc layout is not one onnxaom knows; counting in NCHW")
    return None


def blocked_counting_model(
    graph: Instrumented, *, threads: int | None = None
) -> tuple[onnx.ModelProto, tuple[BlockedTap | None, ...]] | None:
    """ORT's optimised form of ``graph`` with its counts reading blocked tensors, or None.

    Returns the model (for this machine only: it holds ORT's internal NCHWc ops; open it at
    ``optimization="basic"``, it is optimised already) and, per count output, the
    :class:`BlockedTap` that restores its columns (None where the count reads NCHW as usual).
    None when the layout is unknown or no count reads a reordered tensor.
    """
    block = block_size()
    if block is None:
        return None
    with tempfile.TemporaryDirectory(prefix="onnxaom-") as folder:
        path = Path(folder) / "optimized.onnx"
        make_session(graph.model, CPU, threads=threads, optimized_path=path)
        optimized = onnx.load(str(path))
    taps = _read_blocked(optimized, len(graph.outputs), block)
    return (optimized, taps) if any(taps) else None


def blocked_counting_session(
    graph: Instrumented, *, threads: int | None
) -> tuple[ort.InferenceSession, tuple[BlockedTap | None, ...]] | None:
    """A CPU session for :func:`blocked_counting_model`, or None to count in NCHW."""
    try:
        blocked = blocked_counting_model(graph, threads=threads)
        if blocked is None:
            return None
        model, taps = blocked
        session = make_session(model, CPU, threads=threads, optimization="basic")
    except Exception as exc:  # whatever went wrong, the NCHW graph counts the same
        log.debug("counting in NCHW: the blocked-layout graph failed (%s)", exc)
        return None
    return session, taps


def _read_blocked(
    model: onnx.ModelProto, n_counts: int, block: int
) -> tuple[BlockedTap | None, ...]:
    """Point each count's Greater past a ReorderOutput to NCHW; drop reorders left unread."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    taps: list[BlockedTap | None] = []
    moved: list[str] = []  # name prefixes of the counts moved
    for i in range(n_counts):
        greater = producer.get(positive_tensor(i))
        reorder = producer.get(greater.input[0]) if greater is not None else None
        if (
            greater is None
            or reorder is None
            or reorder.op_type != "ReorderOutput"
            or reorder.domain != NCHWC_DOMAIN
            or _attribute(reorder, "channels_last", 0) != 0
            or _attribute(reorder, "channels", 0) <= 0
        ):
            taps.append(None)
            continue
        greater.input[0] = reorder.input[0]
        moved.append(count_prefix(i))
        taps.append(BlockedTap(block, _attribute(reorder, "channels", 0)))
    read = {name for node in graph.node for name in node.input}
    read |= {o.name for o in graph.output}
    unread = [
        node
        for node in graph.node
        if node.op_type == "ReorderOutput" and not read.intersection(node.output)
    ]
    for node in unread:
        graph.node.remove(node)
    # shapes recorded for the moved counts' tensors may name K channels where Kp now flow
    kept = [v for v in graph.value_info if not v.name.startswith(tuple(moved))]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return tuple(taps)


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(helper.get_attribute_value(attr))
    return default
