"""Streaming a labelled data set through ONNX Runtime into exact occurrence counts.

``collect`` is the one verb. Two methods give identical counts (``method="auto"``, the default,
is "graph", or "plain" for a model whose opset is older than 10, which "graph" cannot extend,
and on the CPU for more than 64 classes, where "plain" is faster):

* ``method="graph"``: counting happens inside the ONNX graph
  (:func:`onnxaom.instrument.counting_graph`); only (C, K*H*W) counts per layer leave the
  runtime for each batch. On CUDA the counts stay on the device between batches (IOBinding and
  a small accumulation session) and are copied back once at the end.
* ``method="plain"``: the probe tensors are graph outputs and are counted in numpy, class by
  class. It is slower and is the reference the fast path is tested against.

Fixed batch sizes: a model whose image input has a fixed batch dimension is first rewritten
with a symbolic batch, which is used only when a trial batch shows that it runs and counts each
sample as the exported batch size does. Otherwise (a Reshape with the batch baked in, say),
the stream is fed in chunks of exactly the fixed size, whatever the batches it comes in
(samples after a batch's last whole chunk wait for the next batch's), the last chunk padded
with zero images whose one-hot column is empty, so padding counts nothing. ``metadata[
"batching"]`` records which was used.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from ._version import __version__
from .counting import QUIET_RUN, Accumulator, Engine, EngineSettings, count_columns
from .data import (
    MAX_CLASSES,
    Dataset,
    Preprocessing,
    array_dtype,
    as_class_names,
    default_scale,
    float_pixels,
    iter_batches,
)
from .errors import ArgumentError, DataError, LayerNotFoundError, ModelError
from .graph import GraphIndex
from .instrument import probe_graph
from .layers import Layer, channel_mixing_reader, find_layers
from .memory import available_bytes
from .model import Model, load
from .model_input import read_model_input
from .progress import bar as progress_bar
from .runtime import make_session, resolve_providers
from .stats import OccurrenceStats

__all__ = ["METHODS", "Collector", "collect", "select_layers"]

log = logging.getLogger(__name__)

METHODS = ("auto", "graph", "plain")
#: The oldest default-domain opset the in-graph count works in (MatMulInteger).
GRAPH_MIN_OPSET = 10
#: Above this many classes ``method="auto"`` counts in numpy on the CPU: the in-graph count
#: multiplies a (classes x batch) one-hot matrix, so its cost grows with the classes; the plain
#: path catches up near 64 classes on the paper's CIFAR shape and near 100 on its MNIST shape
#: (``benchmarks/classes.py``, benchmarks/RESULTS.md).
GRAPH_MAX_CLASSES = 64


#: Op domains ONNX Runtime implements; a node of another domain is a custom op or a call to a
#: function the model does not define.
_KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training",
                              "com.microsoft", "com.microsoft.nchwc", "com.ms.internal.nhwc"})


def _other_convs(model: Model) -> str:
    """Why a model has no 2-D Conv layer, where it shows: `` (its convs are 1-D or 3-D: a,
    b)`` naming Conv nodes of another rank, or the ops of unknown domains it calls (a function
    a converter dropped: onnx's version converter keeps the calls, not the functions);
    ``""`` otherwise."""
    index = GraphIndex(model.proto)
    names, unknown = [], []
    for position, node in enumerate(model.proto.graph.node):
        shape = index.constant_shape(node.input[1]) if node.op_type in (
            "Conv", "ConvTranspose") and len(node.input) > 1 else None
        if shape is not None and len(shape) != 4:
            names.append(node.name or f"{node.op_type} #{position}")
        if node.domain not in _KNOWN_DOMAINS:
            unknown.append(f"{node.domain}.{node.op_type}")
    if names:
        return f" (its convs are 1-D or 3-D, which are not analysed: {_few(names)})"
    if unknown:
        return (f" (it calls ops no library here defines, which may hide convs: "
                f"{_few(sorted(set(unknown)))}; a function the model lost?)")
    return ""


def _few(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def select_layers(model: Model, names: Sequence[str] | None, probe: str,
                  layers: Sequence[Layer] | None = None) -> list[Layer]:
    """The layers to analyse: ``names`` in the model's order, or every layer (needs a Conv).
    ``layers``: the model's layers at ``probe``, where the caller has them already."""
    layers = list(model.layers(probe=probe) if layers is None else layers)
    if names is None:
        if not any(layer.op == "Conv" for layer in layers):
            raise ModelError(
                f"model {model.name!r} has no 2-D Conv layer to analyse{_other_convs(model)}; "
                f"pass layers=[...] (--layers on the command line) to analyse its "
                f"fully-connected layers ({', '.join(x.name for x in layers) or 'none'})"
            )
        return layers
    if isinstance(names, str):
        names = [names]
    if not names:
        raise LayerNotFoundError(
            f"layers is empty: name at least one layer of model {model.name!r} "
            f"({', '.join(x.name for x in layers) or 'none'}), or pass None for every layer")
    by_name = {layer.name: layer for layer in layers}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise LayerNotFoundError(
            f"model {model.name!r} has no layer {', '.join(map(repr, unknown))}; "
            f"its layers: {', '.join(by_name) or '(none)'}"
        )
    wanted = set(names)
    return [layer for layer in layers if layer.name in wanted]


def _note_channel_mixing(model: Model, layers: Sequence[Layer], index: GraphIndex) -> None:
    """Say, once per collection, which layers are read through a normalisation across
    channels (:func:`onnxaom.layers.channel_mixing_reader`)."""
    for layer in layers:
        node = channel_mixing_reader(model.proto, layer, index)
        if node is not None:
            log.info("layer %r is counted at %r, after %s: a kernel's activation there also "
                     "depends on the other kernels of its normalisation group", layer.name,
                     layer.probe, node)


def _resolve_shapes(
    model: onnx.ModelProto, layers: list[Layer], images: np.ndarray, providers: list[str],
    fixed_batch: int | None,
) -> list[Layer]:
    """Fill unknown H, W of layer shapes by running the plain graph on the first image of
    ``images``, or on a batch of the model's ``fixed_batch`` (which may be written into the
    graph, so that no other batch size runs)."""
    if all(None not in layer.shape for layer in layers):
        return layers
    graph = probe_graph(model, layers, dynamic_batch=fixed_batch is None)
    sample = images[:1] if fixed_batch is None else _distinct_images(images, fixed_batch)
    session = make_session(graph.model, providers)
    try:
        outputs = session.run(None, {graph.input_name: sample}, QUIET_RUN)
    except Exception as exc:  # ORT raises its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"ONNX Runtime could not run the model on a batch of "
                         f"{sample.shape[0]} to find the layers' sizes "
                         f"({', '.join(layer.name for layer in layers if None in layer.shape)}"
                         f"): {first}") from exc
    values = dict(zip([o.name for o in session.get_outputs()], outputs, strict=True))
    resolved = []
    for layer in layers:
        shape = values[layer.probe].shape
        if len(shape) == 4:
            h, w = (shape[p] for p in (layer.probe_perm or range(4))[2:])
            resolved.append(_replace_shape(layer, (layer.kernels, int(h), int(w))))
        else:
            resolved.append(_replace_shape(layer, (layer.kernels, 1, 1)))
    return resolved


