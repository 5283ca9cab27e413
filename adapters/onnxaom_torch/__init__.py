"""onnxaom's torch adapter: the paper's architectures, ONNX export, edits on nn.Modules,
freezing, retraining and evaluation, and the runner of tuning sessions.

This package imports torch; the core package ``onnxaom`` never does.
"""

from __future__ import annotations

from .architectures import PaperCIFARNet, PaperMNISTNet, export_onnx
from .edit import apply_edits
from .mapping import ModuleMismatchError, map_layers
from .runner import TorchRunner
from .train import Evaluation, evaluate, freeze, retrain

__all__ = [
    "Evaluation",
    "ModuleMismatchError",
    "PaperCIFARNet",
    "PaperMNISTNet",
    "TorchRunner",
    "apply_edits",
    "evaluate",
    "export_onnx",
    "freeze",
    "map_layers",
    "retrain",
]
