"""Loading and saving ONNX models: the only module that touches model files.

A :class:`Model` holds an ``onnx.ModelProto`` with every weight in memory (external data is
resolved at load time) and remembers whether it came with external data, so that saving keeps
large weights external. Models are treated as immutable: the library never edits ``proto`` in
place and never overwrites the file a model was loaded from.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
from onnx import external_data_helper

from .errors import (
    ArgumentError,
    LayerNotFoundError,
    ModelError,
    ModelFileNotFoundError,
    OutputError,
)
from .files import fsync_path, same_file
from .normalize import normalize

if TYPE_CHECKING:
    from .layers import Layer

__all__ = ["BoundFrom", "Model", "load"]

log = logging.getLogger(__name__)

#: Initializers at least this large (bytes) go to the external-data file when saving externally.
EXTERNAL_DATA_THRESHOLD = 1024


@dataclass(frozen=True)
class BoundFrom:
    """Where a model made by :func:`onnxaom.bind_inputs` comes from: the digest and name of
    the model whose inputs were bound, and the values bound (JSON values: lists, or numbers
    for scalars)."""

    digest: str
    name: str
    values: Mapping[str, Any]


class Model:
    """An ONNX model in memory.

    Parameters
    ----------
    proto:
        The model. Its tensors must hold their data (no unresolved external references).
        It is put in normal form first (:mod:`onnxaom.normalize`: local functions inlined,
        sparse initializers dense, nodes sorted, stale stored shapes replaced), a new proto
        where anything changes; a model saved from it is saved in that form.
    path:
        The file it was loaded from, if any.
    external_data:
        Whether saving should write weights to an external ``<file>.data`` (defaults to whether
        the source file used external data).
    protected:
        Files :meth:`save` must never write: the source model file and its external data files,
        also for models made from it by an edit. ``path`` is always among them.
    bound_from:
        For a model :func:`onnxaom.bind_inputs` made: the model whose inputs were bound, and
        the values (see :attr:`source_digest`, :attr:`bound_inputs`).
    """

    def __init__(
        self, proto: onnx.ModelProto, path: Path | None = None, external_data: bool = False,
        protected: Iterable[Path] = (), *,
        bound_from: BoundFrom | None = None,
    ) -> None:
        self._proto = normalize(proto, name=path.name if path is not None
                                else (proto.graph.name or "model"))
        self.path = path
        self.external_data = external_data
        self.protected = frozenset({*(Path(p).resolve() for p in protected),
                                    *(() if path is None else (Path(path).resolve(),))})
        self._layers: dict[str, tuple[Layer, ...]] = {}  # by probe: found once, the proto fixed
        #: set by :func:`onnxaom.bind_inputs`: the model the inputs were bound in (its digest
        #: and name) and the values, as JSON lists
        self._bound_from = bound_from

    @property
    def proto(self) -> onnx.ModelProto:
        """The model proto. Treat as read-only; use :meth:`copy_proto` to edit."""
        return self._proto

    def copy_proto(self) -> onnx.ModelProto:
        """A deep copy of the model proto, safe to edit."""
        copy = onnx.ModelProto()
        copy.CopyFrom(self._proto)
        return copy

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the serialized model (weights included), hex. A model loaded from a file
        has the same digest whether its weights were stored inline or in external data."""
        return hashlib.sha256(self._proto.SerializeToString(deterministic=True)).hexdigest()

    @property
    def name(self) -> str:
        """The file name the model was loaded from, else the graph's name (or ``"model"``); for
        a model made by :func:`onnxaom.bind_inputs`, the name of the model it was made from."""
        if self._bound_from is not None:
            return self._bound_from.name
        return self.path.name if self.path is not None else (self._proto.graph.name or "model")

    @property
    def source_digest(self) -> str:
        """:attr:`digest` of the model whose inputs :func:`onnxaom.bind_inputs` bound to make
        this one, else this model's own. Statistics record it, so that proposals made from them
        apply to the model file the user has."""
        return self._bound_from.digest if self._bound_from is not None else self.digest

    @property
    def bound_inputs(self) -> dict[str, Any]:
        """The inputs :func:`onnxaom.bind_inputs` bound, name -> value (a JSON value: a list,
        or a number for a scalar; a copy); empty for any other model."""
        return {} if self._bound_from is None else copy.deepcopy(dict(self._bound_from.values))

    @property
    def opset(self) -> int:
        """The default-domain (``ai.onnx``) opset version the model imports."""
        for imp in self._proto.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return int(imp.version)
        raise ModelError(f"model {self.name!r} declares no default-domain opset")

    def layers(self, probe: str = "activation") -> list[Layer]:
        """The analysable layers (Conv, Gemm, MatMul-with-weights) in topological order.

        ``probe`` picks where a kernel's activation is read: ``"activation"`` (after the
        per-channel chain that follows the layer: BN, ReLU-like, constant Add/Mul),
        ``"conv"`` (the raw layer output) or ``"pool"`` (after the pooling that follows the
        activation, where there is one).
        """
        if probe not in self._layers:
            from .layers import find_layers

            self._layers[probe] = tuple(find_layers(self._proto, probe=probe))
        return list(self._layers[probe])

    def layer(self, name: str, probe: str = "activation") -> Layer:
        """The layer called ``name``; raises :class:`LayerNotFoundError` naming the known ones."""
        layers = self.layers(probe=probe)
        for layer in layers:
            if layer.name == name:
                return layer
        known = ", ".join(layer.name for layer in layers)
        raise LayerNotFoundError(f"model {self.name!r} has no layer {name!r}; its layers: {known}")

    def save(self, path: str | os.PathLike[str], external_data: bool | None = None) -> Path:
        """Write the model to ``path`` atomically and return the path.

        Refuses to overwrite the files this model, or the model it was edited from, was loaded
        from (the model file and its external data). With external data (default: as the
        source), weights go to ``<path>.data`` beside the model file.
        """
        _check_external_data(external_data)
        return save(
            self._proto,
            path,
            external_data=self.external_data if external_data is None else external_data,
            protect=self.protected,
        )

    def check_output(self, path: str | os.PathLike[str], external_data: bool | None = None
                     ) -> None:
        """Raise, before any work, when :meth:`save` to ``path`` would be refused."""
        _refuse_protected(Path(path), self.external_data if external_data is None
                          else external_data, list(self.protected))

    def __repr__(self) -> str:
        return f"Model({self.name!r}, opset={self.opset}, nodes={len(self._proto.graph.node)})"


