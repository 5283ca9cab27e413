"""Architecture edits as plain data: what to change, never how.

An edit names a layer by the one naming rule of :func:`onnxaom.layers.layer_nodes` and says what
to do with it. Edits are frozen dataclasses that check their own fields when built and
serialise to JSON and back (:meth:`to_dict` / :func:`edit_from_dict`, :func:`edits_to_json` /
:func:`edits_from_json`), so a list of edits is a replayable history: the surgery records the
edits it applied in the model's metadata (key ``"onnxaom.edits"``) and
``onnxaom.apply(model, edits_from_json(...))`` replays them.

Only what can be checked without a model is checked here (types, signs, repeats, known option
values); whether the layer exists and the indices are in range is checked by the surgery.

* :class:`RemoveKernels` (task 1): drop kernels (output channels / neurons) of a layer.
* :class:`WidenLayer` (task 2): add kernels to a layer (Net2WiderNet, random or zero init).
* :class:`InsertLayer` (task 3): insert an identity-initialised conv (+ ReLU) after a ReLU layer
  (Net2DeeperNet).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeAlias

import numpy as np

from .errors import EditError

__all__ = [
    "COUPLED_MODES",
    "INSERT_INITS",
    "WIDEN_INITS",
    "Edit",
    "InsertLayer",
    "RemoveKernels",
    "WidenLayer",
    "as_edit_list",
    "edit_from_dict",
    "edit_steps",
    "edits_from_data",
    "edits_from_json",
    "edits_to_json",
]

#: What to do when a layer's channels are coupled to other layers' channels by an element-wise
#: merge of two tensors (the Add of a residual block): ``"propagate"`` edits every coupled layer
#: the same way (the default), ``"refuse"`` raises an error naming the coupled layers.
COUPLED_MODES = ("propagate", "refuse")
#: Initialisations of the kernels that :class:`WidenLayer` adds.
WIDEN_INITS = ("net2net", "random", "zeros")
#: Initialisations of the layer that :class:`InsertLayer` inserts.
INSERT_INITS = ("identity", "random")


def _check_name(value: object, field: str, edit: str) -> str:
    if not isinstance(value, str) or not value:
        raise EditError(f"{edit}.{field} must be a non-empty layer name (str), got {value!r}")
    return value


def _check_int(value: object, field: str, edit: str, minimum: int) -> int:
    """``value`` as an int (numpy integers welcome), refusing bools, floats and small values."""
    if (
        isinstance(value, bool | np.bool_)
        or not isinstance(value, numbers.Integral)
        or int(value) < minimum
    ):
        raise EditError(f"{edit}.{field} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_choice(value: object, field: str, edit: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise EditError(
            f"{edit}.{field} must be one of {', '.join(map(repr, choices))}, got {value!r}"
        )
    return str(value)


def _check_indices(
    value: object, field: str, edit: str, allow_empty: bool = False
) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise EditError(f"{edit}.{field} must be a list of kernel indices, got {value!r}")
    items = list(value)
    if not items and not allow_empty:
        raise EditError(f"{edit}.{field} is empty: name at least one kernel index")
    for item in items:
        _check_int(item, field, edit, 0)
    return tuple(int(i) for i in items)


@dataclass(frozen=True)
class RemoveKernels:
    """Remove kernels (output channels of a Conv, neurons of a Gemm/MatMul) from a layer.

    Parameters
    ----------
    layer:
        The layer's name (see ``onnxaom.load(path).layers()``).
    kernels:
        Indices of the kernels to remove, 0-based, in the layer as it is when the edit is
        applied; stored sorted. Repeats are refused; so is removing every kernel.
    coupled:
        Channels joined to other layers' channels by an element-wise merge (the Add of a residual
        block) can only go together. ``"propagate"`` (default) removes the same channels from
        every coupled layer; ``"refuse"`` raises :class:`~onnxaom.EditError` naming the coupled
        layers (name them in the same :func:`~onnxaom.apply` step to remove them on purpose).
        Layers that follow channel by channel (a depthwise Conv) always lose the channels too.

    Consecutive ``RemoveKernels`` edits are applied as one step: their indices all refer to the
    model before that step, so ``{"conv1": [0], "conv2": [3]}`` means the same in any order.
    """

    layer: str
    kernels: tuple[int, ...]
    coupled: str = "propagate"

    kind: ClassVar[str] = "RemoveKernels"

    def __post_init__(self) -> None:
        _check_name(self.layer, "layer", self.kind)
        kernels = _check_indices(self.kernels, "kernels", self.kind)
        repeated = sorted({k for k in kernels if kernels.count(k) > 1})
        if repeated:
            raise EditError(
                f"{self.kind}.kernels repeats {repeated} for layer {self.layer!r}; "
                f"name each kernel once"
            )
        object.__setattr__(self, "kernels", tuple(sorted(kernels)))
        _check_choice(self.coupled, "coupled", self.kind, COUPLED_MODES)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``{"edit": "RemoveKernels", ...}``); :func:`onnxaom.edits.edit_from_dict`
        reads it back."""
        return {
            "edit": self.kind,
            "layer": self.layer,
            "kernels": list(self.kernels),
            "coupled": self.coupled,
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict())