def _replace_shape(layer: Layer, shape: tuple[int, int, int]) -> Layer:
    return replace(layer, shape=shape)


class Collector:
    """Streaming occurrence counting: feed batches with :meth:`update`, then :meth:`result`.

    Parameters are those of :func:`collect` (which is this class plus a batching loop and a
    progress bar). The ONNX Runtime session is built on the first batch, which also resolves
    activation shapes that are only known at run time and tests whether a fixed batch
    dimension can be made symbolic.
    """

    def __init__(
        self,
        model: Model | str | os.PathLike[str],
        *,
        layers: Sequence[str] | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        provider: str = "auto",
        threshold: float = 0.0,
        probe: str = "activation",
        method: str = "auto",
        threads: int | None = None,
        accumulate_on_device: bool | None = None,
        check_nan: bool = True,
        blocked_reads: bool = True,
    ) -> None:
        if method not in METHODS:
            raise ModelError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(
                threads, int | np.integer) or threads < 0):
            raise ArgumentError(f"threads must be a number of threads >= 1 (0 or None: ONNX "
                                f"Runtime's choice), got {threads!r}")
        try:
            finite = math.isfinite(float(threshold))
        except (TypeError, ValueError):
            finite = False
        if not finite or isinstance(threshold, bool):
            raise DataError(f"threshold must be a finite number, got {threshold!r}")
        if num_classes is not None and (
            not isinstance(num_classes, int | np.integer) or isinstance(num_classes, bool)
            or num_classes < 1
        ):
            raise DataError(f"num_classes must be a positive integer, got {num_classes!r}")
        num_classes = None if num_classes is None else int(num_classes)  # y.max() + 1 too
        self._classes_from_names = num_classes is None and class_names is not None
        if class_names is not None:
            class_names = as_class_names(class_names)
            if num_classes is None:
                num_classes = len(class_names)
            elif len(class_names) != num_classes:
                raise DataError(f"{len(class_names)} class names given for {num_classes} classes")
        self.model = model if isinstance(model, Model) else load(model)
        index = GraphIndex(self.model.proto)  # one shape inference for the start-up checks
        available = find_layers(self.model.proto, probe=probe, index=index)
        self.layers = select_layers(self.model, layers, probe, available)
        #: the model's last Conv, collected or not: analyze measures the too-shallow sign there
        self.last_conv = next((x.name for x in reversed(available) if x.op == "Conv"), None)
        if probe != "conv":
            _note_channel_mixing(self.model, self.layers, index)
        self._auto = method == "auto"
        if method == "auto":
            opset = _default_opset(self.model.proto)
            method = "graph" if opset >= GRAPH_MIN_OPSET else "plain"
            if method == "plain":
                log.info("model opset %d is older than in-graph counting needs (%d): counting "
                         "the probes in numpy (method='plain')", opset, GRAPH_MIN_OPSET)
            elif other_types := _not_float32_probes(index, self.layers):
                method = "plain"
                log.info("probes of other types than float32 (%s): counting them in numpy "
                         "(method='plain'), where they keep the model's own rounding",
                         ", ".join(other_types))
        elif method == "graph" and (other_types := _not_float32_probes(index, self.layers)):
            warnings.warn(f"method='graph' on probes of other types than float32 "
                          f"({', '.join(other_types[:3])}): ONNX Runtime's CPU provider "
                          f"computes their ops in float32, so the in-graph count can count "
                          f"values the model rounds to 0; method='plain' (or 'auto') counts "
                          f"the model's own values", UserWarning, stacklevel=2)
        self.num_classes, self.class_names = num_classes, class_names
        self.threshold, self.probe, self.method, self.threads = (
            float(threshold),
            probe,
            method,
            threads,
        )
        self._input = read_model_input(self.model.proto)
        self.providers = resolve_providers(provider)
        self._on_device = (
            self.providers[0] == "CUDAExecutionProvider"
            if accumulate_on_device is None
            else accumulate_on_device
        )
        self.check_nan, self.blocked_reads = check_nan, blocked_reads
        self._engine: Engine | None = None
        self._acc: Accumulator | None = None
        #: the stream's samples after its last whole chunk, for a model fed in chunks of its
        #: fixed batch: they run with the next batch's, or padded in :meth:`result`
        self._pending: tuple[np.ndarray, np.ndarray] | None = None

    def update(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Count one batch: images (n, C, H, W) and integer labels (n,). Float images are
        fed as they are; uint8 and uint16 ones are 8- and 16-bit pixels, scaled to [0, 1] as
        :func:`collect` scales them (a uint8 input model gets uint8 pixels as they are)."""
        images = np.asarray(images)
        if images.dtype in (np.uint16, np.uint8) and not (
                images.dtype == np.uint8 and self._input.dtype == np.uint8):
            images = float_pixels(images)
        images = self._input.check(images)
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"labels must be integers of shape ({images.shape[0]},), got {labels.dtype} "
                f"{labels.shape}"
            )
        if labels.size and labels.min() < 0:
            raise DataError(f"labels must be non-negative; found label {int(labels.min())}")
        if labels.size and labels.max() >= MAX_CLASSES:
            raise DataError(f"labels must be class indices 0..C-1 with C <= {MAX_CLASSES:,}; "
                            f"found label {int(labels.max())}")
        if self.num_classes is not None and labels.size and labels.max() >= self.num_classes:
            given = (f"{self.num_classes} class_names" if self._classes_from_names
                     else f"num_classes={self.num_classes}")
            raise DataError(
                f"labels must be in 0..{self.num_classes - 1} ({given}); found label "
                f"{int(labels.max())}"
            )
        if images.shape[0] == 0:
            return
        if self._engine is None:
            proto, providers = self.model.proto, self.providers
            self.layers = _resolve_shapes(proto, self.layers, images, providers,
                                          self._input.fixed_batch)
            classes = max(int(labels.max()) + 1, self.num_classes or 0)
            if self._auto and self.method == "graph" and classes > GRAPH_MAX_CLASSES \
                    and providers[0] == "CPUExecutionProvider":
                log.info("%d classes: counting the probes in numpy (method='plain'), faster "
                         "on the CPU than the in-graph count above %d classes", classes,
                         GRAPH_MAX_CLASSES)
                self.method = "plain"
            settings = EngineSettings(
                self.method,
                self.threshold,
                providers,
                self.threads,
                self._on_device,
                self.check_nan,
                self.blocked_reads,
            )
            _check_memory(self.layers, max(int(labels.max()) + 1, self.num_classes or 0))
            self._engine, self._acc = _start_engine(
                proto, self.layers, settings, self._input.fixed_batch, images, self.num_classes or 0
            )
        engine, acc = self._engine, self._acc
        assert acc is not None
        labels = labels.astype(np.int64, copy=False)
        held, before, rest = self._pending, acc.num_classes, None
        if engine.fixed_batch is not None:  # a DataError (another image size) changes nothing
            images, labels, rest = self._whole_chunks(images, labels, engine.fixed_batch)
        try:
            if images.shape[0]:  # classes come with the samples that run, held ones later
                self._grow(int(labels.max()) + 1)
                engine.run(images, labels, acc)
        except BaseException as exc:
            acc.shrink(before)  # a failed batch adds no class either, and keeps no sample
            if held is not None and images.shape[0] and not isinstance(exc, KeyboardInterrupt):
                self._drop_held(held, "this batch")
            raise
        self._pending = rest

    def _grow(self, needed: int) -> None:
        """Room in the counts for classes 0..needed-1 (memory checked first)."""
        engine, acc = self._engine, self._acc
        assert engine is not None and acc is not None
        if needed > acc.num_classes:
            _check_memory(self.layers, max(needed, self.num_classes or 0))
            engine.flush(acc)
            acc.grow(needed)

    def _drop_held(self, held: tuple[np.ndarray, np.ndarray], failed_with: str) -> None:
        """Forget samples held back for a chunk that failed: they ran in it and may be what
        failed, and kept they would fail every later run."""
        self._pending = None
        fixed = self._engine.fixed_batch if self._engine is not None else None
        warnings.warn(f"the {held[1].shape[0]} sample(s) held back for a whole chunk of the "
                      f"model's fixed batch of {fixed} failed with {failed_with} and are "
                      f"dropped", RuntimeWarning, stacklevel=3)

    def _whole_chunks(self, images: np.ndarray, labels: np.ndarray, size: int
                      ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        """The samples held back so far and ``images`` cut at the last whole chunk of
        ``size``: what runs now, and what is held back for the next batch. A model fed in
        chunks of its fixed batch gets the same chunks whatever the batches given (a model
        whose samples are not independent would count differently with other chunks)."""
        if self._pending is not None:
            if self._pending[0].shape[1:] != images.shape[1:]:
                raise DataError(
                    f"images have shape {images.shape[1:]} per sample but the samples held "
                    f"back from the batch before (for a whole chunk of the model's fixed batch "
                    f"of {size}) have {self._pending[0].shape[1:]}: a model fed in chunks "
                    f"takes images of one size")
            images = np.concatenate([self._pending[0], images])
            labels = np.concatenate([self._pending[1], labels])
        cut = images.shape[0] // size * size
        rest = (images[cut:].copy(), labels[cut:].copy()) if cut < images.shape[0] else None
        return images[:cut], labels[:cut], rest

    @property
    def num_samples(self) -> int:
        """Samples given so far (those held back for a fixed batch's next chunk included)."""
        held = 0 if self._pending is None else int(self._pending[1].shape[0])
        return held + (0 if self._acc is None else int(self._acc.class_sizes.sum()))

    def result(
        self,
        *,
        allow_empty_classes: bool = False,
        source: str | None = None,
        preprocessing: dict[str, Any] | None = None,
    ) -> OccurrenceStats:
        """The statistics of every batch so far (collection may go on afterwards). Samples
        held back for a fixed batch's next chunk run now, padded to the chunk's size: on a
        model fed in chunks whose samples mix, a result taken mid-stream changes the chunks
        after it, and so what the stream counts in the end."""
        engine, acc = self._engine, self._acc
        if engine is None or acc is None or self.num_samples == 0:
            raise DataError("the data set is empty: no image was given")
        if self._pending is not None:
            held, before = self._pending, acc.num_classes
            try:
                self._grow(int(held[1].max()) + 1)
                engine.run(*held, acc)
            except BaseException as exc:
                acc.shrink(before)
                if not isinstance(exc, KeyboardInterrupt):
                    self._drop_held(held, "the last, padded chunk")
                raise
            self._pending = None
        engine.flush(acc)
        if self.num_classes is not None:
            acc.grow(self.num_classes)
        c = acc.num_classes
        names = self.class_names or tuple(str(i) for i in range(c))
        if len(names) != c:
            raise DataError(f"{len(names)} class names given for {c} classes")
        empty = [names[i] for i in np.flatnonzero(acc.class_sizes == 0)]
        if empty:
            listed = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10
                                              else "")
            message = (f"{len(empty)} of {c} classes have no samples: {listed} (their AOMs are "
                       f"undefined)")
            if not allow_empty_classes:
                raise DataError(message + "; pass allow_empty_classes=True (on the command "
                                "line --allow-empty-classes) to get NaN AOMs for them")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        counts = {}
        for layer, flat in zip(self.layers, acc.counts, strict=True):
            k, h, w = layer.shape
            counts[layer.name] = flat.reshape(c, k, h, w).transpose(1, 0, 2, 3)  # type: ignore[arg-type]
        metadata = {
            "model_digest": self.model.source_digest,
            "model_name": self.model.name,
            **({"bound_inputs": self.model.bound_inputs} if self.model.bound_inputs else {}),
            "threshold": self.threshold,
            "probe": self.probe,
            "layers": [layer.to_dict() for layer in self.layers],
            "last_conv": self.last_conv,
            "preprocessing": preprocessing,
            "source": source,
            "num_samples": self.num_samples,
            "method": self.method,
            "provider": self.providers[0],
            "batching": "dynamic" if engine.fixed_batch is None else f"fixed:{engine.fixed_batch}",
            "blocked_layers": [
                layer.name
                for layer, tap in zip(self.layers, engine.blocked, strict=False)
                if tap is not None
            ],
            "onnxaom_version": __version__,
        }
        return OccurrenceStats(counts, acc.class_sizes.copy(), names, metadata)


def collect(
    model: Model | str | os.PathLike[str],
    images: Any,
    labels: Any = None,
    *,
    batch_size: int = 256,
    layers: Sequence[str] | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    provider: str = "auto",
    threshold: float = 0.0,
    probe: str = "activation",
    method: str = "auto",
    progress: bool = True,
    allow_empty_classes: bool = False,
    threads: int | None = None,
    accumulate_on_device: bool | None = None,
    check_nan: bool = True,
    blocked_reads: bool = True,
) -> OccurrenceStats:
    """Count, for every kernel, class and position, the samples with a positive activation.

    Parameters
    ----------
    model:
        An :class:`onnxaom.Model` or a path to an ONNX file.
    images, labels:
        A :class:`onnxaom.data.Dataset`; or an array of shape (N, channels, H, W) with integer
        labels of shape (N,) in 0..C-1 (C classes); or an iterable of ``(images, labels)``
        batches (a torch DataLoader works), with ``labels`` left as None. Float arrays are taken
        as they are; uint8 and uint16 arrays (8- and 16-bit pixels) are scaled to [0, 1], as
        every loader does.
    batch_size:
        Samples per ORT run when the data is an array or Dataset.
    layers:
        Layer names to analyse (see :meth:`Model.layers`); default all (the model needs a Conv).
    num_classes:
        C. Default: one more than the largest label seen. Classes with no samples raise
        :class:`DataError` unless ``allow_empty_classes`` (then their AOMs are NaN, with a
        warning).
    class_names:
        C names; default from a Dataset, else "0".."C-1".
    provider:
        "auto" (CUDA when it really loads, else CPU), "cpu" or "cuda".
    threshold:
        An activation counts when it is strictly greater than this (the paper: 0).
    probe:
        "activation", "conv" or "pool" (see :mod:`onnxaom.layers`).
    method:
        "graph" (count inside the ONNX graph), "plain" (probe outputs counted in numpy), or
        "auto" (default): "graph", or "plain" for a model older than opset 10 and, on the CPU,
        for more than :data:`GRAPH_MAX_CLASSES` classes (seen in the first batch, or
        ``num_classes``). Recorded in ``metadata["method"]``.
    progress:
        Show a progress bar (tqdm) on stderr.
    threads:
        ORT intra-op threads (default: ORT's choice).
    accumulate_on_device:
        Keep counts on the execution device between batches (default: on CUDA only).
    check_nan:
        Raise :class:`ModelError` naming the layer when an activation is NaN (default). The
        in-graph check reads every activation once more (about 5% of the time on small
        models, see benchmarks/RESULTS.md); ``False`` skips it, and NaN then counts as not
        positive.
    blocked_reads:
        On the CPU provider, count each activation in ONNX Runtime's blocked NCHWc layout,
        where ORT keeps it, instead of after ORT's copy back to NCHW (default; same counts,
        much less memory traffic: see :mod:`onnxaom.blocked`). ``False`` always counts NCHW
        tensors. The layers counted this way are listed in ``metadata["blocked_layers"]``.

    Returns
    -------
    OccurrenceStats with counts of shape (K, C, H, W) per layer.
    """
    if not isinstance(batch_size, int | np.integer) or isinstance(batch_size, bool) \
            or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    dataset = images if isinstance(images, Dataset) else None
    if dataset is not None:
        class_names = dataset.class_names if class_names is None else class_names
        num_classes = dataset.num_classes if num_classes is None else num_classes
    collector = Collector(
        model,
        layers=layers,
        num_classes=num_classes,
        class_names=class_names,
        provider=provider,
        threshold=threshold,
        probe=probe,
        method=method,
        threads=threads,
        accumulate_on_device=accumulate_on_device,
        check_nan=check_nan,
        blocked_reads=blocked_reads,
    )
    bar: Any = None  # shown once the first batch is counted: a bad input fails with no bar
    stream_dtypes: list[np.dtype[Any]] = []
    source: Any = images
    if dataset is None and labels is None and array_dtype(images) is None \
            and isinstance(images, Iterable) and not isinstance(images, str | bytes):
        source = _watch_dtype(images, stream_dtypes)
    try:
        for batch_images, batch_labels in iter_batches(source, labels, batch_size=batch_size):
            collector.update(batch_images, batch_labels)
            if bar is None:
                bar = progress_bar(_length(images), desc="collecting", unit="img",
                                   enabled=progress)
            bar.update(batch_images.shape[0])
    finally:
        if bar is not None:
            bar.close()
    return collector.result(
        allow_empty_classes=allow_empty_classes,
        source=dataset.source if dataset is not None else type(images).__name__,
        preprocessing=_preprocessing_of(images, dataset, stream_dtypes),
    )


def _watch_dtype(batches: Iterable[Any], seen: list[np.dtype[Any]]) -> Iterator[Any]:
    """``batches`` unchanged, noting in ``seen`` the element type of the first batch's images
    (every later batch has the same pixel type: :func:`~onnxaom.data.iter_batches` checks)."""
    for item in batches:
        if not seen and isinstance(item, Sequence) and not isinstance(item, str | bytes) \
                and len(item) == 2:
            dtype = array_dtype(item[0])
            if dtype is not None:
                seen.append(dtype)
        yield item


def _preprocessing_of(images: Any, dataset: Dataset | None,
                      stream_dtypes: Sequence[np.dtype[Any]] = ()) -> dict[str, Any] | None:
    """What was done to the pixels, for the metadata: a Dataset's own preprocessing; for an
    array or a stream of batches, the scale :func:`~onnxaom.data.iter_batches` applied (1/255
    for uint8, 1/65535 for uint16, else 1); None when that is not known."""
    if dataset is not None:
        return dataset.preprocessing.to_dict()
    dtype = array_dtype(images)
    if dtype is None and stream_dtypes:
        dtype = stream_dtypes[0]
    return None if dtype is None else Preprocessing(scale=default_scale(dtype)).to_dict()


def _start_engine(
    proto: onnx.ModelProto,
    layers: list[Layer],
    settings: EngineSettings,
    fixed: int | None,
    first_images: np.ndarray,
    num_classes: int,
) -> tuple[Engine, Accumulator]:
    """The engine, trying a symbolic batch first for fixed-batch models.

    A fixed-batch model whose batch was made symbolic is used only when it both runs a batch
    of ``fixed + 1`` distinct images and counts each of them exactly as a batch of ``fixed``
    does (:func:`_samples_independent`): a shape constant that bakes the batch in (a
    ``Reshape`` to ``[1, C, -1]``, say) can make the graph run yet mix samples. Otherwise the
    model is fed in chunks of ``fixed``, as exported."""
    sizes = [count_columns(layer) for layer in layers]

    def build(fixed_batch: int | None) -> Engine:
        return Engine(proto, layers, settings, fixed_batch)

    engine = build(None)
    if fixed is not None:
        trial = _distinct_images(first_images, fixed + 1)
        try:  # does the symbolic-batch graph really run another batch size?
            independent = _samples_independent(engine, trial, fixed, sizes)
        except Exception as exc:  # ORT raises its own exception types; a probe whose rows
            # are not the batch's (a size baked in) is a ModelError; a real fault in the data
            # (NaN) is raised again by the fixed-batch engine
            reason = f"it does not run a batch of {fixed + 1}: {exc}"
        else:
            reason = "" if independent else "its samples' counts depend on the batch size"
        if reason:
            log.info("model has a fixed batch of %d that cannot be made symbolic (%s); "
                     "feeding chunks of %d", fixed, reason.splitlines()[0], fixed)
            engine = build(fixed)
    return engine, Accumulator(sizes, num_classes)


def _distinct_images(images: np.ndarray, n: int) -> np.ndarray:
    """``n`` distinct images from ``images``: the first ``n`` different ones (among the first
    ``8 n``), or, when there are fewer, those followed by flipped and shifted copies (so that
    no two are likely to be equal: a trial of equal images cannot tell whether a model mixes
    its samples)."""
    seen: dict[bytes, int] = {}
    for i in range(min(images.shape[0], 8 * n)):
        seen.setdefault(np.ascontiguousarray(images[i]).tobytes(), i)
        if len(seen) == n:
            break
    images = images[sorted(seen.values())]
    if images.shape[0] >= n:
        return images[:n].copy()
    out = []
    for i in range(n):
        image, variant = images[i % images.shape[0]], i // images.shape[0]
        if variant % 4 in (1, 3):
            image = image[..., ::-1]
        if variant % 4 in (2, 3):
            image = image[..., ::-1, :]
        if variant >= 4:
            image = np.roll(image, variant, axis=-1)
        out.append(image)
    return np.ascontiguousarray(np.stack(out))


#: How many samples of the trial batch :func:`_samples_independent` compares (one class each).
TRIAL_SAMPLES = 4


def _samples_independent(engine: Engine, trial: np.ndarray, fixed: int,
                         sizes: Sequence[int]) -> bool:
    """Whether the first images of ``trial`` (up to :data:`TRIAL_SAMPLES`) get the same
    per-sample counts (one class a sample, the other images counted nowhere) in a batch of
    ``len(trial)`` as in a batch of ``fixed``, the size the model was exported for. Runs
    quietly: a failure here is expected and handled."""
    m = min(fixed, TRIAL_SAMPLES)

    def labels(n: int) -> np.ndarray:
        out = np.full(n, -1, dtype=np.int64)
        out[:m] = np.arange(m)
        return out

    whole, alone = Accumulator(sizes, m), Accumulator(sizes, m)
    engine.run(trial, labels(trial.shape[0]), whole, quiet=True)
    engine.flush(whole)
    engine.run(trial[:fixed], labels(fixed), alone, quiet=True)
    engine.flush(alone)
    if not all(np.array_equal(a, b) for a, b in zip(whole.counts, alone.counts, strict=True)):
        return False
    # the values too: a mixing that moves values without flipping the few samples' signs
    session, name = engine.probe_session()
    big = session.run(None, {name: trial}, QUIET_RUN)
    small = session.run(None, {name: trial[:fixed]}, QUIET_RUN)
    for a, b in zip(big, small, strict=True):
        a, b = np.asarray(a, np.float64)[:fixed], np.asarray(b, np.float64)
        scale = max(1.0, float(np.abs(b).max(initial=0.0)))
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-5 * scale):
            return False
    return True


