"""onnxaom's torch adapter: the paper's CNN architectures and ONNX export.

This package imports torch; the core package ``onnxaom`` never does.
"""

from __future__ import annotations

from .architectures import PaperCIFARNet, PaperMNISTNet, export_onnx

__all__ = ["PaperCIFARNet", "PaperMNISTNet", "export_onnx"]
