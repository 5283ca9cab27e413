"""The torch runner of a tuning session: edit, freeze, retrain, export, evaluate, step by step.

:class:`TorchRunner` implements :class:`onnxaom.tuning.Runner`. For each step it takes the
current step's torch module and ONNX model, applies the edits to the module
(:func:`~onnxaom_torch.edit.apply_edits`, checked against the ONNX surgery), freezes the layers
the paper freezes, retrains (:func:`~onnxaom_torch.train.retrain`), exports the result to ONNX
(:func:`~onnxaom_torch.architectures.export_onnx`) and evaluates it on the test data
(:func:`~onnxaom_torch.train.evaluate`). The session stores the ONNX model and the module's
``state_dict`` (``models/step_<i>.pt``).

A step's module is rebuilt from the files alone: the *factory* (``"package.module:Class"`` with
JSON keyword arguments, kept in the session's config) makes step 0's architecture, its
``state_dict`` is loaded, then the edits of every step on the way are replayed (structure only)
and each step's ``state_dict`` is loaded in turn. Rebuilt modules are cached by model digest.

Freezing (``freeze=``), the layers kept as they are while the rest retrains:

* ``"upto"`` (default, Sec. V-A): every layer up to and including the last layer that lost
  kernels in this step ("we freeze the weights of this layer and retrain the model from the
  second layer onward"; after layer 2, "only the fully-connected layers" retrain);
* ``"edited"``: only the layers that lost kernels (coupled ones included);
* ``"none"``: everything retrains.

Layers a step widens or inserts are never frozen. A frozen layer's batch norm is frozen with it;
with ``"upto"``, so is every batch norm that runs before the last frozen layer (the BN in front
of a pre-activation block's conv feeds it).
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import onnxaom
from onnxaom.data import Dataset, from_arrays
from onnxaom.edits import Edit
from onnxaom.errors import (
    ArgumentError,
    LayerNotFoundError,
    ModelFileNotFoundError,
    OnnxaomError,
)
from onnxaom.session import SESSION_FILE, Artifact, SessionError, TuningSession
from onnxaom.surgery.apply import MIN_OPSET
from onnxaom.tuning import StepOutcome, StepReport, apply_step, tune

from .architectures import export_onnx
from .edit import TorchEdit, apply_edits
from .mapping import ModuleMismatchError, map_layers
from .trace import PER_CHANNEL_TYPES, one_line, trace
from .train import OPTIMIZERS, evaluate, resolve_device, retrain

__all__ = ["FREEZE_POLICIES", "TorchRunner", "build_module", "runner_from_session"]

logger = logging.getLogger(__name__)

FREEZE_POLICIES = ("upto", "edited", "none")
#: The module path :func:`runner_from_session` is found under (kept in session configs).
RUNNER_MODULE = "onnxaom_torch.runner"
#: Modules frozen with the layer they follow: its per-channel norms and activations with
#: parameters, and a group norm's affine.
_FROZEN_WITH_LAYER: tuple[type, ...] = (*PER_CHANNEL_TYPES, nn.GroupNorm)
#: Options kept in the session config and given back to the runner on resume.
OPTIONS = ("epochs", "lr", "batch_size", "seed", "device", "freeze", "optimizer", "exporter",
           "opset", "check")


def _factory_spec(factory: Callable[..., nn.Module] | str | None) -> str | None:
    """``"module:qualname"`` for an importable factory, else None."""
    if factory is None:
        return None
    if isinstance(factory, str):
        return factory
    module = getattr(factory, "__module__", None)
    qualname = getattr(factory, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    return f"{module}:{qualname}"


def _resolve_factory(factory: Callable[..., nn.Module] | str) -> Callable[..., nn.Module]:
    if not isinstance(factory, str):
        return factory
    module_name, sep, attr = factory.partition(":")
    if not sep or not module_name or not attr:
        raise SessionError(f"a module factory is written 'package.module:Name', got {factory!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise SessionError(f"cannot import the module factory {factory!r}: {exc}") from exc
    if not callable(target):
        raise SessionError(f"module factory {factory!r} is not callable")
    return target  # type: ignore[no-any-return]


def _read_state_dict(path: Path, what: str) -> Mapping[str, Any]:
    """``torch.load`` of a state dict, or a :class:`~onnxaom.SessionError` naming ``what``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and zip errors of several kinds
        try:
            with path.open("rb") as handle:
                head = handle.read(2)
        except OSError:
            head = b"PK"  # torch's own message says what is wrong with the path
        # torch.save writes a zip archive (PK), or a pickle (0x80) with the legacy format; for
        # anything else torch's long weights_only explanation is beside the point
        why = one_line(exc, limit=300) if head == b"PK" or head[:1] == b"\x80" else \
            "not a file torch.save writes (neither a zip archive nor a pickle)"
        raise SessionError(f"{path} ({what}) cannot be read as a torch state dict (save one with "
                           f"torch.save(module.state_dict(), path)): {why}") from exc
    if not isinstance(state, Mapping):
        raise SessionError(f"{path} ({what}) holds a {type(state).__name__}, not a state dict "
                           f"(save one with torch.save(module.state_dict(), path))")
    return state


