"""The tuning loop of the paper's workflow (Fig. 1): analyse, propose, edit, retrain, evaluate,
undo an edit that costs too much accuracy, repeat.

session (history) + runner (framework) -> **loop**. The loop is framework-free: a *runner*
(protocol :class:`Runner`; the torch one is :class:`onnxaom_torch.TorchRunner`) turns the current
step's model and a list of edits into a retrained, evaluated model; this module decides what to
edit and whether to keep it.

* :func:`apply_step`: one step with given edits (a designer's, or a reviewed proposal); undone
  when accuracy drops more than ``accept_drop`` percentage points below the reference (the
  starting model, or with ``relative_to="parent"`` the step it started from).
* :func:`tune`: the automatic loop, layer by layer from the first to the last (the paper's order):
  statistics of the layer on the current model (:func:`onnxaom.collect`), findings,
  :func:`onnxaom.proposal.propose`, :func:`apply_step`. Its place is kept in the session's
  ``progress`` after every layer, and each step it makes names its layer (``info["loop_layer"]``),
  so a crashed or interrupted loop continues where it stopped (:func:`resume_loop`) without
  editing a layer twice; a step recorded just before a crash is judged (kept or undone) then.
  The loop names layers as the starting model does; in a later step's model a layer is found
  by the name of its weight tensor (the framework's parameter name, e.g. ``conv2.weight``),
  because exporters that number node names (``node_conv2d_1``) shift them when a layer is
  inserted; exporter-made weight names (``onnx::Conv_23``) fall back to the node name.

A session made for the command line stores in its ``config``:
``"runner": {"module": "onnxaom_torch.runner", ...}`` (a module with a
``runner_from_session(session, train, test, **overrides)`` function), ``"data"``:
``{"spec": "digits", "train_fraction": 0.8, "seed": 0}`` (:func:`load_session_data`) and
``"loop"``: the keyword arguments of :func:`tune`.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .data import Dataset, load_spec
from .edits import Edit
from .errors import TORCH_INSTALL, DataError, EditError, LayerNotFoundError
from .model import Model
from .proposal import DEFAULT_STRATEGY, Proposal, propose
from .session import Artifact, SessionError, Step, TuningSession, describe_edits
from .stats import OccurrenceStats

__all__ = [
    "RELATIVE_TO",
    "Runner",
    "StepOutcome",
    "StepReport",
    "apply_step",
    "load_runner",
    "load_session_data",
    "resume_loop",
    "tune",
]

logger = logging.getLogger(__name__)

RELATIVE_TO = ("baseline", "parent")


@dataclass(frozen=True, eq=False)
class StepOutcome:
    """What a runner returns for one step: the edited (and retrained) model, its accuracy
    (overall, per class), its own files and facts (JSON) to keep with the step."""

    model: Model
    accuracy: float | None
    per_class: Sequence[float | None] = ()
    files: Mapping[str, Artifact] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)


class Runner(Protocol):
    """Applies edits to the current step's model, retrains and evaluates it."""

    def run(self, session: TuningSession, edits: Sequence[Edit]) -> StepOutcome:
        """Edit the model of ``session.current`` (and whatever the runner keeps beside it)."""
        ...

    def forget(self, step: int) -> None:
        """Drop anything cached for ``step`` (called after it is undone)."""
        ...


@dataclass(frozen=True)
class StepReport:
    """One step of a loop: the recorded step, whether it was kept, the accuracy change in
    percentage points against the reference (negative: a drop), and the proposal (if any)."""

    step: Step
    kept: bool
    change_pp: float | None
    proposal: Proposal | None = None

    def line(self) -> str:
        change = "-" if self.change_pp is None else f"{self.change_pp:+.2f} pp"
        acc = "-" if self.step.accuracy is None else f"{100 * self.step.accuracy:.2f}%"
        verdict = "kept" if self.kept else f"undone ({self.step.undo_reason})"
        return (f"step {self.step.index}: {self.step.label}: accuracy {acc} ({change}), "
                f"params {self.step.params:,}: {verdict}")


