"""Progress bars (tqdm, on stderr) for the long steps: counting, analysing, the report. Off,
they cost nothing and tqdm is not imported."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["bar", "over"]

T = TypeVar("T")


class _NoBar:
    def update(self, n: int) -> None:
        del n

    def close(self) -> None:
        pass


def bar(total: int | None, *, desc: str, unit: str, enabled: bool) -> Any:
    """A bar advanced with ``update(n)`` and ended with ``close()``; a silent stand-in when
    not ``enabled``."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, leave=False)


def over(items: Iterable[T], *, total: int | None = None, desc: str, unit: str,
         enabled: bool) -> Iterator[T]:
    """``items`` one by one, a bar advancing with each when ``enabled``."""
    progress = bar(total, desc=desc, unit=unit, enabled=enabled)
    try:
        for item in items:
            yield item
            progress.update(1)
    finally:
        progress.close()
