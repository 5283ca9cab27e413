"""Retraining after an edit, and measuring it: :func:`freeze`, :func:`retrain`, :func:`evaluate`.

The paper (Sec. V-A) freezes the edited layer, so that the kept kernels keep the features they
had learned, and retrains the rest for one epoch. :func:`retrain` does that on a deep copy of the
module: the modules named in ``frozen`` keep their parameters (``requires_grad`` off) *and* their
batch-norm statistics and dropout (they stay in eval mode while the rest trains); every other
parameter is trained. Runs are seedable: the same seed, data and device give the same weights
(bit for bit on CPU; on CUDA, cuDNN is asked for deterministic kernels during the run).

Data, for both functions: an :class:`onnxaom.Dataset`, an ``(images, labels)`` pair of arrays
(float (N, C, H, W), integer (N,)), or an iterable of ``(images, labels)`` batches such as a
torch ``DataLoader`` (its own batching and shuffling are used; its random sampler draws from the
seeded generator of the run, unless the DataLoader was given a ``generator`` of its own, which
the run leaves as it is: seed that one for repeatable runs). uint8 images are scaled to [0, 1],
as everywhere in onnxaom.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from onnxaom.data import Dataset
from onnxaom.errors import ArgumentError, DataError, LayerNotFoundError
from onnxaom.frozen import readonly_array, reduce_by_fields
from onnxaom.progress import over

from .trace import check_float32

__all__ = ["Evaluation", "TrainResult", "evaluate", "freeze", "resolve_device", "retrain"]

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when torch sees a GPU, else CPU; anything else as torch reads it."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ArgumentError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(f"device {device!r} was asked for but torch sees no CUDA GPU; use "
                         f"device='auto' or 'cpu'")
    return resolved


def freeze(module: nn.Module, names: Iterable[str]) -> tuple[str, ...]:
    """Turn off ``requires_grad`` for every parameter of the modules ``names`` (module paths,
    e.g. ``"conv1"``, ``"bn1"``; their submodules included; a module registered under two
    names by either; ``""`` is ``module`` itself). Returns the frozen parameter names, in
    ``module.named_parameters()`` order. Unknown names raise
    :class:`~onnxaom.LayerNotFoundError` listing the module's paths."""
    names = [names] if isinstance(names, str) else names  # one module path, not its letters
    subs = []
    for name in dict.fromkeys(str(n) for n in names):  # every name found before any freezes
        try:
            subs.append(module.get_submodule(name))
        except AttributeError:
            known = ", ".join(n for n, _ in module.named_modules() if n) or "(none)"
            raise LayerNotFoundError(f"{type(module).__name__} has no module {name!r}; its "
                                     f"modules: {known}") from None
    frozen_ids: set[int] = set()
    for sub in subs:
        for param in sub.parameters():
            param.requires_grad_(False)
            frozen_ids.add(id(param))
    return tuple(pname for pname, param in module.named_parameters()
                 if id(param) in frozen_ids)


@dataclass(frozen=True, eq=False)
class TrainResult:
    """What :func:`retrain` returns.

    module: the trained copy (on ``device``, eval mode). losses: mean training loss per epoch.
    frozen: the frozen parameter names. trained: the names of the parameters that were trained.
    """

    module: nn.Module
    losses: tuple[float, ...]
    frozen: tuple[str, ...]
    trained: tuple[str, ...]
    device: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "frozen": list(self.frozen),
                "trained": list(self.trained), "device": self.device, "seconds": self.seconds}


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Accuracy of a classifier on a labelled data set.

    accuracy: correct / n. per_class: accuracy of each class (NaN where a class has no sample),
    shape (C,), C the model's number of outputs. class_counts: samples per class (C,).
    confusion: int64 array of shape (C, C), rows true class, columns predicted class.
    """

    accuracy: float
    per_class: tuple[float, ...]
    class_counts: tuple[int, ...]
    n: int
    confusion: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "confusion", readonly_array(self.confusion))

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_by_fields(self)

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy,
                "per_class": [None if math.isnan(a) else a for a in self.per_class],
                "class_counts": list(self.class_counts), "n": self.n,
                "confusion": self.confusion.tolist()}


# ------------------------------------------------------------------------------------ data
def _as_tensors(data: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(images, labels) tensors for in-memory data; None for an iterable of batches."""
    if isinstance(data, Dataset):
        return torch.from_numpy(np.array(data.images)), torch.from_numpy(np.array(data.labels))
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], tuple):
        images, labels = data
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
        y = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.array(labels))
        if x.shape[0:1] == (0,):
            raise DataError("the data set is empty (0 images)")
        return _checked(x, y, "")
    if isinstance(data, str | bytes) or not isinstance(data, Iterable):
        raise DataError(f"data must be an onnxaom Dataset, an (images, labels) pair or an "
                        f"iterable of (images, labels) batches, got {type(data).__name__}")
    return None


