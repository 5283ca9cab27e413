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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ModelFileNotFoundError, OnnxaomError, OutputError, StatsError

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_to", "fsync_path", "read_json",
           "refuse_inputs", "same_file"]


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike[str], content: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write ``content`` (bytes, or a function writing to a binary handle) to ``path``."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            if isinstance(content, bytes):
                handle.write(content)
            else:
                content(handle)

    return atomic_write_to(path, write)


def atomic_write_to(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """:func:`atomic_write` for writers that take a file name (``onnx.save_model``,
    ``torch.save``): ``write(tmp)`` fills a temporary file beside ``path``, which is then
    flushed to disk and renamed onto ``path``; the folder is synced too, so that the rename
    itself survives a crash."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ModelFileNotFoundError(f"output folder does not exist: {path.parent}")
    if path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file name")
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # a read-only folder
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OnnxaomError):
            raise
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (a rename), to disk, where the platform allows
    it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    except UnicodeDecodeError:
        raise StatsError(f"cannot read {what} file {path}: it is not JSON text (a binary "
                         f"file, such as a model or an .npz?)") from None
    except (OSError, ValueError) as exc:
        raise StatsError(f"cannot read {what} file {path}: {exc}") from exc


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether ``a`` and ``b`` name one file: the same resolved path, or a hard link to it."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_inputs(output: str | os.PathLike[str], inputs: Iterable[Any],
                  option: str = "-o") -> None:
    """Raise :class:`OutputError` when ``output`` is one of a command's ``inputs`` (paths; None
    entries are skipped): the same resolved path or a hard link to it."""
    for given in inputs:
        if given is not None and same_file(output, given):
            raise OutputError(f"{option} {output} is one of this command's inputs ({given}); "
                              f"choose another file")
