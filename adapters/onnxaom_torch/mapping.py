"""ONNX layer names <-> torch module paths, checked against the weights.

onnxaom names layers by their ONNX nodes (:func:`onnxaom.layers.layer_nodes`); an edit names
``"/conv1/Conv"`` and the torch adapter must find ``conv1``. Evidence, strongest first, for each
ONNX layer:

1. ``"weight"``: the layer's weight initializer is named after a parameter, ``conv1.weight``
   (both exporters keep parameter names for weights they do not fold);
2. ``"node name"``: the legacy exporter's node names carry the module path,
   ``/layer1/layer1.0/conv1/Conv`` → ``layer1.0.conv1``;
3. ``"name scopes"``: the dynamo exporter (opset >= 18) records the module path in node metadata
   ``pkg.torch.onnx.name_scopes``; where it names a batch norm folded into the conv, the conv
   whose output that batch norm reads is meant;
4. ``"structure"``: otherwise the layer modules in the order they run are matched to the ONNX
   layers in topological order.

Every candidate is then *checked*: module type (Conv2d for Conv, Linear for Gemm/MatMul), kernel
and input counts, groups, and the weight values (allclose; a batch norm folded into the conv by
the exporter is folded the same way before comparing). A layer whose candidate fails is matched
by its weights alone among the unmatched modules; if none fits, :class:`ModuleMismatchError`
names the first mismatch. So is a layer module that runs in the forward pass but has no ONNX
layer, and a module that runs more than once (shared weights cannot be edited per layer).
"""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

import onnxaom
from onnxaom.errors import LayerNotFoundError, ModelError
from onnxaom.frozen import FrozenMap
from onnxaom.graph import GraphIndex
from onnxaom.layers import Layer

from .trace import BATCH_NORM_TYPES, PER_CHANNEL_TYPES, Trace, check_float32, trace

#: ONNX ops with one parameter per channel that a torch module (PER_CHANNEL_TYPES) holds.
PER_CHANNEL_OPS = ("BatchNormalization", "PRelu", "InstanceNormalization")

__all__ = ["LayerMap", "ModuleMismatchError", "example_input", "map_layers", "node_module_paths"]

#: Tolerances of the weight check (relative to the largest weight of the layer for ``atol``).
RTOL = 1e-4
ATOL = 1e-5
#: Node metadata key where the dynamo exporter records the module path.
NAME_SCOPES = "pkg.torch.onnx.name_scopes"


class ModuleMismatchError(ModelError):
    """The torch module does not compute what the ONNX model computes (names the first
    mismatch: the ONNX layer, the module and what differs)."""


@dataclass(frozen=True)
class LayerMap:
    """Which torch module is which ONNX layer.

    modules: ONNX layer name -> module path, in the model's layer order.
    chains: ONNX layer name -> paths of the per-channel / element-wise modules that directly
        follow the layer in torch (``bn1``, ``relu1`` ...; see :meth:`Trace.chain`).
    nodes: names of other ONNX nodes whose parameters follow channels (:data:`PER_CHANNEL_OPS`
        not folded into a layer, and ConvTranspose, which reads them) -> module path, where the
        module could be identified.
    how: ONNX layer name -> the evidence used: ``"weight"``, ``"node name"``, ``"name scopes"``,
        ``"structure"`` or ``"weights"`` (found by its weight values alone).
    """

    modules: Mapping[str, str]
    chains: Mapping[str, tuple[str, ...]]
    nodes: Mapping[str, str]
    how: Mapping[str, str]

    def __post_init__(self) -> None:
        for name in ("modules", "chains", "nodes", "how"):
            object.__setattr__(self, name, FrozenMap(getattr(self, name)))

    def module_name(self, layer: str) -> str:
        """The module path of ONNX layer ``layer``."""
        try:
            return self.modules[layer]
        except KeyError:
            known = ", ".join(self.modules) or "(none)"
            raise LayerNotFoundError(f"no module is mapped to ONNX layer {layer!r}; mapped "
                                     f"layers: {known}") from None

    def layer_name(self, module: str) -> str:
        """The ONNX layer name of module path ``module``."""
        for layer, path in self.modules.items():
            if path == module:
                return layer
        known = ", ".join(self.modules.values()) or "(none)"
        raise LayerNotFoundError(f"module {module!r} is not an ONNX layer; layer modules: "
                                 f"{known}")

    def to_dict(self) -> dict[str, object]:
        return {"modules": dict(self.modules), "chains": {k: list(v) for k, v in
                                                         self.chains.items()},
                "nodes": dict(self.nodes), "how": dict(self.how)}


