"""The surgery subcommands of the ``onnxaom`` command line: prune, widen, deepen, summary.

Registered by :func:`add_parsers` on the main parser's subparsers (see :mod:`onnxaom.cli`,
which prints :class:`~onnxaom.OnnxaomError` messages in one line and exits 1). Handlers return
the exit code. They never overwrite the input model (or its external data) and write the
result atomically through :meth:`onnxaom.Model.save`.

::

    onnxaom prune MODEL --remove /conv1/Conv:0,3,5 [--remove ...] -o OUT [--coupled refuse]
    onnxaom prune MODEL --proposal PROPOSAL.json -o OUT
    onnxaom widen MODEL --layer conv1 --add 4 [--init net2net|random|zeros] -o OUT
    onnxaom deepen MODEL --after conv2 [--kernel-size 3] [--init identity|random] -o OUT
    onnxaom summary MODEL [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_types import float_from, int_at_least
from .edits import (
    COUPLED_MODES,
    INSERT_INITS,
    WIDEN_INITS,
    Edit,
    InsertLayer,
    RemoveKernels,
    WidenLayer,
)
from .errors import EditError, ModelError

if TYPE_CHECKING:
    from .model import Model

__all__ = ["add_parsers", "parse_indices", "parse_removal"]


#: More kernel indices than any layer has: a range beyond it is a typo, refused before it is
#: expanded into a list.
MAX_INDICES = 1 << 20


def parse_indices(text: str) -> list[int]:
    """``"0,3,5"`` or ``"0-3,7"`` -> ``[0, 3, 5]`` / ``[0, 1, 2, 3, 7]``."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                low, high = part.split("-", 1)
                first, last = int(low), int(high)
                if last < first:
                    raise ValueError
                if last - first >= MAX_INDICES:
                    raise EditError(f"range {part!r} in {text!r} names {last - first + 1:,} "
                                    f"kernels; no layer has more than {MAX_INDICES:,}")
                out.extend(range(first, last + 1))
            else:
                out.append(int(part))
                if out[-1] < 0:
                    raise EditError(f"bad kernel index {part!r} in {text!r}: indices count "
                                    f"from 0 (the first kernel)")
        except EditError:
            raise
        except ValueError:
            raise EditError(f"bad kernel index {part!r} in {text!r}; write indices like "
                            f"0,3,5 or ranges like 0-7") from None
    return out


def parse_removal(text: str) -> tuple[str, list[int]]:
    """``"conv1:0,3,5"`` -> ``("conv1", [0, 3, 5])`` (the last ``:`` separates)."""
    layer, sep, indices = text.rpartition(":")
    if not sep or not layer or not indices:
        raise EditError(f"--remove expects LAYER:INDICES such as /conv1/Conv:0,3,5 (a layer name "
                        f"as `onnxaom layers MODEL` lists it), got {text!r}")
    return layer, parse_indices(indices)


def _output_path(model_path: str, output: str) -> Path:
    source, out = Path(model_path).resolve(), Path(output).resolve()
    if out == source:
        raise ModelError(f"refusing to overwrite the input model {model_path}; choose another "
                         f"output path with -o")
    if out == source.with_name(source.name + ".data") or out.with_name(out.name + ".data") in (
            source, source.with_name(source.name + ".data")):
        raise ModelError(f"output {output} would overwrite the input model's files; choose "
                         f"another name")
    return Path(output)


def _run(args: argparse.Namespace, edits: list[Edit] | Callable[[Model], list[Edit]]) -> int:
    """Apply ``edits`` (or the edits a function makes for the loaded model) to ``args.model``,
    write ``args.output`` and print what changed."""
    from .model import load
    from .summary import summary
    from .surgery import apply

    out = _output_path(args.model, args.output)
    model = load(args.model)
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    model.check_output(out, external)  # its external data too, before the edit's work
    before = summary(model)
    new = apply(model, edits if isinstance(edits, list) else edits(model))
    new.save(out, external_data=external)
    after = summary(new)
    old_rows = {row.name: row for row in before.layers}
    for row in after.layers:
        old = old_rows.get(row.name)
        if old is None:
            print(f"  {row.name}: new layer, {row.kernels} kernels")
        elif old.kernels != row.kernels:
            print(f"  {row.name}: {old.kernels} -> {row.kernels} kernels")
    print(f"params {before.total_params:,} -> {after.total_params:,}, MACs/sample "
          f"{before.total_macs:,} -> {after.total_macs:,}")
    print(f"wrote {out}")
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    if args.proposal is not None:
        return _run(args, lambda model: _proposal_edits(args.proposal, model, args.coupled))
    edits: list[Edit] = []
    for spec in args.remove:
        layer, kernels = parse_removal(spec)
        edits.append(RemoveKernels(layer, tuple(kernels), args.coupled))
    return _run(args, edits)