@dataclass(frozen=True)
class WidenLayer:
    """Add ``add`` kernels to a layer (task 2: a layer too small).

    Parameters
    ----------
    layer:
        The layer's name.
    add:
        How many kernels to add (>= 1). They are appended after the existing ones.
    init:
        ``"net2net"`` (default): Net2WiderNet, function-preserving. Each new kernel copies an
        existing one (with the per-channel parameters after it: bias, BN, PReLU slope ...) and
        the consumer's weights reading the copied channel are split evenly among the copies, so
        the model computes the same function.
        ``"random"``: new kernels drawn from He-normal N(0, 2/fan_in), zero bias, neutral
        per-channel parameters; the consumer's weights for the new channels are zero, so outputs
        are unchanged until retraining moves them.
        ``"zeros"``: new kernels, biases and consumer weights all zero (outputs unchanged; the
        new kernels receive no gradient through a ReLU until something else breaks the tie).
    sources:
        For ``"net2net"``: which existing kernel each new kernel copies (``add`` indices,
        repeats allowed). ``None`` (default): drawn uniformly without replacement (with
        replacement when ``add`` exceeds the kernels) from ``seed``, as in Net2Net.
    seed:
        Seeds the random choices (sources, random weights, noise).
    noise:
        Net2Net's symmetry breaking: Gaussian noise of standard deviation ``noise`` times the
        layer's weight standard deviation added to the copied kernels. ``0`` (default) keeps
        the function exactly.
    coupled:
        As for :class:`RemoveKernels`: layers coupled by a residual Add are widened the same
        way (``"propagate"``, default) or the edit is refused (``"refuse"``).

    Every consumer of the widened channels must be one the surgery can split (Conv, depthwise
    Conv, Gemm, MatMul, through per-channel ops, pooling, Concat, Flatten/Reshape); for any
    other the edit is refused with an error naming the node, never approximated.
    """

    layer: str
    add: int
    init: str = "net2net"
    sources: tuple[int, ...] | None = None
    seed: int = 0
    noise: float = 0.0
    coupled: str = "propagate"

    kind: ClassVar[str] = "WidenLayer"

    def __post_init__(self) -> None:
        _check_name(self.layer, "layer", self.kind)
        object.__setattr__(self, "add", _check_int(self.add, "add", self.kind, 1))
        _check_choice(self.init, "init", self.kind, WIDEN_INITS)
        if self.sources is not None:
            if self.init != "net2net":
                raise EditError(
                    f"{self.kind}.sources only applies to init='net2net' "
                    f"(got init={self.init!r}); leave it out"
                )
            sources = _check_indices(self.sources, "sources", self.kind)
            if len(sources) != self.add:
                raise EditError(
                    f"{self.kind}.sources names {len(sources)} kernels but add is "
                    f"{self.add}; give one source kernel per new kernel"
                )
            object.__setattr__(self, "sources", sources)
        object.__setattr__(self, "seed", _check_int(self.seed, "seed", self.kind, 0))
        if (
            isinstance(self.noise, bool)
            or not isinstance(self.noise, int | float)
            or not math.isfinite(self.noise)
            or self.noise < 0
        ):
            raise EditError(f"{self.kind}.noise must be a finite number >= 0, got {self.noise!r}")
        object.__setattr__(self, "noise", float(self.noise))
        _check_choice(self.coupled, "coupled", self.kind, COUPLED_MODES)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``{"edit": "WidenLayer", ...}``); :func:`onnxaom.edits.edit_from_dict`
        reads it back."""
        return {
            "edit": self.kind,
            "layer": self.layer,
            "add": self.add,
            "init": self.init,
            "sources": None if self.sources is None else list(self.sources),
            "seed": self.seed,
            "noise": self.noise,
            "coupled": self.coupled,
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict())


@dataclass(frozen=True)
class InsertLayer:
    """Insert a layer after ``after`` (task 3: a model too shallow), Net2DeeperNet style.

    The new layer reads the activation of ``after`` (its probe point), which must be the output
    of a ``Relu``; it is a Conv with ``kernel_size`` x ``kernel_size`` kernels (stride 1, "same"
    padding, as many kernels as channels) followed by a new ``Relu``, or a fully-connected Gemm +
    ``Relu`` when ``after`` is a Gemm/MatMul layer (``kernel_size`` is then ignored). Everything
    that read the activation reads the new ReLU's output instead.

    Parameters
    ----------
    after:
        The layer after whose ReLU the new layer goes.
    kernel_size:
        Odd kernel side (1, 3, 5 ...), default 3.
    init:
        ``"identity"`` (default): the identity kernel (1 at the centre tap of its own channel)
        and zero bias, so ``relu(conv(x)) == x`` for the non-negative ``x`` a ReLU gives and the
        model's outputs are unchanged. ``"random"``: He-normal weights, zero bias.
    name:
        Node name of the new layer (and so its layer name); default ``<after>_deep`` (made
        unique).
    seed:
        Seeds ``"random"`` init.
    """

    after: str
    kernel_size: int = 3
    init: str = "identity"
    name: str | None = None
    seed: int = 0

    kind: ClassVar[str] = "InsertLayer"

    def __post_init__(self) -> None:
        _check_name(self.after, "after", self.kind)
        object.__setattr__(
            self, "kernel_size", _check_int(self.kernel_size, "kernel_size", self.kind, 1)
        )
        if self.kernel_size % 2 == 0:
            raise EditError(
                f"{self.kind}.kernel_size must be odd so the output keeps its size, "
                f"got {self.kernel_size}"
            )
        _check_choice(self.init, "init", self.kind, INSERT_INITS)
        if self.name is not None:
            _check_name(self.name, "name", self.kind)
        object.__setattr__(self, "seed", _check_int(self.seed, "seed", self.kind, 0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``{"edit": "InsertLayer", ...}``); :func:`onnxaom.edits.edit_from_dict`
        reads it back."""
        return {
            "edit": self.kind,
            "after": self.after,
            "kernel_size": self.kernel_size,
            "init": self.init,
            "name": self.name,
            "seed": self.seed,
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict())


