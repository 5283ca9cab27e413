"""The ``onnxaom`` command line. The only module that prints.

Exit codes: 0 success, 1 a user mistake reported in one line (no traceback), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from ._version import __version__
from .cli_types import int_at_least
from .errors import OnnxaomError

__all__ = ["build_parser", "main"]

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DEFAULT_MODEL = FIXTURES / "default_model.onnx"
PROBE_CHOICES = ("activation", "conv", "pool")


def _cmd_layers(args: argparse.Namespace) -> int:
    from .model import load
    from .shapes import with_run_sizes

    model = load(args.model)
    layers = with_run_sizes(model.proto, model.layers(probe=args.probe))
    if args.json:
        print(json.dumps([layer.to_dict() for layer in layers], indent=2))
        return 0
    print(f"{model.name}: opset {model.opset}, {len(layers)} layers (probe: {args.probe})")
    width = max([len(layer.name) for layer in layers] + [4])
    print(f"{'name':<{width}}  {'op':<6} {'K':>5}  {'shape':<12} probe (chain)")
    for layer in layers:
        shape = "x".join("?" if d is None else str(d) for d in layer.shape)
        chain = "+".join(layer.chain) or "-"
        print(
            f"{layer.name:<{width}}  {layer.op:<6} {layer.kernels:>5}  {shape:<12} "
            f"{layer.probe} ({chain})"
        )
    return 0


def _analyze(model_path: Path, data_spec: str, args: argparse.Namespace) -> int:
    from .job import run_analysis

    result = run_analysis(
        model_path,
        data_spec,
        Path(args.out),
        layers=args.layers,
        batch_size=args.batch_size,
        provider=args.provider,
        threshold=args.threshold,
        probe=args.probe,
        progress=not args.quiet,
        resize=getattr(args, "resize", None),
        allow_empty_classes=args.allow_empty_classes,
        bind=_bound_values(getattr(args, "bind", None) or []),
    )
    for line in result.lines:
        print(line)
    return 0


def _size(text: str) -> tuple[int, int]:
    """``H,W`` (or one number for a square) for ``--resize``."""
    parts = [part.strip() for part in text.split(",")]
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected H,W (two positive integers), got {text!r}")
    return values[0], values[1]


def _binding(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` for ``--bind``: a JSON number or (nested) array, or a ``.npy`` file
    (read when the command runs: a missing one is named then)."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    if value.endswith(".npy"):
        return name, Path(value)
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number, a JSON array such as "
                                         f"[1,0] or a .npy file") from None


def _bound_values(pairs: Sequence[tuple[str, object]]) -> dict[str, object]:
    """``--bind`` values, ``.npy`` files read."""
    import numpy as np

    from .errors import DataError, ModelFileNotFoundError

    values: dict[str, object] = {}
    for name, value in pairs:
        if name in values:
            raise DataError(f"--bind {name}: given twice")
        if isinstance(value, Path):
            if not value.is_file():
                raise ModelFileNotFoundError(f"--bind {name}={value}: no such file")
            try:
                value = np.load(value, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"--bind {name}={value}: not a .npy array ({exc})") from exc
        values[name] = value
    return values


def _cmd_analyze(args: argparse.Namespace) -> int:
    return _analyze(Path(args.model), args.data, args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .errors import ModelFileNotFoundError

    if not DEFAULT_MODEL.exists():
        raise ModelFileNotFoundError(
            f"the bundled default model is missing ({DEFAULT_MODEL}); run "
            f"fixtures/make_default_model.py, or use `onnxaom analyze MODEL --data SPEC`"
        )
    meta = json.loads((FIXTURES / "default_model.json").read_text())
    spec = str(meta.get("data_spec", "digits:28"))
    print(f"demo: analysing {DEFAULT_MODEL.name} on {spec}")
    return _analyze(DEFAULT_MODEL, spec, args)


def _add_collect_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", nargs="+", metavar="NAME", help="layers to analyse (default: all)")
    p.add_argument("--batch-size", type=int_at_least(1), default=256,
                   help="samples per run (default 256)")
    p.add_argument(
        "--provider",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="execution provider (default auto: CUDA when it loads, else CPU)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.0,
        help="an activation counts when it is > this (default 0)",
    )
    p.add_argument(
        "--probe",
        choices=PROBE_CHOICES,
        default="activation",
        help="where a kernel's activation is read (default: after its BN/ReLU chain)",
    )
    p.add_argument("--allow-empty-classes", action="store_true",
                   help="accept classes without samples (their maps are NaN and are left out "
                   "of the ODM, CSM and selectivity)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxaom",
        description="Activation occurrence maps (AOM, ODM, CSM) for CNNs exported to ONNX.",
    )
    parser.add_argument("--version", action="version", version=f"onnxaom {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("layers", help="list a model's analysable layers and probe points")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--probe", choices=PROBE_CHOICES, default="activation",
                   help="where a kernel's activation is read (default: after its BN/ReLU chain)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_layers)

    p = sub.add_parser(
        "analyze",
        help="collect occurrence statistics and findings for a model",
        description="Stream a labelled data set through MODEL and write stats.npz, "
        "findings.json and report.html into --out.",
    )
    p.add_argument("model", help="ONNX model file")
    p.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help="digits | digits:SIZE | fashion-mnist:train|test (bare fashion-mnist: train) | "
        "npz:PATH | idx:IMAGES,LABELS | folder:PATH",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--resize", type=_size, metavar="H,W",
                   help="resize every image to H x W (bilinear; one number: a square), e.g. "
                   "digits to 28,28")
    p.add_argument("--bind", type=_binding, action="append", metavar="NAME=VALUE",
                   help="feed the model input NAME (not the images) this constant: a number, "
                   "a JSON array or a .npy file (repeat for more inputs)")
    _add_collect_options(p)
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("demo", help="analyse the bundled default model on sklearn digits")
    p.add_argument(
        "--out",
        default="onnxaom-out/demo",
        metavar="DIR",
        help="output folder (default onnxaom-out/demo)",
    )
    _add_collect_options(p)
    p.set_defaults(func=_cmd_demo)

    for extension in ("cli_surgery", "cli_report", "cli_session"):
        module_name = f"{__package__}.{extension}"
        try:
            module = __import__(module_name, fromlist=["add_parsers"])
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_parsers(sub)
    return parser


_warned: set[str] = set()


def _one_line_warning(message: Warning | str, *_args: object, **_kwargs: object) -> None:
    """A warning on the command line: one line, once, no source excerpt."""
    text = str(message)
    if text not in _warned:
        _warned.add(text)
        print(f"onnxaom: warning: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    warnings.showwarning = _one_line_warning
    try:
        return int(args.func(args))
    except OnnxaomError as exc:
        print(f"onnxaom: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("onnxaom: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `onnxaom ... | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