#: The size a symbolic image dimension gets in :func:`example_input`: enough for five
#: stride-2 reductions to leave 2x2 (a 1x1 image made the checks degenerate, or failed a pool).
EXAMPLE_SIZE = 64


def example_input(model: onnxaom.Model, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A random float32 input of the ONNX model's first input shape (symbolic dims -> ``batch``
    for the first axis, :data:`EXAMPLE_SIZE` elsewhere: a model exported with a dynamic image
    size), drawn from a seeded generator."""
    graph = model.proto.graph
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if not inputs:
        raise ModelError(f"model {model.name!r} has no graph input")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if i == 0
             else EXAMPLE_SIZE) for i, d in enumerate(dims)]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _legacy_path(node_name: str) -> str | None:
    """``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``,
    ``/layer1/layer1.0/downsample/downsample.0/Conv`` -> ``layer1.0.downsample.0``; None if not
    of that form. A scope that extends the one before it (``downsample.0`` after
    ``downsample``) replaces it."""
    if not node_name.startswith("/"):
        return None
    parts = [p for p in node_name.split("/")[1:-1] if p]
    if not parts:
        return None
    units: list[str] = []
    for part in parts:
        if units and part.startswith(units[-1] + "."):
            units[-1] = part
        else:
            units.append(part)
    return ".".join(units)


def _scope_path(node: onnx.NodeProto) -> str | None:
    """The module path the dynamo exporter recorded for ``node`` (last scope is the op).

    The scopes run from the root module down. Each is the full path so far (``['', 'block',
    'block.1', 'conv2d_1']``: module ``block.1``), or, in other exporter versions, one
    attribute name a level (``['', 'block', '1', 'conv2d_1']``); both give ``block.1``."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            if isinstance(scopes, list | tuple) and len(scopes) >= 2:
                names = [str(s) for s in scopes[:-1] if s]
                if not names:
                    return None
                path = names[0]
                for name in names[1:]:
                    path = name if name.startswith(path + ".") else f"{path}.{name}"
                return path
    return None


def node_module_paths(node: onnx.NodeProto) -> list[tuple[str, str]]:
    """Candidate module paths for an ONNX node, strongest evidence first, as (path, how)."""
    out: list[tuple[str, str]] = []
    legacy = _legacy_path(node.name)
    if legacy is not None:
        out.append((legacy, "node name"))
    scope = _scope_path(node)
    if scope is not None:
        out.append((scope, "name scopes"))
    return out


#: The parameter and buffer names a per-channel module or a ConvTranspose2d exports under.
_PARAMETER_NAMES = ("weight", "bias", "running_mean", "running_var")


def _parameter_owners(index: GraphIndex, node: onnx.NodeProto) -> list[str]:
    """Module paths named by the constants ``node`` reads (``up.weight`` -> ``up``), through
    ``Identity`` nodes; in input order, each once."""
    out: list[str] = []
    for name in node.input[1:]:
        if not name:
            continue
        source = _weight_source(index, name)
        if len(index.consumers.get(source, ())) > 1:
            continue  # one tensor for equal parameters of several modules: it names none
        path, _, last = source.rpartition(".")
        if path and last in _PARAMETER_NAMES and path not in out:
            out.append(path)
    return out


