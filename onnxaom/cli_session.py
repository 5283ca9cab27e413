"""The ``onnxaom session`` subcommands: proposals and tuning sessions on the command line.

Registered by :func:`add_parsers` on the main parser's subparsers (see :mod:`onnxaom.cli`, which
prints :class:`~onnxaom.OnnxaomError` messages in one line and exits 1). Handlers return the exit
code. Nothing here imports torch: a session names its runner module in its config and
:func:`onnxaom.tuning.load_runner` imports it when a step has to be run.

::

    onnxaom session show DIR [--json]
    onnxaom session propose STATS.npz [--layers NAME ...] [--strategy paper] [--keep LAYER=N ...]
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

from .errors import StatsError
from .proposal import DEFAULT_STRATEGY, STRATEGIES

__all__ = ["add_parsers", "parse_keep", "parse_override"]

OVERRIDE_ACTIONS = ("keep", "remove", "only")


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
    from .findings import Findings
    from .proposal import override, propose
    from .stats import OccurrenceStats

    stats = OccurrenceStats.load(args.stats)
    findings = Findings.from_json(args.findings) if args.findings else None
    keep: dict[str, int] = dict(parse_keep(k) for k in args.keep or [])
    proposal = propose(stats, findings, layers=args.layers, strategy=args.strategy,
                       keep=keep or None)
    tables: dict[str, dict[str, list[int]]] = {a: {} for a in OVERRIDE_ACTIONS}
    for spec in args.override or []:
        layer, action, indices = parse_override(spec)
        tables[action].setdefault(layer, []).extend(indices)
    if any(tables.values()):
        proposal = override(proposal, keep=tables["keep"], remove=tables["remove"],
                            only=tables["only"])
    if args.output:
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
    from .edits import edits_from_json
    from .proposal import Proposal
    from .session import TuningSession
    from .tuning import apply_step

    path = Path(args.edits)
    text = path.read_text(encoding="utf-8") if path.exists() else None
    if text is None:
        from .errors import ModelFileNotFoundError

        raise ModelFileNotFoundError(f"edits file not found: {path}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StatsError(f"{path} is not JSON: {exc}") from exc
    edits: Any = Proposal.from_dict(data) if isinstance(data, dict) and \
        data.get("format") == "onnxaom.Proposal" else edits_from_json(text)
    session = TuningSession.resume(args.folder)
    runner, _ = _runner(session, args)
    report = apply_step(session, runner, edits, accept_drop=args.accept_drop,
                        relative_to=args.relative_to)
    print(report.line())
    return 0


def _cmd_undo(args: argparse.Namespace) -> int:
    from .session import TuningSession

    session = TuningSession.resume(args.folder)
    undone = session.current.index
    current = session.undo(args.reason)
    print(f"undid step {undone}; current step is {current.index} ({current.label})")
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
    """Register ``session`` (with show, propose, apply, undo, resume) on ``subparsers``."""
    p = subparsers.add_parser(
        "session", help="tuning sessions: propose edits, apply, undo, resume, show history",
        description="The paper's workflow (Fig. 1) as a session kept in a folder: every step's "
        "edits, accuracy, parameters and model files, undoable and resumable.")
    sub = p.add_subparsers(dest="session_command", metavar="ACTION")
    sub.required = True

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
                   help="layers to propose for (default: the conv layers)")
    q.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES,
                   help=f"how kernels are chosen (default {DEFAULT_STRATEGY}; see "
                   f"experiments/RESULTS.md)")
    q.add_argument("--keep", action="append", metavar="LAYER=N",
                   help="keep exactly N kernels of LAYER (repeatable)")
    q.add_argument("--override", action="append", metavar="LAYER:ACTION=INDICES",
                   help="keep / remove these kernels, or keep only these: "
                   "/conv1/Conv:keep=0,3,7 (repeatable)")
    q.add_argument("-o", "--output", metavar="OUT.json", help="write the proposal here")
    q.add_argument("--json", action="store_true", help="print the proposal as JSON")
    q.set_defaults(func=_cmd_propose)

    def training_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--epochs", type=int, help="retraining epochs (default: the session's)")
        q.add_argument("--accept-drop", type=float, metavar="PP",
                       help="undo a step that loses more than PP percentage points of accuracy")
        q.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    q = sub.add_parser("apply", help="apply a reviewed proposal (or edits JSON) as one step")
    q.add_argument("folder", metavar="DIR")
    q.add_argument("edits", metavar="PROPOSAL.json", help="a proposal or a JSON list of edits")
    training_options(q)
    q.add_argument("--relative-to", choices=("baseline", "parent"), default="baseline",
                   help="what --accept-drop compares with (default: the starting model)")
    q.set_defaults(func=_cmd_apply)

    q = sub.add_parser("undo", help="undo the current step (it stays in the history)")
    q.add_argument("folder", metavar="DIR")
    q.add_argument("--reason", help="why (kept in the history)")
    q.set_defaults(func=_cmd_undo)

    q = sub.add_parser("resume", help="continue a session's automatic tuning loop")
    q.add_argument("folder", metavar="DIR")
    training_options(q)
    q.add_argument("--max-steps", type=int, metavar="N", help="stop after N steps")
    q.set_defaults(func=_cmd_resume)
