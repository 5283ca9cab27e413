"""ONNX Runtime sessions: which execution providers really load, and how sessions are made.

``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` as *available* even on machines without a
GPU or CUDA libraries; asking for it there prints errors and silently falls back. We therefore
probe once, quietly, whether CUDA really loads (a tiny session with logging muted) and only
then ask for it. On CPU-only machines nothing is printed.
"""

from __future__ import annotations

import ctypes
import logging
import re
from functools import lru_cache
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .errors import ModelError, ProviderError

__all__ = ["PROVIDERS", "cuda_available", "make_session", "resolve_providers"]

log = logging.getLogger(__name__)

PROVIDERS = ("auto", "cpu", "cuda")
_QUIET = 4  # ORT severity: fatal only
# Fatal only for real sessions too: a failed run raises, and onnxaom turns ORT's message into
# its own error naming the layer; ORT's log line would repeat it with internal node names.
_SESSION_LOG_LEVEL = 4


@lru_cache(maxsize=1)
def cuda_available() -> bool:
    """True when the CUDA execution provider really loads and runs a node here."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:  # no driver library: no GPU, so don't even let ORT try (it would log errors)
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    probe.ir_version = 7
    options = ort.SessionOptions()
    options.log_severity_level = _QUIET
    previous = _QUIET
    try:
        ort.set_default_logger_severity(_QUIET)
        session = ort.InferenceSession(
            probe.SerializeToString(), options, providers=["CUDAExecutionProvider"]
        )
        return bool(session.get_providers()[0] == "CUDAExecutionProvider")
    except Exception as exc:  # any failure means: not usable here
        log.debug("CUDA execution provider does not load: %s", exc)
        return False
    finally:
        ort.set_default_logger_severity(min(previous, 2))


def resolve_providers(provider: str = "auto") -> list[str]:
    """ORT provider list for ``provider`` in {"auto", "cpu", "cuda"}.

    "auto" picks CUDA when it really loads, else CPU, silently. "cuda" raises
    :class:`ProviderError` when CUDA does not load.
    """
    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if cuda_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "cuda":
        raise ProviderError(
            "provider='cuda' was requested but the CUDA execution provider does not load on "
            "this machine (no GPU, driver or CUDA libraries); use provider='auto' or 'cpu' "
            "(on the command line --provider auto or cpu)"
        )
    return ["CPUExecutionProvider"]


def _has_qdq(model: onnx.ModelProto) -> bool:
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear")
               for node in model.graph.node)


def make_session(
    model: onnx.ModelProto,
    providers: list[str],
    *,
    threads: int | None = None,
    optimization: str = "all",
    optimized_path: Path | None = None,
) -> ort.InferenceSession:
    """An InferenceSession for an in-memory model.

    ``threads`` sets intra-op threads (None: ORT's default); ``optimization`` is one of
    "disable", "basic", "extended", "all" (ORT's graph optimisation levels).
    ``optimized_path``: where ORT writes the graph as it optimised it (ONNX, inline weights).
    Raises :class:`~onnxaom.errors.ModelError` with ORT's reason when ORT cannot load the model
    (two nodes with one name, an op it does not know).
    """
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.log_severity_level = _SESSION_LOG_LEVEL
    options.graph_optimization_level = levels[optimization]
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    if _has_qdq(model):
        # ORT's graph rewrites (Q/DQ fusions into integer kernels with a quantised bias, and
        # float fusions whose rounding a QuantizeLinear turns into a whole step) fire or not
        # depending on each tensor's readers, which instrumenting and pruning change: counts
        # then depended on which layers were counted and how. Off, every graph computes the
        # Q/DQ model node by node, as the ONNX spec defines it.
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types
        supported = _max_ir_version(str(exc))
        if supported is None or model.ir_version <= supported:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"ONNX Runtime cannot load the model: {first}") from exc
    # A newer onnx wrote an IR version this onnxruntime does not read yet. The IR version only
    # gates file-format features (the opset says what the ops mean), so we run a copy that
    # declares the newest IR onnxruntime reads; the user's model is not changed.
    log.info(
        "model IR version %d is newer than onnxruntime reads (%d); running it as IR %d",
        model.ir_version,
        supported,
        supported,
    )
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = supported
    return ort.InferenceSession(copy.SerializeToString(), options, providers=providers)


def _max_ir_version(message: str) -> int | None:
    """The IR version onnxruntime reads, from its 'Unsupported model IR version' error."""
    match = re.search(
        r"Unsupported model IR version: \d+, max supported IR version: (\d+)", message
    )
    return int(match.group(1)) if match else None
