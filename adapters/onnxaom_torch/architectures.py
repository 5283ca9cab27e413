"""The two CNNs of the paper (Fig. 5) as torch modules, and one way to export a module to ONNX.

Attribute names (``conv1``, ``relu1``, ``pool``, ``fc1`` ...) are chosen to be readable because the
legacy exporter builds ONNX node names from them (``/conv1/Conv``); the dynamo exporter names nodes
after aten ops instead (``node_conv2d``). :func:`export_onnx` documents what each exporter writes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import onnx
import torch
from torch import nn

from onnxaom.errors import ArgumentError

__all__ = ["PaperCIFARNet", "PaperMNISTNet", "export_onnx"]

logger = logging.getLogger(__name__)

#: Name of the graph input and output that :func:`export_onnx` writes.
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArgumentError(f"{name} must be a positive int, got {value!r}")


class PaperMNISTNet(nn.Module):
    """The paper's MNIST model (Fig. 5, top).

    ``conv1`` 3x3 (``conv_kernels[0]``) → ReLU → ``conv2`` 3x3 (``conv_kernels[1]``) → ReLU →
    max-pool 2 → flatten → ``fc1`` (``hidden``) → ReLU → ``fc2`` (``num_classes``).
    Convolutions are Keras-style "valid" (no padding, stride 1), so an input of shape
    ``(N, in_channels, image_size, image_size)`` gives conv outputs of side ``image_size - 2`` and
    ``image_size - 4`` and ``fc1`` takes ``conv_kernels[1] * ((image_size - 4) // 2) ** 2`` features
    (2,304 for the defaults). The output is logits of shape ``(N, num_classes)``, no softmax.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        conv_kernels: Sequence[int] = (16, 16),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        if len(conv_kernels) != 2:
            raise ArgumentError(f"conv_kernels must hold 2 ints (one per conv), got "
                                f"{conv_kernels!r}")
        k1, k2 = conv_kernels
        _check_positive(
            in_channels=in_channels, num_classes=num_classes, image_size=image_size,
            conv_kernels_0=k1, conv_kernels_1=k2, hidden=hidden,
        )
        side = (image_size - 4) // 2
        if side < 1:
            raise ArgumentError(f"image_size must be at least 6 for two valid 3x3 convs and a 2x2 "
                             f"pool, got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, k1, kernel_size=3)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(k1, k2, kernel_size=3)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(k2 * side * side, hidden)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.flatten(self.pool(x))
        return self.fc2(self.relu3(self.fc1(x)))


class PaperCIFARNet(nn.Module):
    """The paper's CIFAR-10 model (Fig. 5, bottom).

    Three groups of (3x3 conv, padding 1 → ReLU → 3x3 conv, padding 1 → ReLU → max-pool 2 →
    dropout 0.25), then flatten → ``fc1`` (``hidden``) → ReLU → dropout 0.5 → ``fc2``
    (``num_classes``). All six convs (``conv1`` .. ``conv6``) have ``width`` kernels (the paper
    analyses the 64-kernel 1st and 6th layers). With ``batch_norm=True`` each conv is followed by
    ``bn1`` .. ``bn6`` before its ReLU and has no bias of its own.

    Modules: ``conv{i}``, (``bn{i}``), ``relu{i}`` for i in 1..6; ``pool{g}``, ``drop{g}`` for g in
    1..3; ``flatten``, ``fc1``, ``relu7``, ``drop4``, ``fc2``. An input of shape
    ``(N, in_channels, image_size, image_size)`` gives logits of shape ``(N, num_classes)``;
    ``fc1`` takes ``width * (image_size // 8) ** 2`` features (4,096 for the defaults).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        width: int = 64,
        hidden: int = 512,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                        width=width, hidden=hidden)
        side = image_size // 8
        if side < 1:
            raise ArgumentError(f"image_size must be at least 8 for three 2x2 pools, got "
                                f"{image_size}")
        self.batch_norm = batch_norm
        channels = in_channels
        for i in range(1, 7):
            conv = nn.Conv2d(channels, width, 3, padding=1, bias=not batch_norm)
            self.add_module(f"conv{i}", conv)
            if batch_norm:
                self.add_module(f"bn{i}", nn.BatchNorm2d(width))
            self.add_module(f"relu{i}", nn.ReLU())
            if i % 2 == 0:
                self.add_module(f"pool{i // 2}", nn.MaxPool2d(2))
                self.add_module(f"drop{i // 2}", nn.Dropout(0.25))
            channels = width
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(width * side * side, hidden)
        self.relu7 = nn.ReLU()
        self.drop4 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, 7):
            x = getattr(self, f"conv{i}")(x)
            if self.batch_norm:
                x = getattr(self, f"bn{i}")(x)
            x = getattr(self, f"relu{i}")(x)
            if i % 2 == 0:
                x = getattr(self, f"drop{i // 2}")(getattr(self, f"pool{i // 2}")(x))
        x = self.relu7(self.fc1(self.flatten(x)))
        return self.fc2(self.drop4(x))


# Loggers that report, at WARNING level, things export_onnx documents once below: the opset 18 ->
# 17 down-conversion (twice), and torchvision ops that cannot be registered.
_CHATTY_LOGGERS = (
    "torch.onnx._internal.exporter._compat",
    "torch.onnx._internal.exporter._registration",
    "onnxscript.version_converter",
)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' known, documented chatter; anything else still reaches the user."""
    saved = {name: logging.getLogger(name).level for name in _CHATTY_LOGGERS}
    try:
        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            # torch >= 2.9 deprecates the TorchScript exporter; choosing it here is deliberate.
            warnings.filterwarnings("ignore", message=r"You are using the legacy TorchScript-based",
                                    category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=r"The feature will be removed",
                                    category=DeprecationWarning, module=r"torch\.onnx")
            # torch.export pickles pytree specs with a deprecated LeafSpec check (torch-internal).
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                                    category=FutureWarning)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


#: The opset :func:`export_onnx` writes by default, per exporter.
DEFAULT_OPSET = {"legacy": 17, "dynamo": 18}


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike[str],
    *,
    exporter: Literal["legacy", "dynamo"] = "legacy",
    input_shape: Sequence[int],
    opset: int | None = None,
    external_data: bool = False,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``module`` (in eval mode) to an ONNX file with one input ``"input"`` and one output
    ``"logits"``.

    Parameters
    ----------
    module:
        A module taking one tensor. It is put in eval mode for the export (dropout off, batch norm
        on running statistics); each submodule's train/eval mode is restored afterwards.
    path:
        The ``.onnx`` file to write; its folder must exist.
    exporter:
        ``"legacy"``: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``).
        ``"dynamo"``: the ``torch.export`` exporter (``dynamo=True``, with its default
        ``optimize=True``); needs ``onnxscript``.
    input_shape:
        Shape of the example input, batch first, e.g. ``(1, 1, 28, 28)``. Its batch size is the
        one baked in when ``dynamic_batch`` is false.
    opset:
        The default-domain opset the file should declare (default: :data:`DEFAULT_OPSET` of
        the exporter, 17 for legacy and 18 for dynamo, which writes 18 natively and keeps the
        node metadata that maps nodes to modules only there).
    external_data:
        Write weights to ``<file name>.data`` beside the model (e.g. ``model.onnx.data``),
        referenced by a relative location. An existing file of that name is replaced.
    dynamic_batch:
        Make axis 0 of input and output the symbolic dimension ``"N"``
        (legacy: ``dynamic_axes``; dynamo: ``dynamic_shapes`` with ``torch.export.Dim("N")``).

    Returns
    -------
    Path
        The path written.

    Notes
    -----
    What the exporters write (torch 2.13, onnxscript 0.7; for :class:`PaperMNISTNet`):

    * Legacy: nodes are named from module paths, ``/conv1/Conv``, ``/relu1/Relu``,
      ``/conv2/Conv``, ``/relu2/Relu``, ``/pool/MaxPool``, ``/flatten/Flatten``, ``/fc1/Gemm``,
      ``/relu3/Relu``, ``/fc2/Gemm``; tensors ``/conv1/Conv_output_0``; weights keep their
      parameter names (``conv1.weight``). ``nn.Flatten`` stays a ``Flatten`` node, also with a fixed
      batch. IR version 8, the opset asked for, no ``value_info``.
    * Dynamo: nodes are named after aten ops, ``node_conv2d``, ``node_relu``, ``node_conv2d_1``,
      ``node_relu_1``, ``node_max_pool2d``, ``node_Reshape_<n>``, ``node_linear``, ``node_relu_2``,
      ``node_linear_1``; tensors ``conv2d``, ``relu``, ...; weights keep their parameter names. The
      module path of each node is only in its ``metadata_props`` (``namespace``,
      ``pkg.torch.onnx.name_scopes``), and only for opset >= 18: torch implements opset 18 and for a
      lower ``opset`` converts down with the ONNX C API, which drops node metadata; the file then
      declares the opset asked for. IR version 10, ``value_info`` filled in. ``nn.Flatten`` becomes
      ``Reshape`` with an int64 initializer shape: ``[-1, 2304]`` with a dynamic batch but
      ``[B, 2304]`` (the example's batch size B) with a fixed one, so such a file only runs at batch
      B. ``optimize=True`` (the default) is what folds that shape to a constant; without it the
      graph computes the shape with ``Shape``/``Squeeze``/``Concat`` nodes and keeps eval-mode
      dropout as ``Identity`` and batch norm as ``BatchNormalization``. The external data file is
      ``<file name>.data`` and holds only tensors over 256 bytes (biases of 16 floats stay inline).
    * Both: eval-mode dropout disappears, and eval-mode ``BatchNorm2d`` after a conv is folded
      into that conv (legacy renames the folded weights ``onnx::Conv_<n>`` and may share identical
      biases through ``Identity`` nodes; dynamo names the new bias ``conv1.weight_bias`` and the
      conv ``node_Conv_<n>``).

    Legacy has no external-data switch below 2 GB, so with ``external_data=True`` the file is
    written whole and re-saved through ``onnx`` (tensors of at least 1,024 bytes go external).
    The exporters' deprecation warnings and the opset-conversion and torchvision log messages are
    silenced; other warnings pass through.

    Raises
    ------
    ValueError
        An unknown ``exporter`` or an ``input_shape`` that is not a sequence of positive ints.
    ImportError
        ``exporter="dynamo"`` without ``onnxscript`` installed.
    """
    if exporter not in ("legacy", "dynamo"):
        raise ArgumentError(f"exporter must be 'legacy' or 'dynamo', got {exporter!r}")
    shape = tuple(input_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ArgumentError(f"input_shape must be a non-empty sequence of positive ints, batch "
                         f"first, got {input_shape!r}")
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        raise ImportError("exporter='dynamo' needs onnxscript: pip install onnxscript "
                          "(or use exporter='legacy')")
    opset = DEFAULT_OPSET[exporter] if opset is None else opset
    path = Path(path)
    data_path = path.with_name(path.name + ".data")
    if external_data:
        data_path.unlink(missing_ok=True)  # onnx appends to an existing data file
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    if exporter == "dynamo" and dynamic_batch and shape[0] == 1:
        # torch.export takes a size of 1 for a constant: a dynamic batch needs an example of 2
        # or more ("Invalid ranges [2:1]" on ConvNeXt-style models)
        shape = (2, *shape[1:])
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    modes = {sub: sub.training for sub in module.modules()}
    module.eval()
    dynamic_axes = {INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}} if dynamic_batch else None
    try:
        with _quiet_exporter(), torch.no_grad():
            if exporter == "legacy":
                torch.onnx.export(
                    module, (example,), path, dynamo=False, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes=dynamic_axes, verbose=False,
                )
            else:
                torch.onnx.export(
                    module, (example,), path, dynamo=True, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: torch.export.Dim("N")},) if dynamic_batch else None,
                    external_data=external_data, verbose=False,
                )
    finally:
        for sub, training in modes.items():
            sub.training = training
    if exporter == "legacy" and external_data:
        onnx.save_model(onnx.load_model(path), path, save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_path.name)
        if data_path.exists():  # none where every tensor is under onnx's 1 KiB threshold
            data_path.chmod(path.stat().st_mode & 0o777)  # onnx makes it 0600; as the model
    logger.debug("exported %s with the %s exporter to %s", type(module).__name__, exporter, path)
    return path
