"""Tensor shapes that ONNX shape inference leaves unknown, taken from one ONNX Runtime run.

Shape inference loses H and W wherever an exporter computes a shape with graph ops (the Pad
amounts PyTorch's legacy exporter writes for ``padding_mode="reflect"``, the ``view`` of a
channel shuffle, an Upsample whose scales are computed). When the image input has fixed sizes
after the batch, one run on a batch of zeros tells every tensor's size; the surgery and the
summary use it to fill the gaps (:func:`fill_unknown`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper

from .graph import GraphIndex, Shape, dim_values

__all__ = ["fill_unknown"]

log = logging.getLogger(__name__)


def fill_unknown(model: onnx.ModelProto, shapes: Mapping[str, Shape],
                 index: GraphIndex | None = None) -> dict[str, Shape]:
    """``shapes`` (tensor -> inferred shape, None for unknown dims) with the unknown dims after
    the first filled from one CPU run of ``model`` on zeros. The first dim (the batch) keeps
    what inference said. Unchanged when nothing is unknown, when the image input has an unknown
    size after its batch dimension, or when the run fails."""
    out = dict(shapes)
    index = GraphIndex(model) if index is None else index
    produced = {o for node in model.graph.node for o in node.output if o}
    unknown = [name for name, shape in shapes.items()
               if name in produced and len(shape) >= 2 and None in shape[1:]]
    if not unknown:
        return out
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        return out
    dims = dim_values(inputs[0].type)
    if dims is None or len(dims) < 2 or None in dims[1:]:
        return out
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(name, index.elem_type(name), None)
                              for name in unknown)
    elem = inputs[0].type.tensor_type.elem_type
    size = [dims[0] if dims[0] is not None else 1, *(int(d) for d in dims[1:] if d is not None)]
    feed = np.zeros(size, dtype=helper.tensor_dtype_to_np_dtype(elem))
    try:
        from .runtime import make_session

        session = make_session(probe, ["CPUExecutionProvider"], threads=1)
        values = session.run(unknown, {inputs[0].name: feed})
    except Exception as exc:  # ORT raises its own types; the shapes stay as inferred
        log.debug("could not run the model for its tensor shapes: %s", exc)
        return out
    for name, value in zip(unknown, values, strict=True):
        inferred = shapes[name]
        if np.ndim(value) != len(inferred):
            continue
        out[name] = (inferred[0], *(d if d is not None else int(v)
                                    for d, v in zip(inferred[1:], np.shape(value)[1:],
                                                    strict=True)))
    return out