def _physical_memory() -> int | None:
    """Memory the counts can use now (``memory.available_bytes``); a seam for the tests."""
    return available_bytes()


#: Peak bytes a count cell needs while collecting (measured 21 with 5,000 classes): the int64
#: running counts (8), the int32 counts of one batch and their reordered copy (4 + 4, on the
#: blocked path), and the int64 (K, C, H, W) copy :meth:`Collector.result` hands out (8). A
#: float64 AOM made afterwards fits in what the running counts free.
BYTES_PER_CELL = 24


def _check_memory(layers: Sequence[Layer], classes: int) -> None:
    """Refuse, before allocating, counts that cannot fit in the memory available now:
    :data:`BYTES_PER_CELL` for each cell of every layer's (K, C, H, W) counts."""
    memory = _physical_memory()
    cells = [(layer.kernels * (layer.shape[1] or 1) * (layer.shape[2] or 1) * classes, layer)
             for layer in layers]
    need = BYTES_PER_CELL * sum(n for n, _ in cells)
    if memory is None or need <= memory:
        return
    biggest = max(cells, key=lambda item: item[0])[1]
    raise DataError(
        f"counting {len(layers)} layer(s) for {classes} classes needs about {need / 2**30:.1f} "
        f"GiB (counts and occurrence maps are (K, C, H, W) per layer; the largest is "
        f"{biggest.name!r}, {biggest.kernels}x{classes}x{biggest.shape[1]}x{biggest.shape[2]}), "
        f"more than the {memory / 2**30:.1f} GiB of memory available: collect a few layers at "
        f"a time (layers=[...]; each layer's counts are independent of the others), read them "
        f"after pooling (probe='pool') or use fewer classes")


def _not_float32_probes(index: GraphIndex, layers: Sequence[Layer]) -> list[str]:
    """The probes of ``layers`` whose element type is not float32 (inferred; float16 models):
    ONNX Runtime's CPU provider computes those ops in float32 and drops the cast back before
    an in-graph comparison, so the count would see values the model never rounded."""
    return [layer.probe for layer in layers if index.elem_type(layer.probe) != TensorProto.FLOAT]


def _default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset (the ONNX default when it imports none)."""
    versions = [imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")]
    return max(versions) if versions else onnx.defs.onnx_opset_version()


def _length(images: Any) -> int | None:
    try:
        return len(images) if isinstance(images, np.ndarray | Dataset) else None
    except TypeError:
        return None


