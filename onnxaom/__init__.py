"""onnxaom: activation-occurrence maps for any CNN exported to ONNX.

Garcia et al., "A Methodology for Neural Network Architectural Tuning Using Activation
Occurrence Maps": per conv kernel and class, the fraction of samples with a positive activation
at each position (AOM), kernel-pair differences (ODM), class selectivity (CSM) and kernel
selectivity, computed exactly by streaming a data set through ONNX Runtime.
"""

from __future__ import annotations

from .errors import (
    DataError,
    EditError,
    LayerNotFoundError,
    ModelError,
    ModelFileNotFoundError,
    OnnxaomError,
    ProviderError,
    StatsError,
)
from .layers import Layer
from .model import Model, load
from .stats import OccurrenceStats

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "EditError",
    "Layer",
    "LayerNotFoundError",
    "Model",
    "ModelError",
    "ModelFileNotFoundError",
    "OccurrenceStats",
    "OnnxaomError",
    "ProviderError",
    "StatsError",
    "__version__",
    "load",
]
