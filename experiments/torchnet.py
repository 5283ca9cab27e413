"""The torch side of the experiments: train, retrain frozen on cached features, mask kernels.

Kernel removal and evaluation in the experiments go through the torch adapter
(:mod:`onnxaom_torch.edit`, :mod:`onnxaom_torch.train`); :func:`remove_kernels` here is a plain
slicing of :class:`~onnxaom_torch.PaperMNISTNet` that the tests use as an independent reference.

Everything here works on :class:`onnxaom_torch.PaperMNISTNet` (conv1 → ReLU → conv2 → ReLU →
max-pool → flatten → fc1 → ReLU → fc2) and on tensors already in memory: images float32
(N, 1, H, W) in [0, 1], labels int64 (N,).

Retraining "with the kept kernels frozen" (Sec. V-A: "freeze the weights of this layer and
retrain the model from the second layer onward") freezes the reduced layer and every layer before
it. Those layers are deterministic functions of the input (no dropout, no batch norm), so their
output is computed once, kept in memory (:func:`prefix_features`) and the rest of the network
(:func:`suffix`) is trained on it: the same gradient steps as running the whole network with
``requires_grad=False`` on the frozen part, for a fraction of the time. Removing kernels of a
layer only drops channels of its output, so the features of a reduced model are the channels
``keep`` of the unreduced model's features (``features[:, keep]``); :func:`check_features`
verifies that on a batch before each retraining.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from onnxaom_torch import PaperMNISTNet

__all__ = [
    "STAGES",
    "TrainConfig",
    "check_features",
    "clone",
    "freeze",
    "kernel_mask",
    "prefix_features",
    "remove_kernels",
    "retrain_suffix",
    "suffix",
    "train",
]

#: The layers that can be reduced, in model order. Reducing ``STAGES[i]`` freezes ``STAGES[:i+1]``.
STAGES = ("conv1", "conv2")


@dataclass(frozen=True)
class TrainConfig:
    """Adam with a fresh state, cross-entropy, shuffled mini-batches (the order drawn from
    ``seed``)."""

    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    yield from torch.randperm(n, generator=generator).split(batch_size)


def train(model: PaperMNISTNet, x: torch.Tensor, y: torch.Tensor, config: TrainConfig
          ) -> list[float]:
    """Train every parameter of ``model`` in place; returns the mean loss of each epoch."""
    torch.manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    model.train()
    for _ in range(config.epochs):
        total = 0.0
        for batch in _batches(len(y), config.batch_size, generator):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / len(y))
    model.eval()
    return losses


# ----------------------------------------------------------------------------- kernel removal
def _shape(model: PaperMNISTNet) -> dict[str, int]:
    k2 = model.conv2.out_channels
    side = round((model.fc1.in_features // k2) ** 0.5)
    return {
        "in_channels": model.conv1.in_channels,
        "num_classes": model.fc2.out_features,
        "image_size": 2 * side + 4,
        "hidden": model.fc1.out_features,
    }


def remove_kernels(model: PaperMNISTNet, layer: str, keep: Sequence[int]) -> PaperMNISTNet:
    """A new model with only the kernels ``keep`` of ``layer`` ("conv1" or "conv2"), in that
    order; ``model`` is not modified.

    conv1: its out-channels and conv2's in-channels. conv2: its out-channels and, as flatten is
    channel-major, fc1's input columns ``k * side**2 .. (k + 1) * side**2 - 1`` of each kept k.
    """
    if layer not in STAGES:
        raise ValueError(f"layer must be one of {STAGES}, got {layer!r}")
    k_old = getattr(model, layer).out_channels
    idx = [int(k) for k in keep]
    if not idx or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= k_old:
        raise ValueError(f"keep must be distinct kernel indices in 0..{k_old - 1}, got {keep!r}")
    kernels = [model.conv1.out_channels, model.conv2.out_channels]
    kernels[STAGES.index(layer)] = len(idx)
    new = PaperMNISTNet(conv_kernels=tuple(kernels), **_shape(model))
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    sel = torch.tensor(idx)
    if layer == "conv1":
        state["conv1.weight"] = state["conv1.weight"][sel]
        state["conv1.bias"] = state["conv1.bias"][sel]
        state["conv2.weight"] = state["conv2.weight"][:, sel]
    else:
        state["conv2.weight"] = state["conv2.weight"][sel]
        state["conv2.bias"] = state["conv2.bias"][sel]
        area = model.fc1.in_features // k_old
        columns = (sel[:, None] * area + torch.arange(area)[None, :]).reshape(-1)
        state["fc1.weight"] = state["fc1.weight"][:, columns]
    new.load_state_dict(state)
    new.eval()
    return new


def freeze(model: PaperMNISTNet, through: str) -> list[torch.nn.Parameter]:
    """Set ``requires_grad=False`` on ``through`` and every layer before it; returns the
    parameters left trainable."""
    frozen = STAGES[: STAGES.index(through) + 1]
    for name in frozen:
        for p in getattr(model, name).parameters():
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- split forward
def _prefix(model: PaperMNISTNet, through: str, x: torch.Tensor) -> torch.Tensor:
    x = model.relu1(model.conv1(x))
    if through == "conv2":
        x = model.pool(model.relu2(model.conv2(x)))
    return x


def suffix(model: PaperMNISTNet, through: str, h: torch.Tensor) -> torch.Tensor:
    """Logits from the output of :func:`prefix_features` (the layers after ``through``)."""
    if through == "conv1":
        h = model.pool(model.relu2(model.conv2(h)))
    return model.fc2(model.relu3(model.fc1(model.flatten(h))))


def prefix_features(model: PaperMNISTNet, through: str, x: torch.Tensor,
                    batch_size: int = 2000) -> torch.Tensor:
    """Output of the frozen part, float32: ReLU(conv1) (N, K1, H-2, W-2) for "conv1", the
    max-pooled ReLU(conv2) (N, K2, (H-4)//2, (W-4)//2) for "conv2"."""
    if through not in STAGES:
        raise ValueError(f"through must be one of {STAGES}, got {through!r}")
    model.eval()
    with torch.no_grad():
        return torch.cat([_prefix(model, through, chunk) for chunk in x.split(batch_size)])


def check_features(model: PaperMNISTNet, through: str, x: torch.Tensor, h: torch.Tensor) -> None:
    """Raise if ``suffix(model, through, h)`` differs from ``model(x)`` (a few samples)."""
    with torch.no_grad():
        direct = model(x)
        split = suffix(model, through, h)
    if not torch.allclose(direct, split, atol=1e-4, rtol=1e-4):
        diff = float((direct - split).abs().max())
        raise RuntimeError(f"cached features of {through} do not reproduce the model (max abs "
                           f"difference {diff:.3g}): the kernel slicing is wrong")


def retrain_suffix(model: PaperMNISTNet, through: str, h: torch.Tensor, y: torch.Tensor,
                   config: TrainConfig) -> dict[str, float]:
    """Train, in place, the layers after ``through`` on the frozen features ``h`` (the output of
    :func:`prefix_features` for this model); ``through`` and the layers before it keep their
    weights. Returns ``{"loss": mean loss of the last epoch, "seconds": ...}``."""
    start = time.perf_counter()
    params = freeze(model, through)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    total = 0.0
    for _ in range(config.epochs):
        total = 0.0
        for batch in _batches(len(y), config.batch_size, generator):
            optimizer.zero_grad()
            loss = F.cross_entropy(suffix(model, through, h[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
    model.eval()
    return {"loss": total / len(y), "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------- masking (Fig. 8)
@contextmanager
def kernel_mask(model: torch.nn.Module, layer: str, keep: np.ndarray) -> Iterator[None]:
    """Zero the activations of the kernels of conv ``layer`` (``"conv{i}"``) not in the boolean
    mask ``keep`` (K,), read after its ReLU ``relu{i}`` (onnxaom's probe point), while the
    context is open. Works on :class:`~onnxaom_torch.PaperMNISTNet` and
    :class:`~onnxaom_torch.PaperCIFARNet`, whose conv ``i`` is followed by module ``relu{i}``."""
    relu = getattr(model, "relu" + layer.removeprefix("conv"), None) \
        if layer.startswith("conv") else None
    if not isinstance(relu, torch.nn.ReLU):
        raise ValueError(f"layer must name a conv followed by its ReLU (conv1, conv2, ...), got "
                         f"{layer!r}")
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (getattr(model, layer).out_channels,):
        raise ValueError(f"keep must hold one bool per kernel of {layer} "
                         f"({getattr(model, layer).out_channels}), got shape {keep.shape}")
    mask = torch.as_tensor(keep.astype(np.float32))[None, :, None, None]

    def hook(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        return output * mask

    handle = relu.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def clone(model: PaperMNISTNet) -> PaperMNISTNet:
    """A deep copy in eval mode."""
    new = copy.deepcopy(model)
    new.eval()
    return new