Edit: TypeAlias = RemoveKernels | WidenLayer | InsertLayer
EDIT_TYPES: dict[str, type[RemoveKernels] | type[WidenLayer] | type[InsertLayer]] = {
    cls.kind: cls for cls in (RemoveKernels, WidenLayer, InsertLayer)
}


def edit_from_dict(data: Mapping[str, Any]) -> Edit:
    """The edit a :meth:`to_dict` produced (key ``"edit"`` names the type)."""
    if not isinstance(data, Mapping):
        raise EditError(f"an edit must be a JSON object, got {type(data).__name__}")
    kind = data.get("edit")
    if "edit" not in data:
        keys = ", ".join(map(repr, data)) or "none"
        raise EditError(f"an edit needs the key 'edit' naming its type ({', '.join(EDIT_TYPES)}"
                        f"), as edit.to_dict() writes it; this one has keys {keys}")
    cls = EDIT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise EditError(f"unknown edit type {kind!r}; expected one of {', '.join(EDIT_TYPES)}")
    values = {k: v for k, v in data.items() if k != "edit"}
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise EditError(
            f"{kind} has no field(s) {', '.join(unknown)}; its fields: {', '.join(sorted(allowed))}"
        )
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise EditError(f"{kind}: {exc}") from exc


def edits_to_json(edits: Edit | Iterable[Edit], indent: int | None = None) -> str:
    """A JSON array of the edits' :meth:`to_dict` (one edit or a list)."""
    return json.dumps([edit.to_dict() for edit in as_edit_list(edits)], indent=indent)


def edits_from_json(text: str) -> list[Edit]:
    """The edits of :func:`edits_to_json` (a JSON array, or a single JSON object)."""
    if not isinstance(text, str | bytes | bytearray):
        raise EditError(f"edits_from_json takes JSON text, got {type(text).__name__} (for edit "
                        f"objects or dicts already parsed use onnxaom.apply, which takes them)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EditError(f"edits are not valid JSON: {exc}") from exc
    return edits_from_data(data)


def edits_from_data(data: Any) -> list[Edit]:
    """The edits of parsed edits JSON: a list of edit dicts, or a single one."""
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list):
        raise EditError(f"edits JSON must be an array of objects, got {type(data).__name__}")
    return [edit_from_dict(item) for item in data]


def as_edit_list(
    edits: Edit | Mapping[str, Any] | Iterable[Edit | Mapping[str, Any]],
) -> list[Edit]:
    """One edit, a dict, or an iterable of them, as a list of edit objects (dicts are parsed)."""
    items: list[Any]
    if isinstance(edits, RemoveKernels | WidenLayer | InsertLayer | Mapping):
        items = [edits]
    elif isinstance(edits, str | bytes) or not isinstance(edits, Iterable):
        raise EditError(f"edits must be an edit or a list of edits, got {type(edits).__name__}")
    else:
        items = list(edits)
    out: list[Edit] = []
    for item in items:
        if isinstance(item, Mapping):
            item = edit_from_dict(item)
        if not isinstance(item, RemoveKernels | WidenLayer | InsertLayer):
            raise EditError(
                f"not an edit: {item!r}; use onnxaom.RemoveKernels, WidenLayer or InsertLayer"
            )
        out.append(item)
    return out


def edit_steps(edits: list[Edit]) -> list[list[Edit]]:
    """The steps edits are applied in: consecutive RemoveKernels form one step (their indices
    all refer to the model before it); every other edit is a step of its own."""
    steps: list[list[Edit]] = []
    for edit in edits:
        if isinstance(edit, RemoveKernels) and steps and isinstance(steps[-1][0], RemoveKernels):
            steps[-1].append(edit)
        else:
            steps.append([edit])
    return steps
