"""Value types for the command line's options: numbers checked where they are parsed, so a bad
one is a usage error (exit 2) naming the option, not an error from deeper down naming a Python
field."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["float_from", "int_at_least"]


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def float_from(low: float, *, strict: bool) -> Callable[[str], float]:
    """An argparse ``type``: a finite number ``> low`` (``strict``) or ``>= low``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low or (strict and value == low):
            bound = f"> {low:g}" if strict else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}")
        return value

    return parse
