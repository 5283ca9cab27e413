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
batches are fed in chunks of exactly the fixed size, the last one padded with zero images
whose one-hot column is empty, so padding counts nothing. ``metadata["batching"]``
records which was used.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from ._version import __version__
from .blocked import BlockedTap, blocked_counting_session
from .data import (
    MAX_CLASSES,
    Dataset,
    Preprocessing,
    array_dtype,
    as_class_names,
    default_scale,
    iter_batches,
)
from .errors import DataError, LayerNotFoundError, ModelError
from .graph import GraphIndex, dim_values
from .instrument import ONEHOT_INPUT, Instrumented, counting_graph, image_input, probe_graph
from .layers import Layer, channel_mixing_reader, find_layers
from .memory import available_bytes
from .model import Model, load
from .runtime import make_session, resolve_providers
from .stats import OccurrenceStats

__all__ = ["METHODS", "Collector", "collect", "select_layers"]

log = logging.getLogger(__name__)

#: Run options for trial runs whose failure is expected and handled: ORT logs nothing.
_QUIET_RUN = ort.RunOptions()
_QUIET_RUN.log_severity_level = 4

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


@dataclass
class _Input:
    name: str
    dims: tuple[int | None, ...] | None  # None: the model declares no shape; anything goes
    dtype: np.dtype[Any]
    channels_last: bool = False  # set once a batch had to be transposed to fit

    @property
    def fixed_batch(self) -> int | None:
        return self.dims[0] if self.dims else None

    def check(self, images: np.ndarray) -> np.ndarray:
        """``images`` (N, C, H, W) as the model input takes them: its dtype, and channels
        last (N, H, W, C) for a model whose input is (Keras models converted by tf2onnx keep
        theirs): when the batch does not fit the input as it is but does once transposed."""
        if self.dims is None:
            return self._typed(images)
        if images.ndim != len(self.dims):
            raise DataError(
                f"images have shape {images.shape} per batch but model input {self.name!r} "
                f"expects rank {len(self.dims)} {self.expected()}"
            )
        differs = self._first_difference(images.shape)
        if differs is not None and images.ndim == 4 and \
                self._first_difference(images.transpose(0, 2, 3, 1).shape) is None:
            if not self.channels_last:
                log.info("model input %r is channels last %s: feeding the images as "
                         "(N, H, W, C)", self.name, self.expected())
                self.channels_last = True
            images = images.transpose(0, 2, 3, 1)
        elif differs is not None:
            raise DataError(
                f"images have shape {images.shape} per batch but model input {self.name!r} "
                f"expects {self.expected()} (axis {differs} differs); check the image size "
                f"(Preprocessing(resize=...), or --resize on the command line) and channels "
                f"(images are fed as (N, C, H, W), or as (N, H, W, C) to a channels-last input)"
            )
        return self._typed(images)

    def _typed(self, images: np.ndarray) -> np.ndarray:
        """``images`` in the input's element type. A uint8 input (a deployment model that
        takes raw pixels and scales them itself) gets 8-bit pixels back: onnxaom scales 8-bit
        images to [0, 1] (k / 255), so 255 times the images must be whole numbers in
        0..255; anything else (normalised or 16-bit images) is refused, not rounded."""
        if self.dtype != np.uint8 or images.dtype == np.uint8:
            return np.ascontiguousarray(images, dtype=self.dtype)
        pixels = np.asarray(images, dtype=np.float64) * 255.0
        whole = np.rint(pixels)
        if pixels.size and (whole.min() < 0 or whole.max() > 255
                            or np.abs(pixels - whole).max() > 1e-3):
            raise DataError(
                f"model input {self.name!r} takes 8-bit pixels (uint8); these images are not "
                f"8-bit images scaled to [0, 1] (values from {float(images.min()):.4g} to "
                f"{float(images.max()):.4g}, not all multiples of 1/255): give 8-bit images "
                f"(uint8 arrays, image files, IDX) without normalisation and without resizing "
                f"(a bilinear resize, --resize, gives pixels between the 8-bit levels: resize "
                f"the images to the model's size beforehand)")
        return np.ascontiguousarray(whole, dtype=np.uint8)

    def _first_difference(self, shape: tuple[int, ...]) -> int | None:
        """The first axis after the batch where ``shape`` differs from the input's known
        dims; None when it fits."""
        assert self.dims is not None
        for axis, (got, want) in enumerate(zip(shape[1:], self.dims[1:], strict=True)):
            if want is not None and got != want:
                return axis + 1
        return None

    def expected(self) -> str:
        if self.dims is None:
            return "(any shape)"
        return (
            "("
            + ", ".join("N" if i == 0 else (str(d) if d else "?") for i, d in enumerate(self.dims))
            + ")"
        )


