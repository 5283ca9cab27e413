"""A tuning session on disk: every step of the paper's workflow (Fig. 1), undoable, resumable.

edits -> retrained model -> **session** (history) -> report. A :class:`TuningSession` records,
step by step, what was done to a model and what it cost: the edits (JSON), overall and per-class
accuracy, parameters and MACs (:func:`onnxaom.summary.summary`), the digest of the statistics the
edits were chosen from, and the model files. :meth:`TuningSession.undo` goes back to the model a
step started from; the undone step stays in the history, marked. Step indices are never reused,
so steps form a tree: each has a ``parent`` (the step whose model it edited).

The folder::

    DIR/session.json          the history (format "onnxaom.TuningSession"), written last
    DIR/models/step_<i>.onnx  the model after step i (step 0: the starting model)
    DIR/models/step_<i><sfx>  files a runner adds per step (the torch adapter: step_<i>.pt)

Crash safety: a step's files are written first, each to a temporary name and renamed into place,
and ``session.json`` last, the same way; a crash at any point leaves the previous consistent
session. Files of a step that never reached ``session.json`` are moved aside to
``models/orphaned/`` when the step index is used again, never overwritten. :meth:`resume` checks
the history and every file it names (existence, size and SHA-256) and raises
:class:`SessionError` naming the file at fault.

This module knows nothing of frameworks: training and evaluation come from a runner (see
:mod:`onnxaom.tuning`), which hands over the model and its accuracy, and :class:`Artifact` writers
for its own files.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from .edits import Edit, as_edit_list, edit_from_dict
from .errors import EditError, ModelError, ModelFileNotFoundError, SessionError
from .files import atomic_write_to
from .frozen import FrozenMap
from .model import Model, load

__all__ = [
    "FORMAT",
    "Artifact",
    "SessionError",
    "Step",
    "TuningSession",
    "describe_edits",
]

logger = logging.getLogger(__name__)

FORMAT = "onnxaom.TuningSession"
FORMAT_VERSION = 1
SESSION_FILE = "session.json"
MODELS = "models"
#: Held (an exclusive ``flock``) while a session checks and writes its folder.
LOCK_FILE = ".session.lock"

Status = Literal["applied", "undone"]
STATUSES: tuple[Status, ...] = ("applied", "undone")




@dataclass(frozen=True)
class Artifact:
    """A file a runner adds to a step: ``write(path)`` writes it to ``path`` (a temporary name
    in the session's models folder; the session renames it to ``step_<i><suffix>``)."""

    suffix: str
    write: Callable[[Path], None]

    def __post_init__(self) -> None:
        if not self.suffix.startswith(".") or "/" in self.suffix or "\\" in self.suffix \
                or self.suffix == ".onnx":
            raise SessionError(f"artifact suffix must look like '.pt' (and not '.onnx'), got "
                               f"{self.suffix!r}")


@dataclass(frozen=True)
class FileRecord:
    """A file of a step: path relative to the session folder, size in bytes, SHA-256 hex."""

    path: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FileRecord:
        return cls(str(data["path"]), int(data["size"]), str(data["sha256"]))


@dataclass(frozen=True)
class Step:
    """One step of a session.

    index: 0 for the starting model, then 1, 2, ... in the order steps were made.
    parent: the step whose model this step edited (None for step 0).
    edits: what was done (empty for step 0).
    status: ``"applied"`` or ``"undone"`` (``undo_reason`` says why).
    accuracy: overall accuracy in [0, 1] (None if not measured); per_class: one per class
        (None where a class had no sample).
    params, macs: total parameters and MACs per sample of the step's model.
    stats_digest: digest of the statistics the edits were chosen from (None: chosen by hand).
    model_digest: SHA-256 of the step's ONNX model (:attr:`onnxaom.Model.digest`).
    files: kind -> :class:`FileRecord`; kind ``"onnx"`` is the model, others a runner's.
    label: what the step did, in words. info: anything else the runner records (JSON).
    """

    index: int
    parent: int | None
    edits: tuple[Edit, ...]
    status: Status
    accuracy: float | None
    per_class: tuple[float | None, ...]
    params: int
    macs: int
    stats_digest: str | None
    model_digest: str
    files: Mapping[str, FileRecord]
    label: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)
    created: str = ""
    undo_reason: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "edits", tuple(self.edits))
        object.__setattr__(self, "per_class", tuple(self.per_class))
        object.__setattr__(self, "files", FrozenMap(self.files))
        object.__setattr__(self, "info", FrozenMap(self.info))

    @property
    def applied(self) -> bool:
        return self.status == "applied"

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "parent": self.parent,
            "edits": [e.to_dict() for e in self.edits], "status": self.status,
            "label": self.label, "accuracy": self.accuracy, "per_class": list(self.per_class),
            "params": self.params, "macs": self.macs, "stats_digest": self.stats_digest,
            "model_digest": self.model_digest,
            "files": {k: f.to_dict() for k, f in self.files.items()},
            "info": _plain(dict(self.info)), "created": self.created,
            "undo_reason": self.undo_reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Step:
        status = data["status"]
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        return cls(
            index=int(data["index"]),
            parent=None if data.get("parent") is None else int(data["parent"]),
            edits=tuple(edit_from_dict(e) for e in data.get("edits", ())),
            status=status,
            accuracy=_accuracy(data.get("accuracy"), "accuracy"),
            per_class=tuple(_accuracy(a, "per-class accuracy") for a in data.get("per_class", ())),
            params=int(data["params"]), macs=int(data["macs"]),
            stats_digest=_text(data, "stats_digest"), model_digest=str(data["model_digest"]),
            files={str(k): FileRecord.from_dict(v) for k, v in data["files"].items()},
            label=_text(data, "label") or "", info=dict(data.get("info") or {}),
            created=_text(data, "created") or "", undo_reason=_text(data, "undo_reason"),
        )


