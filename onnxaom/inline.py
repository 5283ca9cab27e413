"""Model-local ONNX functions, inlined so that the layers inside them can be seen.

An exporter may wrap a block of the network in a model-local function (torch's legacy
exporter with ``export_modules_as_functions``, onnxscript models): the graph then holds one
call node per block and the block's Conv nodes live in ``ModelProto.functions``, out of reach
of layer discovery, instrumentation and surgery. :func:`inline_functions` replaces each call by
the function's body (``onnx.inliner``, recursively), which computes the same outputs.

Inlined nodes are named by the path of calls that led to them, ``<call>/<node>``
(``block1/conv``, ``block1/act/relu`` for a nested call), so that a layer's name says which
block it came from. Where those names would not be unique, onnx's own names are kept
(``conv__1``). Nodes of the main graph keep their names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import onnx
import onnx.inliner

from .errors import ModelError

__all__ = ["inline_functions"]

log = logging.getLogger(__name__)

_Key = tuple[str, str, str]
_LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _key(node: onnx.NodeProto) -> _Key:
    return node.domain, node.op_type, getattr(node, "overload", "")


def _function_key(function: onnx.FunctionProto) -> _Key:
    return function.domain, function.name, getattr(function, "overload", "")


def _calls(graph: onnx.GraphProto, functions: set[_Key]) -> bool:
    """Whether ``graph`` or a subgraph of it calls one of ``functions``."""
    for node in graph.node:
        if _key(node) in functions:
            return True
        for attribute in node.attribute:
            subgraphs = [*attribute.graphs, *([attribute.g] if attribute.HasField("g") else [])]
            if any(_calls(sub, functions) for sub in subgraphs):
                return True
    return False


def inline_functions(proto: onnx.ModelProto, name: str = "model") -> onnx.ModelProto:
    """``proto`` with every call to a model-local function inlined (a new proto).

    ``proto`` itself is returned, unchanged, when the graph calls no local function. A
    function that imports another opset version than the model is version-converted as it is
    inlined, where onnx can (it needs the type of every input of the call). A call that still
    cannot be inlined is left in place when its function holds no
    layer op, and refused (:class:`ModelError` naming the function) when it does: its layers
    would otherwise be silently left out. ``name`` is the model's name, for that error.
    """
    functions = {_function_key(f): f for f in proto.functions}
    if not functions or not _calls(proto.graph, set(functions)):
        return proto
    proto = _with_default_attributes(proto)
    functions = {_function_key(f): f for f in proto.functions}
    inlined = _inline(proto, name)
    left = _called(inlined.graph, functions)
    if left:  # onnx leaves a call whose function imports another opset than the model
        converted = _converted(proto)
        if converted is not None:
            inlined, left = converted, _called(converted.graph, functions)
    with_layers = sorted(left & {key for key in functions
                                 if _holds_layers(functions[key], functions)})
    if with_layers:
        reasons = "; ".join(f"{_label(key)}{_opset_difference(functions[key], proto)}"
                            for key in with_layers)
        raise ModelError(f"model {name!r}: local function(s) hold layers (Conv, Gemm or MatMul) "
                         f"but cannot be inlined, so those layers cannot be analysed: {reasons}. "
                         "Export with the functions inlined (torch: leave "
                         "export_modules_as_functions off) or with one opset throughout")
    if left:
        log.warning("model %r: local function(s) %s left as calls (they hold no layer)", name,
                    ", ".join(sorted(_label(key) for key in left)))
    _name_by_call_path(proto.graph, functions, inlined.graph)
    log.info("model %r: inlined %d local function(s) into its graph", name, len(functions))
    return inlined


def _converted(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """``proto`` inlined with its functions version-converted to the model's opsets, or None
    when onnx cannot. The conversion needs the type of every input of a call: shape inference
    gives those of computed tensors, value_info written for the initializers theirs; both are
    dropped again afterwards, so the model keeps its own choice of value_info."""
    typed = onnx.ModelProto()
    typed.CopyFrom(proto)
    kept = {v.name for v in proto.graph.value_info}
    typed.graph.value_info.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in proto.graph.initializer if t.name not in kept)
    try:
        typed = onnx.shape_inference.infer_shapes(typed)
        converted = onnx.inliner.inline_local_functions(typed, convert_version=True)
    except Exception:  # onnx raises plain RuntimeError/ValueError from C++
        return None
    own = [v for v in converted.graph.value_info if v.name in kept]
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(own)
    return converted


def _called(graph: onnx.GraphProto, functions: dict[_Key, onnx.FunctionProto]) -> set[_Key]:
    """The keys of ``functions`` that ``graph`` still calls."""
    return {key for key in functions if _calls(graph, {key})}


def _opset_difference(function: onnx.FunctionProto, model: onnx.ModelProto) -> str:
    """`` (imports ai.onnx 13; the model imports 17)``, or ``""`` where the opsets agree."""
    versions = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
    for imp in function.opset_import:
        domain = imp.domain or "ai.onnx"
        if domain in versions and versions[domain] != imp.version:
            return f" (imports {domain} {imp.version}; the model imports {versions[domain]})"
    return ""


def _with_default_attributes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose function calls spell out every attribute the function gives a
    default (``FunctionProto.attribute_proto``) and the call leaves out: ONNX Runtime applies
    those defaults, ``onnx.inliner`` drops them (the inlined op then falls back to its own
    default: LeakyRelu's alpha 0.01 for the function's 0.5)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    defaults = {_function_key(f): list(f.attribute_proto) for f in out.functions}
    if not any(defaults.values()):
        return proto

    def fill(nodes: Iterable[onnx.NodeProto]) -> None:
        for node in nodes:
            given = {a.name for a in node.attribute}
            for attribute in defaults.get(_key(node), ()):
                if attribute.name not in given:
                    node.attribute.append(attribute)
            for attribute in node.attribute:
                for graph in [*attribute.graphs, *([attribute.g] if attribute.HasField("g")
                                                   else [])]:
                    fill(graph.node)

    fill(out.graph.node)
    for function in out.functions:
        fill(function.node)
    return out


def _inline(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    try:
        return onnx.inliner.inline_local_functions(proto)
    except Exception as exc:  # onnx raises plain RuntimeError/ValueError from C++
        names = ", ".join(sorted(_label(_function_key(f)) for f in proto.functions))
        raise ModelError(f"model {name!r}: its local functions ({names}) cannot be inlined, "
                         f"so the layers inside them cannot be analysed: {exc}") from exc


def _label(key: _Key) -> str:
    domain, function, _ = key
    return f"{domain}.{function}" if domain else function


def _holds_layers(function: onnx.FunctionProto, functions: dict[_Key, onnx.FunctionProto],
                  seen: frozenset[_Key] = frozenset()) -> bool:
    """Whether ``function``, or a function it calls, has a node of a layer op."""
    for node in function.node:
        if node.op_type in _LAYER_OPS and node.domain in ("", "ai.onnx"):
            return True
        key = _key(node)
        if key in functions and key not in seen and _holds_layers(
                functions[key], functions, seen | {_function_key(function)}):
            return True
    return False


def _paths(nodes: list[onnx.NodeProto], functions: dict[_Key, onnx.FunctionProto],
           prefix: str) -> Iterator[tuple[str, str]]:
    """(op type, name) of each node inlining emits for ``nodes``, in the inliner's order."""
    for position, node in enumerate(nodes):
        label = node.name or f"{node.op_type}_{position}"
        function = functions.get(_key(node))
        if function is not None:
            yield from _paths(list(function.node), functions, f"{prefix}{label}/")
        else:
            yield node.op_type, (f"{prefix}{label}" if prefix else node.name)


def _name_by_call_path(graph: onnx.GraphProto, functions: dict[_Key, onnx.FunctionProto],
                       inlined: onnx.GraphProto) -> None:
    """Rename the inlined nodes of ``inlined`` (in place) by their call path, where the nodes
    line up one to one with the expected ones and the new names are unique."""
    expected = list(_paths(list(graph.node), functions, ""))
    if len(expected) != len(inlined.node) or any(
            op != node.op_type for (op, _), node in zip(expected, inlined.node, strict=True)):
        return
    names = [name for _, name in expected]
    given = [name for name in names if name]  # unnamed nodes of the main graph stay unnamed
    if len(set(given)) != len(given):
        return
    for node, name in zip(inlined.node, names, strict=True):
        node.name = name
