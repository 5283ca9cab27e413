"""The ``onnxaom session`` subcommands: proposals and tuning sessions on the command line.

Registered by :func:`add_parsers` on the main parser's subparsers (see :mod:`onnxaom.cli`, which
prints :class:`~onnxaom.OnnxaomError` messages in one line and exits 1). Handlers return the exit
code. Nothing here imports torch at import time: a session names its runner module in its config
and :func:`onnxaom.tuning.load_runner` imports it when a step has to be run.

``session start`` is the exception: it builds and trains (or loads) the starting torch module,
so it imports the torch adapter, inside its handler.

::

    onnxaom session start DIR --factory PACKAGE.MODULE:NAME [--factory-kwargs JSON]
                              --data SPEC [--test-data SPEC] [--train-fraction 0.8] [--split-seed 0]
                              (--weights STATE.pt | --train-epochs N)
                              [--epochs 1] [--lr 1e-3] [--batch-size 64] [--seed 0]
                              [--freeze upto] [--device auto] [--exporter legacy] [--opset N]
                              [--loop-layers NAME ...] [--loop-strategy S] [--accept-drop PP] [-q]
    onnxaom session show DIR [--json]
    onnxaom session propose STATS.npz [--layers NAME ...] [--strategy paper] [--keep LAYER=N ...]
                                      [--model MODEL.onnx]
                                      [--override LAYER:keep|remove|only=INDICES ...] [-o OUT]
    onnxaom session apply DIR PROPOSAL.json [--epochs N] [--accept-drop PP]
    onnxaom session undo DIR [--reason TEXT]
    onnxaom session resume DIR [--epochs N] [--accept-drop PP] [--max-steps N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .cli_types import float_from, int_at_least
from .errors import TORCH_INSTALL, DataError, SessionError, StatsError
from .proposal import DEFAULT_STRATEGY, MODEL_STRATEGIES, STRATEGIES

__all__ = ["add_parsers", "parse_keep", "parse_override"]

OVERRIDE_ACTIONS = ("keep", "remove", "only")
#: onnxaom_torch.runner.FREEZE_POLICIES, written out: importing it would import torch (a test
#: checks that the two agree).
FREEZE_CHOICES = ("upto", "edited", "none")
EXPORTERS = ("legacy", "dynamo")


def parse_keep(text: str) -> tuple[str, int]:
    """``"/conv1/Conv=5"`` -> ``("/conv1/Conv", 5)`` (the last ``=`` separates)."""
    layer, sep, count = text.rpartition("=")
    try:
        value = int(count)
    except ValueError:
        value = -1
    if not sep or not layer or value < 1:
        raise StatsError(f"--keep expects LAYER=N with N >= 1, such as /conv1/Conv=5, got "
                         f"{text!r}")
    return layer, value


def parse_override(text: str) -> tuple[str, str, list[int]]:
    """``"/conv1/Conv:keep=0,3,7"`` -> ``("/conv1/Conv", "keep", [0, 3, 7])``."""
    from .cli_surgery import parse_indices

    layer, sep, rest = text.rpartition(":")
    action, eq, indices = rest.partition("=")
    if not sep or not layer or not eq or action not in OVERRIDE_ACTIONS or not indices:
        raise StatsError(f"--override expects LAYER:ACTION=INDICES with ACTION one of "
                         f"{', '.join(OVERRIDE_ACTIONS)}, such as /conv1/Conv:keep=0,3,7, got "
                         f"{text!r}")
    return layer, action, parse_indices(indices)


def _json_object(text: str | None, option: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SessionError(f"{option} is not JSON ({exc}); write an object such as "
                           f"'{{\"image_size\": 8}}'") from exc
    if not isinstance(value, dict):
        raise SessionError(f"{option} must be a JSON object such as '{{\"image_size\": 8}}', "
                           f"got {text!r}")
    return value


def _cmd_start(args: argparse.Namespace) -> int:
    from .session import SESSION_FILE
    from .tuning import load_session_data

    folder = Path(args.folder)
    # TuningSession.create refuses such a folder too, but only once the module is trained;
    # refusing here first makes a wrong DIR cost nothing.
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        what = (f"holds a tuning session (continue it with `onnxaom session resume {folder}`)"
                if (folder / SESSION_FILE).exists() else "exists and is not an empty folder")
        raise SessionError(f"{folder} {what}; a new session needs a new or empty folder")
    kwargs = _json_object(args.factory_kwargs, "--factory-kwargs")
    try:  # the torch adapter, only now: the core never imports torch at import time
        from onnxaom_torch.runner import TorchRunner, build_module
        from onnxaom_torch.train import retrain
    except ImportError as exc:
        raise SessionError(f"session start trains and exports a torch module and needs torch "
                           f"({exc}): {TORCH_INSTALL}") from exc

    # exactly what load_session_data reads back for `session resume` and `session apply`
    data: dict[str, Any] = {"spec": args.data, "train_fraction": args.train_fraction,
                            "seed": args.split_seed}
    if args.test_data is not None:
        data["test_spec"] = args.test_data
    train, test = load_session_data({"data": data})
    data["preprocessing"] = train.preprocessing.to_dict()  # checked when the data is reloaded
    if train.image_shape != test.image_shape:
        raise DataError(f"the training images have shape {train.image_shape} but the test "
                        f"images ({args.test_data}) {test.image_shape}; use test data of the "
                        f"same size and channels")
    try:  # before training: the runner checks its options (a device torch cannot use)
        runner = TorchRunner(train, test, factory=args.factory, factory_kwargs=kwargs,
                             epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                             seed=args.seed, device=args.device, freeze=args.freeze,
                             exporter=args.exporter, opset=args.opset, progress=not args.quiet)
    except ValueError as exc:
        raise SessionError(str(exc)) from exc
    module = build_module(args.factory, kwargs, weights=args.weights,
                          input_shape=(1, *train.image_shape), num_classes=train.num_classes,
                          seed=args.seed)
    if args.train_epochs is not None:
        if args.loop_layers:  # a wrong name fails now, not after the training
            runner.check_loop_layers(module, args.loop_layers)
        module = retrain(module, train, args.train_epochs, lr=args.lr,
                         batch_size=args.batch_size, seed=args.seed, device=args.device,
                         progress=not args.quiet).module
    loop: dict[str, Any] = {}  # tune()'s keyword arguments, as resume_loop reads them
    if args.loop_layers:
        loop["layers"] = list(args.loop_layers)
    if args.loop_strategy is not None:
        loop["strategy"] = args.loop_strategy
    if args.accept_drop is not None:
        loop["accept_drop"] = args.accept_drop
    session = runner.start(folder, module, data=data, loop=loop)
    print(session.format_table())
    print(f"started a tuning session in {session.folder}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .session import TuningSession

    session = TuningSession.resume(args.folder, verify=not args.no_verify)
    if args.json:
        print(json.dumps({"folder": str(session.folder), "current": session.current.index,
                          "steps": [s.to_dict() for s in session.steps],
                          "progress": dict(session.progress)}, indent=2))
    else:
        print(session.format_table())
    return 0


def _cmd_propose(args: argparse.Namespace) -> int:
    from .files import refuse_inputs
    from .findings import Findings
    from .proposal import override, propose
    from .stats import OccurrenceStats

    if args.output:  # before any work; the model's own files are checked once it is loaded
        refuse_inputs(args.output, [args.stats, args.findings, args.model])
    if args.strategy in MODEL_STRATEGIES and not args.model:
        raise StatsError(f"--strategy {args.strategy} reads the next layers' weights: give "
                         f"--model MODEL.onnx (the model the statistics were collected on)")
    stats = OccurrenceStats.load(args.stats)
    findings = Findings.from_json(args.findings) if args.findings else None
    keep: dict[str, int] = dict(parse_keep(k) for k in args.keep or [])
    model = None
    if args.model:
        from .model import load

        model = load(args.model)
    proposal = propose(stats, findings, layers=args.layers, strategy=args.strategy,
                       keep=keep or None, model=model)
    tables: dict[str, dict[str, list[int]]] = {a: {} for a in OVERRIDE_ACTIONS}
    for spec in args.override or []:
        layer, action, indices = parse_override(spec)
        tables[action].setdefault(layer, []).extend(indices)
    if any(tables.values()):
        proposal = override(proposal, keep=tables["keep"], remove=tables["remove"],
                            only=tables["only"], model=model)
    if args.output:
        refuse_inputs(args.output, [args.stats, args.findings,
                                    *(model.protected if model is not None else ())])
        proposal.to_json(args.output)
    if args.json:
        print(json.dumps(proposal.to_dict(), indent=2))
    else:
        for line in proposal.summary_lines():
            print(line)
        if args.output:
            print(f"wrote {args.output}")
    return 0


def _runner(session: Any, args: argparse.Namespace) -> Any:
    from .tuning import load_runner, load_session_data

    train, test = load_session_data(session.config)
    runner = load_runner(session, train, test, epochs=args.epochs,
                         progress=not args.quiet)
    return runner, train


def _cmd_apply(args: argparse.Namespace) -> int:
    from .edits import edits_from_data
    from .files import read_json
    from .proposal import Proposal
    from .session import TuningSession
    from .tuning import apply_step

    data = read_json(args.edits, "edits")  # a folder, bytes that are not UTF-8: one line
    edits: Any = Proposal.from_dict(data) if isinstance(data, dict) and \
        data.get("format") == "onnxaom.Proposal" else edits_from_data(data)
    session = TuningSession.resume(args.folder)
    runner, _ = _runner(session, args)
    drop = args.accept_drop if args.accept_drop is not None else \
        (session.config.get("loop") or {}).get("accept_drop")  # the session's, if it set one
    report = apply_step(session, runner, edits, accept_drop=drop, relative_to=args.relative_to)
    print(report.line())
    return 0


def _cmd_undo(args: argparse.Namespace) -> int:
    from .session import TuningSession

    # undo verifies the steps it goes back to: a damaged file of the step undone (or of
    # another branch) is no reason to refuse the way out of it
    session = TuningSession.resume(args.folder, verify=False)
    undone = session.current
    current = session.undo(args.reason)
    print(f"undid step {undone.index}; current step is {current.index} ({current.label})")
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from .session import TuningSession
    from .tuning import resume_loop

    session = TuningSession.resume(args.folder)
    runner, train = _runner(session, args)
    reports = resume_loop(session, runner, train, accept_drop=args.accept_drop,
                          max_steps=args.max_steps, progress=not args.quiet)
    for report in reports:
        print(report.line())
    if not reports:
        print("nothing left to do: every layer of the loop is done")
    print(session.format_table())
    return 0


def add_parsers(subparsers: Any) -> None:
    """Register ``session`` (with start, show, propose, apply, undo, resume) on
    ``subparsers``."""
    p = subparsers.add_parser(
        "session", help="tuning sessions: start, propose edits, apply, undo, resume, show "
        "history",
        description="The paper's workflow (Fig. 1) as a session kept in a folder: every step's "
        "edits, accuracy, parameters and model files, undoable and resumable.")
    sub = p.add_subparsers(dest="session_command", metavar="ACTION")
    sub.required = True

    q = sub.add_parser(
        "start", help="start a session from a torch module (needs onnxaom[torch])",
        description="Build the starting module with --factory, load its --weights or train it "
        "from scratch for --train-epochs epochs, export and evaluate it, and record it as step "
        "0 of a new session in DIR, with everything `session resume` and `session apply` need "
        "to continue without Python.")
    q.add_argument("folder", metavar="DIR", help="the session folder (new, or empty)")
    q.add_argument("--factory", required=True, metavar="PACKAGE.MODULE:NAME",
                   help="what builds the architecture, such as "
                   "onnxaom_torch.architectures:PaperMNISTNet")
    q.add_argument("--factory-kwargs", metavar="JSON",
                   help='its keyword arguments, such as \'{"image_size": 8}\'')
    q.add_argument("--data", required=True, metavar="SPEC",
                   help="the labelled data, as for `onnxaom analyze` (digits, digits:SIZE, "
                   "fashion-mnist:train, npz:PATH, ...)")
    q.add_argument("--test-data", metavar="SPEC",
                   help="test data (default: split off --data)")
    q.add_argument("--train-fraction", type=float, default=0.8, metavar="F",
                   help="share of --data used for training, the rest tests (default 0.8)")
    q.add_argument("--split-seed", type=int_at_least(0), default=0, metavar="N",
                   help="seed of the stratified split (default 0)")
    source = q.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", metavar="STATE.pt",
                        help="the trained module's state dict (torch.save(module.state_dict(), "
                        "path))")
    source.add_argument("--train-epochs", type=int_at_least(1), metavar="N",
                        help="train the module from scratch for N epochs (initialised and "
                        "trained with --seed, --lr, --batch-size)")
    q.add_argument("--lr", type=float_from(0.0, strict=True), default=1e-3, metavar="LR",
                   help="learning rate (default 1e-3)")
    q.add_argument("--batch-size", type=int_at_least(1), default=64, metavar="N",
                   help="training batch size (default 64)")
    q.add_argument("--seed", type=int_at_least(0), default=0, metavar="N",
                   help="training seed; step i retrains with seed + i (default 0)")
    q.add_argument("--freeze", choices=FREEZE_CHOICES, default="upto",
                   help="layers kept as they are while a step retrains (default upto: every "
                   "layer up to the last edited one, as in the paper)")
    q.add_argument("--device", default="auto",
                   help="torch device (default auto: CUDA when available)")
    q.add_argument("--exporter", choices=EXPORTERS, default="legacy",
                   help="torch's ONNX exporter (default legacy)")
    q.add_argument("--opset", type=int_at_least(7), default=None, metavar="N",
                   help="ONNX opset of the exported models (default 17 with the legacy "
                        "exporter, 18 with dynamo)")
    q.add_argument("--loop-layers", nargs="+", metavar="NAME",
                   help="layers `session resume` tunes, in this order (default: the conv layers)")
    q.add_argument("--loop-strategy", choices=STRATEGIES, metavar="S",
                   help=f"how `session resume` chooses kernels: {', '.join(STRATEGIES)} (default "
                   f"{DEFAULT_STRATEGY})")
    _training_options(q, epochs_default=1, drop_help="`session resume` undoes a step that "
                      "loses more than PP percentage points of accuracy (default 1)")
    q.set_defaults(func=_cmd_start)

    q = sub.add_parser("show", help="print a session's history table")
    q.add_argument("folder", metavar="DIR")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--no-verify", action="store_true",
                   help="do not check the model files' checksums")
    q.set_defaults(func=_cmd_show)

    q = sub.add_parser(
        "propose", help="propose kernels to remove from statistics (prints / writes JSON)",
        description="Drop ineffective kernels and keep the most selective kernel of each "
        "redundant group (strategy paper), or rank by another strategy; --keep sets a kernel "
        "count, --override changes single decisions.")
    q.add_argument("stats", metavar="STATS.npz", help="statistics from `onnxaom analyze`")
    q.add_argument("--findings", metavar="FINDINGS.json",
                   help="findings to use (default: computed from the statistics)")
    q.add_argument("--layers", nargs="+", metavar="NAME",
                   help="layers to propose for (default: those of --keep, else the conv layers)")
    q.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES,
                   help=f"how kernels are chosen (default {DEFAULT_STRATEGY}; see "
                   f"experiments/RESULTS.md)")
    q.add_argument("--keep", action="append", metavar="LAYER=N",
                   help="keep exactly N kernels of LAYER (repeatable)")
    q.add_argument("--model", metavar="MODEL.onnx",
                   help="the model the statistics come from (strategies usage and auto read "
                   "its weights; without it auto is clusters)")
    q.add_argument("--override", action="append", metavar="LAYER:ACTION=INDICES",
                   help="keep / remove these kernels, or keep only these: "
                   "/conv1/Conv:keep=0,3,7 (repeatable)")
    q.add_argument("-o", "--output", metavar="OUT.json", help="write the proposal here")
    q.add_argument("--json", action="store_true", help="print the proposal as JSON")
    q.set_defaults(func=_cmd_propose)

    q = sub.add_parser("apply", help="apply a reviewed proposal (or edits JSON) as one step")
    q.add_argument("folder", metavar="DIR")
    q.add_argument("edits", metavar="PROPOSAL.json", help="a proposal or a JSON list of edits")
    _training_options(q, drop_help="undo the step if it loses more than PP percentage points "
                      "of accuracy (default: the session's --accept-drop, if it was started "
                      "with one; else the step is kept)")
    q.add_argument("--relative-to", choices=("baseline", "parent"), default="baseline",
                   help="what --accept-drop compares with (default: the starting model)")
    q.set_defaults(func=_cmd_apply)

    q = sub.add_parser("undo", help="undo the current step (it stays in the history)")
    q.add_argument("folder", metavar="DIR")
    q.add_argument("--reason", help="why (kept in the history)")
    q.set_defaults(func=_cmd_undo)

    q = sub.add_parser("resume", help="continue a session's automatic tuning loop")
    q.add_argument("folder", metavar="DIR")
    _training_options(q, drop_help="undo a step that loses more than PP percentage points of "
                      "accuracy (default: the session's --accept-drop, else 1)")
    q.add_argument("--max-steps", type=int_at_least(1), metavar="N",
                   help="stop after N steps (at least 1)")
    q.set_defaults(func=_cmd_resume)


def _training_options(q: argparse.ArgumentParser, epochs_default: int | None = None,
                      drop_help: str = "undo a step that loses more than PP percentage points "
                      "of accuracy (default: the session's)") -> None:
    """--epochs, --accept-drop and --quiet, validated alike for start, apply and resume
    (``None`` defaults: the session's values)."""
    q.add_argument("--epochs", type=int_at_least(0), default=epochs_default, metavar="N",
                   help="retraining epochs after each step (default: "
                   + (f"{epochs_default})" if epochs_default is not None else "the session's)"))
    q.add_argument("--accept-drop", type=float_from(0.0, strict=False), metavar="PP",
                   help=drop_help)
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