def _check_settings(path: Path, config: Mapping[str, Any], progress: Mapping[str, Any]) -> None:
    """The loop's and the data's settings that ``session.json`` keeps, of the types the loop
    reads them as: a damaged one is named here, not met as a traceback mid-loop."""

    def fail(where: str, wanted: str, value: Any) -> None:
        raise SessionError(f"{path}: {where} must be {wanted}, got {value!r}")

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value)

    def count(value: Any, least: int) -> bool:  # 256.0 from a hand-written config is 256
        return number(value) and float(value).is_integer() and value >= least

    loop = config.get("loop") or {}
    data = config.get("data") or {}
    for name, section in (("config 'loop'", loop), ("config 'data'", data)):
        if not isinstance(section, Mapping):
            fail(name, "a JSON object", section)
    for where, keep in (("progress 'keep'", progress.get("keep")),
                        ("config loop 'keep'", loop.get("keep"))):
        if keep is None:
            continue
        if not isinstance(keep, Mapping):
            fail(where, "a JSON object of layer -> kernel count", keep)
        for layer, n in keep.items():  # 0 is refused by the proposal, with its reason
            if not count(n, 0):
                fail(f"{where}[{layer!r}]", "a kernel count", n)
    for where, drop in (("progress 'accept_drop'", progress.get("accept_drop")),
                        ("config loop 'accept_drop'", loop.get("accept_drop"))):
        if drop is not None and not (number(drop) and drop >= 0):
            fail(where, "a number of percentage points >= 0 or null", drop)
    for where, text in (("progress 'strategy'", progress.get("strategy")),
                        ("config loop 'strategy'", loop.get("strategy")),
                        ("config loop 'provider'", loop.get("provider"))):
        if text is not None and not isinstance(text, str):
            fail(where, "a string", text)
    for where, relative in (("progress 'relative_to'", progress.get("relative_to")),
                            ("config loop 'relative_to'", loop.get("relative_to"))):
        if relative not in (None, "baseline", "parent"):
            fail(where, "'baseline' or 'parent'", relative)
    if "batch_size" in loop and not count(loop["batch_size"], 1):
        fail("config loop 'batch_size'", "an integer >= 1", loop["batch_size"])
    layers = loop.get("layers")  # progress 'layers' is checked with the progress
    if layers is not None and (not isinstance(layers, list)
                               or not all(isinstance(n, str) for n in layers)):
        fail("config loop 'layers'", "a JSON list of layer names", layers)
    for key in ("spec", "test_spec"):
        if data.get(key) is not None and not isinstance(data[key], str):
            fail(f"config data {key!r}", "a data spec string", data[key])
    runner = config.get("runner")
    if runner is not None:
        if not isinstance(runner, Mapping):
            fail("config 'runner'", "a JSON object", runner)
        if runner.get("factory") is not None and not isinstance(runner["factory"], str):
            fail("config runner 'factory'", "a string such as 'pkg.module:Name'",
                 runner["factory"])
        if runner.get("factory_kwargs") is not None \
                and not isinstance(runner["factory_kwargs"], Mapping):
            fail("config runner 'factory_kwargs'", "a JSON object", runner["factory_kwargs"])
    fraction = data.get("train_fraction")
    if fraction is not None and "test_spec" not in data \
            and not (number(fraction) and 0 < fraction < 1):  # unused with test data
        fail("config data 'train_fraction'", "a number between 0 and 1", fraction)
    if "seed" in data and not count(data["seed"], 0):
        fail("config data 'seed'", "an integer >= 0", data["seed"])