def _check_drop(accept_drop: float | None, relative_to: str) -> None:
    if relative_to not in RELATIVE_TO:
        raise SessionError(f"relative_to must be one of {', '.join(RELATIVE_TO)}, got "
                           f"{relative_to!r}")
    if accept_drop is not None and (isinstance(accept_drop, bool)
                                    or not isinstance(accept_drop, int | float)
                                    or not math.isfinite(accept_drop) or accept_drop < 0):
        raise SessionError(f"accept_drop must be a number of percentage points >= 0 (or None "
                           f"to keep every step), got {accept_drop!r}")


def apply_step(
    session: TuningSession,
    runner: Runner,
    edits: Iterable[Edit] | Proposal,
    *,
    stats: OccurrenceStats | None = None,
    accept_drop: float | None = None,
    relative_to: str = "baseline",
    label: str | None = None,
    info: Mapping[str, Any] | None = None,
) -> StepReport:
    """Apply ``edits`` to the current step through ``runner`` and record the step; undo it when
    accuracy falls more than ``accept_drop`` percentage points below the reference.

    ``stats``: the statistics the edits were chosen from; they must be of the current step's
    model (checked through their ``model_digest``), and their digest is recorded. ``info`` is
    kept with the step, beside what the runner reports.
    """
    _check_drop(accept_drop, relative_to)
    proposal = edits if isinstance(edits, Proposal) else None
    edit_list = list(edits)
    if not edit_list:
        raise SessionError("no edits to apply (the proposal removes nothing)")
    parent = session.current
    digest = None
    if proposal is not None and proposal.model_digest not in (None, parent.model_digest):
        applied = _applied_as(session, proposal)
        if applied is not None:  # the usual case: a command re-run after it was cut short
            undone = " (then undone)" if applied.status == "undone" else ""
            raise SessionError(
                f"this proposal was applied already: step {applied.index}{undone}, made from "
                f"step {applied.parent}; the current step is {parent.index}. To go on, collect "
                f"statistics on the current step's model and propose again")
        raise SessionError(f"the proposal was made for another model (digest "
                           f"{str(proposal.model_digest)[:12]}), not for the current step "
                           f"{parent.index} ({parent.model_digest[:12]}); collect statistics on "
                           f"the current model and propose again")
    if stats is not None:
        made_for = stats.metadata.get("model_digest")
        if made_for not in (None, parent.model_digest):
            raise SessionError(f"the statistics were collected on another model (digest "
                               f"{str(made_for)[:12]}), not on the current step {parent.index} "
                               f"({parent.model_digest[:12]})")
        digest = stats.digest
    elif proposal is not None:
        digest = proposal.stats_digest
    outcome = runner.run(session, edit_list)
    facts = {**dict(outcome.info), **dict(info or {})}
    if proposal is not None:
        facts["proposal"] = proposal.to_dict()
    change, reason = _verdict(session, parent, outcome.accuracy, accept_drop, relative_to)
    # judged before it is recorded: a rejected step is written undone, in the same write
    step = session.record(edit_list, outcome.model, accuracy=outcome.accuracy,
                          per_class=outcome.per_class, files=outcome.files,
                          stats_digest=digest, label=label or describe_edits(edit_list),
                          info=facts, undone=reason)
    if reason is not None:
        runner.forget(step.index)
    return StepReport(step, reason is None, change, proposal)


def _applied_as(session: TuningSession, proposal: Proposal) -> Step | None:
    """The latest step that applied ``proposal`` (recorded in its info) to the model the
    proposal was made for; None when there is none."""
    wanted = json.loads(json.dumps(proposal.to_dict()))
    for step in reversed(session.steps):
        parent = session.step(step.parent) if step.parent is not None else None
        if parent is not None and parent.model_digest == proposal.model_digest \
                and json.loads(json.dumps(step.info.get("proposal"))) == wanted:
            return step
    return None


def _verdict(session: TuningSession, parent: Step, accuracy: float | None,
             accept_drop: float | None, relative_to: str) -> tuple[float | None, str | None]:
    """The change in pp of a step made from ``parent`` with ``accuracy`` against the reference,
    and why it is to be undone (None: kept)."""
    reference = session.baseline if relative_to == "baseline" else parent
    change = None
    if accuracy is not None and reference.accuracy is not None:
        change = 100.0 * (accuracy - reference.accuracy)
    if accept_drop is not None and change is not None and -change > accept_drop + 1e-9:
        return change, (f"accuracy {-change:.2f} pp below the {relative_to} "
                        f"(more than {accept_drop:g} pp)")
    return change, None