def _input_info(model: onnx.ModelProto) -> _Input:
    value = image_input(model)
    dims = dim_values(value.type)
    if dims is not None and len(dims) < 2:
        raise ModelError(
            f"model input {value.name!r} has shape {dims}; onnxaom needs a batch of images "
            f"(N, C, H, W)"
        )
    elem = value.type.tensor_type.elem_type
    if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE,
                    TensorProto.UINT8):
        raise ModelError(
            f"model input {value.name!r} has element type {TensorProto.DataType.Name(elem)}; "
            f"onnxaom feeds float images, or 8-bit pixels to a uint8 input"
        )
    return _Input(value.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(elem)))


class _Accumulator:
    """int64 per-layer counts of shape (C, K*H*W), growing C when new labels appear."""

    def __init__(self, sizes: Sequence[int], num_classes: int) -> None:
        self.counts = [np.zeros((num_classes, p), np.int64) for p in sizes]
        self.class_sizes = np.zeros(num_classes, np.int64)

    @property
    def num_classes(self) -> int:
        return int(self.class_sizes.shape[0])

    def grow(self, num_classes: int) -> None:
        extra = num_classes - self.num_classes
        if extra > 0:
            self.counts = [np.pad(c, ((0, extra), (0, 0))) for c in self.counts]
            self.class_sizes = np.pad(self.class_sizes, (0, extra))

    def shrink(self, num_classes: int) -> None:
        """Undo :meth:`grow` back to ``num_classes`` (the rows dropped count nothing)."""
        if num_classes < self.num_classes:
            assert not self.class_sizes[num_classes:].any()
            self.counts = [np.ascontiguousarray(c[:num_classes]) for c in self.counts]
            self.class_sizes = self.class_sizes[:num_classes].copy()


@dataclass(frozen=True)
class _Rows:
    """One run's counts of a layer: ``rows`` (n, K*H*W) for the classes ``classes`` (sorted,
    distinct), or for every class in order where ``classes`` is None."""

    classes: np.ndarray | None
    rows: np.ndarray

    def add_to(self, total: np.ndarray) -> None:
        if self.classes is None:
            total += self.rows
        else:
            total[self.classes] += self.rows


@dataclass(frozen=True)
class _Settings:
    """How a Collector counts: fixed at construction, shared by every engine it builds."""

    method: str
    threshold: float
    providers: list[str]
    threads: int | None
    on_device: bool
    check_nan: bool
    blocked_reads: bool = True