def _text(data: Mapping[str, Any], key: str) -> str | None:
    """``data[key]``: a string, or None where absent or null; ValueError for anything else."""
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {type(value).__name__}")
    return value


def describe_edits(edits: Sequence[Edit]) -> str:
    """A short label: ``"/conv1/Conv: remove 11 kernels; /conv2/Conv: widen +4"``."""
    parts = []
    for edit in edits:
        d = edit.to_dict()
        if d["edit"] == "RemoveKernels":
            n = len(d["kernels"])
            parts.append(f"{d['layer']}: remove {n} kernel{'s' if n != 1 else ''}")
        elif d["edit"] == "WidenLayer":
            parts.append(f"{d['layer']}: widen +{d['add']} ({d['init']})")
        else:
            parts.append(f"{d['after']}: insert layer ({d['init']})")
    return "; ".join(parts) or "no edit"


def _plain(value: Any) -> Any:
    """``value`` with NaN/inf floats as None and tuples as lists (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _accuracy(value: object, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number) \
            or isinstance(value, np.complexfloating):
        raise SessionError(f"{what} must be a number in [0, 1] or None, got {value!r}")
    value = float(value)
    if math.isnan(value):
        return None
    if not 0.0 <= value <= 1.0:
        raise SessionError(f"{what} must lie in [0, 1] (a fraction, not a percentage), got "
                           f"{value}")
    return value


class TuningSession:
    """A tuning history kept in a folder (see the module docstring).

    Make one with :meth:`create` or :meth:`resume`; never with the constructor.
    """

    def __init__(self, folder: Path, data: dict[str, Any]) -> None:
        self._folder = folder
        self._steps: list[Step] = [Step.from_dict(s) for s in data["steps"]]
        self._current: int = int(data["current"])
        self._config: dict[str, Any] = dict(data.get("config") or {})
        self._progress: dict[str, Any] = dict(data.get("progress") or {})
        self._created: str = str(data.get("created", ""))
        #: SHA-256 of session.json as this object last read or wrote it (None: not yet written)
        self._seen: str | None = None

    # ------------------------------------------------------------------ creating and loading
    @classmethod
    def create(
        cls,
        folder: str | os.PathLike[str],
        model: Model,
        *,
        accuracy: float | None = None,
        per_class: Sequence[float | None] = (),
        files: Mapping[str, Artifact] | None = None,
        config: Mapping[str, Any] | None = None,
        info: Mapping[str, Any] | None = None,
        label: str = "start",
    ) -> TuningSession:
        """Start a session in ``folder`` (created; must be empty or missing) with ``model`` as
        step 0. ``config`` is free JSON for the runner and the tuning loop (how to rebuild the
        runner, the data, the loop's settings); it is kept as given."""
        folder = Path(folder)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise SessionError(f"{folder} exists and is not an empty folder; a new session "
                               f"needs a new folder (continue an existing one with `onnxaom "
                               f"session resume`, or TuningSession.resume in Python)")
        if not isinstance(model, Model):
            raise ModelError(f"expected an onnxaom.Model, got {type(model).__name__}")
        _check_json(config, "config")
        existed = folder.exists()
        (folder / MODELS).mkdir(parents=True, exist_ok=True)
        try:
            session = cls(folder, {"steps": [], "current": 0, "config": dict(config or {}),
                                   "created": _now()})
            session._add_step((), model, parent=None, accuracy=accuracy, per_class=per_class,
                              files=files, stats_digest=None, label=label, info=info)
        except BaseException:
            # refused (or interrupted) before step 0 was recorded: leave the folder as it was
            # (empty or missing), so that a corrected call can start there
            if (folder / SESSION_FILE).exists():
                raise  # recorded after all: a session to resume
            for child in folder.iterdir() if existed else ():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            if not existed:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return session

    @classmethod
    def resume(cls, folder: str | os.PathLike[str], *, verify: bool = True) -> TuningSession:
        """Load the session in ``folder``, checking the history and (``verify``) the size and
        SHA-256 of every file it names. Nothing is written."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFileNotFoundError(f"session folder not found: {folder}")
        path = folder / SESSION_FILE
        if not path.exists():
            leftovers = sorted(p.name for p in folder.glob(f".{SESSION_FILE}.*"))
            if (folder / MODELS).exists() or leftovers:
                raise SessionError(f"{path} is missing: the session in {folder} is half-written "
                                   f"(it crashed before its first step was recorded); start a "
                                   f"new session in an empty folder")
            raise ModelFileNotFoundError(f"{folder} is not a tuning session: {SESSION_FILE} not "
                                         f"found")
        try:
            raw = path.read_bytes()
            data = json.loads(raw.decode("utf-8"))
        except OSError as exc:
            raise SessionError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from exc
        except UnicodeDecodeError as exc:
            raise SessionError(f"{path} is corrupt (not UTF-8 text): {exc}") from exc
        except json.JSONDecodeError as exc:
            raise SessionError(f"{path} is corrupt (not valid JSON: {exc}); restore it from a "
                               f"backup or start a new session") from exc
        session = cls._validated(folder, path, data)
        session._seen = hashlib.sha256(raw).hexdigest()
        if verify:
            session.verify()
        return session

    @classmethod
    def _validated(cls, folder: Path, path: Path, data: Any) -> TuningSession:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SessionError(f"{path} is not an onnxaom tuning session (expected format "
                               f"{FORMAT!r})")
        version = data.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise SessionError(f"{path}: session format version {version!r} is not supported "
                               f"(this onnxaom reads up to {FORMAT_VERSION}); upgrade onnxaom")
        raw = data.get("steps")
        if not isinstance(raw, list) or not raw:
            raise SessionError(f"{path} has no steps; it is corrupt")
        steps: list[Step] = []
        for i, item in enumerate(raw):
            try:
                step = Step.from_dict(item)
            except (EditError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise SessionError(f"{path}: step {i} is malformed ({type(exc).__name__}: "
                                   f"{exc})") from exc
            if step.index != i:
                raise SessionError(f"{path}: step {i} says it is step {step.index}")
            if (i == 0) != (step.parent is None) or (step.parent is not None
                                                     and not 0 <= step.parent < i):
                raise SessionError(f"{path}: step {i} has parent {step.parent!r}; step 0 has "
                                   f"none and every other step a parent made before it")
            if "onnx" not in step.files:
                raise SessionError(f"{path}: step {i} names no ONNX model file")
            for record in step.files.values():
                if Path(record.path).is_absolute() or ".." in Path(record.path).parts:
                    raise SessionError(f"{path}: step {i} names file {record.path!r} outside "
                                       f"the session folder")
            steps.append(step)
        current = data.get("current")
        if not isinstance(current, int) or not 0 <= current < len(steps) \
                or not steps[current].applied:
            raise SessionError(f"{path}: current step {current!r} is not an applied step")
        node: int | None = current
        while node is not None:
            if not steps[node].applied:
                raise SessionError(f"{path}: current step {current} descends from undone step "
                                   f"{node}")
            node = steps[node].parent
        for key in ("config", "progress"):
            if not isinstance(data.get(key) or {}, dict):
                raise SessionError(f"{path}: {key!r} must be a JSON object")
        progress = data.get("progress") or {}
        for key in ("layers", "done"):
            value = progress.get(key)
            if value is not None and (not isinstance(value, list)
                                      or not all(isinstance(v, str) for v in value)):
                raise SessionError(f"{path}: progress {key!r} must be a list of layer names, got "
                                   f"{value!r}")
        _check_settings(path, data.get("config") or {}, progress)
        return cls(folder, data)

    def verify(self, steps: Iterable[Step] | None = None) -> None:
        """Check that every file of every step (or of ``steps``) exists with its recorded size
        and SHA-256."""
        for step in self._steps if steps is None else steps:
            for kind, record in step.files.items():
                file = self._folder / record.path
                where = f"{record.path} ({kind} file of step {step.index} in {SESSION_FILE})"
                if not file.is_file():
                    raise SessionError(f"{self._folder}: {where} is missing; restore it, or "
                                       f"start a new session")
                if file.stat().st_size != record.size or _sha256(file) != record.sha256:
                    raise SessionError(f"{self._folder}: {where} is corrupt (its size or "
                                       f"SHA-256 differs from the record); restore it, or start "
                                       f"a new session")

    # ------------------------------------------------------------------ reading
    @property
    def folder(self) -> Path:
        """The session's folder."""
        return self._folder

    @property
    def steps(self) -> tuple[Step, ...]:
        """Every step, undone ones included, by index."""
        return tuple(self._steps)

    @property
    def current(self) -> Step:
        """The step whose model the next edit starts from."""
        return self._steps[self._current]

    @property
    def baseline(self) -> Step:
        """Step 0: the starting model."""
        return self._steps[0]

    @property
    def config(self) -> Mapping[str, Any]:
        """The free JSON given to :meth:`create` (runner, data, loop settings), read-only."""
        return MappingProxyType(self._config)

    @property
    def progress(self) -> Mapping[str, Any]:
        """Free JSON where a tuning loop keeps its place (:mod:`onnxaom.tuning`)."""
        return MappingProxyType(self._progress)

    def step(self, index: int) -> Step:
        """Step ``index``; :class:`SessionError` for an index the session does not have."""
        if isinstance(index, bool) or not isinstance(index, int) \
                or not 0 <= index < len(self._steps):
            last = len(self._steps) - 1
            raise SessionError(f"no step {index!r}; the session has steps 0..{last}")
        return self._steps[index]

    def lineage(self, index: int | None = None) -> list[Step]:
        """Steps from step 0 to ``index`` (default: the current step), following parents."""
        out: list[Step] = []
        node: int | None = self._current if index is None else self.step(index).index
        while node is not None:
            out.append(self._steps[node])
            node = self._steps[node].parent
        return out[::-1]

    def path(self, index: int | None = None, kind: str = "onnx") -> Path:
        """The file of kind ``kind`` of step ``index`` (default current)."""
        step = self.current if index is None else self.step(index)
        try:
            return self._folder / step.files[kind].path
        except KeyError:
            raise SessionError(f"step {step.index} has no {kind!r} file; it has "
                               f"{', '.join(step.files)}") from None

    def model(self, index: int | None = None) -> Model:
        """The ONNX model of step ``index`` (default: the current step), checked against the
        step's recorded ``model_digest``."""
        step = self.current if index is None else self.step(index)
        path = self.path(step.index)
        if not path.exists():
            raise SessionError(f"{path} is missing (model of step {step.index}); the session "
                               f"folder is damaged")
        model = load(path)
        if model.digest != step.model_digest:
            record = step.files.get("onnx")
            intact = record is not None and record.sha256 == _sha256(path)
            why = ("; its file is the one recorded (SHA-256), so either session.json was "
                   "changed or the session was recorded by an onnxaom that read this model "
                   "into another normal form (onnxaom.normalize): start a new session from "
                   "this step's model file") if intact else (
                "; the session folder is damaged: restore it, or start a new session")
            raise SessionError(
                f"{self._folder / SESSION_FILE}: step {step.index}'s model_digest "
                f"{step.model_digest[:12]} does not match its model {step.files['onnx'].path} "
                f"({model.digest[:12]}){why}")
        return model

    def history(self, *, include_undone: bool = False) -> list[dict[str, Any]]:
        """Rows for :func:`onnxaom.charts.tuning_history`: ``step``, ``params``, ``accuracy``,
        ``label`` (and ``status``, ``macs``), for the current lineage (or every step)."""
        steps = self._steps if include_undone else self.lineage()
        return [{"step": s.index, "params": s.params, "macs": s.macs,
                 "accuracy": s.accuracy, "label": s.label or describe_edits(s.edits),
                 "status": s.status} for s in steps if s.accuracy is not None]

    def format_table(self) -> str:
        """The history as a plain-text table, one row per step (``*`` marks the current)."""
        base = self.baseline.accuracy
        rows = [("", "step", "parent", "status", "accuracy", "change", "params", "MACs",
                 "stats", "what")]
        for s in self._steps:
            acc = "-" if s.accuracy is None else f"{100 * s.accuracy:.2f}%"
            change = "-" if s.accuracy is None or base is None or s.index == 0 else \
                f"{100 * (s.accuracy - base):+.2f} pp"
            what = s.label or describe_edits(s.edits)
            if s.undo_reason:
                what += f" [undone: {s.undo_reason}]"
            rows.append(("*" if s.index == self._current else "", str(s.index),
                         "-" if s.parent is None else str(s.parent), s.status, acc, change,
                         f"{s.params:,}", f"{s.macs:,}", (s.stats_digest or "-")[:8], what))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(cell.ljust(w) if i in (0, 3, 8) else cell.rjust(w)
                           for i, (cell, w) in enumerate(zip(r[:-1], widths, strict=True)))
                 + "  " + r[-1] for r in rows]
        return "\n".join([f"tuning session {self._folder} ({len(self._steps)} steps, current "
                          f"{self._current})", *lines])

    # ------------------------------------------------------------------ changing
    def record(
        self,
        edits: Iterable[Edit],
        model: Model,
        *,
        accuracy: float | None,
        per_class: Sequence[float | None] = (),
        files: Mapping[str, Artifact] | None = None,
        stats_digest: str | None = None,
        label: str | None = None,
        info: Mapping[str, Any] | None = None,
        undone: str | None = None,
    ) -> Step:
        """Record a step made from the current step's model: ``edits`` gave ``model`` (already
        retrained, if at all) with ``accuracy``. Writes its files and then ``session.json``;
        the new step becomes current. With ``undone`` (the reason), the step is recorded as
        undone and the current step stays: one write, so that a crash cannot leave a step
        applied that its judgement rejected."""
        try:
            edit_list = tuple(as_edit_list(edits))  # edit dicts parsed, anything else refused
        except EditError as exc:
            raise SessionError(f"edits: {exc}") from exc
        if not edit_list:
            raise SessionError("a step needs at least one edit")
        if undone is not None and not isinstance(undone, str):
            raise SessionError(f"undone must be the reason (a string) or None, got "
                               f"{type(undone).__name__}")
        return self._add_step(edit_list, model, parent=self._current, accuracy=accuracy,
                              per_class=per_class, files=files, stats_digest=stats_digest,
                              label=label, info=info, undone=undone)

    def undo(self, reason: str | None = None) -> Step:
        """Undo the current step: it is marked ``"undone"`` and its parent becomes current
        (returned). The undone step's files stay. The files of the steps it goes back to are
        verified first; the undone step's may be damaged (undo is the way out of it: open
        the session with ``resume(folder, verify=False)``)."""
        step = self.current
        if step.parent is None:
            raise SessionError("nothing to undo: the current step is the starting model")
        self.verify(self.lineage(step.parent))
        with self._exclusive():
            self._steps[step.index] = replace(step, status="undone", undo_reason=reason)
            self._current = step.parent
            try:
                self._write()
            except BaseException:
                self._steps[step.index], self._current = step, step.index
                raise
        logger.info("undid step %d (%s); current step is %d", step.index,
                    reason or "no reason given", self._current)
        return self.current

    def set_progress(self, progress: Mapping[str, Any]) -> None:
        """Replace :attr:`progress` and write ``session.json``."""
        _check_json(progress, "progress")
        with self._exclusive():
            previous, self._progress = self._progress, dict(progress)
            try:
                self._write()
            except BaseException:
                self._progress = previous
                raise

    # ------------------------------------------------------------------ internals
    def _add_step(self, edits: tuple[Edit, ...], model: Model, *, parent: int | None,
                  accuracy: float | None, per_class: Sequence[float | None],
                  files: Mapping[str, Artifact] | None, stats_digest: str | None,
                  label: str | None, info: Mapping[str, Any] | None,
                  undone: str | None = None) -> Step:
        from .summary import summary

        if not isinstance(model, Model):
            raise ModelError(f"expected an onnxaom.Model, got {type(model).__name__}")
        _check_json(info, "info")
        index = len(self._steps)
        acc = _accuracy(accuracy, "accuracy")
        classes = tuple(_accuracy(a, f"per_class[{i}]") for i, a in enumerate(per_class))
        facts = summary(model)
        with self._exclusive():
            return self._write_step(edits, model, facts, index, parent=parent, accuracy=acc,
                                    per_class=classes, files=files,
                                    stats_digest=stats_digest, label=label, info=info,
                                    undone=undone)

    def _write_step(self, edits: tuple[Edit, ...], model: Model, facts: Any, index: int, *,
                    parent: int | None, accuracy: float | None,
                    per_class: tuple[float | None, ...], files: Mapping[str, Artifact] | None,
                    stats_digest: str | None, label: str | None,
                    info: Mapping[str, Any] | None, undone: str | None = None) -> Step:
        """:meth:`_add_step`'s writing part, under the folder's lock."""
        models = self._folder / MODELS
        models.mkdir(exist_ok=True)
        records: dict[str, FileRecord] = {}
        outputs: list[tuple[str, Path, Callable[[Path], None]]] = [
            ("onnx", models / f"step_{index}.onnx", lambda p: _save_model(model, p))]
        for kind, artifact in (files or {}).items():
            if kind == "onnx" or not isinstance(artifact, Artifact):
                raise SessionError(f"files[{kind!r}] must be an Artifact under a kind other "
                                   f"than 'onnx'")
            outputs.append((kind, models / f"step_{index}{artifact.suffix}", artifact.write))
        for _, target, _ in outputs:
            self._move_orphan(target)
        for kind, target, write in outputs:
            atomic_write_to(target, write)
            records[kind] = FileRecord(target.relative_to(self._folder).as_posix(),
                                       target.stat().st_size, _sha256(target))
        step = Step(index=index, parent=parent, edits=edits,
                    status="applied" if undone is None else "undone", accuracy=accuracy,
                    per_class=per_class, params=facts.total_params, macs=facts.total_macs,
                    stats_digest=stats_digest, model_digest=model.digest, files=records,
                    label=label if label is not None else describe_edits(edits),
                    info=dict(info or {}), created=_now(), undo_reason=undone)
        self._steps.append(step)
        previous = self._current
        if undone is None:
            self._current = index
        try:
            self._write()
        except BaseException:
            self._steps.pop()
            self._current = previous
            raise
        return step

    def _move_orphan(self, target: Path) -> None:
        """A file left by a step that never reached session.json: move it aside."""
        if not target.exists():
            return
        known = {r.path for s in self._steps for r in s.files.values()}
        rel = target.relative_to(self._folder).as_posix()
        if rel in known:
            raise SessionError(f"internal: {rel} belongs to a recorded step; refusing to "
                               f"overwrite it")
        aside = self._folder / MODELS / "orphaned"
        aside.mkdir(exist_ok=True)
        n = 0
        while (aside / f"{target.name}.{n}").exists():
            n += 1
        os.replace(target, aside / f"{target.name}.{n}")
        logger.warning("%s was left by an interrupted step; moved to %s", rel,
                       (aside / f"{target.name}.{n}").relative_to(self._folder))

    def _write(self) -> None:
        data = {
            "format": FORMAT, "version": FORMAT_VERSION, "created": self._created,
            "updated": _now(), "current": self._current, "config": _plain(self._config),
            "progress": _plain(self._progress), "steps": [s.to_dict() for s in self._steps],
        }
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"

        def write(path: Path) -> None:
            path.write_bytes(text.encode("utf-8"))

        atomic_write_to(self._folder / SESSION_FILE, write)
        self._seen = hashlib.sha256(text.encode("utf-8")).hexdigest()

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the folder's lock and refuse to go on when ``session.json`` is no longer what
        this object read or wrote: another process (a second ``session apply`` on the same
        folder, say) recorded a step meanwhile, and writing now would drop it."""
        path = self._folder / SESSION_FILE
        with _folder_lock(self._folder / LOCK_FILE) as locked:
            if locked:
                self._clear_temporaries()
            try:
                now = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
            except OSError as exc:
                raise SessionError(f"{path} cannot be read ({type(exc).__name__}: {exc})"
                                   ) from exc
            if now != self._seen:
                raise SessionError(
                    f"{path} was changed by another process since this session was loaded "
                    f"(another `session apply`, `undo` or loop on the same folder?); nothing "
                    f"was written. Resume the session again to continue from its new state")
            yield

    def _clear_temporaries(self) -> None:
        """Delete the temporary files of writes a crash cut short (``.session.json.*.tmp``,
        ``models/.step_*.tmp``): every writer holds the folder's lock, so under it none is
        one's own."""
        for folder, pattern in ((self._folder, f".{SESSION_FILE}.*.tmp"),
                                (self._folder / MODELS, ".step_*.tmp")):
            for stale in folder.glob(pattern):
                try:
                    stale.unlink()
                except OSError:  # gone already, or not ours to delete: harmless
                    continue
                logger.info("deleted %s, left by an interrupted write", stale)

    def __repr__(self) -> str:
        return (f"TuningSession({str(self._folder)!r}, steps={len(self._steps)}, "
                f"current={self._current})")


