"""Tensor shapes that ONNX shape inference leaves unknown, taken from one ONNX Runtime run.

Shape inference loses H and W wherever an exporter computes a shape with graph ops (the Pad
amounts PyTorch's legacy exporter writes for ``padding_mode="reflect"``, the ``view`` of a
channel shuffle, an Upsample whose scales are computed). When the image input has fixed sizes
after the batch, one run on a batch of zeros tells every tensor's size; the surgery and the
summary use it to fill the gaps (:func:`fill_unknown`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from .graph import Shape, dim_values, fed_inputs

if TYPE_CHECKING:
    from .layers import Layer

__all__ = ["fill_unknown", "with_run_sizes"]

log = logging.getLogger(__name__)


def fill_unknown(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """``shapes`` (tensor -> inferred shape, None for unknown dims) with the unknown dims after
    the first filled from one CPU run of ``model`` on zeros, and the tensors whose rank
    inference could not tell (after a reshape to a computed target at opsets where ONNX does
    not propagate shape values) added: their first dim from ONNX Runtime's own inference (None
    where it depends on the batch), the others from the run. The first dim (the batch) of a
    known shape keeps what inference said. Unchanged when nothing is unknown, when the image
    input has an unknown size after its batch dimension, or when the run fails."""
    out = dict(shapes)
    produced = [o for node in model.graph.node for o in node.output if o]
    unknown = [name for name in produced if name not in shapes
               or (len(shapes[name]) >= 2 and None in shapes[name][1:])]
    if not unknown:
        return out
    inputs = fed_inputs(model)
    if len(inputs) != 1:
        return out
    dims = dim_values(inputs[0].type)
    if dims is None or len(dims) < 2 or None in dims[1:]:
        return out
    elem = inputs[0].type.tensor_type.elem_type
    size = [dims[0] if dims[0] is not None else 1, *(int(d) for d in dims[1:] if d is not None)]
    feed = {inputs[0].name: np.zeros(size, dtype=helper.tensor_dtype_to_np_dtype(elem))}
    ran = _run_for_shapes(model, unknown, feed)
    if ran is None and any(name not in shapes for name in unknown):
        # an output of unknown rank may not be a tensor (a sequence): try without them
        unknown = [name for name in unknown if name in shapes]
        ran = _run_for_shapes(model, unknown, feed) if unknown else None
    if ran is None:
        return out
    declared, values = ran
    for name, value in zip(unknown, values, strict=True):
        if not isinstance(value, np.ndarray):
            continue  # a sequence (SplitToSequence) or a map: it has no shape of its own
        got = np.shape(value)
        inferred = shapes.get(name)
        if inferred is None:
            first = (declared.get(name) or [None])[0] if got else None
            inferred = (first if isinstance(first, int) else None,) + (None,) * (len(got) - 1)
            if not got:
                out[name] = ()
                continue
        if len(got) != len(inferred):
            continue
        out[name] = (inferred[0], *(d if d is not None else int(v)
                                    for d, v in zip(inferred[1:], got[1:], strict=True)))
    return out


def _run_for_shapes(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]
                    ) -> tuple[dict[str, list[object]], list[np.ndarray]] | None:
    """(ONNX Runtime's declared output shapes, the values) of tensors ``names`` of ``model``
    run on ``feed`` on the CPU; None when the run fails."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    initializers = {t.name for t in probe.graph.initializer}
    kept = [i for i in probe.graph.input if i.name in feed or i.name in initializers]
    del probe.graph.input[:]  # an input no node reads is not fed
    probe.graph.input.extend(kept)
    # outputs without a type: ONNX Runtime takes them and types them itself
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    try:
        from .runtime import make_session

        session = make_session(probe, ["CPUExecutionProvider"], threads=1)
        declared = {o.name: list(o.shape or []) for o in session.get_outputs()}
        return declared, session.run(names, feed)
    except Exception as exc:  # ORT raises its own types; the shapes stay as inferred
        log.debug("could not run the model for its tensor shapes: %s", exc)
        return None


def with_run_sizes(model: onnx.ModelProto, layers: Sequence[Layer]) -> list[Layer]:
    """``layers`` with the H and W that shape inference left unknown filled from
    :func:`fill_unknown` (one run; nothing to do, and no run, when every size is known)."""
    if all(None not in layer.shape for layer in layers):
        return list(layers)
    from .graph import GraphIndex
    from .layers import nchw_shape

    shapes = GraphIndex(model).run_shapes
    out = []
    for layer in layers:
        shape = shapes.get(layer.probe)
        shape = None if shape is None else nchw_shape(shape, layer.probe_perm)
        if None in layer.shape and shape is not None and len(shape) == 4 \
                and None not in shape[2:]:
            layer = replace(layer, shape=(layer.kernels, int(shape[2]), int(shape[3])))  # type: ignore[arg-type]
        out.append(layer)
    return out
