"""The edit objects of :mod:`onnxaom.edits`, applied to a torch module.

``apply_edits(module, model, edits)`` edits a deep copy of ``module`` (never ``module`` itself)
so that it computes what ``onnxaom.surgery.apply(model, edits)`` computes, where ``model`` is the
ONNX export of ``module``. The ONNX side decides, the torch side follows:

* the surgery runs first, on ``model``: it validates every edit (a missing layer, indices out of
  range, coupled layers with ``coupled="refuse"``, unsupported ops ...) and raises before any
  torch work; its result is the *oracle* the torch edit is checked against;
* the channel graph of the surgery (:func:`onnxaom.surgery.channels.build`) says, for every
  layer, which input and output positions change, including layers coupled by a residual Add,
  depthwise convs tied to their producer and ``Linear`` layers after a flatten (a channel of
  (K, H, W) covers positions k*H*W .. (k+1)*H*W-1); the torch modules get exactly those
  changes, computed by the surgery's own :class:`~onnxaom.surgery.channels.Rewriter`
  arithmetic (Net2Net copies and splits, fresh kernels, zero consumer weights);
* per-channel modules that the exporter folded away (a ``BatchNorm2d`` after a conv) are found
  by tracing the module (:meth:`onnxaom_torch.trace.Trace.chain`) and sliced with their layer;
  ones that stay in the ONNX graph are found by their node (:attr:`LayerMap.nodes`).

Torch modules changed in place on the copy: ``Conv2d`` (out and in channels, bias, ``groups`` of
depthwise convs, equal removals per group of grouped convs), ``Linear``, ``BatchNorm1d/2d``
(weight, bias, running statistics; new channels neutral: 1, 0, 0, 1), ``PReLU`` with one slope
per channel (new: 0.25). :class:`~onnxaom.InsertLayer` puts a ``Conv2d`` (or ``Linear``) + ``ReLU``
after the layer's ReLU (or ReLU6) module: that module becomes ``nn.Sequential(act=<the ReLU>,
deep=<new layer>, deep_relu=ReLU())``; where a ReLU is functional or shared by several calls,
the module before it becomes ``nn.Sequential(body=<module>, act=ReLU(), deep=<new layer>)``
(the ReLU that follows then acts as the new layer's ReLU). A functional ReLU6 is refused.

With ``check=True`` (default) the edited module is exported and compared with the surgery
result on a random batch and on the same batch times 10, where saturating activations such as
ReLU6 show (``atol``, relative to the largest output); a difference raises
:class:`~onnxaom.EditError`. Random numbers: :class:`~onnxaom.WidenLayer` (sources, random
kernels) and :class:`~onnxaom.InsertLayer` (random init) draw exactly what the surgery draws,
from the same seed; Net2Net ``noise`` is scaled by the torch weight's standard deviation, which
differs from the ONNX one when a batch norm was folded, so with ``noise > 0`` the check is
skipped.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import torch
from torch import nn

import onnxaom
from onnxaom.edits import Edit, InsertLayer, RemoveKernels, WidenLayer, as_edit_list, edit_steps
from onnxaom.errors import EditError, ModelError
from onnxaom.frozen import FrozenMap
from onnxaom.layers import (
    CONSTANT_ARITHMETIC,
    ELEMENTWISE_ACTIVATIONS,
    PASS_THROUGH,
    PER_CHANNEL_NORMS,
)
from onnxaom.runtime import make_session
from onnxaom.session import describe_edits
from onnxaom.surgery.apply import apply_steps
from onnxaom.surgery.channels import (
    Change,
    ChannelGraph,
    Plan,
    Rewriter,
    WidenPlan,
    build,
)
from onnxaom.surgery.gsio import import_graph
from onnxaom.surgery.ops import conv_weight
from onnxaom.surgery.remove import RemovalPlan
from onnxaom.surgery.remove import plan as removal_plan
from onnxaom.surgery.widen import widen_sources

from .mapping import (
    PER_CHANNEL_OPS,
    LayerMap,
    ModuleMismatchError,
    example_input,
    map_layers,
)
from .trace import (
    BATCH_NORM_TYPES,
    MIXING_NORM_TYPES,
    PER_CHANNEL_TYPES,
    Trace,
    check_float32,
    one_line,
    trace,
)

__all__ = ["TorchEdit", "apply_edits"]

logger = logging.getLogger(__name__)

#: Tolerance of the post-edit check against the ONNX surgery result.
CHECK_ATOL = 1e-5


@dataclass(frozen=True, eq=False)
class TorchEdit:
    """The result of :func:`apply_edits`.

    module: the edited copy. model: the ONNX surgery result (the oracle; its layer names).
    layers: ONNX layer name (in ``model``) -> module path (in ``module``).
    changed: ONNX layer names whose kernels changed or that are new (removed or added kernels,
        coupled layers included), in layer order.
    modules: paths of the modules whose parameters or shapes changed (layers, their batch norms,
        consumers), in the order they were edited.
    difference: largest absolute output difference against ``model`` (None: not checked).
    """

    module: nn.Module
    model: onnxaom.Model
    layers: Mapping[str, str]
    changed: tuple[str, ...]
    modules: tuple[str, ...]
    difference: float | None = None
    notes: tuple[str, ...] = field(default=())

    def module_names(self, layers: Iterable[str]) -> list[str]:
        """Module paths of ONNX layers ``layers`` (names of :attr:`model`)."""
        return [self.layers[name] for name in layers]




def apply_edits(module: nn.Module, model: onnxaom.Model, edits: Edit | Iterable[Edit], *,
                mapping: LayerMap | None = None, example: torch.Tensor | None = None,
                check: bool = True, atol: float = CHECK_ATOL) -> TorchEdit:
    """Apply ``edits`` to a deep copy of ``module``, as the ONNX surgery applies them to
    ``model``.

    Parameters
    ----------
    module:
        The torch module; not modified.
    model:
        Its ONNX export (weights must match: :func:`~onnxaom_torch.mapping.map_layers`). The
        edits name its layers.
    edits:
        One edit or a list, as for :func:`onnxaom.surgery.apply` (consecutive RemoveKernels
        are one step whose indices refer to the model before it).
    mapping:
        A :class:`LayerMap` of ``module`` and ``model`` (default: computed).
    example:
        An input for tracing and checking (default: random, of the model's input shape).
    check:
        Export the edited module and compare every output with the surgery result's, on the
        example and on 10 times it (skipped for Net2Net ``noise > 0``).
    atol:
        Largest output difference the check accepts, per unit of the output's largest value
        (plus 1e-4 relative), or, where larger, eight times what the unedited module already
        differs from ``model`` on that output and feed (float32 rounding of deep exports).

    Raises
    ------
    LayerNotFoundError, EditError
        As the surgery raises them (before any torch work), or an edit the torch side cannot
        follow (a module with per-channel parameters it cannot place, a failed check).
    ModuleMismatchError
        ``module`` is not what ``model`` computes.
    """
    if not isinstance(module, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(module).__name__}")
    check_float32(module)
    edit_list = as_edit_list(edits)
    if not edit_list:
        raise EditError("no edits given; pass at least one RemoveKernels, WidenLayer or "
                        "InsertLayer")
    steps = edit_steps(edit_list)
    models = [model]
    done: list[object] = []  # per step, what the surgery did (a removal's bias folds, ...)
    for step in steps:  # validates every edit before any torch work; the oracles
        result, (step_done,) = apply_steps(models[-1], step)
        models.append(result)
        done.append(step_done)
    work = copy.deepcopy(module)
    x = example_input(model) if example is None else example
    lmap = mapping if mapping is not None else map_layers(work, model, x)
    layers = dict(lmap.modules)
    nodes = dict(lmap.nodes)
    changed: list[str] = []
    touched: list[str] = []
    notes: list[str] = []
    for number, (current, step) in enumerate(zip(models[:-1], steps, strict=True)):
        run = _traced(work, x, steps[:number])
        proto = current.proto
        head = step[0]
        if isinstance(head, RemoveKernels):
            removal = done[number]
            assert isinstance(removal, RemovalPlan)
            # the same removal point as the ONNX surgery's (its fallback: the chain end)
            cg = build(import_graph(proto), proto, chain_end=removal.chain_end)
            removals = [e for e in step if isinstance(e, RemoveKernels)]
            plan, _ = removal_plan(cg, removals)
            rewriter = Rewriter(cg, plan, init="zeros", rng=np.random.default_rng(0))
            rewriter.folds = dict(removal.folds)
            step_changed = _apply_plan(work, cg, rewriter, layers, nodes, run, touched)
        elif isinstance(head, WidenLayer):
            cg = build(import_graph(proto), proto)
            rewriter = _widen_rewriter(cg, head)
            step_changed = _apply_plan(work, cg, rewriter, layers, nodes, run, touched)
        elif isinstance(head, InsertLayer):
            inserted = done[number]
            assert isinstance(inserted, dict)
            step_changed = [str(inserted["layer"])]
            onnx_chain = current.layer(head.after).chain  # ends in "Relu" or "Clip" (checked)
            _insert(work, head, step_changed[0], onnx_chain, layers, nodes, run, touched, notes,
                    x)
        else:  # pragma: no cover - as_edit_list admits only the three edit types
            raise EditError(f"not an edit: {head!r}")
        changed.extend(n for n in step_changed if n not in changed)
    current = models[-1]
    _traced(work, x, steps)  # the edited forward must run, checked or not
    difference = None
    noisy = any(isinstance(e, WidenLayer) and e.noise > 0 for e in edit_list)
    guessed = any(note.startswith("the ReLU after") for note in notes)
    if (check or guessed) and not noisy:
        # an insertion wrapped around a functional or shared ReLU is a guess about the
        # forward: checked against the surgery even with check=False
        try:
            difference = _check_against(work, current, x, atol,
                                        noise=_numeric_noise(module, model, x))
        except EditError as exc:
            if not guessed or check:
                raise
            raise EditError(f"the layer inserted around a functional or shared ReLU does not "
                            f"give the ONNX surgery's result ({exc}): an op between the "
                            f"layer's chain and its ReLU (a scale module?) that the adapter "
                            f"does not see; make the ReLU an nn.ReLU module right after the "
                            f"layer's chain") from exc
    order = [layer.name for layer in current.layers()]
    return TorchEdit(
        module=work, model=current,
        layers=FrozenMap({name: layers[name] for name in order if name in layers}),
        changed=tuple(n for n in order if n in changed),
        modules=tuple(dict.fromkeys(touched)),
        difference=difference, notes=tuple(notes),
    )


# ------------------------------------------------------------------------------- plans
def _widen_rewriter(cg: ChannelGraph, edit: WidenLayer) -> Rewriter:
    """The plan and random numbers of :func:`onnxaom.surgery.widen.widen_step`, drawn again
    from the same seed (the surgery has validated the edit already)."""
    ref = cg.layer(edit.layer)
    k = len(ref.slots)
    rng = np.random.default_rng(edit.seed)
    sources = widen_sources(edit, k, rng)
    block = cg.slots.roots(ref.slots)
    plan = WidenPlan(cg, block, sources, edit.layer)
    return Rewriter(cg, plan, init="random" if edit.init == "random" else "zeros", rng=rng,
                    noise=edit.noise)


def _apply_plan(work: nn.Module, cg: ChannelGraph, r: Rewriter, layers: dict[str, str],
                nodes: dict[str, str], run: Trace, touched: list[str]) -> list[str]:
    """Change every module the plan touches, in the surgery's record order (so random draws
    come in the same order); returns the ONNX layers whose kernels changed."""
    plan: Plan = r.plan
    modules = dict(work.named_modules())
    done: set[str] = set()
    changed: list[str] = []
    followed: list[str] = []  # per-channel modules edited as a layer's chain
    for rec in cg.records:
        in_flow = rec.ins[0] if rec.ins else None
        in_change = plan.change(in_flow) if in_flow is not None else None
        if rec.layer is not None:
            name = rec.layer.layer.name
            out_flow = rec.outs[0] if rec.outs else None
            out_change = plan.change(out_flow) if out_flow is not None else None
            if in_change is None and out_change is None:
                continue
            path = layers.get(name)
            if path is None:
                raise EditError(f"no torch module is mapped to ONNX layer {name!r}")
            fold = r.folds.get(rec.node.name or rec.node.outputs[0].name)
            if fold is not None:
                _add_to_bias(modules[path], _before_folded_norm(
                    fold, rec.layer.layer.chain, [modules[f] for f in run.chain(path)]))
            _edit_layer(modules[path], path, r, in_change, out_change)
            touched.append(path)
            done.add(path)
            if out_change is not None:
                changed.append(name)
                for follower in run.chain(path):
                    sub = modules[follower]
                    if isinstance(sub, PER_CHANNEL_TYPES) and follower not in done:
                        _edit_per_channel(sub, follower, r, out_change)
                        touched.append(follower)
                        done.add(follower)
                        followed.append(follower)
        elif in_change is not None and rec.node.op == "ConvTranspose":
            path = nodes.get(rec.node.name)
            module = modules.get(path) if path is not None else None
            if path is None or not isinstance(module, nn.ConvTranspose2d):
                raise EditError(f"ONNX node {rec.node.name!r} (ConvTranspose) reads channels that "
                                f"change with this edit, but no torch ConvTranspose2d could be "
                                f"identified for it (no module path in its name or metadata)")
            if path not in done:
                _set_param(module, "weight", r.in_channels(_numpy(module.weight), 0, in_change))
                module.in_channels = in_change.size
                touched.append(path)
                done.add(path)
        elif in_change is not None and rec.node.op in PER_CHANNEL_OPS:
            path = nodes.get(rec.node.name)
            if path is None:  # no name to go by (an export converted to an older opset): the
                # module of its kind at its place in the chain of the layer it follows, where
                # that chain was edited with the layer
                path = _chain_module(cg, rec.node, layers, run, modules)
                path = path if path in followed else None
            if path is None:
                raise EditError(
                    f"ONNX node {rec.node.name!r} ({rec.node.op}) has per-channel parameters "
                    f"that change with this edit, but no torch module could be identified for "
                    f"it (not after a layer module, no module path in its name or metadata)")
            if path not in done:
                _edit_per_channel(modules[path], path, r, in_change)
                touched.append(path)
                done.add(path)
    return changed


def _chain_module(cg: ChannelGraph, node: Any, layers: Mapping[str, str], run: Trace,
                  modules: Mapping[str, nn.Module]) -> str | None:
    """The torch module of per-channel ONNX ``node`` (a graphsurgeon node) found by place: up
    its single-input chain of per-channel ops to the ONNX layer it follows, then, in the torch
    chain after that layer's module, the module of its kind at the same position among those
    of its kind; None when the node follows no layer that way."""
    owner = {id(ref.node): name for name, ref in cg.layers.items()}
    passing = ELEMENTWISE_ACTIVATIONS | PASS_THROUGH | PER_CHANNEL_NORMS | CONSTANT_ARITHMETIC
    before, current = 0, node
    for _ in range(64):
        computed = [t for t in current.inputs if not isinstance(t, gs.Constant)]
        tensor = computed[0] if computed else None
        if tensor is None or len(tensor.inputs) != 1:
            return None
        producer = tensor.inputs[0]
        if id(producer) in owner:
            path = layers.get(owner[id(producer)])
            if path is None:
                return None
            kinds = _PER_CHANNEL_MODULES[node.op]
            same = [f for f in run.chain(path) if isinstance(modules[f], kinds)]
            # only where the torch chain has as many modules of the kind as the ONNX chain has
            # nodes (an exporter folds a batch norm into the conv: then places do not match)
            if len(same) != _ops_in_chain(producer, node.op, passing):
                return None
            return same[before] if before < len(same) else None
        computed = [t for t in producer.inputs if not isinstance(t, gs.Constant)]
        if producer.op not in passing or len(computed) != 1:
            return None  # a merge of two tensors (a residual Add) ends the chain
        before += producer.op == node.op
        current = producer
    return None


def _ops_in_chain(layer_node: Any, op: str, passing: frozenset[str]) -> int:
    """How many ``op`` nodes the single-reader chain of per-channel ops after ``layer_node``
    (a graphsurgeon node) holds."""
    count, tensor = 0, layer_node.outputs[0]
    for _ in range(64):
        readers = list(tensor.outputs)
        if len(readers) != 1:
            break
        reader = readers[0]
        computed = [t for t in reader.inputs if not isinstance(t, gs.Constant)]
        if reader.op not in passing or len(computed) != 1 or not reader.outputs:
            break
        count += reader.op == op
        tensor = reader.outputs[0]
    return count


#: The torch modules an ONNX per-channel op is exported from.
_PER_CHANNEL_MODULES: dict[str, tuple[type, ...]] = {
    "BatchNormalization": BATCH_NORM_TYPES, "PRelu": (nn.PReLU,),
    "InstanceNormalization": (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.GroupNorm)}


# ------------------------------------------------------------------------------- modules
def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.array(tensor.detach().cpu().numpy(), copy=True)


def _set_param(module: nn.Module, name: str, values: np.ndarray) -> None:
    old = getattr(module, name)
    new = torch.from_numpy(np.ascontiguousarray(values)).to(device=old.device, dtype=old.dtype)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:  # a buffer
        setattr(module, name, new)


#: The first op of a layer's ONNX chain where the norm after it was exported unfolded: a
#: torch batch norm as a BatchNormalization; a FrozenBatchNorm2d (a module computing
#: ``x * scale + shift``, which no exporter folds into the conv) as that arithmetic.
_UNFOLDED_NORM_OPS = frozenset({"BatchNormalization"})
_UNFOLDED_FROZEN_NORM_OPS = frozenset({"BatchNormalization", "Mul", "Div"})


def _before_folded_norm(shift: np.ndarray, onnx_chain: Sequence[str],
                        followers: Sequence[nn.Module]) -> np.ndarray:
    """``shift``, added to an ONNX layer's outputs, in the units of the torch layer's own
    outputs: where the export folded the batch norm that follows the torch layer into the conv
    (its ONNX chain starts with no norm: neither a BatchNormalization nor the Mul of a norm
    exported as arithmetic, as torchvision's FrozenBatchNorm2d is), divided by that norm's
    scale."""
    first = followers[0] if followers else None
    if not isinstance(first, BATCH_NORM_TYPES):
        return shift
    unfolded = _UNFOLDED_NORM_OPS if isinstance(first, nn.modules.batchnorm._BatchNorm) \
        else _UNFOLDED_FROZEN_NORM_OPS  # a BN followed by x * c: folded, chain starts with Mul
    if onnx_chain and onnx_chain[0] in unfolded:
        return shift
    scale = np.ones(len(shift)) if first.weight is None else _numpy(first.weight)
    scale = scale / np.sqrt(_numpy(first.running_var).astype(np.float64) + first.eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(scale != 0, shift / scale, 0.0)


def _add_to_bias(module: nn.Module, shift: np.ndarray) -> None:
    """``module.bias += shift`` (one value per output), a bias made where it has none."""
    weight = module.weight
    bias = module.bias if module.bias is not None else torch.zeros(
        weight.shape[0], dtype=weight.dtype, device=weight.device)
    module.bias = nn.Parameter(bias.detach() + torch.as_tensor(shift, dtype=weight.dtype,
                                                                device=weight.device))


def _edit_layer(module: nn.Module, path: str, r: Rewriter, in_change: Change | None,
                out_change: Change | None) -> None:
    if isinstance(module, nn.Conv2d):
        _edit_conv(module, path, r, in_change, out_change)
    elif isinstance(module, nn.Linear):
        weight = _numpy(module.weight)  # (K, F)
        if out_change is not None:
            weight = r.out_channels(weight, 0, out_change, fan_in=int(weight.shape[1]))
        if in_change is not None:
            weight = r.in_channels(weight, 1, in_change)
        _set_param(module, "weight", weight)
        module.out_features, module.in_features = int(weight.shape[0]), int(weight.shape[1])
        if out_change is not None and module.bias is not None:
            _set_param(module, "bias", r.out_channels(_numpy(module.bias), 0, out_change,
                                                      fan_in=1, bias=True))
    else:
        raise EditError(f"module {path!r} is a {type(module).__name__}; only Conv2d and Linear "
                        f"layers can be edited")


def _edit_conv(module: nn.Conv2d, path: str, r: Rewriter, in_change: Change | None,
               out_change: Change | None) -> None:
    weight, group = conv_weight(r, _numpy(module.weight), module.groups, in_change, out_change,
                                f"conv {path!r}")
    _set_param(module, "weight", weight)
    module.groups = group
    module.out_channels = int(weight.shape[0])
    module.in_channels = int(weight.shape[1]) * group
    if out_change is not None and module.bias is not None:
        _set_param(module, "bias", r.out_channels(_numpy(module.bias), 0, out_change, fan_in=1,
                                                  bias=True))


def _edit_per_channel(module: nn.Module, path: str, r: Rewriter, change: Change) -> None:
    if isinstance(module, (*BATCH_NORM_TYPES, nn.InstanceNorm1d, nn.InstanceNorm2d)):
        # a FrozenBatchNorm2d keeps no num_features: its buffers' length is the count
        features = getattr(module, "num_features", None) or int(module.running_mean.numel())
        if features != change.old_size:
            raise EditError(f"{type(module).__name__} {path!r} has {features} "
                            f"features, but the channels it reads number {change.old_size}")
        for name, neutral in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                              ("running_var", 1.0)):
            if getattr(module, name, None) is not None:
                _set_param(module, name, r.per_channel(_numpy(getattr(module, name)), 0, change,
                                                       neutral))
        if hasattr(module, "num_features"):
            module.num_features = change.size
    elif isinstance(module, nn.GroupNorm):
        # the surgery edits through a group norm only where each channel is its own group
        if module.num_groups != module.num_channels or module.num_channels != change.old_size:
            raise EditError(f"GroupNorm {path!r} has {module.num_groups} groups of "
                            f"{module.num_channels} channels; only one channel a group "
                            f"follows an edit of the {change.old_size} channels it reads")
        for name, neutral in (("weight", 1.0), ("bias", 0.0)):
            if getattr(module, name, None) is not None:
                _set_param(module, name, r.per_channel(_numpy(getattr(module, name)), 0, change,
                                                       neutral))
        module.num_groups = module.num_channels = change.size
    elif isinstance(module, nn.PReLU):
        if module.num_parameters == 1:
            return
        _set_param(module, "weight", r.per_channel(_numpy(module.weight), 0, change, 0.25))
        module.num_parameters = change.size
    else:  # pragma: no cover - PER_CHANNEL_TYPES lists only the types above
        raise EditError(f"module {path!r} ({type(module).__name__}) cannot be edited")


# ------------------------------------------------------------------------------- insertion
def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)


def _new_layer(layer_module: nn.Module, edit: InsertLayer, kernels: int) -> nn.Module:
    """The inserted layer, with the weights :func:`onnxaom.surgery.deepen.insert_step` gives."""
    rng = np.random.default_rng(edit.seed)
    weight_param = layer_module.weight
    if not isinstance(weight_param, torch.Tensor):
        raise EditError(f"layer module {type(layer_module).__name__} has no weight tensor")
    k = kernels
    new: nn.Module
    if isinstance(layer_module, nn.Conv2d):
        size, pad = edit.kernel_size, edit.kernel_size // 2
        if edit.init == "identity":
            w = np.zeros((k, k, size, size))
            w[np.arange(k), np.arange(k), pad, pad] = 1
        else:
            w = rng.normal(0.0, np.sqrt(2.0 / (k * size * size)), (k, k, size, size))
        new = nn.Conv2d(k, k, size, padding=pad)
    else:
        w = np.eye(k) if edit.init == "identity" else rng.normal(0.0, np.sqrt(2.0 / k), (k, k))
        new = nn.Linear(k, k)
    new = new.to(device=weight_param.device, dtype=weight_param.dtype)
    with torch.no_grad():
        new.weight.copy_(torch.from_numpy(w.astype(np.float32)))
        new.bias.zero_()  # type: ignore[union-attr]
    return new


def _nonnegative_activation(module: nn.Module) -> bool:
    """A module that is the ReLU (or ReLU6) ending a layer's ONNX chain."""
    if isinstance(module, nn.ReLU | nn.ReLU6):
        return True
    return isinstance(module, nn.Hardtanh) and float(module.min_val) >= 0


def _renamed(old: str, new: str, *tables: dict[str, str]) -> None:
    """Point every entry of ``tables`` (ONNX name -> module path) at ``old`` to ``new``."""
    for table in tables:
        for key, value in table.items():
            if value == old:
                table[key] = new


def _insert(work: nn.Module, edit: InsertLayer, new_name: str, onnx_chain: Sequence[str],
            layers: dict[str, str], nodes: dict[str, str], run: Trace, touched: list[str],
            notes: list[str], example: torch.Tensor) -> None:
    """Put the new layer after the activation module that ends ``edit.after``'s chain
    (``onnx_chain``: the ONNX layer's chain, ending in its activation, "Relu" or "Clip"), as
    ``Sequential(act, deep, deep_relu)``; after a module that runs the activation itself
    (timm's ``BatchNormAct2d``), as ``Sequential(body, deep, deep_relu)``; where that
    activation is functional, wrap the module before it, which is exact only for a functional
    ReLU applied to that module's output (relu(deep(relu(x))) either way): refused where the
    ONNX chain holds ops before its ReLU that no module of the torch chain accounts for (an
    inline ``conv(x) + 0.3``, a module the trace does not follow), or where the module's
    forward shows that no ReLU follows that module's output (:func:`_relu_follows`)."""
    activation = onnx_chain[-1]
    path = layers.get(edit.after)
    if path is None:
        raise EditError(f"no torch module is mapped to ONNX layer {edit.after!r}")
    modules = dict(work.named_modules())
    layer_module = modules[path]
    kernels = int(layer_module.weight.shape[0])  # type: ignore[union-attr,index]
    chain = list(run.chain(path, through=MIXING_NORM_TYPES))  # Conv -> GroupNorm -> ReLU too
    counts = run.call_counts()
    act_at = next((i for i, p in enumerate(chain) if _nonnegative_activation(modules[p])), None)
    new = _new_layer(layer_module, edit, kernels)
    # a chain module that runs its activation itself (timm's BatchNormAct2d: bn.act)
    inside = None if act_at is not None else next(
        (p for p in chain if any(_nonnegative_activation(sub)
                                 for sub in modules[p].modules())), None)
    if act_at is not None and counts.get(chain[act_at], 0) == 1:
        target = chain[act_at]
        _replace(work, target, nn.Sequential(OrderedDict(
            [("act", modules[target]), ("deep", new), ("deep_relu", nn.ReLU())])))
        layers[new_name] = f"{target}.deep"
    elif inside is not None and counts.get(inside, 0) == 1:
        target = inside
        _replace(work, target, nn.Sequential(OrderedDict(
            [("body", modules[target]), ("deep", new), ("deep_relu", nn.ReLU())])))
        _renamed(target, f"{target}.body", layers, nodes)
        layers[new_name] = f"{target}.deep"
    else:
        if activation != "Relu":
            raise EditError(f"cannot insert a layer after {edit.after!r} in the torch module: "
                            f"its {activation} activation is not a module that runs once (a "
                            f"functional call such as F.relu6?); make it an nn.ReLU6 module")
        before = chain[:act_at] if act_at is not None else chain
        unexplained = _unexplained_ops(onnx_chain[:-1], [modules[p] for p in before])
        if unexplained:
            raise EditError(
                f"cannot insert a layer after {edit.after!r} in the torch module: in the ONNX "
                f"model its ReLU comes after {', '.join(unexplained)}, which no module of the "
                f"torch chain after {path!r} ({', '.join(before) or 'none'}) accounts for (an "
                f"inline op such as conv(x) + c, or a module the adapter does not follow), so "
                f"the ReLU module or call to insert after cannot be told; make the ReLU an "
                f"nn.ReLU module right after the layer's chain")
        target = ([path, *before])[-1]
        if counts.get(target, 0) != 1:
            raise EditError(f"cannot insert a layer after {edit.after!r}: module {target!r} "
                            f"runs {counts.get(target, 0)} times, so wrapping it would insert "
                            f"the layer in several places")
        if not _relu_follows(work, modules[target], example):
            raise EditError(
                f"cannot insert a layer after {edit.after!r} in the torch module: the forward "
                f"does not apply a ReLU right to the output of {target!r}, the last module "
                f"the adapter traces before the ONNX model's ReLU (an inline op between them, "
                f"such as bn(conv(x)) + 0.3, or an in-place F.relu before {target!r}), so the "
                f"place of the ReLU cannot be told; make the ReLU an nn.ReLU module right "
                f"after the layer's chain")
        _replace(work, target, nn.Sequential(OrderedDict(
            [("body", modules[target]), ("act", nn.ReLU()), ("deep", new)])))
        _renamed(target, f"{target}.body", layers, nodes)
        layers[new_name] = f"{target}.deep"
        notes.append(f"the ReLU after {target!r} is functional or shared: wrapped {target!r} "
                     f"as {target}.body")
    touched.append(layers[new_name])


def _relu_follows(work: nn.Module, target: nn.Module, example: torch.Tensor) -> bool:
    """Whether ``work``'s forward on ``example`` applies a ReLU (or an op that, like it, sends
    every value <= 0 to what it sends 0 to) right to the output of module ``target``: the
    output is the same with ``target``'s output replaced by -|y| as by zeros. An inline op
    in between (y + 0.3) or no ReLU at all (an in-place F.relu ran before ``target``) tells
    the two apart."""
    def run(replace: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        handle = target.register_forward_hook(lambda _m, _i, out: replace(out))
        try:
            with torch.no_grad():
                out = work(example)
        finally:
            handle.remove()
        return out if isinstance(out, torch.Tensor) else torch.as_tensor(0.0)

    modes = {sub: sub.training for sub in work.modules()}
    work.eval()
    try:
        negative = run(lambda y: -y.abs() - 1.0)
        zeros = run(torch.zeros_like)
    finally:
        for sub, mode in modes.items():
            sub.train(mode)
    return bool(torch.allclose(negative, zeros, rtol=1e-5, atol=1e-6))


def _unexplained_ops(ops: Sequence[str], modules: Sequence[nn.Module]) -> list[str]:
    """The ONNX ops of a layer's chain before its activation (``ops``) that nothing in the torch
    module's traced chain (``modules``, in order) can account for: all of them (less Identity
    and Dropout) where the trace saw no module between the layer and its activation (an
    inline ``conv(x) + 0.3``, or a module the trace does not follow, sits there); none where it
    saw some (a batch norm exports as a BatchNormalization, as Mul and Add (torchvision's
    FrozenBatchNorm2d), or folded; a group norm as Reshape, InstanceNormalization, ...)."""
    if modules:
        return []
    return [op for op in ops if op not in ("Identity", "Dropout")]


# ------------------------------------------------------------------------------- the check
def _traced(work: nn.Module, x: torch.Tensor, done: Sequence[Sequence[Edit]]) -> Trace:
    """:func:`trace` of ``work`` after the edit steps ``done``, or an :class:`EditError` when
    its forward no longer runs (a width written into the forward, such as
    ``x.reshape(-1, 96)``, that the edits changed)."""
    try:
        return trace(work, x)
    except Exception as exc:  # torch raises RuntimeError, IndexError, ... for shape mistakes
        if not done:
            raise ModuleMismatchError(f"the module's forward fails on an example input of "
                                      f"shape {tuple(x.shape)}: {one_line(exc)}") from exc
        what = "; ".join(describe_edits(list(step)) for step in done)
        raise EditError(
            f"after {what}, the torch module's forward fails: {one_line(exc)}. Its forward "
            f"has a size written in that the edit changed: a reshape or view to a fixed width "
            f"(compute it from the input: x.flatten(1), x.view(x.size(0), -1)), or a width a "
            f"module keeps as an attribute and slices with (timm's GhostModule.out_chs in "
            f"x[:, :self.out_chs]), or a channel chunk/split into parts the removal made "
            f"unequal (x.chunk(2, 1)), or a per-channel tensor kept on a module and used in "
            f"forward (x + self.shift: only the tensors of BatchNorm, FrozenBatchNorm2d, "
            f"InstanceNorm and PReLU modules follow an edit); the ONNX surgery result does "
            f"not depend on it"
        ) from exc


#: The check's two feeds: the example batch and a scaled copy (saturating activations, ReLU6
#: and clips, differ only on large values).
_CHECK_SCALES = (1.0, 10.0)
#: How many times the unedited module's own rounding difference the check forgives.
_NOISE_FACTOR = 8.0


def _numeric_noise(module: nn.Module, model: onnxaom.Model, x: torch.Tensor
                   ) -> list[list[float]] | None:
    """Per check feed and graph output, how far the *unedited* ``module`` (run in torch) and
    ``model`` (run in ONNX Runtime) already differ at most: float32 rounding that a deep network
    amplifies (a dynamo export against torch's own kernels on 10x inputs), which the edited
    pair shows too and is no sign of a wrong edit. None when the module's outputs (a tensor, or
    a tuple, list or dict of them) do not pair up with the model's."""
    feed = x.detach().cpu().numpy().astype(np.float32)
    modes = {sub: sub.training for sub in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            mine = [_flat_outputs(module(torch.as_tensor(k * feed, device=x.device)))
                    for k in _CHECK_SCALES]
    finally:
        for sub, training in modes.items():
            sub.training = training
    noise: list[list[float]] = []
    for k, got in zip(_CHECK_SCALES, mine, strict=True):
        want = [value for _, value in _run(model, k * feed)]
        if got is None or len(got) != len(want) or any(
                g.shape != w.shape for g, w in zip(got, want, strict=True)):
            return None
        noise.append([float(np.abs(g - w).max(initial=0.0))
                      for g, w in zip(got, want, strict=True)])
    return noise


def _flat_outputs(out: object) -> list[np.ndarray] | None:
    """A forward's outputs in the order the exporter makes them graph outputs: a tensor, or
    the tensors of a (nested) tuple, list or dict (a segmentation model's ``out`` and
    ``aux``); None for anything else."""
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().numpy()]
    items = list(out.values()) if isinstance(out, dict) else \
        list(out) if isinstance(out, tuple | list) else None
    if items is None:
        return None
    flat: list[np.ndarray] = []
    for item in items:
        inner = _flat_outputs(item)
        if inner is None:
            return None
        flat.extend(inner)
    return flat


def _check_against(work: nn.Module, oracle: onnxaom.Model, x: torch.Tensor,
                   atol: float, noise: list[list[float]] | None = None) -> float:
    """Export ``work``, run it and ``oracle`` on ``x`` (and 10 ``x``); raise if any graph
    output differs by more than ``atol`` per unit of its largest value plus 1e-4 relative, or,
    where larger, :data:`_NOISE_FACTOR` times the unedited pair's ``noise`` on that output and
    feed (:func:`_numeric_noise`). Returns the largest difference."""
    from .architectures import export_onnx

    with tempfile.TemporaryDirectory(prefix="onnxaom-check-") as tmp:
        try:  # the feeds have x's batch: a fixed one exports more modules (a batch norm
            # without running statistics needs it)
            path = export_onnx(work, Path(tmp) / "edited.onnx", input_shape=tuple(x.shape),
                               dynamic_batch=False)
        except Exception as exc:  # torch's exporter raises many kinds
            raise EditError(
                f"the edited torch module cannot be exported to ONNX for the check against the "
                f"surgery ({one_line(exc)}); apply_edits(..., check=False) skips the check "
                f"(the ONNX surgery is exact by itself)") from exc
        exported = onnxaom.load(path)
    feed = x.detach().cpu().numpy().astype(np.float32)
    difference, failed = 0.0, None
    for k, scale_by in enumerate(_CHECK_SCALES):
        got, want = _run(exported, scale_by * feed), _run(oracle, scale_by * feed)
        if [v.shape for _, v in got] != [v.shape for _, v in want]:
            raise EditError(f"the edited torch module gives outputs of shapes "
                            f"{[v.shape for _, v in got]}, the ONNX surgery result "
                            f"{[v.shape for _, v in want]}")
        for j, ((_, g), (name, w)) in enumerate(zip(got, want, strict=True)):
            off = np.abs(g - w)
            difference = max(difference, float(off.max(initial=0.0)))
            allowed = atol * max(1.0, float(np.abs(w).max(initial=0.0))) + 1e-4 * np.abs(w)
            forgiven = _NOISE_FACTOR * noise[k][j] if noise is not None else 0.0
            if failed is None and np.any(off > np.maximum(allowed, forgiven)):
                failed = (name, float(off.max()), forgiven)
    if failed is not None:
        name, worst, forgiven = failed
        noise_note = (f"; the unedited module already differs from its ONNX model by up to "
                      f"{forgiven / _NOISE_FACTOR:.3g} there") if forgiven else ""
        raise EditError(
            f"the edited torch module differs from the ONNX surgery result by up to "
            f"{worst:.3g} on output {name!r} (tolerance {atol:g} per unit of its largest value"
            f"{noise_note}); a module with per-channel parameters or a functional op the "
            f"adapter cannot follow is on the edited channels' path")
    return difference


def _run(model: onnxaom.Model, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Every graph output of ``model`` on ``x`` (ONNX Runtime, CPU), with its name."""
    session = make_session(model.proto, ["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    return list(zip(names, (np.asarray(v) for v in session.run(None, {name: x})), strict=True))