class _Engine:
    """One instrumented session, fed whole or fixed-size chunks, counting into an accumulator."""

    def __init__(
        self,
        model: onnx.ModelProto,
        layers: list[Layer],
        settings: _Settings,
        fixed_batch: int | None,
    ) -> None:
        self.layers, self.method, self.threshold = layers, settings.method, settings.threshold
        self.check_nan = settings.check_nan
        self._source, self._threads = model, settings.threads
        self._confirm: tuple[ort.InferenceSession, str] | None = None  # see _nan_confirmed
        self.fixed_batch = fixed_batch
        dynamic = fixed_batch is None
        providers, on_device = settings.providers, settings.on_device
        if self.method == "graph":
            self.graph: Instrumented = counting_graph(
                model,
                layers,
                threshold=self.threshold,
                dynamic_batch=dynamic,
                check_nan=settings.check_nan,
            )
        else:
            self.graph = probe_graph(model, layers, dynamic_batch=dynamic)
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
        self.on_device = on_device and self.method == "graph"
        # per count output: how to restore columns counted in ORT's blocked layout (or None)
        self.blocked: tuple[BlockedTap | None, ...] = ()
        blocked = None
        if (
            settings.blocked_reads
            and self.method == "graph"
            and self.device == "cpu"
            and not self.on_device
        ):
            blocked = blocked_counting_session(self.graph, threads=settings.threads)
        if blocked is not None:
            self.session, taps = blocked
            self.blocked = tuple(
                None if tap is None else replace(tap, positions=_positions(layer))
                for tap, layer in zip(taps, layers, strict=True)
            )
        else:
            self.session = make_session(self.graph.model, providers, threads=settings.threads)
        self._device_counts: list[ort.OrtValue] | None = None
        self._run_options: ort.RunOptions | None = None
        self._adder: ort.InferenceSession | None = None
        if self.on_device:
            self._adder = make_session(_adder_graph(), providers)

    # -- feeding ---------------------------------------------------------------------------
    def run(self, images: np.ndarray, labels: np.ndarray, acc: _Accumulator,
            quiet: bool = False) -> None:
        """Count a batch into ``acc``, all of it or nothing: a batch that fails (a NaN, a size
        the layer does not have, an ORT error), in any of its fixed-size chunks, leaves ``acc``
        and the device-resident counts as they were. ``quiet``: ORT logs nothing for this run
        (a trial whose failure is handled)."""
        self._run_options = _QUIET_RUN if quiet else None
        saved_device = self._device_counts  # the adder makes new values; these stay intact
        pieces: list[list[_Rows]] = []  # per layer, what the batch adds
        try:
            for chunk, chunk_labels in self._chunks(images, labels):
                counted = self._count(chunk, chunk_labels, acc.num_classes)
                if counted is None:  # added on the device
                    continue
                if not pieces:
                    pieces = [[part] for part in counted]
                    continue
                for held, part in zip(pieces, counted, strict=True):
                    if held[0].classes is None and part.classes is None:
                        # at most a batch's samples a cell: int32 holds it
                        np.add(held[0].rows, part.rows, out=held[0].rows)
                    else:
                        held.append(part)
        except BaseException:
            self._device_counts = saved_device
            raise
        for total, held in zip(acc.counts, pieces, strict=False):
            for part in held:
                part.add_to(total)
        acc.class_sizes += np.bincount(labels[labels >= 0], minlength=acc.num_classes)

    def _chunks(self, images: np.ndarray,
                labels: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The batch as it is run: whole, or in chunks of the model's fixed batch, the last
        padded with zero images labelled -1 (which count nothing)."""
        if self.fixed_batch is None:
            yield images, labels
            return
        b = self.fixed_batch
        for start in range(0, images.shape[0], b):
            chunk, chunk_labels = images[start : start + b], labels[start : start + b]
            n = chunk.shape[0]
            if n < b:
                chunk = np.concatenate([chunk, np.zeros((b - n, *chunk.shape[1:]), chunk.dtype)])
                chunk_labels = np.concatenate([chunk_labels, np.full(b - n, -1, np.int64)])
            yield chunk, chunk_labels

    def _count(self, images: np.ndarray, labels: np.ndarray,
               num_classes: int) -> list[_Rows] | None:
        """One run's per-layer counts, checked (NaN, sizes) before anything is added: every
        class's row (the in-graph count), or the rows of the classes in the run (the plain
        count: a (C, K*H*W) array a run would cost much with many classes); None when they
        were added to the device-resident counts."""
        real = labels >= 0
        try:
            if self.method == "plain":
                return self._count_plain(images, labels, num_classes)
            onehot = np.zeros((num_classes, labels.shape[0]), np.uint8)
            onehot[labels[real], np.flatnonzero(real)] = 1
            feeds = {self.graph.input_name: images, ONEHOT_INPUT: onehot}
            if self.on_device:
                self._run_on_device(feeds, num_classes)
                return None
            results = self.session.run(None, feeds, self._run_options)
        except ModelError:
            raise
        except Exception as exc:  # ORT raises its own exception types
            if self._run_options is _QUIET_RUN:
                raise  # a trial whose failure the caller handles
            raise ModelError(self._failure(images, exc)) from exc
        n_layers = len(self.graph.outputs)
        self._check_nan(results[n_layers:], images, real)
        restore = self.blocked or (None,) * n_layers
        counts = []
        for layer, batch, tap in zip(self.layers, results[:n_layers], restore, strict=True):
            counted = batch if tap is None else tap.restore(batch)
            if counted.shape != (num_classes, _columns(layer)):
                raise ModelError(_size_message(layer, counted.shape[-1] // layer.kernels))
            counts.append(_Rows(None, counted))
        return counts

    def _count_plain(self, images: np.ndarray, labels: np.ndarray,
                     num_classes: int) -> list[_Rows]:
        results = dict(
            zip(
                [o.name for o in self.session.get_outputs()],
                self.session.run(None, {self.graph.input_name: images}, self._run_options),
                strict=True,
            )
        )
        present = np.unique(labels[labels >= 0])
        counts = []
        for layer in self.layers:
            values = results[layer.probe]
            if values.shape[0] != images.shape[0]:
                raise ModelError(_rows_message(layer, values.shape[0], images.shape[0]))
            if self.check_nan and np.isnan(values[labels >= 0]).any():  # not the padding
                raise ModelError(_nan_message(layer))
            positive = values.reshape(values.shape[0], -1) > self.threshold
            if positive.shape[1] != _columns(layer):
                raise ModelError(_size_message(layer, positive.shape[1] // layer.kernels))
            rows = np.stack([positive[labels == c].sum(axis=0) for c in present]) \
                if present.size else np.zeros((0, positive.shape[1]), np.int64)
            counts.append(_Rows(present, rows))
        return counts

    def _check_nan(self, checks: list[np.ndarray], images: np.ndarray,
                   real: np.ndarray) -> None:
        """Raise for a layer whose probe held a NaN for a sample of this batch (``real``: the
        rows that are samples, not the padding of a fixed-size chunk). The in-graph check (a
        sum of per-channel means over the whole batch) is NaN for a NaN, but also for
        infinities of both signs, for finite values whose sum overflows, or for a NaN in the
        padding; a flagged layer is therefore confirmed on the probe tensor itself."""
        flagged = [position for (position, _), value in zip(self.graph.checks, checks,
                                                           strict=True) if np.isnan(value)]
        for position in flagged:
            if self._nan_confirmed(images, real, position):
                raise ModelError(_nan_message(self.layers[position]))

    def _nan_confirmed(self, images: np.ndarray, real: np.ndarray, position: int) -> bool:
        """Whether the probe of layer ``position`` really holds a NaN for a ``real`` row of
        ``images``: the batch is run again through a session with the probes as outputs (made
        once, on the CPU, only when the in-graph check has flagged a batch)."""
        session, name = self._probe_session()
        probe = self.layers[position].probe
        (values,) = session.run([probe], {name: images})
        return bool(np.isnan(values[real]).any())

    def _probe_session(self) -> tuple[ort.InferenceSession, str]:
        """A CPU session with the probes as outputs, and its input name (made once, when a
        batch needs a second look)."""
        if self._confirm is None:
            graph = probe_graph(self._source, self.layers,
                                dynamic_batch=self.fixed_batch is None)
            session = make_session(graph.model, ["CPUExecutionProvider"], threads=self._threads)
            self._confirm = (session, graph.input_name)
        return self._confirm

    def _failure(self, images: np.ndarray, exc: Exception) -> str:
        """Why the counting graph failed on ``images``: a layer whose probe does not have one
        row per sample (a dense layer applied at every position), found by running the probes
        alone; else ONNX Runtime's own first line."""
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        try:
            session, name = self._probe_session()
            values = session.run([layer.probe for layer in self.layers], {name: images})
        except Exception as probe_exc:  # ORT raises its own exception types
            first = (str(probe_exc).strip().splitlines() or [first])[0]
            hint = ("" if self.fixed_batch is not None else
                    "; if the model only runs batches of one size (a size written into a "
                    "Reshape), declare that batch on its input, and onnxaom feeds it in "
                    "chunks of that size")
            return f"ONNX Runtime could not run the model on this batch of {images.shape[0]}: " \
                f"{first}{hint}"
        for layer, value in zip(self.layers, values, strict=True):
            if np.shape(value)[0] != images.shape[0]:
                return _rows_message(layer, np.shape(value)[0], images.shape[0])
        return f"ONNX Runtime could not run the counting graph: {first}"

    # -- device-resident accumulation (CUDA) ------------------------------------------------
    def _run_on_device(self, feeds: dict[str, np.ndarray], num_classes: int) -> None:
        assert self._adder is not None
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in self.graph.outputs:
            binding.bind_output(name, self.device)
        for _, name in self.graph.checks:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding, self._run_options)
        outputs = binding.get_outputs()
        n_layers = len(self.graph.outputs)
        labels_fed = np.asarray(feeds[ONEHOT_INPUT].any(axis=0))  # samples, not padding
        self._check_nan([o.numpy() for o in outputs[n_layers:]], feeds[self.graph.input_name],
                        labels_fed)
        # a growing class count flushes the device counts first (Collector.update)
        assert self._device_counts is None or self._device_counts[0].shape()[0] == num_classes
        if self._device_counts is None:
            self._device_counts = [
                ort.OrtValue.ortvalue_from_numpy(
                    np.zeros((num_classes, _columns(layer)), np.int64), self.device)
                for layer in self.layers
            ]
        summed = []
        for total, batch in zip(self._device_counts, outputs[:n_layers], strict=True):
            add = self._adder.io_binding()
            add.bind_ortvalue_input("total", total)
            add.bind_ortvalue_input("batch", batch)
            add.bind_output("sum", self.device)
            self._adder.run_with_iobinding(add)
            summed.append(add.get_outputs()[0])
        self._device_counts = summed

    def flush(self, acc: _Accumulator) -> None:
        """Copy device-resident counts into the host accumulator."""
        if self._device_counts is None:
            return
        for total, device in zip(acc.counts, self._device_counts, strict=True):
            host = device.numpy()
            total[: host.shape[0]] += host
        self._device_counts = None


