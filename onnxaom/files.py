"""Writing output files atomically: the one way onnxaom puts a file on disk.

The content goes to a temporary file beside the target, is flushed to disk, gets the
permissions a plain ``open(path, "w")`` would give (``mkstemp`` makes 0600), and is renamed
onto the target. A reader never sees half a file, and a failure leaves the old file, if any,
untouched. (Models are written by :mod:`onnxaom.model`, which also places external data.)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ModelFileNotFoundError, StatsError

__all__ = ["atomic_write", "atomic_write_text", "read_json"]


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike[str], content: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write ``content`` (bytes, or a function writing to a binary handle) to ``path``."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ModelFileNotFoundError(f"output folder does not exist: {path.parent}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(content, bytes):
                handle.write(content)
            else:
                content(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically."""
    return atomic_write(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """The JSON in ``path``; ``what`` ("findings", "proposal") names the file in errors."""
    path = Path(path)
    if not path.exists():
        raise ModelFileNotFoundError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StatsError(f"cannot read {what} file {path}: {exc}") from exc
