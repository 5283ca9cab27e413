"""Read-only containers for the library's immutable result objects.

:class:`FrozenMap` is a read-only mapping that, unlike :class:`types.MappingProxyType`, can be
pickled and deep-copied (results go through multiprocessing, joblib and caches).
:func:`readonly_array` gives an array whose ``WRITEABLE`` flag cannot be set back: a view of a
read-only copy (numpy refuses to make a view writable when its base is not).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import numpy as np

__all__ = ["FrozenJSON", "FrozenMap", "frozen_in_place", "readonly_array", "reduce_by_fields"]

K = TypeVar("K")
V = TypeVar("V")


class FrozenMap(Mapping[K, V]):
    """A read-only mapping over a private copy of ``data`` (insertion order kept)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[K, V] | None = None) -> None:
        self._data: dict[K, V] = dict(data or {})

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._data,))


class FrozenJSON(FrozenMap[str, Any]):
    """A read-only mapping of JSON values whose nested dicts and lists cannot be changed
    through it either: each lookup returns a copy of a nested value."""

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        value = self._data[key]
        return copy.deepcopy(value) if isinstance(value, dict | list) else value


def readonly_array(array: Any) -> np.ndarray:
    """A read-only copy of ``array`` that cannot be made writable again."""
    base = np.array(array, copy=True)
    base.setflags(write=False)
    view = base.view()
    view.setflags(write=False)
    return view


def reduce_by_fields(obj: Any) -> tuple[Any, ...]:
    """``__reduce__`` for a frozen dataclass whose ``__post_init__`` makes its arrays read-only:
    made again through the constructor, since pickle and ``copy`` neither keep numpy's
    ``WRITEABLE`` flag nor call ``__post_init__`` otherwise."""
    return (type(obj), tuple(getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init))


def frozen_in_place(array: np.ndarray) -> np.ndarray:
    """``array`` read-only for good without a copy, where it is not shared: an array that owns
    its data (fresh from pickle or a deep copy) becomes the read-only base of a read-only view;
    one that is already such a view is returned as it is; anything else is copied
    (:func:`readonly_array`)."""
    if not array.flags.writeable and array.base is not None \
            and not getattr(array.base, "flags", array.flags).writeable:
        return array
    if array.base is None and array.flags.writeable:
        array.setflags(write=False)
        view = array.view()
        view.setflags(write=False)
        return view
    return readonly_array(array)
