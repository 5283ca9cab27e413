"""What a torch module does when it runs: the leaf-module calls of one forward pass, in order.

:func:`trace` runs the module once (eval mode, no gradients) with a forward hook on every leaf
module and records, per call, the module's path, its input tensors and its output tensor. Tensor
*identity* links the calls: a module whose first input is the very tensor another module
returned reads that module's output. From this come two facts the other steps need:

* which :data:`LAYER_TYPES` modules run, in call order (the structure the ONNX layers are matched
  against, :mod:`onnxaom_torch.mapping`);
* each layer's *chain*: the per-channel and element-wise modules that follow it directly
  (``conv1 → bn1 → relu1``), which share its channels (:meth:`Trace.chain`).

Functional calls (``F.relu``, ``x + y``, ``torch.flatten``) are invisible to hooks; a chain stops
where one sits between two modules.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BATCH_NORM_TYPES", "CHAIN_TYPES", "LAYER_TYPES", "MIXING_NORM_TYPES",
           "PER_CHANNEL_TYPES", "Call", "FrozenBatchNorm", "Trace", "check_float32", "one_line",
           "trace"]

class FrozenBatchNorm(abc.ABC):  # noqa: B024 - an isinstance target, nothing to implement
    """An eval-mode batch norm whose ``weight``, ``bias``, ``running_mean`` and
    ``running_var`` are buffers, named ``FrozenBatchNorm2d`` (torchvision's, in its detection
    and segmentation backbones, and detectron2's): torchvision is not a dependency, so a module
    class of that name counts as one (``isinstance(m, FrozenBatchNorm)``)."""

    @classmethod
    def __subclasshook__(cls, other: type) -> bool:
        if other.__name__ == "FrozenBatchNorm2d" and issubclass(other, nn.Module):
            return True
        return NotImplemented


#: Modules that are onnxaom layers (ONNX Conv and Gemm/MatMul).
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
#: Batch norms in eval mode: x * weight / sqrt(running_var + eps) + shift, per channel.
BATCH_NORM_TYPES: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, FrozenBatchNorm)
#: Modules with one parameter (or buffer) per channel, sliced with the channels they read.
PER_CHANNEL_TYPES: tuple[type, ...] = (*BATCH_NORM_TYPES, nn.PReLU, nn.InstanceNorm1d,
                                       nn.InstanceNorm2d)
#: Modules that keep channels apart (per-channel or element-wise): they continue a layer's chain.
CHAIN_TYPES: tuple[type[nn.Module], ...] = (
    *PER_CHANNEL_TYPES, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.Hardswish, nn.Softplus, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Identity,
)
#: Normalisations across channels that keep channel k at channel k (what onnxaom's probe reads
#: through): they continue a chain only where the activation after them is looked for
#: (:meth:`Trace.chain` with ``through=``), never for per-channel edits.
MIXING_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True, eq=False)
class Call:
    """One call of a leaf module: ``name`` is its path in the traced module (``"conv1"``,
    ``"layer1.0.conv1"``); ``inputs`` the positional tensor inputs; ``output`` the returned
    tensor (None when it returned something else)."""

    name: str
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class Trace:
    """The leaf-module calls of one forward pass, in call order, and the pass's output (when
    it is one tensor)."""

    calls: tuple[Call, ...]
    output: torch.Tensor | None = None

    def first_call(self, name: str) -> Call | None:
        return next((c for c in self.calls if c.name == name), None)

    def call_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for call in self.calls:
            counts[call.name] = counts.get(call.name, 0) + 1
        return counts

    def layers(self) -> list[str]:
        """Paths of the :data:`LAYER_TYPES` modules that ran, in order of their first call."""
        seen: list[str] = []
        for call in self.calls:
            if isinstance(call.module, LAYER_TYPES) and call.name not in seen:
                seen.append(call.name)
        return seen

    def chain(self, name: str, through: tuple[type[nn.Module], ...] = ()) -> tuple[str, ...]:
        """Paths of the :data:`CHAIN_TYPES` modules (and ``through`` ones) that directly follow
        module ``name``: each reads, as its first input, exactly the tensor the one before
        returned (in-place activations included), and nothing else reads that tensor first.
        Empty when a functional op or a non-chain module comes first, or when ``name`` did not
        run."""
        calls = self.calls
        start = next((i for i, c in enumerate(calls) if c.name == name), None)
        if start is None or calls[start].output is None:
            return ()
        out: list[str] = []
        tensor = calls[start].output
        i = start + 1
        while i < len(calls):
            reader = next((j for j in range(i, len(calls))
                           if any(t is tensor for t in calls[j].inputs)), None)
            if reader is None:
                break
            call = calls[reader]
            if (not isinstance(call.module, (*CHAIN_TYPES, *through)) or not call.inputs
                    or call.inputs[0] is not tensor or call.output is None
                    or call.output.shape != tensor.shape):
                break
            out.append(call.name)
            tensor, i = call.output, reader + 1
        return tuple(out)

    def producer_of_input(self, name: str) -> str | None:
        """Path of the module whose output module ``name`` reads first (None: a functional op
        or the graph input produced it)."""
        call = self.first_call(name)
        if call is None or not call.inputs:
            return None
        first = call.inputs[0]
        for other in self.calls:
            if other is call:
                break
            if other.output is first:
                return other.name
        return None


def _leaves(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose calls are recorded: those without children, and layer and
    per-channel modules with children (timm's ``BatchNormAct2d``, a ``BatchNorm2d`` that runs
    its own ``act`` and ``drop``), whose children are then not recorded apart: the module is
    one call, its input what the layer returned, its output what the next module reads."""
    whole = (*LAYER_TYPES, *PER_CHANNEL_TYPES)
    out: list[tuple[str, nn.Module]] = []
    inside: list[str] = []  # paths of recorded modules that have children
    for name, sub in module.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if next(iter(sub.children()), None) is None:
            out.append((name, sub))
        elif isinstance(sub, whole):
            out.append((name, sub))
            inside.append(name)
    return out