def _call_factory(factory: Any, kwargs: dict[str, Any], seed: int | None = None) -> nn.Module:
    """``factory(**kwargs)`` (a callable or "pkg.mod:Name"), its initial weights drawn from
    ``seed`` when given (the global torch RNG is forked, not changed); a failure, or anything
    but an ``nn.Module``, is a :class:`~onnxaom.SessionError` naming the factory."""
    build = _resolve_factory(factory)
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            module = build(**kwargs)
    except Exception as exc:  # the factory's own checks raise anything
        raise SessionError(f"the module factory {factory!r} failed with keyword arguments "
                           f"{kwargs}: {one_line(exc)}") from exc
    if not isinstance(module, nn.Module):
        raise SessionError(f"the module factory {factory!r} returned a "
                           f"{type(module).__name__}, not a torch.nn.Module")
    return module


def build_module(
    factory: str,
    factory_kwargs: Mapping[str, Any] | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    seed: int | None = None,
) -> nn.Module:
    """The module that ``factory`` (``"package.module:Name"``) builds with ``factory_kwargs``,
    on the CPU: freshly initialised, or with the state dict saved in ``weights``
    (``torch.save(module.state_dict(), path)``) loaded. What ``onnxaom session start`` begins
    with.

    With ``input_shape`` (e.g. ``(1, 1, 8, 8)``) a batch of zeros of that shape is run through
    the module, which must return logits of shape ``(N, C)`` with ``C >= num_classes``, so that
    an architecture that does not fit the data fails here, before any training. With ``seed``
    the initial weights are drawn from it (the global torch RNG is forked, not changed).

    Raises :class:`~onnxaom.SessionError` (factory not importable or failing, weights
    unreadable), :class:`~onnxaom.ModelFileNotFoundError` (no ``weights`` file) or
    :class:`ModuleMismatchError` (weights or data that do not fit the architecture).
    """
    kwargs = dict(factory_kwargs or {})
    module = _call_factory(factory, kwargs, seed).cpu().eval()
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise ModelFileNotFoundError(f"weights file not found: {path}")
        state = _read_state_dict(path, "the starting weights")
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise ModuleMismatchError(
                f"{path} does not fit the module built by {factory!r} with {kwargs}: "
                f"{one_line(exc)}") from exc
    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
        try:
            with torch.no_grad():
                logits = module(torch.zeros(shape))
        except Exception as exc:  # shape errors of any layer
            raise ModuleMismatchError(
                f"the module built by {factory!r} with {kwargs} does not take inputs of shape "
                f"{shape} (the data's); give the factory the data's image size and channels: "
                f"{one_line(exc)}") from exc
        width = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.ndim == 2 else 0
        need = max(1, num_classes or 1)
        if width < need:
            got = f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else \
                f"a {type(logits).__name__}"
            raise ModuleMismatchError(
                f"the module built by {factory!r} with {kwargs} returns {got} for inputs of "
                f"shape {shape}; a classifier of the data returns logits of shape (N, C) with "
                f"C >= {need} (its number of classes)")
    return module