def _holds_parameters(index: GraphIndex, node: onnx.NodeProto, module: nn.Module) -> bool:
    """Whether ``module`` holds exactly the constant parameters of per-channel ``node``: a
    BatchNormalization's scale, bias, mean and variance; a PRelu's slope; an
    InstanceNormalization's scale and bias (False where any is computed)."""
    names = {"BatchNormalization": ("weight", "bias", "running_mean", "running_var"),
             "PRelu": ("weight",), "InstanceNormalization": ("weight", "bias")}.get(
        node.op_type, ())
    inputs = list(node.input[1:1 + len(names)])
    if not names or len(inputs) != len(names):
        return False
    for name, tensor in zip(names, inputs, strict=True):
        value = index.constant(tensor) if tensor else None
        mine = getattr(module, name, None)
        if value is None or not isinstance(mine, torch.Tensor):
            return False
        mine_values = mine.detach().cpu().numpy().ravel()
        if value.size != mine_values.size or not np.array_equal(
                value.ravel().astype(np.float32), mine_values.astype(np.float32)):
            return False
    return True


def _weight_source(index: GraphIndex, name: str) -> str:
    """The tensor a layer's weight input comes from, through ``Identity`` nodes (the legacy
    exporter feeds a second layer with the same weights through one)."""
    seen = {name}
    while index.constant(name) is None:
        producer = index.producer.get(name)
        node = index.graph.node[producer] if producer is not None else None
        if node is None or node.op_type != "Identity" or node.input[0] in seen:
            break
        name = node.input[0]
        seen.add(name)
    return name


def _onnx_weight(index: GraphIndex, layer: Layer, node: onnx.NodeProto) -> np.ndarray | None:
    """The layer's weight as torch lays it out: Conv (K, C/g, kh, kw); Linear (K, F)."""
    weight = index.constant(_weight_source(index, node.input[1]))
    if weight is None:
        return None
    weight = np.asarray(weight, dtype=np.float64)
    if layer.op == "Gemm":
        if not index.attribute(node, "transB", 0):
            weight = weight.T
        weight = weight * float(index.attribute(node, "alpha", 1.0))  # type: ignore[arg-type]
    elif layer.op == "MatMul":
        weight = weight.T
    return weight


