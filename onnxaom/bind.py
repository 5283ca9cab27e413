"""Binding a model's extra inputs to constants, so that one image input is left.

``collect`` feeds a model one thing, a batch of images. A model with more graph inputs (a
mode flag, a scale, a fixed mask, an ``is_training`` placeholder left by an old TensorFlow
export) is refused there; :func:`bind_inputs` makes a copy in which those inputs are
initializers holding the given values, which then analyses like any single-input model.
A per-sample second input (a second image, a text embedding) cannot be bound: a constant
does not change from one sample to the next.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import DataError, ModelError
from .graph import dim_values, fed_inputs
from .model import BoundFrom, Model, load

__all__ = ["bind_inputs"]


def bind_inputs(model: Model | str | os.PathLike[str], values: Mapping[str, Any]) -> Model:
    """A copy of ``model`` in which each graph input named in ``values`` is a constant.

    ``values`` maps input names to array-likes; an input with a default value (an
    initializer of its name) takes the value given instead. Each is converted to the input's
    element type where that does not change it (whole numbers in range for an integer type,
    finite values staying finite for a float type; ``0.5`` for an int8 input or ``1e6`` for a
    float16 one is refused) and must have its declared shape: static sizes as declared (a value
    with as many elements is reshaped: ``0.5`` for a (1,) input), a symbolic size any size.
    A value that cannot be bound is a :class:`DataError`; a name or an input that cannot, a
    :class:`ModelError`. An input whose first axis is the batch axis of the input left
    unbound (the same symbolic name) is refused: a constant cannot follow the batch size.

    The copy is named after the source and remembers it: statistics collected on it record the
    source's digest and the values bound (:attr:`Model.source_digest`,
    :attr:`Model.bound_inputs`), so proposals made from them apply to the source file. The
    source model and its file are not changed; saving the copy keeps the source's
    external-data setting and never writes over the source.
    """
    if not isinstance(model, Model):
        model = load(model)
    if not values:
        raise ModelError("bind_inputs: no inputs named; give {input name: value}")
    declared = {value.name: value for value in model.proto.graph.input}
    initializers = {t.name for t in model.proto.graph.initializer}
    for name in values:
        if name not in declared:  # an input with a default (an initializer) can be bound too
            known = ", ".join(v.name for v in fed_inputs(model.proto)) or "(none)"
            raise ModelError(f"model {model.name!r} has no graph input {name!r} to bind; "
                             f"its inputs: {known}")
    arrays = {name: _value_for(model, declared[name], value) for name, value in values.items()}
    left = [v for v in declared.values() if v.name not in arrays and v.name not in initializers]
    _refuse_batch_axis(model, {n: declared[n] for n in arrays}, left)
    proto = model.copy_proto()
    keep_listed = proto.ir_version < 4  # before IR 4 an initializer must be a graph input
    kept = [v for v in proto.graph.input if keep_listed or v.name not in arrays]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    others = [t for t in proto.graph.initializer if t.name not in arrays]  # old defaults go
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(others)
    proto.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in arrays.items())
    values_so_far = model.bound_inputs  # binding a bound model again keeps the first ones
    values_so_far.update({name: array.tolist() for name, array in arrays.items()})
    return Model(proto, path=None, external_data=model.external_data,
                 protected=model.protected,
                 bound_from=BoundFrom(model.source_digest, model.name, values_so_far))


def _value_for(model: Model, value: onnx.ValueInfoProto, given: Any) -> np.ndarray:
    """``given`` as the tensor input ``value`` takes: its element type and declared shape."""
    where = f"model {model.name!r} input {value.name!r}"
    if not value.type.HasField("tensor_type"):
        raise ModelError(f"{where} is not a tensor ({value.type.WhichOneof('value')}); only "
                         f"tensor inputs can be bound")
    elem = value.type.tensor_type.elem_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    try:
        array = np.asarray(given)
    except Exception as exc:  # ragged lists and other non-arrays
        raise DataError(f"{where}: the value to bind is not an array ({exc})") from exc
    type_name = onnx.TensorProto.DataType.Name(elem)
    problem = _conversion_problem(array, dtype)
    if problem is not None:
        raise DataError(f"{where} takes {type_name}; the value to bind {problem}")
    with np.errstate(over="ignore", invalid="ignore"):  # checked above
        array = np.array(array, dtype=dtype, order="C")  # (ascontiguousarray makes 0-d 1-d)
    dims = dim_values(value.type)
    if dims is not None:
        wrong = len(dims) != array.ndim or any(
            d is not None and d != got for d, got in zip(dims, array.shape, strict=False))
        static = [int(d) for d in dims if d is not None]
        if wrong and len(static) == len(dims) and array.size == math.prod(static):
            array = array.reshape(static)  # 0.5 for a (1,) input, [1, 2] for a (1, 2) one
        elif wrong:
            shape = "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"
            raise DataError(f"{where} has shape {shape}; the value to bind has shape "
                            f"{array.shape}")
    return array


def _conversion_problem(array: np.ndarray, dtype: np.dtype[Any]) -> str | None:
    """Why ``array`` cannot become ``dtype`` without changing what it says, or None. Integers
    and booleans must be whole numbers in the type's range (1.0 is 1; 0.5 and 300 for int8
    are refused); floats must stay finite where they are (1e6 is inf in float16); rounding
    to a float type's precision is not a change."""
    kind = array.dtype.kind
    if kind not in "biuf":
        return f"is {array.dtype}, not numbers"
    if dtype.kind in "biu":
        values = array.astype(np.float64) if kind == "f" else array
        if kind == "f" and not (np.isfinite(values).all() and (values == np.round(values)).all()):
            return f"holds values that are not whole numbers (it is {array.dtype})"
        low, high = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        if values.size and (values.min() < low or values.max() > high):
            return (f"holds values outside {low}..{high} (from {values.min()} to "
                    f"{values.max()})")
        return None
    if dtype.kind != "f":
        return f"cannot be given as {dtype}"
    with np.errstate(over="ignore", invalid="ignore"):
        converted = array.astype(dtype)
    if (np.isfinite(array) & ~np.isfinite(converted)).any():
        return f"holds values beyond the range of {dtype} (up to {np.abs(array).max():g})"
    return None


def _batch_name(value: onnx.ValueInfoProto) -> str | None:
    """The symbolic name of an input's first axis, if it has one."""
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    dims = value.type.tensor_type.shape.dim
    return (dims[0].dim_param or None) if len(dims) else None


def _refuse_batch_axis(model: Model, bound: Mapping[str, onnx.ValueInfoProto],
                       left: list[onnx.ValueInfoProto]) -> None:
    batch = {name: owner.name for owner in left if (name := _batch_name(owner))}
    for name, value in bound.items():
        axis = _batch_name(value)
        if axis in batch:
            raise ModelError(
                f"model {model.name!r} input {name!r} has the batch axis {axis!r} of input "
                f"{batch[axis]!r}: it takes one value a sample, which a constant cannot give; "
                f"only inputs that are the same for every sample can be bound")