def _columns(layer: Layer) -> int:
    """K*H*W: the columns of a layer's counts (its shape resolved)."""
    k, h, w = layer.shape
    assert h is not None and w is not None
    return k * h * w


def _positions(layer: Layer) -> int | None:
    """H*W of a layer's probe, when known."""
    _, h, w = layer.shape
    return None if h is None or w is None else h * w


def _adder_graph() -> onnx.ModelProto:
    """total (int64) + batch (int32 counts) -> sum (int64), for device-resident accumulation."""
    total = helper.make_tensor_value_info("total", TensorProto.INT64, ["C", "P"])
    batch = helper.make_tensor_value_info("batch", TensorProto.INT32, ["C", "P"])
    out = helper.make_tensor_value_info("sum", TensorProto.INT64, ["C", "P"])
    nodes = [
        helper.make_node("Cast", ["batch"], ["batch_int"], to=TensorProto.INT64),
        helper.make_node("Add", ["total", "batch_int"], ["sum"]),
    ]
    graph = helper.make_graph(nodes, "onnxaom_accumulate", [total, batch], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7  # the IR of opset 13; newer onnx writes IR versions ORT may not read
    return model


def _rows_message(layer: Layer, rows: int, batch: int) -> str:
    return (f"layer {layer.name!r}: its probe tensor {layer.probe!r} has {rows} rows for a "
            f"batch of {batch} samples, not one a sample: a dense layer applied at every "
            f"position (leave it out with layers=[...], --layers on the command line), or a "
            f"batch size written into the graph before it (a Reshape or Resize to a fixed "
            f"batch; declare that batch on the model's input, and onnxaom feeds it in chunks)")


def _size_message(layer: Layer, positions: int) -> str:
    _, h, w = layer.shape
    return (f"layer {layer.name!r}: its probe tensor {layer.probe!r} has {positions} positions "
            f"a kernel where the model's shapes say {h}x{w}: a shape stored in the model "
            f"(value_info) is wrong for it; drop them (del model.graph.value_info[:] in onnx) "
            f"and load the model again")


def _nan_message(layer: Layer) -> str:
    return (
        f"layer {layer.name!r} produced NaN activations (probe tensor {layer.probe!r}); check "
        f"the model weights and the input preprocessing"
    )


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
        outputs = session.run(None, {graph.input_name: sample}, _QUIET_RUN)
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
            resolved.append(_replace_shape(layer, (layer.kernels, int(shape[2]), int(shape[3]))))
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
        self._input = _input_info(self.model.proto)
        self.providers = resolve_providers(provider)
        self._on_device = (
            self.providers[0] == "CUDAExecutionProvider"
            if accumulate_on_device is None
            else accumulate_on_device
        )
        self.check_nan, self.blocked_reads = check_nan, blocked_reads
        self._engine: _Engine | None = None
        self._acc: _Accumulator | None = None

    def update(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Count one batch: float images (n, C, H, W) and integer labels (n,)."""
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
            settings = _Settings(
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
        needed, before = int(labels.max()) + 1, acc.num_classes
        if needed > before:
            _check_memory(self.layers, max(needed, self.num_classes or 0))
            engine.flush(acc)
            acc.grow(needed)
        try:
            engine.run(images, labels.astype(np.int64, copy=False), acc)
        except BaseException:
            acc.shrink(before)  # a failed batch adds no class either
            raise

    @property
    def num_samples(self) -> int:
        """Samples counted so far."""
        return 0 if self._acc is None else int(self._acc.class_sizes.sum())

    def result(
        self,
        *,
        allow_empty_classes: bool = False,
        source: str | None = None,
        preprocessing: dict[str, Any] | None = None,
    ) -> OccurrenceStats:
        """The statistics of every batch so far (collection may go on afterwards)."""
        engine, acc = self._engine, self._acc
        if engine is None or acc is None or self.num_samples == 0:
            raise DataError("the data set is empty: no image was given")
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
            "model_digest": self.model.digest,
            "model_name": self.model.name,
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
        as they are; uint8 arrays (8-bit pixels) are scaled to [0, 1], as every loader does.
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
                bar = _progress(_length(images), progress)
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
    for uint8, else 1); None when that is not known."""
    if dataset is not None:
        return dataset.preprocessing.to_dict()
    dtype = array_dtype(images)
    if dtype is None and stream_dtypes:
        dtype = stream_dtypes[0]
    return None if dtype is None else Preprocessing(scale=default_scale(dtype)).to_dict()


def _start_engine(
    proto: onnx.ModelProto,
    layers: list[Layer],
    settings: _Settings,
    fixed: int | None,
    first_images: np.ndarray,
    num_classes: int,
) -> tuple[_Engine, _Accumulator]:
    """The engine, trying a symbolic batch first for fixed-batch models.

    A fixed-batch model whose batch was made symbolic is used only when it both runs a batch
    of ``fixed + 1`` distinct images and counts each of them exactly as a batch of ``fixed``
    does (:func:`_samples_independent`): a shape constant that bakes the batch in (a
    ``Reshape`` to ``[1, C, -1]``, say) can make the graph run yet mix samples. Otherwise the
    model is fed in chunks of ``fixed``, as exported."""
    sizes = [_columns(layer) for layer in layers]

    def build(fixed_batch: int | None) -> _Engine:
        return _Engine(proto, layers, settings, fixed_batch)

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
    return engine, _Accumulator(sizes, num_classes)


def _distinct_images(images: np.ndarray, n: int) -> np.ndarray:
    """``n`` images from ``images``: the first ``n``, or, when there are fewer, every image
    followed by flipped and shifted copies (so that no two are likely to be equal)."""
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


def _samples_independent(engine: _Engine, trial: np.ndarray, fixed: int,
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

    whole, alone = _Accumulator(sizes, m), _Accumulator(sizes, m)
    engine.run(trial, labels(trial.shape[0]), whole, quiet=True)
    engine.flush(whole)
    engine.run(trial[:fixed], labels(fixed), alone, quiet=True)
    engine.flush(alone)
    return all(np.array_equal(a, b) for a, b in zip(whole.counts, alone.counts, strict=True))


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


class _NoBar:
    def update(self, n: int) -> None:
        del n

    def close(self) -> None:
        pass


def _progress(total: int | None, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="collecting", leave=False)