def _batches(data: Any, tensors: tuple[torch.Tensor, torch.Tensor] | None, batch_size: int,
             generator: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if tensors is not None:
        x, y = tensors
        n = x.shape[0]
        order = (torch.randperm(n, generator=generator) if generator is not None
                 else torch.arange(n))
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]
        return
    for index, item in enumerate(data):
        if not isinstance(item, Sequence) or len(item) != 2:
            raise DataError(f"batch {index} is a {type(item).__name__}; expected an "
                            f"(images, labels) pair")
        x, y = item
        yield _checked(torch.as_tensor(x), torch.as_tensor(y), f"batch {index}: ")


def _checked(x: torch.Tensor, y: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 images (N, C, H, W) and int64 labels (N,); :class:`DataError` for other shapes
    or float labels (a DataLoader's (B, 1) labels would otherwise broadcast in the confusion
    matrix, and 0.7 would become class 0)."""
    if x.ndim != 4:
        raise DataError(f"{where}images must have shape (N, C, H, W), got {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{where}labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise DataError(f"{where}labels must be integers, got {y.dtype}")
    return _pixels(x), y.long()


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """float32 images; uint8 pixels scaled to [0, 1], as onnxaom's loaders and ``collect`` do
    (:func:`onnxaom.data.default_scale`)."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _count(data: Any, tensors: tuple[torch.Tensor, torch.Tensor] | None,
           batch_size: int) -> int | None:
    if tensors is not None:
        return math.ceil(tensors[0].shape[0] / batch_size)
    try:
        return len(data)
    except TypeError:
        return None


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


# ------------------------------------------------------------------------------------ train
def _forward(module: nn.Module, x: torch.Tensor, *, first: bool) -> torch.Tensor:
    """``module(x)``; on the first batch a shape error becomes a :class:`DataError` naming the
    batch's shape (later batches have the same shape, so an error there is the module's)."""
    if not first:
        return module(x)
    try:
        return module(x)
    except RuntimeError as exc:
        if "out of memory" in str(exc):
            raise
        raise DataError(f"the module cannot run a batch of shape {tuple(x.shape)} (N, C, H, W): "
                        f"{str(exc).splitlines()[0]}; check the data's channels and image "
                        f"size against the model's input") from exc