def _judge(session: TuningSession, runner: Runner, step: Step, accept_drop: float | None,
           relative_to: str) -> StepReport:
    """Undo ``step`` (the current one) if it lost more than ``accept_drop`` pp: for a loop
    step recorded applied and never judged (written by a version that judged steps after
    recording them, and cut short in between)."""
    parent = session.step(step.parent) if step.parent is not None else step
    change, reason = _verdict(session, parent, step.accuracy, accept_drop, relative_to)
    if reason is not None:
        session.undo(reason)
        runner.forget(step.index)
        step = session.step(step.index)
    return StepReport(step, reason is None, change, None)


def _layer_names(model: Model, wanted: Sequence[str] | None) -> list[str]:
    layers = model.layers()
    if wanted is None:
        return [layer.name for layer in layers if layer.op == "Conv"]
    known = {layer.name for layer in layers}
    missing = [n for n in wanted if n not in known]
    if missing:
        raise LayerNotFoundError(f"the model has no layer {missing[0]!r}; its layers: "
                                 f"{', '.join(layer.name for layer in layers)}")
    return list(wanted)


def _weight_keys(model: Model, names: Sequence[str]) -> dict[str, str]:
    """The name of each layer's weight tensor: the identity of a layer across re-exports.
    Exporters number their node names (the dynamo exporter's ``node_conv2d_1``), so an
    inserted layer shifts them; the weights keep the framework's parameter name
    (``conv2.weight``)."""
    nodes = {layer.name: model.proto.graph.node[layer.node_index] for layer in model.layers()}
    return {name: nodes[name].input[1] for name in names
            if name in nodes and len(nodes[name].input) > 1}


def _generated(key: str) -> bool:
    """Whether a weight name was made up by the exporter (``onnx::Conv_23``, ``val_4``, a
    number), so that it says nothing about which layer it belongs to."""
    return key.startswith("onnx::") or key.startswith("val_") or key.isdigit()


def _unwrapped(key: str) -> str:
    """A weight name without the ``.body`` scopes an insertion adds right before the
    parameter where it wraps a layer whose ReLU is functional (the torch adapter's
    ``Sequential(body=layer, act, deep)``): ``conv1.body.weight`` is ``conv1.weight``, and a
    module really named ``body`` elsewhere (``body.conv1.weight``) stays as it is."""
    *path, param = key.split(".")
    while path and path[-1] == "body" and len(path) > 1:
        path.pop()
    return ".".join([*path, param])


def _current_name(model: Model, name: str, key: str | None) -> str | None:
    """The name, in ``model``, of the loop layer called ``name`` in the starting model whose
    weight was ``key``; None when it is gone."""
    layers = model.layers()
    if key is None or _generated(key):
        return name if any(layer.name == name for layer in layers) else None
    found = _weight_keys(model, [layer.name for layer in layers])
    same = [n for n, k in found.items() if k == key]
    if not same:  # an insertion may have wrapped the layer's module as <path>.body
        same = [n for n, k in found.items() if _unwrapped(k) == _unwrapped(key)]
    if name in same:
        return name
    if len(same) == 1:
        if same[0] != name:
            logger.info("layer %s of the starting model (weight %s) is now %s", name, key,
                        same[0])
        return same[0]
    return None