def _torch_weights(module: nn.Module, chain: list[nn.Module]
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The module's (weight, bias), and the same with a following eval-mode batch norm folded
    in (a module without a bias has a zero one)."""
    weight = module.weight.detach().cpu().double().numpy()  # type: ignore[union-attr,operator]
    bias = (module.bias.detach().cpu().double().numpy()  # type: ignore[union-attr,operator]
            if getattr(module, "bias", None) is not None else np.zeros(weight.shape[0]))
    out = [(weight, bias)]
    bn = chain[0] if chain else None
    if isinstance(bn, BATCH_NORM_TYPES) and bn.running_var is not None \
            and bn.running_mean is not None:
        scale = (bn.weight.detach().cpu().double().numpy() if bn.weight is not None
                 else np.ones(bn.running_var.numel()))
        scale = scale / np.sqrt(bn.running_var.detach().cpu().double().numpy() + bn.eps)
        shift = bn.bias.detach().cpu().double().numpy() if bn.bias is not None else 0.0
        if scale.shape[0] == weight.shape[0]:
            mean = bn.running_mean.detach().cpu().double().numpy()
            out.append((weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1)),
                        (bias - mean) * scale + shift))
    return out


def _onnx_bias(index: GraphIndex, layer: Layer, node: onnx.NodeProto) -> np.ndarray | None:
    """A Conv's or Gemm's bias input as one value per kernel (None: none, or not a constant
    of that shape, so not compared)."""
    if layer.op not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
        return None
    bias = index.constant(_weight_source(index, node.input[2]))
    if bias is None:
        return None
    bias = np.asarray(bias, dtype=np.float64)
    if layer.op == "Gemm":
        bias = bias * float(index.attribute(node, "beta", 1.0))  # type: ignore[arg-type]
    bias = bias.reshape(-1) if bias.size == layer.kernels else bias
    return bias if bias.shape == (layer.kernels,) else None


def _check(layer: Layer, node: onnx.NodeProto, onnx_w: np.ndarray | None, path: str,
           module: nn.Module, chain: list[nn.Module], index: GraphIndex) -> str | None:
    """Why ``module`` is not ``layer`` (None: it is)."""
    kind = type(module).__name__
    want = nn.Conv2d if layer.op == "Conv" else nn.Linear
    if not isinstance(module, want):
        return f"module {path!r} is a {kind}, ONNX layer {layer.name!r} is a {layer.op}"
    if onnx_w is None:
        return f"ONNX layer {layer.name!r} has weights that are not constant"
    weight = module.weight
    if tuple(weight.shape) != onnx_w.shape:
        return (f"ONNX layer {layer.name!r} has weights of shape {onnx_w.shape}, module "
                f"{path!r} ({kind}) has {tuple(weight.shape)}")
    if isinstance(module, nn.Conv2d):
        group = int(index.attribute(node, "group", 1))  # type: ignore[call-overload]
        if group != module.groups:
            return (f"ONNX layer {layer.name!r} has group={group}, module {path!r} has "
                    f"groups={module.groups}")
    scale = max(1.0, float(np.abs(onnx_w).max(initial=0.0)))
    onnx_b = _onnx_bias(index, layer, node)
    candidates = _torch_weights(module, chain)
    matching = [b for w, b in candidates if np.allclose(w, onnx_w, rtol=RTOL, atol=ATOL * scale)]
    if not matching:
        # the closest reading: the weights as they are, or with a batch norm folded in
        worst = min(float(np.abs(w - onnx_w).max()) for w, _ in candidates)
        return (f"ONNX layer {layer.name!r} and module {path!r} ({kind}) have different weight "
                f"values (max difference {worst:.3g})")
    if onnx_b is None:
        return None
    b_scale = max(1.0, float(np.abs(onnx_b).max(initial=0.0)))
    if any(np.allclose(b, onnx_b, rtol=RTOL, atol=ATOL * b_scale) for b in matching):
        return None
    worst = min(float(np.abs(b - onnx_b).max()) for b in matching)
    return (f"ONNX layer {layer.name!r} and module {path!r} ({kind}) have the same weights but "
            f"different biases (max difference {worst:.3g})")


def map_layers(module: nn.Module, model: onnxaom.Model,
               example: torch.Tensor | None = None) -> LayerMap:
    """Map every ONNX layer of ``model`` to the module of ``module`` that computes it.

    ``example`` is an input for one forward pass (default: :func:`example_input`); ``module`` is
    not changed. Raises :class:`ModuleMismatchError` naming the first mismatch.
    """
    if not isinstance(module, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(model, onnxaom.Model):
        raise ModelError(f"expected an onnxaom.Model, got {type(model).__name__}; load one with "
                         f"onnxaom.load(path)")
    check_float32(module)
    x = example_input(model) if example is None else example
    try:
        run = trace(module, x)
    except Exception as exc:  # the module cannot run the ONNX model's input at all
        given = "the example given" if example is not None else (
            f"made for the ONNX model {model.name!r}'s input, its unknown sizes taken as "
            f"{EXAMPLE_SIZE}; "
            f"pass example= (a batch the module runs on) where it only runs at certain sizes")
        raise ModuleMismatchError(
            f"{type(module).__name__} cannot run an input of shape {tuple(x.shape)} ({given}): "
            f"{type(exc).__name__}: {exc}") from exc
    layer_map = _match(module, model, run)
    _check_outputs(module, model, x, run)
    return layer_map


#: How far the module's output may be from the ONNX model's on the example (relative to the
#: largest output): folded batch norms and exporter rewrites differ by rounding only.
OUTPUT_TOLERANCE = 1e-3


#: The example is fed as it is and this many times larger: activations that agree on small
#: values and part on large ones (a ReLU6 for a ReLU, a clipped head) differ only there.
CHECK_SCALES = (1.0, 10.0)


def _check_outputs(module: nn.Module, model: onnxaom.Model, x: torch.Tensor, run: Trace) -> None:
    """Raise :class:`ModuleMismatchError` when ``module`` and ``model`` give other outputs on
    ``x`` or on ``x`` times 10 (:data:`CHECK_SCALES`): weights that match but a forward pass
    that differs (another flatten order, another activation, say)."""
    if run.output is None:
        return
    from onnxaom.runtime import make_session

    try:  # a model ORT cannot run this way (another input type, several inputs) goes unchecked
        session = make_session(model.proto, ["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        session.run(None, {name: x.detach().cpu().numpy().astype(np.float32)})
    except Exception:  # ORT raises its own exception types
        return
    for scale in CHECK_SCALES:
        fed = x if scale == 1.0 else x * scale
        output = run.output if scale == 1.0 else trace(module, fed).output
        if output is None:
            return
        want = np.asarray(session.run(None, {name: fed.detach().cpu().numpy()
                                             .astype(np.float32)})[0])
        got = output.detach().cpu().float().numpy()
        if got.shape != want.shape:
            raise ModuleMismatchError(f"{type(module).__name__} gives outputs of shape "
                                      f"{got.shape}, the ONNX model {model.name!r} {want.shape}")
        difference = float(np.abs(got - want).max(initial=0.0))
        if difference > OUTPUT_TOLERANCE * max(1.0, float(np.abs(want).max(initial=0.0))):
            where = "the example input" if scale == 1.0 else f"the example input x {scale:g}"
            raise ModuleMismatchError(
                f"{type(module).__name__} has the weights of the ONNX model {model.name!r} but "
                f"computes something else: outputs differ by up to {difference:.3g} on {where} "
                f"(another flatten order, activation or head?)")


def _match(module: nn.Module, model: onnxaom.Model, run: Trace) -> LayerMap:
    proto = model.proto
    index = GraphIndex(proto)
    layers = model.layers()
    modules = dict(module.named_modules())
    counts = run.call_counts()
    ran = run.layers()
    initializer_owner = {f"{p}.weight": p for p in modules}
    sources = {layer.name: _weight_source(index, proto.graph.node[layer.node_index].input[1])
               for layer in layers}
    # exporters keep one copy of equal weights (a deep copy, two identity insertions): its
    # name then says nothing about which module a layer is
    read_by = Counter(sources.values())

    def chain_of(path: str) -> list[nn.Module]:
        return [modules[p] for p in run.chain(path)]

    def candidates(layer: Layer, node: onnx.NodeProto) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        owner = initializer_owner.get(sources[layer.name])
        if owner is not None and read_by[sources[layer.name]] == 1:
            found.append((owner, "weight"))
        for path, how in node_module_paths(node):
            sub = modules.get(path)
            if isinstance(sub, PER_CHANNEL_TYPES):  # dynamo: a batch norm folded into the conv
                producer = run.producer_of_input(path)
                if producer is not None:
                    found.append((producer, how))
            elif sub is not None:
                found.append((path, how))
        return found

    chosen: dict[str, tuple[str, str]] = {}
    problems: dict[str, str] = {}
    for layer in layers:
        node = proto.graph.node[layer.node_index]
        onnx_w = _onnx_weight(index, layer, node)
        for path, how in candidates(layer, node):
            if path in {p for p, _ in chosen.values()}:
                continue
            why = _check(layer, node, onnx_w, path, modules[path], chain_of(path), index)
            if why is None:
                chosen[layer.name] = (path, how)
                break
            problems.setdefault(layer.name, why)
    # structure: unmatched ONNX layers against unmatched layer modules, in order
    free_layers = [layer for layer in layers if layer.name not in chosen]
    used = {p for p, _ in chosen.values()}
    free_modules = [p for p in ran if p not in used]
    if free_layers and len(free_layers) == len(free_modules):
        for layer, path in zip(free_layers, free_modules, strict=True):
            node = proto.graph.node[layer.node_index]
            why = _check(layer, node, _onnx_weight(index, layer, node), path, modules[path],
                         chain_of(path), index)
            if why is None:
                chosen[layer.name] = (path, "structure")
            else:
                problems.setdefault(layer.name, why)
    for layer in layers:  # last resort: any unmatched module with the same weights
        if layer.name in chosen:
            continue
        node = proto.graph.node[layer.node_index]
        onnx_w = _onnx_weight(index, layer, node)
        used = {p for p, _ in chosen.values()}
        for path in ran:
            if path not in used and _check(layer, node, onnx_w, path, modules[path],
                                           chain_of(path), index) is None:
                chosen[layer.name] = (path, "weights")
                break
    reused = [p for p in ran if counts.get(p, 0) > 1]
    if reused and any(layer.name not in chosen for layer in layers):
        # the ONNX graph has one layer per call, the module one module: not a mismatch to fix
        raise ModuleMismatchError(
            f"module {reused[0]!r} runs {counts[reused[0]]} times in one forward pass; onnxaom "
            f"edits each ONNX layer on its own, so modules used more than once are not supported")
    for layer in layers:
        if layer.name not in chosen:
            why = problems.get(layer.name)
            advice = ("Export the module again (onnxaom_torch.export_onnx) or pass the ONNX "
                      "model exported from this module")
            if why is None:
                why = (f"no module of {type(module).__name__} has its kind, shape and weights "
                       f"({layer.op}, {layer.kernels} kernels)")
                advice = ("A layer computed by torch.nn.functional (F.conv2d or F.linear on a "
                          "registered Parameter) has no module to edit: write it as an "
                          "nn.Conv2d or nn.Linear. Otherwise pass the ONNX model exported from "
                          "this module")
            raise ModuleMismatchError(
                f"the module does not match ONNX model {model.name!r}: layer {layer.name!r} "
                f"has no module: {why}. {advice}")
    used = {p for p, _ in chosen.values()}
    extra = [p for p in ran if p not in used]
    if extra:
        raise ModuleMismatchError(
            f"the module does not match ONNX model {model.name!r}: module {extra[0]!r} "
            f"({type(modules[extra[0]]).__name__}) runs in the forward pass but no ONNX layer "
            f"matches it")
    shared = [p for p in used if counts.get(p, 0) > 1]
    if shared:
        raise ModuleMismatchError(
            f"module {shared[0]!r} runs {counts[shared[0]]} times in one forward pass; onnxaom "
            f"edits each ONNX layer on its own, so modules used more than once are not supported")
    nodes: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type in (*PER_CHANNEL_OPS, "ConvTranspose"):
            kinds = PER_CHANNEL_TYPES if node.op_type in PER_CHANNEL_OPS else nn.ConvTranspose2d
            if node.op_type == "InstanceNormalization":  # nn.GroupNorm as the legacy export
                kinds = (*PER_CHANNEL_TYPES, nn.GroupNorm)  # writes it (one group a channel)
            for path in [p for p, _ in node_module_paths(node)] + _parameter_owners(
                    index, node):  # by name, else by the parameters it reads (their names
                if isinstance(modules.get(path), kinds):  # survive a conversion to an older
                    nodes[node.name] = path  # opset, which drops the node's metadata)
                    break
            if node.name not in nodes and node.op_type in PER_CHANNEL_OPS:
                # else by value: the one module of its kind holding the node's parameters
                same = [path for path, sub in modules.items() if isinstance(sub, kinds)
                        and _holds_parameters(index, node, sub)]
                if len(same) == 1:
                    nodes[node.name] = same[0]
    return LayerMap(
        modules={layer.name: chosen[layer.name][0] for layer in layers},
        chains={layer.name: run.chain(chosen[layer.name][0]) for layer in layers},
        nodes=nodes,
        how={layer.name: chosen[layer.name][1] for layer in layers},
    )
