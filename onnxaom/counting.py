"""The counting engine: one ONNX Runtime session, batches in, int64 counts accumulated.

:func:`onnxaom.collect` decides what to count and how (the layers, the method, the providers,
the batching); an :class:`Engine` runs it: it feeds each batch (with its one-hot labels for
the in-graph count, or in chunks of a fixed batch size), adds the counts that come out to an
:class:`Accumulator` (per layer, shape (C, K*H*W), on the host or, on CUDA, on the device
between batches), and names the layer and the batch when a run fails or a probe holds NaN.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .blocked import BlockedTap, blocked_counting_session
from .errors import ModelError
from .instrument import ONEHOT_INPUT, Instrumented, counting_graph, probe_graph, threshold_in
from .layers import Layer
from .runtime import make_session

log = logging.getLogger(__name__)

#: Run options for trial runs whose failure is expected and handled: ORT logs nothing.
QUIET_RUN = ort.RunOptions()
QUIET_RUN.log_severity_level = 4


class Accumulator:
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
class Rows:
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
class EngineSettings:
    """How a Collector counts: fixed at construction, shared by every engine it builds."""

    method: str
    threshold: float
    providers: list[str]
    threads: int | None
    on_device: bool
    check_nan: bool
    blocked_reads: bool = True


class Engine:
    """One instrumented session, fed whole or fixed-size chunks, counting into an accumulator."""

    def __init__(
        self,
        model: onnx.ModelProto,
        layers: list[Layer],
        settings: EngineSettings,
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
    def run(self, images: np.ndarray, labels: np.ndarray, acc: Accumulator,
            quiet: bool = False) -> None:
        """Count a batch into ``acc``, all of it or nothing: a batch that fails (a NaN, a size
        the layer does not have, an ORT error), in any of its fixed-size chunks, leaves ``acc``
        and the device-resident counts as they were. ``quiet``: ORT logs nothing for this run
        (a trial whose failure is handled)."""
        self._run_options = QUIET_RUN if quiet else None
        saved_device = self._device_counts  # the adder makes new values; these stay intact
        pieces: list[list[Rows]] = []  # per layer, what the batch adds
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
               num_classes: int) -> list[Rows] | None:
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
            if self._run_options is QUIET_RUN:
                raise  # a trial whose failure the caller handles
            raise ModelError(self._failure(images, exc)) from exc
        n_layers = len(self.graph.outputs)
        self._check_nan(results[n_layers:], images, real)
        restore = self.blocked or (None,) * n_layers
        counts = []
        for layer, batch, tap in zip(self.layers, results[:n_layers], restore, strict=True):
            counted = batch if tap is None else tap.restore(batch)
            if counted.shape != (num_classes, count_columns(layer)):
                raise ModelError(_size_message(layer, counted.shape[-1] // layer.kernels))
            counts.append(Rows(None, counted))
        return counts

    def _count_plain(self, images: np.ndarray, labels: np.ndarray,
                     num_classes: int) -> list[Rows]:
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
            if layer.probe_perm and values.ndim == len(layer.probe_perm):
                values = values.transpose(layer.probe_perm)  # channels last: to (N, K, H, W)
            if values.shape[0] != images.shape[0]:
                raise ModelError(_rows_message(layer, values.shape[0], images.shape[0]))
            if self.check_nan and np.isnan(values[labels >= 0]).any():  # not the padding
                raise ModelError(_nan_message(layer))
            positive = values.reshape(values.shape[0], -1) > threshold_in(self.threshold,
                                                                          values.dtype)
            if positive.shape[1] != count_columns(layer):
                raise ModelError(_size_message(layer, positive.shape[1] // layer.kernels))
            rows = np.stack([positive[labels == c].sum(axis=0) for c in present]) \
                if present.size else np.zeros((0, positive.shape[1]), np.int64)
            counts.append(Rows(present, rows))
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
        session, name = self.probe_session()
        probe = self.layers[position].probe
        (values,) = session.run([probe], {name: images})
        return bool(np.isnan(values[real]).any())

    def probe_session(self) -> tuple[ort.InferenceSession, str]:
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
            session, name = self.probe_session()
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
                    np.zeros((num_classes, count_columns(layer)), np.int64), self.device)
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

    def flush(self, acc: Accumulator) -> None:
        """Copy device-resident counts into the host accumulator."""
        if self._device_counts is None:
            return
        for total, device in zip(acc.counts, self._device_counts, strict=True):
            host = device.numpy()
            total[: host.shape[0]] += host
        self._device_counts = None


def count_columns(layer: Layer) -> int:
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