def tune(
    session: TuningSession,
    runner: Runner,
    data: Dataset,
    *,
    layers: Sequence[str] | None = None,
    strategy: str = DEFAULT_STRATEGY,
    keep: Mapping[str, int] | None = None,
    accept_drop: float | None = 1.0,
    relative_to: str = "baseline",
    max_steps: int | None = None,
    batch_size: int = 256,
    provider: str = "auto",
    progress: bool = True,
) -> list[StepReport]:
    """The automatic loop (see the module docstring); returns the steps it made.

    Parameters
    ----------
    data:
        The labelled data the statistics are collected on (the paper: the training set).
    layers:
        Layer names of the starting model, tuned in this order; default: its conv layers.
    strategy, keep:
        As for :func:`onnxaom.proposal.propose` (``keep``: target kernel counts per layer).
    accept_drop:
        Percentage points of accuracy a step may lose against the reference before it is
        undone; None keeps every step.
    relative_to:
        ``"baseline"`` (the starting model, default) or ``"parent"`` (the step before).
    max_steps:
        Stop after this many steps (kept or undone) in this call.

    A layer whose proposed removal the surgery refuses (a constant read by a padded conv, a
    channel shuffle) is skipped with a warning and counted as done; the session's progress
    keeps why under ``"refused"``.
    """
    return _tune(session, runner, data, layers=layers, strategy=strategy, keep=keep,
                 accept_drop=accept_drop, kept_drop=accept_drop, relative_to=relative_to,
                 max_steps=max_steps, batch_size=batch_size, provider=provider,
                 progress=progress)


def _tune(session: TuningSession, runner: Runner, data: Dataset, *,
          layers: Sequence[str] | None, strategy: str, keep: Mapping[str, int] | None,
          accept_drop: float | None, kept_drop: float | None, relative_to: str,
          max_steps: int | None, batch_size: int, provider: str,
          progress: bool) -> list[StepReport]:
    """:func:`tune`, judging with ``accept_drop`` and keeping ``kept_drop`` in the session's
    progress (a resume's one-off ``--accept-drop`` is not the session's)."""
    _check_drop(accept_drop, relative_to)
    _check_drop(kept_drop, relative_to)
    if not isinstance(data, Dataset):
        raise DataError(f"tune() collects statistics from an onnxaom Dataset, got "
                        f"{type(data).__name__}")
    state = dict(session.progress)
    start = session.model(0)
    start_kernels = {layer.name: layer.kernels for layer in start.layers()}
    if layers is not None or not state.get("layers"):
        order = _layer_names(start, layers)
        weights = _weight_keys(start, order)
    else:
        order = [str(n) for n in state["layers"]]
        weights = {str(k): str(v) for k, v in dict(state.get("weights") or {}).items()}
    done = list(state.get("done", []))
    state.update({"layers": order, "weights": weights, "done": done, "strategy": strategy,
                  "keep": dict(keep or {}), "accept_drop": kept_drop,
                  "relative_to": relative_to})
    session.model()  # the current step's model checked before anything is written
    if state != dict(session.progress):  # a damaged folder is named, not rewritten
        session.set_progress(state)
    reports: list[StepReport] = []
    made_now = 0
    from .collect import collect

    for name in order:
        if name in done:
            continue
        made = [s for s in session.steps if s.info.get("loop_layer") == name]
        if made:  # interrupted after the step was recorded: settle it, don't edit twice
            last = made[-1]
            if last.index == session.current.index and last.applied:
                reports.append(_judge(session, runner, last, accept_drop, relative_to))
            done.append(name)
            session.set_progress({**state, "done": done})
            continue
        if max_steps is not None and made_now >= max_steps:
            break
        model = session.model()
        current = _current_name(model, name, weights.get(name))
        if current is None:
            logger.warning("layer %s is gone from the current model; skipped", name)
            done.append(name)
            session.set_progress({**state, "done": done})
            continue
        if keep and name in keep:
            now = next(layer.kernels for layer in model.layers() if layer.name == current)
            if now <= keep[name] < start_kernels.get(name, 0):
                # an earlier step shrank it with a layer it is coupled to
                logger.info("layer %s has %d kernels, at most its target %d (an earlier step "
                            "removed kernels of a layer coupled to it); skipped", name, now,
                            keep[name])
                done.append(name)
                session.set_progress({**state, "done": done})
                continue
        stats = collect(model, data, layers=[current], batch_size=batch_size,
                        provider=provider, progress=progress)
        target = {current: keep[name]} if keep and name in keep else None
        proposal = propose(stats, layers=[current], strategy=strategy, keep=target, model=model)
        if not len(proposal):
            logger.info("layer %s: nothing to remove", current)
        else:
            try:
                report = apply_step(session, runner, proposal, stats=stats,
                                    accept_drop=accept_drop, relative_to=relative_to,
                                    info={"loop_layer": name})
            except EditError as exc:  # raised before any step is recorded
                logger.warning("layer %s skipped: the surgery refuses its proposed removal: %s",
                               current, exc)
                refused = {**dict(state.get("refused") or {}), name: str(exc)}
                state["refused"] = refused
            else:
                reports.append(report)
                made_now += 1
                logger.info("%s", report.line())
        done.append(name)
        session.set_progress({**state, "done": done})
    return reports