def check_float32(module: nn.Module) -> None:
    """Refuse a module whose floating-point parameters or buffers are not float32: the adapter
    feeds float32 (as ONNX Runtime and onnxaom's loaders give it), and would otherwise fail
    with an error that blames the data or the model's match."""
    from onnxaom.errors import ModelError

    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise ModelError(
                f"{type(module).__name__} holds {str(tensor.dtype).removeprefix('torch.')} "
                f"tensors ({name!r}); onnxaom_torch works on float32 modules: convert it with "
                f"module.float() (and analyse its float32 ONNX export)")


def one_line(exc: BaseException, limit: int = 600) -> str:
    """``"Type: message"`` on one line (torch's load and shape errors span several), cut to
    about ``limit`` characters."""
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return text if len(text) <= limit else text[:limit].rstrip() + " ..."


def trace(module: nn.Module, example: torch.Tensor | Sequence[torch.Tensor]) -> Trace:
    """Run ``module`` once on ``example`` (a tensor, or a sequence of positional inputs) in
    eval mode without gradients, recording every leaf-module call. Train/eval modes are restored
    afterwards; parameters are not changed."""
    calls: list[Call] = []
    handles = []

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(mod: nn.Module, inputs: tuple[object, ...], output: object) -> None:
            tensors = tuple(t for t in inputs if isinstance(t, torch.Tensor))
            calls.append(Call(name, mod, tensors,
                              output if isinstance(output, torch.Tensor) else None))
        return record

    modes = {sub: sub.training for sub in module.modules()}
    args = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    try:
        for name, sub in _leaves(module):
            handles.append(sub.register_forward_hook(hook(name)))
        module.eval()
        with torch.no_grad():
            output = module(*args)
    finally:
        for handle in handles:
            handle.remove()
        for sub, training in modes.items():
            sub.training = training
    return Trace(tuple(calls), output if isinstance(output, torch.Tensor) else None)
