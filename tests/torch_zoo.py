"""Small torch modules mirroring structures of :mod:`zoo`, for exporter-parity tests.

Each builder returns a module in eval mode whose parameters (and batch-norm running statistics)
are drawn from ``torch.Generator().manual_seed(seed)``; the global torch RNG is not touched.
Inputs are (N, 3, 8, 8) by default and every module returns logits of shape (N, classes).
Submodule names match the node names of the :mod:`zoo` counterpart (``conv1``, ``bn1``,
``relu1`` ...), so the legacy exporter names its nodes ``/conv1/Conv``, ``/bn1/...`` and so on.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "TORCH_BUILDERS",
    "ChainBN",
    "Depthwise",
    "Residual",
    "chain_bn",
    "depthwise",
    "reinit",
    "residual",
]


def reinit(module: nn.Module, seed: int) -> nn.Module:
    """Redraw ``module``'s weights from N(0, 1/fan_in), biases from U(-0.1, 0.1) and batch-norm
    parameters and running statistics at random (non-trivial), from one seeded generator.
    Returns ``module`` in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape: torch.Size, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=gen)

    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d | nn.Linear):
                fan_in = sub.weight[0].numel()
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) / math.sqrt(fan_in))
                if sub.bias is not None:
                    sub.bias.copy_(uniform(sub.bias.shape, -0.1, 0.1))
            elif isinstance(sub, nn.BatchNorm2d):
                k = sub.num_features
                sub.weight.copy_(uniform(torch.Size([k]), 0.5, 1.5))
                sub.bias.copy_(0.2 * torch.randn(k, generator=gen))
                sub.get_buffer("running_mean").copy_(0.2 * torch.randn(k, generator=gen))
                sub.get_buffer("running_var").copy_(uniform(torch.Size([k]), 0.5, 1.5))
    return module.eval()


class ChainBN(nn.Module):
    """conv1 (3x3 pad 1, no bias) → bn1 → relu1 → conv2 (3x3 pad 1, no bias) → bn2 → relu2 →
    pool (MaxPool 2) → flatten → fc1 → relu3 → fc2; mirrors ``zoo.bn_kept(conv_bias=False)``.
    """

    def __init__(self, channels: int = 3, size: int = 8, kernels: tuple[int, int] = (4, 8),
                 hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        k1, k2 = kernels
        self.conv1 = nn.Conv2d(channels, k1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(k1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(k1, k2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(k2)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(k2 * (size // 2) ** 2, hidden)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(self.pool(x)))))


class Residual(nn.Module):
    """conv1 → relu1 → conv2 → relu2 → conv3 → (+ relu1 output) → relu3 → gap → flatten → fc;
    mirrors ``zoo.residual``.
    """

    def __init__(self, channels: int = 3, kernels: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, kernels, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(kernels, kernels, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(kernels, kernels, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(kernels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.relu1(self.conv1(x))
        x = self.relu3(self.conv3(self.relu2(self.conv2(skip))) + skip)
        return self.fc(self.flatten(self.gap(x)))


class Depthwise(nn.Module):
    """conv1 → relu1 → dwconv2 (depthwise, groups=K1) → relu2 → pwconv3 (1x1) → relu3 → gap →
    flatten → fc; mirrors ``zoo.depthwise``.
    """

    def __init__(self, channels: int = 3, kernels: tuple[int, int] = (4, 8),
                 classes: int = 3) -> None:
        super().__init__()
        k1, k2 = kernels
        self.conv1 = nn.Conv2d(channels, k1, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.dwconv2 = nn.Conv2d(k1, k1, 3, padding=1, groups=k1)
        self.relu2 = nn.ReLU()
        self.pwconv3 = nn.Conv2d(k1, k2, 1)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(k2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu3(self.pwconv3(self.relu2(self.dwconv2(x))))
        return self.fc(self.flatten(self.gap(x)))


def chain_bn(seed: int = 0) -> nn.Module:
    """:class:`ChainBN` with defaults, seeded, in eval mode."""
    return reinit(ChainBN(), seed)


def residual(seed: int = 0) -> nn.Module:
    """:class:`Residual` with defaults, seeded, in eval mode."""
    return reinit(Residual(), seed)


def depthwise(seed: int = 0) -> nn.Module:
    """:class:`Depthwise` with defaults, seeded, in eval mode."""
    return reinit(Depthwise(), seed)


#: name → builder(seed) returning a seeded module in eval mode; input shape (N, 3, 8, 8).
TORCH_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "chain_bn": chain_bn,
    "residual": residual,
    "depthwise": depthwise,
}


class GroupNormNet(nn.Module):
    """conv1 -> GroupNorm with one channel a group -> ReLU -> conv2 -> ReLU -> global mean ->
    fc: the norm's affine is conv1's, frozen with it."""

    def __init__(self, channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 6, 3, padding=1)
        self.norm = nn.GroupNorm(6, 6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv2(torch.relu(self.norm(self.conv1(x)))))
        return self.fc(y.mean((2, 3)))


class PreActConcat(nn.Module):
    """conv0 -> ReLU, concatenated with the image, then a pre-activation block: bn -> ReLU ->
    conv1 (1x1) -> ReLU -> global mean -> fc. ``bn`` is in front of conv1, in no layer's
    chain (a DenseNet layer's norm1)."""

    def __init__(self, channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4 + channels)
        self.conv1 = nn.Conv2d(4 + channels, 6, 1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.conv0(x)), x], 1)
        y = torch.relu(self.conv1(torch.relu(self.bn(y))))
        return self.fc(y.mean((2, 3)))