class TorchRunner:
    """Runs tuning steps on a torch module (see the module docstring).

    Parameters
    ----------
    train, test:
        Training data (retraining) and test data (accuracy), as :func:`retrain` and
        :func:`evaluate` take them (an :class:`onnxaom.Dataset`, arrays, or batches).
    factory, factory_kwargs:
        What builds step 0's architecture when a session is resumed: a class or function (or
        ``"package.module:Name"``) and JSON keyword arguments. Needed for :meth:`resume` and
        the command line; a class defined in ``__main__`` or a lambda only works in-process.
    epochs, lr, batch_size, seed, device, optimizer:
        Retraining (:func:`~onnxaom_torch.train.retrain`); the seed of step i is ``seed + i``.
    freeze:
        One of :data:`FREEZE_POLICIES`.
    exporter, opset:
        How step models are exported (:func:`~onnxaom_torch.architectures.export_onnx`;
        ``opset`` None: 17 for the legacy exporter, 18 for dynamo).
    check:
        Check each torch edit against the ONNX surgery (:func:`apply_edits`).
    progress:
        Progress bars while retraining.
    """

    def __init__(
        self,
        train: Any,
        test: Any,
        *,
        factory: Callable[..., nn.Module] | str | None = None,
        factory_kwargs: Mapping[str, Any] | None = None,
        epochs: int = 1,
        lr: float = 1e-3,
        batch_size: int = 64,
        seed: int = 0,
        device: str = "auto",
        freeze: str = "upto",
        optimizer: str = "adam",
        exporter: str = "legacy",
        opset: int | None = None,
        check: bool = True,
        progress: bool = True,
        cache_size: int = 4,
    ) -> None:
        if freeze not in FREEZE_POLICIES:
            raise ArgumentError(f"freeze must be one of {', '.join(FREEZE_POLICIES)}, got "
                             f"{freeze!r}")
        if exporter not in ("legacy", "dynamo"):
            raise ArgumentError(f"exporter must be 'legacy' or 'dynamo', got {exporter!r}")
        if optimizer not in OPTIMIZERS:
            raise ArgumentError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                             f"{optimizer!r}")
        for name, value, least in (("epochs", epochs, 0), ("batch_size", batch_size, 1),
                                   ("seed", seed, 0), ("cache_size", cache_size, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ArgumentError(f"{name} must be an integer >= {least}, got {value!r}")
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
            raise ArgumentError(f"lr must be a positive number, got {lr!r}")
        if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)
                                  or opset < MIN_OPSET):
            raise ArgumentError(f"opset must be an integer >= {MIN_OPSET} (the surgery's least) or "
                             f"None, got {opset!r}")
        resolve_device(device)  # a device torch cannot use fails now, not after training
        self.train, self.test = train, test
        self.factory = factory
        self.factory_kwargs = dict(factory_kwargs or {})
        self.epochs, self.lr, self.batch_size, self.seed = epochs, lr, batch_size, seed
        self.device, self.freeze, self.optimizer = device, freeze, optimizer
        self.exporter, self.opset, self.check = exporter, opset, check
        self.progress = progress
        self.cache_size = cache_size
        self._cache: OrderedDict[str, nn.Module] = OrderedDict()

    # ------------------------------------------------------------------ sessions
    def config(self) -> dict[str, Any]:
        """The runner's part of a session config (JSON)."""
        return {"module": RUNNER_MODULE, "factory": _factory_spec(self.factory),
                "factory_kwargs": self.factory_kwargs,
                **{name: getattr(self, name) for name in OPTIONS}}

    def start(self, folder: str | os.PathLike[str], module: nn.Module, *,
              data: Mapping[str, Any] | None = None,
              loop: Mapping[str, Any] | None = None) -> TuningSession:
        """Start a session in ``folder`` with ``module`` (trained) as step 0: exported,
        evaluated, saved. ``data`` (e.g. ``{"spec": "digits", "train_fraction": 0.8}``) and
        ``loop`` (keyword arguments of :func:`onnxaom.tuning.tune`) go into the config so that
        ``onnxaom session resume`` can continue without Python; ``module`` is not changed."""
        if not isinstance(module, nn.Module):
            raise ModuleMismatchError(f"expected a torch.nn.Module, got {type(module).__name__}")
        base = copy.deepcopy(module).cpu().eval()
        self._check_factory(base)
        model = self._export(base)
        map_layers(base, model)  # the export must map back onto the module
        _check_loop_layers(model, (loop or {}).get("layers") or ())
        result = evaluate(base, self.test, device=self.device)
        config = {"runner": self.config(), "data": dict(data or {}), "loop": dict(loop or {})}
        session = TuningSession.create(
            folder, model, accuracy=result.accuracy, per_class=_none_for_nan(result.per_class),
            files={"torch": self._state_artifact(base)}, config=config,
            info={"evaluation": result.to_dict()}, label="start")
        self._remember(session.current.model_digest, base)
        return session

    def resume(self, folder: str | os.PathLike[str], *, verify: bool = True) -> TuningSession:
        """Load a session and check that this runner can rebuild its current module."""
        session = TuningSession.resume(folder, verify=verify)
        self.module(session)
        return session

    def module(self, session: TuningSession, index: int | None = None) -> nn.Module:
        """The torch module of step ``index`` (default: the current step), on the CPU. A copy:
        changing it changes nothing in the session."""
        step = session.current if index is None else session.step(index)
        cached = self._cache.get(step.model_digest)
        if cached is None:
            cached = self._rebuild(session, step.index)
            self._remember(step.model_digest, cached)
        return copy.deepcopy(cached)

    def forget(self, step: int) -> None:
        """Nothing to do: modules are cached by model digest, and an undone step's module may
        be asked for again."""

    # ------------------------------------------------------------------ one step
    def run(self, session: TuningSession, edits: Sequence[Edit]) -> StepOutcome:
        """Edit the current step's module, freeze, retrain, export and evaluate."""
        parent = session.current
        module = self.module(session)
        parent_model = session.model()
        edited = apply_edits(module, parent_model, list(edits), check=self.check)
        frozen = self._frozen(edited, parent_model)
        index = len(session.steps)
        trained = retrain(edited.module, self.train, self.epochs, lr=self.lr,
                          batch_size=self.batch_size, seed=self.seed + index,
                          device=self.device, frozen=frozen, optimizer=self.optimizer,
                          progress=self.progress)
        final = trained.module.cpu().eval()
        model = self._export(final)
        result = evaluate(final, self.test, device=self.device)
        self._remember(model.digest, final)
        info = {
            "parent": parent.index, "frozen": frozen, "epochs": self.epochs,
            "train": trained.to_dict(), "evaluation": result.to_dict(),
            "changed_layers": list(edited.changed), "changed_modules": list(edited.modules),
            "check_difference": edited.difference, "notes": list(edited.notes),
        }
        return StepOutcome(model, result.accuracy, _none_for_nan(result.per_class),
                           {"torch": self._state_artifact(final)}, info)

    def apply(self, session: TuningSession, edits: Any, **kwargs: Any) -> StepReport:
        """:func:`onnxaom.tuning.apply_step` with this runner."""
        return apply_step(session, self, edits, **kwargs)

    def tune(self, session: TuningSession, data: Any = None,
             **kwargs: Any) -> list[StepReport]:
        """:func:`onnxaom.tuning.tune` with this runner; statistics on ``data`` (default: the
        training data; an ``(images, labels)`` pair of arrays is wrapped in a Dataset)."""
        source = data if data is not None else self.train
        if isinstance(source, tuple) and len(source) == 2:
            images, labels = (v.cpu().numpy() if isinstance(v, torch.Tensor) else v
                              for v in source)
            source = from_arrays(images, labels)
        kwargs.setdefault("progress", self.progress)
        return tune(session, self, source, **kwargs)

    # ------------------------------------------------------------------ helpers
    def _frozen(self, edited: TorchEdit, parent: onnxaom.Model) -> list[str]:
        """Module paths to freeze: the layers that lost kernels (``"edited"``), or every layer
        up to the last of them (``"upto"``), with their batch norms."""
        if self.freeze == "none":
            return []
        before = {layer.name: layer.kernels for layer in parent.layers()}
        after = {layer.name: layer.kernels for layer in edited.model.layers()}
        names = list(after)
        lost = [n for n in edited.changed if n in before and after.get(n, 0) < before[n]]
        if not lost:
            return []
        if self.freeze == "upto":
            last = max(names.index(n) for n in lost)
            chosen = [n for n in names[:last + 1] if n in edited.layers and n in before
                      and after[n] <= before[n]]  # widened and inserted layers train
        else:
            chosen = lost
        run = trace(edited.module, _example(edited.model))
        modules = dict(edited.module.named_modules())
        paths: list[str] = []
        for name in chosen:
            path = edited.layers[name]
            paths.append(path)
            paths.extend(p for p in run.chain(path, through=(nn.GroupNorm,))
                         if isinstance(modules[p], _FROZEN_WITH_LAYER))
        if self.freeze == "upto" and paths:
            # the norms that run before the last frozen layer (a pre-activation block's BN
            # in front of its conv) are part of what is frozen: they feed it
            order = [call.name for call in run.calls]
            last = max(order.index(p) for p in paths if p in order) if any(
                p in order for p in paths) else -1
            paths.extend(p for p in order[:last]
                         if isinstance(modules.get(p), _FROZEN_WITH_LAYER))
        return list(dict.fromkeys(paths))

    def check_loop_layers(self, module: nn.Module, layers: Iterable[str]) -> None:
        """Refuse ``layers`` that are not layers of ``module``'s export (what :meth:`start`
        checks), before a long training: the names depend on the structure, not the weights."""
        _check_loop_layers(self._export(copy.deepcopy(module).cpu().eval()), layers)

    def _export(self, module: nn.Module) -> onnxaom.Model:
        shape = self._input_shape()
        with tempfile.TemporaryDirectory(prefix="onnxaom-export-") as tmp:
            path = export_onnx(module, Path(tmp) / "model.onnx", exporter=self.exporter,  # type: ignore[arg-type]
                               input_shape=shape, opset=self.opset)
            loaded = onnxaom.load(path)
        return onnxaom.Model(loaded.proto)

    def _input_shape(self) -> tuple[int, ...]:
        for data in (self.test, self.train):
            if isinstance(data, Dataset):
                return (1, *data.image_shape)
            if isinstance(data, tuple) and len(data) == 2:
                return (1, *tuple(int(d) for d in data[0].shape[1:]))
        for x, _ in self.test:
            return (1, *tuple(int(d) for d in x.shape[1:]))
        raise SessionError("the test data gave no batch")

    @staticmethod
    def _state_artifact(module: nn.Module) -> Artifact:
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

        def write(path: Path) -> None:
            try:
                torch.save(state, path)
            except RuntimeError as exc:  # torch's stream errors (a full disk) are not OSError
                full = shutil.disk_usage(path.parent).free < (1 << 20)
                raise OSError(f"torch.save failed{' (the disk is full)' if full else ''}: "
                              f"{one_line(exc)}") from exc

        return Artifact(".pt", write)

    def _remember(self, digest: str, module: nn.Module) -> None:
        self._cache[digest] = copy.deepcopy(module).cpu()
        self._cache.move_to_end(digest)
        while len(self._cache) > max(1, self.cache_size):
            self._cache.popitem(last=False)

    def _check_factory(self, module: nn.Module) -> None:
        if self.factory is None:
            logger.warning("no factory given: this session can be continued in this process "
                           "only, not resumed from its folder")
            return
        try:
            fresh = _resolve_factory(self.factory)(**self.factory_kwargs)
            fresh.load_state_dict(module.state_dict())
        except Exception as exc:  # any failure: the factory does not build this module
            raise ModuleMismatchError(
                f"the factory {_factory_spec(self.factory) or self.factory!r} with "
                f"{self.factory_kwargs} does not build the module given to start(): "
                f"{one_line(exc)}") from exc

    def _rebuild(self, session: TuningSession, index: int) -> nn.Module:
        factory = self.factory if self.factory is not None else \
            (session.config.get("runner") or {}).get("factory")
        if factory is None:
            raise SessionError("cannot rebuild the session's torch modules: it was started "
                               "without a factory; give TorchRunner(factory=...) the class "
                               "that built step 0")
        kwargs = self.factory_kwargs or dict((session.config.get("runner") or {})
                                             .get("factory_kwargs") or {})
        module = _call_factory(factory, kwargs)
        lineage = session.lineage(index)
        self._load_state(session, module, lineage[0].index)
        for step in lineage[1:]:
            parent = session.model(step.parent)
            try:
                module = apply_edits(module, parent, list(step.edits), check=False).module
            except OnnxaomError as exc:
                raise SessionError(
                    f"{session.folder / SESSION_FILE}: step {step.index}'s recorded edits cannot "
                    f"be replayed on step {step.parent}'s model to rebuild its torch module "
                    f"({one_line(exc)}); the session record is damaged") from exc
            self._load_state(session, module, step.index)
        return module.cpu().eval()

    @staticmethod
    def _load_state(session: TuningSession, module: nn.Module, index: int) -> None:
        path = session.path(index, "torch")
        if not path.exists():
            raise SessionError(f"{path} is missing (torch weights of step {index})")
        state = _read_state_dict(path, f"torch weights of step {index}")
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise ModuleMismatchError(
                f"{path} (torch weights of step {index}) does not fit the module rebuilt by "
                f"the factory and the recorded edits: {one_line(exc)}") from exc