def _check_json(value: Mapping[str, Any] | None, what: str) -> None:
    """:class:`SessionError` unless ``value`` (a mapping, or None) can go into session.json."""
    if value is not None and not isinstance(value, Mapping):
        raise SessionError(f"{what} must be a dict of JSON values, got {type(value).__name__}")
    try:
        json.dumps(_plain(dict(value or {})), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SessionError(f"{what} must be JSON (dicts, lists, str, numbers): {exc}") from exc


@contextmanager
def _folder_lock(path: Path) -> Iterator[bool]:
    """An exclusive advisory lock on ``path`` (created), held for the ``with`` block; waits
    for another holder. Gives whether the lock is held: where ``fcntl`` does not exist
    (Windows) or the file system has no locks there is none, and the change check of
    :meth:`TuningSession._exclusive` alone guards the history."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield False
        return
    try:
        handle = path.open("a")
    except OSError as exc:
        raise SessionError(f"cannot open the session's lock file {path}: "
                           f"{exc.strerror or exc}") from exc
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as exc:  # a file system without locks (some network mounts)
            logger.debug("no lock on %s (%s); the change check alone guards it", path, exc)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _save_model(model: Model, path: Path) -> None:
    """Write the model whole (no external data) to ``path``; used for a temporary name."""
    import onnx

    onnx.save_model(model.proto, str(path))
