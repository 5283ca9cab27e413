"""``apply(model, edits)``: the one entry point of graph surgery. A pure function.

The input :class:`~onnxaom.Model` (and its file) is never touched: the proto is deep-copied,
imported into onnx-graphsurgeon, edited step by step, cleaned up, sorted and exported. Steps:
a run of consecutive :class:`~onnxaom.RemoveKernels` edits is one step (their indices all refer
to the model before it); every other edit is a step of its own, applied to the model the
previous steps produced.

Post-conditions, checked on every result (:class:`~onnxaom.EditError` if one fails):
``onnx.checker.check_model(full_check=True)`` and strict shape inference. The result keeps the
input's IR version, opset imports, producer, doc strings, model and graph metadata, node names,
node metadata, its choice of intermediate ``value_info`` (none stays none; a model with
value_info gets it for new tensors too) and its external-data setting; the
applied edits are appended as JSON to the metadata key ``"onnxaom.edits"`` (every edit in
order, :func:`onnxaom.edits.edits_from_json`), and what each step did to the key
``"onnxaom.steps"``: one object per step, its ``edits`` and its ``result`` (for a removal
the layers and kernels removed, coupled layers included, ``removed_at`` (``"probe"`` or
``"chain end"``) and ``chain_end``; for a widening the layers widened and the source kernels;
for an insertion the new layer's name and kernel count). The steps replay the history with
one ``apply`` per step; the flat edit list alone would merge the consecutive removals of two
applies into one step.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from ..edits import Edit, RemoveKernels, WidenLayer, as_edit_list, edit_steps
from ..errors import EditError
from ..graph import dim_values, fed_inputs
from ..model import Model
from ..warn import user_stacklevel
from .deepen import insert_step
from .gsio import export_model, import_graph, restore_node_metadata, restore_value_info
from .remove import RemovalPlan, plan, remove_with_fallback
from .widen import widen_step

__all__ = ["METADATA_KEY", "STEPS_KEY", "apply", "apply_steps", "plan_removal",
           "remove_kernels"]

logger = logging.getLogger(__name__)

#: Model metadata key holding the JSON list of applied edits (appended to on every apply).
METADATA_KEY = "onnxaom.edits"
#: Model metadata key holding the JSON list of what each applied step did (appended to).
STEPS_KEY = "onnxaom.steps"
#: The oldest default-domain opset the surgery edits (opset 6 and before broadcast by
#: ``broadcast``/``axis`` attributes, which ONNX Runtime does not run either).
MIN_OPSET = 7
#: Protobuf's limit: larger models cannot be checked in memory.
_MAX_PROTO_BYTES = 2**31 - 1




def _check_model(model: Model) -> None:
    if not isinstance(model, Model):
        raise EditError(f"expected an onnxaom.Model, got {type(model).__name__}; load one with "
                        f"onnxaom.load(path) or wrap a proto with onnxaom.Model(proto)")


def apply(model: Model, edits: Edit | Iterable[Edit]) -> Model:
    """A new model with ``edits`` applied in order; ``model`` and its file are unchanged.

    Parameters
    ----------
    model:
        The model to edit.
    edits:
        One edit or a list (edit dicts from :meth:`to_dict` are accepted too). Consecutive
        :class:`RemoveKernels` form one step whose indices refer to the model before it.

    Returns
    -------
    Model
        The edited model (``path`` None, ``external_data`` as the input's), with the edits
        recorded under metadata key ``"onnxaom.edits"``.

    Raises
    ------
    LayerNotFoundError
        An edit names a layer the model does not have.
    EditError
        An edit that cannot be applied exactly (indices out of range, every kernel of a layer,
        coupled layers with ``coupled="refuse"``, an op on the channels' path that the surgery
        does not support, ...), or a result that fails the checker (a bug: please report).
    """
    return apply_steps(model, edits)[0]


def apply_steps(model: Model, edits: Edit | Iterable[Edit]) -> tuple[Model, list[object]]:
    """:func:`apply`, with what each step did: a :class:`RemovalPlan` for a removal step (its
    ``folds`` filled), the widening's or insertion's description (a dict) for the others."""
    _check_model(model)
    made_for = getattr(edits, "model_digest", None)  # a Proposal records its model
    if isinstance(made_for, str) and made_for != model.source_digest:
        raise EditError(f"the proposal was made for another model ({made_for[:12]}...) than "
                        f"{model.name!r} ({model.source_digest[:12]}...): its kernel indices "
                        f"name other kernels here; propose from statistics of this model")
    edit_list = as_edit_list(edits)
    if model.opset < MIN_OPSET:
        raise EditError(f"model {model.name!r} is at opset {model.opset}: the surgery reads "
                        f"opset {MIN_OPSET} and later (before it, Add and Mul broadcast by "
                        f"attributes it does not follow); convert it first with "
                        f"onnx.version_converter.convert_version(proto, {MIN_OPSET})")
    original = model.proto
    proto = model.copy_proto()
    done: list[object] = []
    for step in edit_steps(edit_list):
        head = step[0]
        if isinstance(head, RemoveKernels):
            graph, removal = remove_with_fallback(
                proto, [e for e in step if isinstance(e, RemoveKernels)])
            logger.info("removed kernels: %s", removal.removed)
            result: object = removal
        elif isinstance(head, WidenLayer):
            graph = import_graph(proto)
            result = widen_step(graph, proto, head)
            logger.info("widened: %s", result)
        else:
            graph = import_graph(proto)
            result = insert_step(graph, proto, head)
            logger.info("inserted: %s", result)
        done.append(result)
        proto = export_model(graph, proto)
    restore_node_metadata(proto, original)
    restore_value_info(proto, _value_info_names(original, proto))
    _record(proto, edit_list, done)
    _postconditions(proto, edit_list, original)
    return (Model(proto, path=None, external_data=model.external_data,
                  protected=model.protected), done)


def remove_kernels(model: Model, removals: Mapping[str, Iterable[int]],
                   coupled: str = "propagate") -> Model:
    """Shorthand: ``apply(model, [RemoveKernels(layer, kernels, coupled) for ...])``, one step
    (every index refers to ``model``)."""
    _check_model(model)
    if not isinstance(removals, Mapping) or not removals:
        raise EditError("removals must be a non-empty mapping of layer name -> kernel indices, "
                        "e.g. {'conv1': [0, 3, 5]}")
    return apply(model, [RemoveKernels(layer, tuple(kernels), coupled)
                         for layer, kernels in removals.items()])


def plan_removal(model: Model, removals: Mapping[str, Iterable[int]],
                 coupled: str = "propagate") -> RemovalPlan:
    """What :func:`remove_kernels` would remove, layer by layer, without editing anything."""
    from .channels import build

    _check_model(model)
    edits = [RemoveKernels(layer, tuple(kernels), coupled) for layer, kernels in removals.items()]
    cg = build(import_graph(model.proto), model.proto)
    return plan(cg, edits)[1]


def _value_info_names(original: onnx.ModelProto, edited: onnx.ModelProto) -> list[str]:
    """The input's value_info names, plus every new tensor if the input had any value_info
    (exporters that write value_info write it for every tensor)."""
    names = [v.name for v in original.graph.value_info]
    if not names:
        return names
    known = {t.name for t in original.graph.initializer}
    known.update(v.name for v in [*original.graph.input, *original.graph.output])
    known.update(o for node in original.graph.node for o in node.output)
    return names + [o for node in edited.graph.node for o in node.output if o and o not in known]


def _record(proto: onnx.ModelProto, edits: list[Edit], done: list[object]) -> None:
    """Append ``edits`` to the metadata's edit history, and one entry per step to its step
    record (a key holding something else than a JSON list is started anew, with a warning)."""
    steps = [{"edits": [e.to_dict() for e in step],
              "result": result.to_dict() if isinstance(result, RemovalPlan) else result}
             for step, result in zip(edit_steps(edits), done, strict=True)]
    _append_metadata(proto, METADATA_KEY, [edit.to_dict() for edit in edits])
    _append_metadata(proto, STEPS_KEY, steps)


def _append_metadata(proto: onnx.ModelProto, key: str, items: list[Any]) -> None:
    history: list[Any] = []
    for prop in proto.metadata_props:
        if prop.key == key:
            try:
                loaded = json.loads(prop.value)
                history = loaded if isinstance(loaded, list) else [loaded]
            except json.JSONDecodeError:
                logger.warning("metadata %r is not JSON; starting it anew", key)
    history.extend(items)
    keep = [p for p in proto.metadata_props if p.key != key]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    proto.metadata_props.add(key=key, value=json.dumps(history))


_QUIET_RUN = ort.RunOptions()
_QUIET_RUN.log_severity_level = 4  # a failing run is reported in the EditError, not on stderr


def _postconditions(proto: onnx.ModelProto, edits: list[Edit],
                    original: onnx.ModelProto) -> None:
    """The checker (full) and strict shape inference pass on the edited model, and ONNX
    Runtime runs it on a batch of zeros where the input model runs and its sizes are known
    (a channel count that no longer matches stays hidden from the checker behind a symbolic
    batch). Where the input model fails the checker itself (ONNX Runtime runs models the
    checker rejects, such as an int64 Constant at opset 8), the edited model must load in
    ONNX Runtime instead, with a warning."""
    if proto.ByteSize() > _MAX_PROTO_BYTES:
        logger.warning("edited model exceeds 2 GB; checker and shape inference skipped")
        return
    applied = json.dumps([e.to_dict() for e in edits])
    failure = _check_failure(proto)
    if failure is None:
        failure, outputs = _run_batches(proto)  # what the checker cannot see: a symbolic batch
        if failure is None:
            _refuse_not_finite(outputs, original, edits)
            return
        if _run_batches(original)[0] is not None:
            return
        raise EditError(
            f"the edited model does not run in ONNX Runtime ({failure}); this is a bug in "
            f"onnxaom's surgery, please report it with the model and these edits: {applied}")
    own = _check_failure(original)
    if own is not None and _runs(proto):
        run_failure, outputs = _run_batches(proto)
        if run_failure is None or _run_batches(original)[0] is not None:
            warnings.warn(f"the input model fails the ONNX checker or shape inference itself "
                          f"({own}), so the edited model was checked by running it in ONNX "
                          f"Runtime only", UserWarning, stacklevel=user_stacklevel())
            _refuse_not_finite(outputs, original, edits)
            return
        raise EditError(
            f"the edited model does not run in ONNX Runtime ({run_failure}), where the input "
            f"model does; this is a bug in onnxaom's surgery, please report it with the model "
            f"and these edits: {applied}")
    raise EditError(
        f"the edited model fails the ONNX checker or shape inference ({failure}); this is a "
        f"bug in onnxaom's surgery, please report it with the model and these edits: {applied}")


def _check_failure(proto: onnx.ModelProto) -> str | None:
    """Why ``proto`` fails the full checker or strict shape inference; None if it passes."""
    try:
        onnx.checker.check_model(proto, full_check=True)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as exc:  # checker and inference raise several unrelated types
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return None


def _run_batches(proto: onnx.ModelProto) -> tuple[str | None, list[Any] | None]:
    """None and the outputs of ``proto`` on one batch of random images (seeded; one sample
    where the batch is symbolic; the other inputs zeros), or, where that run fails, why a
    batch of zeros fails too (None, None where zeros run: an input read as an index, say);
    (None, None) when an input has other sizes not known (nothing to feed)."""
    from ..runtime import make_session

    zeros, drawn = {}, {}
    rng = np.random.default_rng(0)
    for value in fed_inputs(proto):
        dims = dim_values(value.type)
        if not value.type.HasField("tensor_type") or not dims or None in dims[1:]:
            return None, None
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        shape = [dims[0] or 1, *(int(d or 0) for d in dims[1:])]
        zeros[value.name] = np.zeros(shape, dtype)
        drawn[value.name] = (rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                             else rng.integers(0, 256, shape).astype(dtype) if dtype == np.uint8
                             else zeros[value.name])
    try:
        session = make_session(proto, ["CPUExecutionProvider"], threads=1,
                               optimization="disable")
    except Exception as exc:  # ModelError, and anything ORT raises
        return " ".join(str(exc).split())[:300] or type(exc).__name__, None
    failure = ""
    for feeds in (drawn, zeros):
        try:
            outputs = session.run(None, feeds, _QUIET_RUN)
        except Exception as exc:  # ORT raises its own types
            failure = " ".join(str(exc).split())[:300] or type(exc).__name__
            continue
        # on zeros only (an input read as an index, say): nothing to compare
        return None, outputs if feeds is drawn else None
    return failure, None


def _not_finite(outputs: list[Any]) -> list[int]:
    """Which of ``outputs`` (float tensors) hold an inf or a NaN."""
    return [i for i, value in enumerate(outputs)
            if isinstance(value, np.ndarray) and value.dtype.kind == "f"
            and not np.isfinite(value).all()]


def _refuse_not_finite(outputs: list[Any] | None, original: onnx.ModelProto,
                       edits: list[Edit]) -> None:
    """Refuse an edit after which the model computes inf or NaN on the random batch of
    :func:`_run_batches` where the input model does not. New kernels started at zero
    (WidenLayer init='zeros') give activations of 0, which an op on the way to their
    consumers can turn into inf (a division by the activation, a Reciprocal, a Log), and the
    consumers' zero weights times inf into NaN."""
    bad = _not_finite(outputs or [])
    if not bad:
        return
    failure, before = _run_batches(original)
    if failure is not None or before is None:
        return
    bad = sorted(set(bad) - set(_not_finite(before)))  # outputs the edit made so
    if not bad:
        return
    names = [v.name for v in original.graph.output]
    where = ", ".join(repr(names[i]) if i < len(names) else str(i) for i in bad)
    zeros = [e for e in edits if isinstance(e, WidenLayer) and e.init == "zeros"]
    hint = (f"; WidenLayer({zeros[0].layer!r}, init='zeros') gives the new kernels activations "
            f"of 0, which an op before their consumers turns into inf (a division by the "
            f"activation, a Reciprocal, a Log): widen with init='random' or 'net2net'"
            if zeros else "")
    raise EditError(f"the edited model computes inf or NaN in output(s) {where} on a batch of "
                    f"random images, where the input model does not{hint}")


def _runs(proto: onnx.ModelProto) -> bool:
    """Whether ONNX Runtime loads ``proto`` on the CPU."""
    from ..runtime import make_session

    try:
        make_session(proto, ["CPUExecutionProvider"], threads=1)
    except Exception:  # ModelError, and anything ORT raises
        return False
    return True
