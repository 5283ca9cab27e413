"""onnxaom: activation-occurrence maps for any CNN exported to ONNX.

Garcia et al., "A Methodology for Neural Network Architectural Tuning Using Activation
Occurrence Maps": per conv kernel and class, the fraction of samples with a positive activation
at each position (AOM), kernel-pair differences (ODM), class selectivity (CSM) and kernel
selectivity, computed exactly by streaming a data set through ONNX Runtime.
"""

from ._version import __version__
from .bind import bind_inputs
from .collect import Collector, collect
from .compare import Comparison, compare
from .data import (
    Dataset,
    Preprocessing,
    from_arrays,
    load_digits,
    load_fashion_mnist,
    load_idx,
    load_image_folder,
    load_npz,
    load_spec,
)
from .edits import InsertLayer, RemoveKernels, WidenLayer, edits_from_json, edits_to_json
from .errors import (
    ArgumentError,
    DataError,
    EditError,
    LayerNotFoundError,
    ModelError,
    ModelFileNotFoundError,
    OnnxaomError,
    OutputError,
    ProviderError,
    ReportError,
    SessionError,
    StatsError,
)
from .findings import Findings, LayerFindings, Thresholds, analyze, kernel_order
from .layers import Layer
from .model import Model, load
from .proposal import Proposal, override, propose
from .session import TuningSession
from .stats import OccurrenceStats
from .summary import LayerSummary, ModelSummary, summary
from .surgery import apply, plan_removal, remove_kernels

__all__ = [
    "ArgumentError",
    "Collector",
    "Comparison",
    "DataError",
    "Dataset",
    "EditError",
    "Findings",
    "InsertLayer",
    "Layer",
    "LayerFindings",
    "LayerNotFoundError",
    "LayerSummary",
    "Model",
    "ModelError",
    "ModelFileNotFoundError",
    "ModelSummary",
    "OccurrenceStats",
    "OnnxaomError",
    "OutputError",
    "Preprocessing",
    "Proposal",
    "ProviderError",
    "RemoveKernels",
    "ReportError",
    "SessionError",
    "StatsError",
    "Thresholds",
    "TuningSession",
    "WidenLayer",
    "__version__",
    "analyze",
    "apply",
    "bind_inputs",
    "collect",
    "compare",
    "edits_from_json",
    "edits_to_json",
    "from_arrays",
    "kernel_order",
    "load",
    "load_digits",
    "load_fashion_mnist",
    "load_idx",
    "load_image_folder",
    "load_npz",
    "load_spec",
    "override",
    "plan_removal",
    "propose",
    "remove_kernels",
    "summary",
]