def _check_labels(y: torch.Tensor, classes: int) -> None:
    """Labels must index the model's ``classes`` outputs."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise DataError(f"labels must lie in 0..{classes - 1} (the model has {classes} outputs), "
                        f"got {int(y.min())}..{int(y.max())}")


def retrain(
    module: nn.Module,
    data: Any,
    epochs: int = 1,
    *,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "auto",
    frozen: Iterable[str] = (),
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a deep copy of ``module`` for ``epochs`` epochs; ``module`` is not changed.

    Parameters
    ----------
    module:
        A classifier returning logits of shape (N, C).
    data:
        Training data (see the module docstring); in-memory data is shuffled every epoch from
        ``seed``.
    epochs:
        Passes over the data (0: no training, the copy is returned as is).
    lr, optimizer, weight_decay:
        Adam (default) or SGD with momentum 0.9.
    batch_size:
        For in-memory data.
    seed:
        Seeds shuffling, dropout and everything else random in the run (the global torch RNG is
        forked, not changed).
    device:
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` ...; the result stays there.
    frozen:
        Module paths to freeze (:func:`freeze`); they also stay in eval mode (batch-norm
        statistics and dropout unchanged). Every other parameter is trained.
    loss_fn:
        Default cross entropy.
    progress:
        A tqdm bar per epoch.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ArgumentError(f"epochs must be an int >= 0, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
    if optimizer not in OPTIMIZERS:
        raise ArgumentError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ArgumentError(f"lr must be a positive number, got {lr!r}")
    check_float32(module)
    target = resolve_device(device)
    tensors = _as_tensors(data)
    work = copy.deepcopy(module).to(target)
    frozen_names = list(dict.fromkeys([frozen] if isinstance(frozen, str) else frozen))
    for param in work.parameters():
        param.requires_grad_(True)
    frozen_params = freeze(work, frozen_names)
    trained = tuple(n for n, p in work.named_parameters() if p.requires_grad)
    frozen_modules = [work.get_submodule(n) for n in frozen_names]
    loss_of = loss_fn if loss_fn is not None else nn.functional.cross_entropy
    params = [p for p in work.parameters() if p.requires_grad]
    start = time.perf_counter()
    losses: list[float] = []
    devices = [target.index or 0] if target.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _deterministic(target):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        opt: torch.optim.Optimizer | None = None
        if params and epochs:
            opt = (torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
                   if optimizer == "adam" else
                   torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay))
        for epoch in range(epochs):
            work.train()
            for sub in frozen_modules:
                sub.eval()
            total, count = 0.0, 0
            batches = _batches(data, tensors, batch_size, generator)
            bar = over(batches, total=_count(data, tensors, batch_size),
                       desc=f"epoch {epoch + 1}/{epochs}", unit="it", enabled=progress)
            for x, y in bar:
                x, y = x.to(target), y.to(target)
                out = _forward(work, x, first=count == 0 and epoch == 0)
                if loss_fn is None:
                    _check_labels(y, int(out.shape[1]))
                loss = loss_of(out, y)
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                total += float(loss.detach()) * x.shape[0]
                count += int(x.shape[0])
            if count == 0:
                raise DataError("the training data gave no batch")
            losses.append(total / count)
            logger.info("epoch %d/%d: loss %.4f", epoch + 1, epochs, losses[-1])
    work.eval()
    return TrainResult(work, tuple(losses), frozen_params, trained, str(target),
                       time.perf_counter() - start)


def evaluate(module: nn.Module, data: Any, *, batch_size: int = 256,
             device: str | torch.device = "auto", num_classes: int | None = None,
             progress: bool = False) -> Evaluation:
    """Overall and per-class accuracy of ``module`` (eval mode, no gradients) on ``data``.

    ``num_classes`` defaults to the width of the model's output and may not be below it.
    ``module`` is not changed
    (its train/eval modes are restored; it is moved to ``device`` and back).
    """
    if num_classes is not None and (isinstance(num_classes, bool)
                                    or not isinstance(num_classes, int | np.integer)
                                    or num_classes < 1):
        raise DataError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) \
            or batch_size < 1:
        raise ArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
    batch_size = int(batch_size)
    check_float32(module)
    target = resolve_device(device)
    tensors = _as_tensors(data)
    modes = {sub: sub.training for sub in module.modules()}
    parameter = next(module.parameters(), None)
    home = parameter.device if parameter is not None else torch.device("cpu")
    confusion: np.ndarray | None = None
    n = 0
    try:
        module.to(target).eval()
        with torch.no_grad():
            batches = _batches(data, tensors, batch_size, None)
            for x, y in over(batches, total=_count(data, tensors, batch_size),
                             desc="evaluate", unit="it", enabled=progress):
                logits = _forward(module, x.to(target), first=confusion is None)
                width = int(logits.shape[1])
                c = int(num_classes) if num_classes is not None else width
                if c < width:
                    raise DataError(
                        f"num_classes={c} is below the model's output width ({width} logits): "
                        f"a prediction of class {c} or above would fit no row of the "
                        f"confusion matrix; leave num_classes unset or give at least {width}")
                if confusion is None:
                    confusion = np.zeros((c, c), dtype=np.int64)
                pred = logits.argmax(dim=1).cpu().numpy()
                _check_labels(y, c)
                truth = y.cpu().numpy()
                np.add.at(confusion, (truth, pred), 1)
                n += int(truth.size)
    finally:
        module.to(home)
        for sub, training in modes.items():
            sub.training = training
    if confusion is None or n == 0:
        raise DataError("the evaluation data gave no batch")
    counts = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(counts > 0, np.diag(confusion) / np.maximum(counts, 1), np.nan)
    return Evaluation(float(np.trace(confusion) / n), tuple(float(a) for a in per_class),
                      tuple(int(c) for c in counts), n, confusion)