def _proposal_edits(path: str, model: Model, coupled: str) -> list[Edit]:
    """The removals of the proposal in ``path`` (``session propose -o``), for ``model``: the
    model its statistics were collected on (by digest), refused for any other."""
    from .proposal import Proposal

    proposal = Proposal.from_json(path)
    if proposal.model_digest not in (None, model.source_digest):
        raise EditError(f"--proposal {path} was made for another model "
                        f"({str(proposal.model_digest)[:12]}...) than {model.name} "
                        f"({model.source_digest[:12]}...); propose from statistics of this model")
    if not proposal.edits:
        raise EditError(f"--proposal {path} removes no kernels; nothing to prune")
    return [dataclasses.replace(edit, coupled=coupled) for edit in proposal.edits]


def _cmd_widen(args: argparse.Namespace) -> int:
    sources = None if args.sources is None else tuple(parse_indices(args.sources))
    return _run(args, [WidenLayer(args.layer, args.add, init=args.init, sources=sources,
                                  seed=args.seed, noise=args.noise, coupled=args.coupled)])


def _cmd_deepen(args: argparse.Namespace) -> int:
    return _run(args, [InsertLayer(args.after, kernel_size=args.kernel_size, init=args.init,
                                   name=args.name, seed=args.seed)])


def _cmd_summary(args: argparse.Namespace) -> int:
    from .model import load
    from .summary import summary

    result = summary(load(args.model))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.format_table())
    return 0


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model file (not modified)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="where to write the edited model (must differ from MODEL)")
    p.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto",
                   help="write weights to OUT.data: as the input does (auto), always, never")


def add_parsers(subparsers: Any) -> None:
    """Register ``prune``, ``widen``, ``deepen`` and ``summary`` on ``subparsers`` (the object
    ``ArgumentParser.add_subparsers`` returns)."""
    p = subparsers.add_parser(
        "prune", help="remove kernels from layers (task 1)",
        description="Remove kernels (output channels / neurons) and everything that depends "
        "on them. Indices refer to the input model. Channels coupled by a residual Add go "
        "from every coupled layer unless --coupled refuse.",
    )
    _add_output(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--remove", action="append", metavar="LAYER:INDICES",
                      help="LAYER:INDICES with LAYER as `onnxaom layers MODEL` names it, e.g. "
                           "/conv1/Conv:0,3,5 or /conv2/Conv:0-7 (repeatable)")
    what.add_argument("--proposal", metavar="PROPOSAL.json",
                      help="remove what a reviewed proposal removes (`onnxaom session propose "
                           "STATS.npz --model MODEL -o PROPOSAL.json`; made for MODEL)")
    p.add_argument("--coupled", choices=COUPLED_MODES, default="propagate",
                   help="coupled residual layers: remove there too (default) or refuse")
    p.set_defaults(func=_cmd_prune)

    p = subparsers.add_parser(
        "widen", help="add kernels to a layer (task 2)",
        description="Append kernels to a layer. net2net copies existing kernels and splits the "
        "consumers' weights (same function); random and zeros start new kernels fresh with zero "
        "consumer weights (same function until retrained).",
    )
    _add_output(p)
    p.add_argument("--layer", required=True, help="layer to widen")
    p.add_argument("--add", required=True, type=int_at_least(1),
                   help="how many kernels to add")
    p.add_argument("--init", choices=WIDEN_INITS, default="net2net",
                   help="how new kernels start (default net2net)")
    p.add_argument("--sources", metavar="INDICES",
                   help="net2net: kernels to copy, e.g. 0,0,3 (default: drawn with --seed)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="random draws (default 0)")
    p.add_argument("--noise", type=float_from(0, strict=False), default=0.0,
                   help="net2net: relative noise on copies (breaks exact preservation; "
                        "default 0)")
    p.add_argument("--coupled", choices=COUPLED_MODES, default="propagate",
                   help="coupled residual layers: widen them too (default) or refuse")
    p.set_defaults(func=_cmd_widen)

    p = subparsers.add_parser(
        "deepen", help="insert an identity layer + ReLU after a ReLU/ReLU6 layer (task 3)",
        description="Insert a Conv (or Gemm) + ReLU after the ReLU of a layer; with the "
        "identity init the model computes the same function.",
    )
    _add_output(p)
    p.add_argument("--after", required=True, help="layer whose ReLU the new layer follows")
    p.add_argument("--kernel-size", type=int_at_least(1), default=3,
                   help="the new conv's kernel size (default 3)")
    p.add_argument("--init", choices=INSERT_INITS, default="identity",
                   help="identity (same function) or random (default identity)")
    p.add_argument("--name", help="node name of the new layer (default <after>_deep)")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="random init's seed (default 0)")
    p.set_defaults(func=_cmd_deepen)

    p = subparsers.add_parser("summary", help="kernels, parameters and MACs per layer")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_summary)
