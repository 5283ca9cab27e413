"""Widening a layer (task 2): Net2WiderNet, random or zero-initialised new kernels.

New kernels are appended after the layer's existing ones. Wherever the layer's channels go
(through per-channel ops, pools, Concat, Flatten/Reshape), the new channels are inserted right
after them, and every consumer (Conv, depthwise Conv, Gemm, MatMul) gets input weights for them:

* ``net2net``: new kernel j copies kernel ``sources[j]`` (and every per-channel parameter on the
  way: bias, BN, PReLU slope, per-channel Mul/Add), and each consumer's weights for a copied
  channel are divided evenly among the original and its copies: the function is unchanged.
* ``random`` / ``zeros``: new kernels He-normal or zero, neutral per-channel parameters, and
  zero consumer weights: the function is unchanged as well, until retraining.

Consumers the surgery cannot split (an unsupported op, a graph output, a non-depthwise grouped
conv) make the edit refuse with an error naming the node; nothing is approximated. Layers
coupled by a residual Add are widened the same way (``coupled="propagate"``), and a depthwise
conv reading the layer grows with it.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..edits import WidenLayer
from ..errors import EditError
from ..memory import available_bytes
from .channels import Rewriter, WidenPlan, build, rewrite
from .remove import check_blocked, refuse_coupled

__all__ = ["widen_sources", "widen_step"]

logger = logging.getLogger(__name__)


def widen_sources(edit: WidenLayer, k: int, rng: np.random.Generator) -> np.ndarray:
    """Which existing kernel each new kernel copies (int64 (add,); -1: not a copy).

    The one place the Net2Net draw is made, so the torch adapter, redrawing from the same
    seed, gets the same kernels as the ONNX surgery.
    """
    if edit.init != "net2net":
        return np.full(edit.add, -1, dtype=np.int64)
    if edit.sources is not None:
        bad = [s for s in edit.sources if s >= k]
        if bad:
            raise EditError(f"WidenLayer.sources {bad} out of range: layer {edit.layer!r} "
                            f"has {k} kernels (indices 0..{k - 1})")
        return np.asarray(edit.sources, dtype=np.int64)
    return np.sort(rng.choice(k, size=edit.add, replace=edit.add > k)).astype(np.int64)


def _check_memory(proto: onnx.ModelProto, edit: WidenLayer, k: int) -> None:
    """Refuse, before allocating, a widening whose weights cannot fit in the memory available:
    at most every weight grows by (K + add) / K on both of its channel axes."""
    memory = available_bytes()
    weights = sum(t.ByteSize() for t in proto.graph.initializer)
    need = weights * ((k + edit.add) / k) ** 2
    if memory is not None and need > memory:
        raise EditError(f"WidenLayer({edit.layer!r}, add={edit.add}): {k} -> {k + edit.add} "
                        f"kernels could need up to {need / 2**30:.1f} GiB of weights, more than "
                        f"the {memory / 2**30:.1f} GiB of memory available")


def widen_step(graph: gs.Graph, proto: onnx.ModelProto, edit: WidenLayer) -> dict[str, object]:
    """Widen ``edit.layer`` of ``graph`` in place; returns which layers grew and the sources."""
    cg = build(graph, proto)
    ref = cg.layer(edit.layer)
    k = len(ref.slots)
    _check_memory(proto, edit, k)
    rng = np.random.default_rng(edit.seed)
    sources = widen_sources(edit, k, rng)
    block = cg.slots.roots(ref.slots)
    if len(set(block.tolist())) != k:
        raise EditError(f"cannot widen layer {edit.layer!r}: some of its own kernels are "
                        f"tied or coupled to each other (a depthwise conv with a channel "
                        f"multiplier, whose kernels for one input channel go together; a "
                        f"tensor added to a permutation of itself)")
    classes = set(block.tolist())
    check_blocked(cg, edit.layer, classes)
    if edit.coupled == "refuse":
        refuse_coupled(cg, edit.layer, classes, asked_by_step=set())
    grown = [name for name, kernels in cg.layers_in(classes).items() if len(kernels) == k]
    partial = [name for name, kernels in cg.layers_in(classes).items() if len(kernels) != k]
    if partial:
        raise EditError(f"cannot widen layer {edit.layer!r}: the kernels of layer(s) "
                        f"{', '.join(map(repr, partial))} are tied to its channels in another "
                        f"pattern (e.g. a depthwise conv with a channel multiplier), so new "
                        f"channels would have no matching kernels there")
    widen_plan = WidenPlan(cg, block, sources, edit.layer)
    rewriter = Rewriter(cg, widen_plan, init="random" if edit.init == "random" else "zeros",
                        rng=rng, noise=edit.noise)
    rewrite(cg, rewriter, check_zero=False)
    if len(grown) > 1:
        logger.info("widening %s also widens %s", edit.layer,
                    ", ".join(n for n in grown if n != edit.layer))
    return {"layers": grown, "sources": sources.tolist()}