def _check_external_data(value: object) -> None:
    if value is not None and not isinstance(value, bool):
        raise ArgumentError(f"external_data must be True, False or None (as the source), got "
                            f"{value!r}")


def load(path: str | os.PathLike[str] | onnx.ModelProto) -> Model:
    """Load an ONNX model file, resolving external data (``.onnx.data``) next to it. An
    ``onnx.ModelProto`` already in memory is wrapped as it is (``Model(proto)``)."""
    if isinstance(path, onnx.ModelProto):
        return Model(path)
    if not isinstance(path, str | os.PathLike):
        raise ArgumentError(f"load takes a path to an ONNX file (or an onnx.ModelProto), got "
                            f"{type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise ModelFileNotFoundError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"{path} is a directory, not an ONNX model file")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(f"{path} is not an ONNX model ({type(exc).__name__}: {exc})") from exc
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ModelError(f"{path} is not an ONNX model with a graph (no nodes found)")
    uses_external = any(
        external_data_helper.uses_external_data(t)
        for t in external_data_helper._get_all_tensors(proto)
    )
    protected = _external_files(proto, path.parent)  # read before loading clears them
    if uses_external:
        try:
            external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:  # OSError, or onnx's ValidationError for a missing file
            raise ModelFileNotFoundError(
                f"{path} stores weights in an external data file that cannot be read: {exc}"
            ) from exc
    _clear_default_locations(proto)
    return Model(proto, path=path.resolve(), external_data=uses_external, protected=protected)


def _clear_default_locations(proto: onnx.ModelProto) -> None:
    """Unset ``data_location`` where it says DEFAULT (inline), as onnx leaves it after loading
    external data, so that :attr:`Model.digest` is the same for the same model whether its
    weights were stored inline or in an external file."""
    for tensor in external_data_helper._get_all_tensors(proto):
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.DEFAULT:
            tensor.ClearField("data_location")


def _external_files(proto: onnx.ModelProto, folder: Path) -> set[Path]:
    """The external data files ``proto``'s tensors point to, resolved against ``folder``."""
    files = set()
    for tensor in external_data_helper._get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location":
                files.add((folder / entry.value).resolve())
    return files


def save(
    proto: onnx.ModelProto,
    path: str | os.PathLike[str],
    external_data: bool = False,
    protect: Path | Iterable[Path] | None = None,
) -> Path:
    """Write ``proto`` to ``path`` atomically (temp file + rename); ``proto`` is not changed.

    With ``external_data`` the weights go to ``<name>.data`` in the same folder, or, when that
    file exists (the weights of a model being replaced), to a fresh ``<name>.<8 hex>.data``:
    the model file is replaced last, and the weights files the replaced model read are removed
    after it, so a crash at any point leaves the old pair or the new one, never a model beside
    the other's weights. Only weights files named for ``path`` (``<name>.data``,
    ``<name>.<8 hex>.data``) are removed; one of another name (``shared.data``) may be read by
    other models, and stays. ``protect``: files that must not be written, the
    model's nor its external data's (a source model's).
    """
    path = Path(path)
    data_path = path.with_name(path.name + ".data")
    guarded = [protect] if isinstance(protect, Path) else list(protect or ())
    _refuse_protected(path, external_data, guarded)
    if path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file name such as "
                          f"{path / 'model.onnx'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ModelFileNotFoundError(f"output folder does not exist: {parent}")
    stale = _weights_of(path) if path.is_file() else []
    if external_data and data_path.exists():
        data_path = path.with_name(f"{path.name}.{secrets.token_hex(4)}.data")
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    placed: Path | None = None
    try:
        with tempfile.TemporaryDirectory(dir=parent, prefix=".onnxaom-") as tmp:
            tmp_model = Path(tmp) / path.name
            if external_data:
                # the weights are marked by hand: onnx's own conversion looks for an existing
                # file of that name in the current directory, not beside the model
                for tensor in external_data_helper._get_initializer_tensors(copy):
                    if tensor.HasField("raw_data") and len(tensor.raw_data) >= \
                            EXTERNAL_DATA_THRESHOLD:
                        external_data_helper.set_external_data(tensor, data_path.name)
            onnx.save_model(copy, str(tmp_model))
            tmp_data = Path(tmp) / data_path.name
            written = [tmp_model]
            if tmp_data.exists():
                os.chmod(tmp_data, os.stat(tmp_model).st_mode & 0o777)  # as the model file
                written.append(tmp_data)
            for file in written:
                fsync_path(file)
            if tmp_data.exists():
                os.replace(tmp_data, data_path)
                placed = data_path
            os.replace(tmp_model, path)
        fsync_path(parent)
    except OSError as exc:  # a read-only folder, a full disk
        if placed is not None and placed not in stale:  # weights no model file reads
            placed.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    for old in stale:  # the replaced model's weights, no longer read by this file
        if old == placed or any(same_file(old, p) for p in guarded):
            continue
        if _named_for(path, old):
            old.unlink(missing_ok=True)
        else:  # another model may read it (a weights file shared by several models)
            log.info("kept %s, which the replaced %s read: its name is not one onnxaom "
                     "gives that model's weights, so another model may read it", old, path)
    return path


def _named_for(path: Path, weights: Path) -> bool:
    """Whether ``weights`` has a name :func:`save` gives ``path``'s weights (``<name>.data``,
    ``<name>.<8 hex>.data``; also what torch's exporter writes): only such files are removed
    with the model that read them."""
    return re.fullmatch(re.escape(path.name) + r"(\.[0-9a-f]{8})?\.data", weights.name) is not None


def _weights_of(path: Path) -> list[Path]:
    """The external-data files in ``path``'s folder that the model file at ``path`` reads
    (none when it cannot be parsed)."""
    try:
        old = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf raises DecodeError and friends: nothing to clean up
        return []
    names = {entry.value for tensor in external_data_helper._get_all_tensors(old)
             for entry in tensor.external_data if entry.key == "location"}
    return [path.with_name(name) for name in sorted(names)
            if Path(name).name == name and path.with_name(name).is_file()]


def _refuse_protected(path: Path, external_data: bool, guarded: list[Path]) -> None:
    """Raise when the model file or its weights file would land on a ``guarded`` file."""
    data_path = path.with_name(path.name + ".data")
    for target in (path, data_path) if external_data else (path,):
        if any(same_file(target, p) for p in guarded):
            what = "the model" if target == path else "its weights file"
            raise ModelError(f"refusing to overwrite a file of the source model: {target} "
                             f"({what} would replace it); choose another output path")