def _none_for_nan(values: Sequence[float]) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values]


def _example(model: onnxaom.Model) -> torch.Tensor:
    from .mapping import example_input

    return example_input(model)


def runner_from_session(session: TuningSession, train: Any, test: Any,
                        **overrides: Any) -> TorchRunner:
    """The runner a session's config describes (used by ``onnxaom session resume``);
    ``overrides`` replace its options (e.g. ``epochs=2``; None values are ignored)."""
    config = dict(session.config.get("runner") or {})
    options = {name: config[name] for name in OPTIONS if name in config}
    options.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(options) - set(OPTIONS) - {"progress"})
    if unknown:
        raise SessionError(f"unknown runner option(s) {', '.join(unknown)}")
    try:
        return TorchRunner(train, test, factory=config.get("factory"),
                           factory_kwargs=config.get("factory_kwargs") or {}, **options)
    except (TypeError, ValueError) as exc:
        raise SessionError(f"the session's runner options {options} are not valid: "
                           f"{one_line(exc)}") from exc


def _check_loop_layers(model: onnxaom.Model, layers: Iterable[str]) -> None:
    """Loop layers must be layers of ``model`` (refused at start, not when `session resume`
    reaches them)."""
    names = [layer.name for layer in model.layers()]
    missing = [name for name in layers if name not in names]
    if missing:
        raise LayerNotFoundError(f"loop layers {', '.join(map(repr, missing))} are not layers of "
                                 f"the exported model; its layers: {', '.join(names)}")
