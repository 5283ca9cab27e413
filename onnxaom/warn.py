"""Where a warning points: at the user's line, whatever path inside onnxaom led to it."""

from __future__ import annotations

import sys

__all__ = ["user_stacklevel"]


def user_stacklevel() -> int:
    """The ``stacklevel`` for :func:`warnings.warn`, called by the function that warns, that
    names the first frame outside onnxaom and its adapters (modules ``onnxaom*``): the same
    warning reached through ``apply``, ``remove_kernels`` or the torch adapter points at the
    caller's own line (Python 3.12's ``skip_file_prefixes``, for 3.11)."""
    frame = sys._getframe(1)  # the function that warns: stacklevel 1
    level = 1
    while frame.f_back is not None and str(frame.f_globals.get("__name__", "")).startswith(
            "onnxaom"):
        frame = frame.f_back
        level += 1
    return level