def resume_loop(session: TuningSession, runner: Runner, data: Dataset, *,
                accept_drop: float | None = None, max_steps: int | None = None,
                progress: bool = True) -> list[StepReport]:
    """Continue :func:`tune` with the settings kept in the session; ``accept_drop`` changes the
    drop allowed in this call only (the session keeps its own); layers already done are
    skipped."""
    state = dict(session.progress)
    loop = dict(session.config.get("loop") or {})
    strategy = str(state.get("strategy", loop.get("strategy", DEFAULT_STRATEGY)))
    keep = {str(k): int(v) for k, v in (state.get("keep", loop.get("keep")) or {}).items()} \
        or None  # session.json may write 5 as 5.0
    relative_to = str(state.get("relative_to", loop.get("relative_to", "baseline")))
    layers = state.get("layers", loop.get("layers"))
    kept = state.get("accept_drop", loop.get("accept_drop", 1.0))
    return _tune(session, runner, data, layers=layers, strategy=strategy, keep=keep,
                 accept_drop=accept_drop if accept_drop is not None else kept, kept_drop=kept,
                 relative_to=relative_to, max_steps=max_steps,
                 batch_size=int(loop.get("batch_size", 256)),
                 provider=str(loop.get("provider", "auto")), progress=progress)


def load_session_data(config: Mapping[str, Any]) -> tuple[Dataset, Dataset]:
    """(train, test) from a session config's ``"data"``: ``spec`` (a CLI data spec, e.g.
    ``"digits"``), ``train_fraction`` (stratified split, default 0.8), ``seed`` (default 0).
    With ``test_spec`` the test set is loaded from it instead of split off. With
    ``preprocessing`` (what ``session start`` recorded), the spec must still load with it: a
    :class:`SessionError` otherwise, rather than retraining on other pixel values."""
    data = config.get("data")
    if not isinstance(data, Mapping) or not isinstance(data.get("spec"), str):
        raise SessionError("this session's config has no data spec (it was started from Python "
                           "with in-memory data); resume it from Python, giving the runner its "
                           "data")
    full = load_spec(data["spec"])
    recorded = data.get("preprocessing")
    if recorded is not None and recorded != full.preprocessing.to_dict():
        raise SessionError(
            f"data spec {data['spec']!r} now loads with preprocessing "
            f"{full.preprocessing.to_dict()}, but this session was made with {recorded}: its "
            f"models were trained on other pixel values; load the data in Python with "
            f"Preprocessing(**recorded) and resume from there")
    if isinstance(data.get("test_spec"), str):
        return full, load_spec(data["test_spec"])
    return full.split(float(data.get("train_fraction", 0.8)), seed=int(data.get("seed", 0)))


def load_runner(session: TuningSession, train: Dataset, test: Dataset,
                **overrides: Any) -> Runner:
    """The runner named in the session's config (``config["runner"]["module"]``, a module with
    ``runner_from_session(session, train, test, **overrides)``)."""
    spec = session.config.get("runner")
    module_name = spec.get("module") if isinstance(spec, Mapping) else None
    if not isinstance(module_name, str):
        raise SessionError("this session's config names no runner module; resume it from "
                           "Python with the runner that made it")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SessionError(f"this session needs runner module {module_name!r}, which cannot be "
                           f"imported ({exc}); for the torch runner: {TORCH_INSTALL}") from exc
    factory = getattr(module, "runner_from_session", None)
    if factory is None:
        raise SessionError(f"runner module {module_name!r} has no runner_from_session()")
    runner = factory(session, train, test, **overrides)
    return runner  # type: ignore[no-any-return]
