"""Occurrence statistics: exact integer counts and the paper's matrices derived from them.

Axis order, everywhere: kernels first. For a layer with K kernels whose activation maps are
H x W, over C classes:

* ``counts[name]``: int64 array of shape (K, C, H, W), the number of class-c samples whose
  activation at (h, w) of kernel k is above the threshold;
* ``class_sizes``: int64 array of shape (C,), samples per class.

From these come the AOM (eq. 1), ODM (eq. 2), CSM (eq. 3) and kernel selectivity (eq. 4).
Fully-connected layers have H = W = 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LayerNotFoundError, ModelFileNotFoundError, StatsError
from .files import atomic_write
from .frozen import FrozenJSON, FrozenMap, frozen_in_place, readonly_array

__all__ = ["OccurrenceStats", "aom_from_counts", "class_selectivity", "csm", "odm", "selectivity"]

FORMAT_VERSION = 1
#: Metadata keys that must agree for two runs to be merged.
MERGE_KEYS = ("model_digest", "bound_inputs", "threshold", "probe", "layers", "preprocessing")


def aom_from_counts(counts: np.ndarray, class_sizes: np.ndarray) -> np.ndarray:
    """Eq. 1: occurrence fraction, float64 (K, C, H, W). Classes of size 0 give NaN."""
    sizes = np.asarray(class_sizes, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts / sizes[None, :, None, None]


def odm(aom: np.ndarray) -> np.ndarray:
    """Eq. 2: mean absolute AOM difference for every kernel pair, float64 (K, K).

    ``aom`` has shape (K, C, H, W).
    """
    k = aom.shape[0]
    flat = np.ascontiguousarray(aom.reshape(k, -1), dtype=np.float64)
    if flat.shape[1] == 0:
        return np.zeros((k, k))
    from scipy.spatial.distance import cdist

    return np.asarray(cdist(flat, flat, metric="cityblock") / flat.shape[1])


def mirrored_odm(aom: np.ndarray) -> np.ndarray:
    """The ODM (eq. 2) with a kernel's complement counted as its twin, float64 (K, K):
    ``min(D[i, j], mean abs(M[i] - (1 - M[j])))``.

    Two kernels that fire exactly where the other does not split the inputs the same way, so
    a layer reading both gets the same information twice; the plain ODM puts them as far apart
    as two kernels can be. ``aom`` has shape (K, C, H, W).
    """
    k = aom.shape[0]
    flat = np.ascontiguousarray(aom.reshape(k, -1), dtype=np.float64)
    if flat.shape[1] == 0:
        return np.zeros((k, k))
    from scipy.spatial.distance import cdist

    mirrored = cdist(flat, 1.0 - flat, metric="cityblock") / flat.shape[1]
    return np.asarray(np.minimum(odm(aom), mirrored))


def csm(aom: np.ndarray) -> np.ndarray:
    """Eq. 3: class selectivity maps, float64 (K, C, H, W), values in [-1, 1].

    S[k, c] = 1/(C-1) * sum over d != c of (M[k, c] - M[k, d])
            = (C M[k, c] - sum_d M[k, d]) / (C-1).
    """
    c = aom.shape[1]
    if c < 2:
        raise StatsError("class selectivity needs at least 2 classes; the statistics have 1")
    total = aom.sum(axis=1, keepdims=True)
    return np.asarray((c * aom - total) / (c - 1))


def class_selectivity(aom: np.ndarray) -> np.ndarray:
    """Average CSM of every (kernel, class) pair, float64 (K, C): the paper's s^{k,c}."""
    s = csm(aom)
    return np.asarray(s.reshape(s.shape[0], s.shape[1], -1).mean(axis=2))


def selectivity(aom: np.ndarray) -> np.ndarray:
    """Eq. 4: kernel selectivity, float64 (K,).

    s(k) = sum over ordered class pairs c0 != c1 of |avg S[k, c0] - avg S[k, c1]|
    (each unordered pair counts twice, as the sum runs over ordered pairs).
    """
    a = np.sort(class_selectivity(aom), axis=1)
    c = a.shape[1]
    # sum over ordered pairs |a_i - a_j| = 2 * sum_i a_(i) * (2i - C + 1) for sorted a:
    # O(K C log C) instead of a (K, C, C) temporary
    weights = 2.0 * (2.0 * np.arange(c) - c + 1)
    return np.asarray(a @ weights)


def _restored(cls: type[OccurrenceStats], counts: Mapping[str, np.ndarray],
              class_sizes: np.ndarray, class_names: tuple[str, ...],
              metadata: dict[str, Any]) -> OccurrenceStats:
    """:class:`OccurrenceStats` as :meth:`OccurrenceStats.__reduce__` gave them: their arrays
    made read-only in place (they are fresh from unpickling or a deep copy, or read-only views
    already, from a shallow copy)."""
    stats = object.__new__(cls)
    object.__setattr__(stats, "counts", FrozenMap({name: frozen_in_place(np.asarray(array))
                                                  for name, array in counts.items()}))
    object.__setattr__(stats, "class_sizes", frozen_in_place(np.asarray(class_sizes)))
    object.__setattr__(stats, "class_names", tuple(class_names))
    object.__setattr__(stats, "metadata", FrozenJSON(metadata))
    return stats


def _readonly(array: np.ndarray) -> np.ndarray:
    return readonly_array(array)


def _check_counts(layer: str, counts: np.ndarray, sizes: np.ndarray,
                  names: tuple[str, ...]) -> None:
    """A count is a number of samples of its class: in 0..class size. Anything else (a count
    above its class's size, a negative one) makes AOMs outside [0, 1] and every measure wrong
    without a sign, so it is refused here."""
    low = int(counts.min())
    if low < 0:
        raise StatsError(f"counts for layer {layer!r} must be >= 0 (numbers of samples), got "
                         f"{low}")
    high = counts.max(axis=(0, 2, 3))  # (C,) without a temporary of the counts' size
    over = np.flatnonzero(high > sizes)
    if over.size:
        cls = int(over[0])
        raise StatsError(f"counts for layer {layer!r} exceed the size of class {names[cls]!r}: "
                         f"{int(high[cls])} of its {int(sizes[cls])} samples; a count is the "
                         f"number of the class's samples with the activation > 0, at most its "
                         f"size")


@dataclass(frozen=True, eq=False)
class OccurrenceStats:
    """Exact activation-occurrence counts of one model over one labelled data set.

    Parameters
    ----------
    counts:
        Layer name -> int64 array of shape (K, C, H, W), in the model's topological order.
    class_sizes:
        int64 array of shape (C,): samples seen per class.
    class_names:
        C names (defaults to "0".."C-1").
    metadata:
        JSON-able facts about the run: model digest and name, probe point, threshold,
        preprocessing, layers (name, op, shape), data source, samples. Kept as a copy in
        JSON's own types (numpy scalars become numbers, tuples lists), as a saved file holds it.
    """

    counts: Mapping[str, np.ndarray]
    class_sizes: np.ndarray
    class_names: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = np.asarray(self.class_sizes)
        if sizes.ndim != 1 or not np.issubdtype(sizes.dtype, np.integer):
            raise StatsError(
                f"class_sizes must be a 1-D integer array, got {sizes.dtype} {sizes.shape}"
            )
        c = sizes.shape[0]
        if c and sizes.min() < 0:
            raise StatsError(f"class_sizes must be >= 0, got {sizes.min()} for class "
                             f"{int(sizes.argmin())}")
        names = tuple(str(n) for n in self.class_names) if self.class_names \
            else tuple(str(i) for i in range(c))
        if len(names) != c:
            raise StatsError(f"{len(names)} class names given for {c} classes")
        counts: dict[str, np.ndarray] = {}
        for name, array in self.counts.items():
            array = np.asarray(array)
            if array.ndim != 4 or array.shape[1] != c:
                raise StatsError(
                    f"counts for layer {name!r} must have shape (K, {c}, H, W), got {array.shape}"
                )
            if not np.issubdtype(array.dtype, np.integer):
                raise StatsError(f"counts for layer {name!r} must be integers, got {array.dtype}")
            if 0 in (array.shape[0], array.shape[2], array.shape[3]):
                raise StatsError(f"counts for layer {name!r} have shape {array.shape}: a layer "
                                 f"needs at least one kernel and one position")
            if array.size:
                _check_counts(name, array, sizes, names)
            counts[name] = _readonly(array.astype(np.int64, copy=False))
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise StatsError(f"class names must be distinct; repeated: {repeated}")
        try:  # a copy in JSON's own types: what save() writes, load() reads and digest hashes,
            # and nothing the caller keeps and changes later
            metadata = json.loads(json.dumps(dict(self.metadata), default=_json_default))
        except (TypeError, ValueError) as exc:
            raise StatsError(f"metadata must be JSON-able (numbers, strings, lists, dicts; "
                             f"numpy scalars and arrays are converted): {exc}") from exc
        object.__setattr__(self, "counts", FrozenMap(counts))
        object.__setattr__(self, "class_sizes", _readonly(sizes.astype(np.int64)))
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "metadata", FrozenJSON(metadata))

    def __eq__(self, other: object) -> bool:
        """Equal statistics: the same :attr:`digest` (counts, class sizes and names, and the
        metadata that defines them)."""
        if not isinstance(other, OccurrenceStats):
            return NotImplemented
        return self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __reduce__(self) -> tuple[Any, ...]:
        # pickle keeps no read-only flag: made again, without the constructor's checks and
        # copies (the values were checked when these statistics were made)
        return (_restored, (type(self), dict(self.counts), self.class_sizes,
                            self.class_names, dict(self.metadata)))

    # ----------------------------------------------------------------- basic facts
    @cached_property
    def digest(self) -> str:
        """SHA-256 (hex) of the statistics' content: layer names, counts, class sizes and
        names, and the metadata that defines them (model digest, probe, threshold,
        preprocessing). Findings and proposals record it, to be refused on other statistics."""
        h = hashlib.sha256()
        head = {key: self.metadata.get(key) for key in
                ("model_digest", "probe", "threshold", "preprocessing")}
        if "bound_inputs" in self.metadata:  # (absent otherwise: earlier digests stay)
            head["bound_inputs"] = self.metadata["bound_inputs"]
        head["class_names"] = list(self.class_names)
        h.update(json.dumps(head, sort_keys=True).encode())  # metadata holds JSON types
        h.update(np.ascontiguousarray(self.class_sizes, dtype="<i8").tobytes())
        for name in self.layer_names:
            counts = self.counts[name]
            h.update(name.encode() + b"\0" + json.dumps(list(counts.shape)).encode())
            h.update(np.ascontiguousarray(counts, dtype="<i8").tobytes())
        return h.hexdigest()

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Names of the counted layers, in model order."""
        return tuple(self.counts)

    @property
    def num_classes(self) -> int:
        """C, the number of classes (some may have no samples)."""
        return int(self.class_sizes.shape[0])

    @property
    def num_samples(self) -> int:
        """N, the samples counted (the sum of the class sizes)."""
        return int(self.class_sizes.sum())

    def _counts(self, name: str) -> np.ndarray:
        try:
            return self.counts[name]
        except KeyError:
            known = ", ".join(self.counts) or "(none)"
            raise LayerNotFoundError(
                f"no statistics for layer {name!r}; layers collected: {known}"
            ) from None

    # ----------------------------------------------------------------- the paper's matrices
    def aom(self, name: str, *, warn: bool = True) -> np.ndarray:
        """Eq. 1, float64 (K, C, H, W). A class with no samples gives NaN, with a warning
        unless ``warn`` is False (for callers that report those classes themselves)."""
        counts = self._counts(name)
        empty = [self.class_names[i] for i in np.flatnonzero(self.class_sizes == 0)]
        if empty and warn:
            warnings.warn(
                f"classes with no samples have undefined AOMs (NaN): {', '.join(empty)}",
                RuntimeWarning,
                stacklevel=2,
            )
        return aom_from_counts(counts, self.class_sizes)

    def odm(self, name: str) -> np.ndarray:
        """Eq. 2, float64 (K, K), over the classes with samples."""
        aom, present = self._aom_present(name)
        return odm(aom[:, present])

    def csm(self, name: str) -> np.ndarray:
        """Eq. 3, float64 (K, C, H, W), divided by |C| - 1; over the classes with samples (a
        class without any has NaN maps and is left out of the others' means)."""
        aom, present = self._aom_present(name, between=True)
        return self._per_class(csm(aom[:, present]), aom.shape, present)

    def class_selectivity(self, name: str) -> np.ndarray:
        """Average CSM per (kernel, class), float64 (K, C); NaN for a class without samples."""
        aom, present = self._aom_present(name, between=True)
        return self._per_class(class_selectivity(aom[:, present]), aom.shape[:2], present)

    def selectivity(self, name: str) -> np.ndarray:
        """Eq. 4, float64 (K,), over ordered pairs c0 != c1 of classes with samples."""
        aom, present = self._aom_present(name, between=True)
        return selectivity(aom[:, present])

    def _aom_present(self, name: str, between: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The AOM and the indices of the classes with samples (every class, normally);
        ``between``: for a measure between classes, which needs two of them."""
        present = np.flatnonzero(self.class_sizes > 0)
        if between and len(present) < 2 <= self.num_classes:
            raise StatsError(
                f"the measures between classes need at least 2 classes with samples; "
                f"{len(present)} of the {self.num_classes} classes have any "
                f"({', '.join(self.class_names[i] for i in present) or 'none'})")
        return self.aom(name), present

    def _per_class(self, values: np.ndarray, shape: tuple[int, ...], present: np.ndarray
                   ) -> np.ndarray:
        """``values`` of the present classes (axis 1) placed in an array of ``shape``, NaN for
        the classes without samples."""
        if len(present) == shape[1]:
            return values
        out = np.full(shape, np.nan)
        out[:, present] = values
        return out

    # ----------------------------------------------------------------- merging
    def __add__(self, other: object) -> OccurrenceStats:
        """Exact merge of two runs over disjoint data (same model, layers, probe, classes)."""
        if not isinstance(other, OccurrenceStats):
            return NotImplemented
        if self.layer_names != other.layer_names:
            only_mine = [n for n in self.layer_names if n not in other.layer_names]
            only_theirs = [n for n in other.layer_names if n not in self.layer_names]
            what = "; ".join(part for part in (
                f"only the first has {_names(only_mine)}" if only_mine else "",
                f"only the second has {_names(only_theirs)}" if only_theirs else "",
            ) if part) or "the same layers in another order"
            raise StatsError(f"cannot merge statistics of different layers: {what}")
        for key in MERGE_KEYS:
            mine, theirs = self.metadata.get(key), other.metadata.get(key)
            if mine != theirs:
                raise StatsError(
                    f"cannot merge statistics with different {key!r}: "
                    f"{_short(mine)} vs {_short(theirs)}"
                )
        c = max(self.num_classes, other.num_classes)
        names = self._merged_class_names(other, c)
        counts = {}
        for name in self.layer_names:
            a, b = self.counts[name], other.counts[name]
            if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
                raise StatsError(
                    f"cannot merge layer {name!r}: shapes {a.shape} and {b.shape} differ"
                )
            counts[name] = _pad_classes(a, c) + _pad_classes(b, c)
        sizes = _pad_classes(self.class_sizes, c, axis=0) + _pad_classes(
            other.class_sizes, c, axis=0
        )
        metadata = dict(self.metadata)
        metadata["num_samples"] = int(sizes.sum())
        sources = list(self.metadata.get("sources", [self.metadata.get("source")]))
        sources += list(other.metadata.get("sources", [other.metadata.get("source")]))
        metadata["sources"] = [s for s in sources if s is not None]
        return OccurrenceStats(counts, sizes, names, metadata)

    def __radd__(self, other: object) -> OccurrenceStats:
        """``0 + stats`` is ``stats``, so that ``sum(runs)`` merges a list of runs."""
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self
        return NotImplemented

    def _merged_class_names(self, other: OccurrenceStats, c: int) -> tuple[str, ...]:
        longer, shorter = (self, other) if self.num_classes >= other.num_classes else (other, self)
        if longer.class_names[: shorter.num_classes] != shorter.class_names:
            raise StatsError(
                f"cannot merge statistics with different class names: {self.class_names} vs "
                f"{other.class_names}"
            )
        return longer.class_names[:c]

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to ``path`` (.npz) atomically; counts stay int64, metadata as JSON."""
        path = Path(path)
        if not path.parent.is_dir():
            raise ModelFileNotFoundError(f"output folder does not exist: {path.parent}")
        header = {
            "format": "onnxaom.OccurrenceStats",
            "version": FORMAT_VERSION,
            "layers": list(self.layer_names),
            "class_names": list(self.class_names),
            "metadata": dict(self.metadata),
        }
        arrays: dict[str, Any] = {
            f"counts_{i}": self.counts[n] for i, n in enumerate(self.layer_names)
        }
        arrays["header"] = np.array(json.dumps(header))  # metadata holds JSON types
        arrays["class_sizes"] = self.class_sizes
        return atomic_write(path, lambda handle: np.savez_compressed(handle, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OccurrenceStats:
        """Read statistics written by :meth:`save`."""
        path = Path(path)
        if not path.exists():
            raise ModelFileNotFoundError(f"statistics file not found: {path}")
        if path.is_dir():
            raise StatsError(f"{path} is a folder, not a statistics file")
        with path.open("rb") as handle:
            if handle.read(2) != b"PK":  # an .npz is a zip archive
                raise StatsError(f"{path} is not an onnxaom statistics file (not an .npz "
                                 f"archive); give the stats.npz that `onnxaom analyze` wrote")
        try:
            with np.load(path, allow_pickle=False) as data:
                if "header" not in data.files:
                    raise StatsError(f"{path} is not an onnxaom statistics file (an .npz "
                                     f"without its header); give the stats.npz that `onnxaom "
                                     f"analyze` wrote")
                header = json.loads(str(data["header"]))
                if not isinstance(header, dict) or \
                        header.get("format") != "onnxaom.OccurrenceStats":
                    raise StatsError(f"{path} is not an onnxaom statistics file")
                version = header.get("version")
                if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                    raise StatsError(f"{path}: format version {version!r} is not valid")
                if version > FORMAT_VERSION:
                    raise StatsError(f"{path} was written by a newer onnxaom (format version "
                                     f"{version}; this one reads up to {FORMAT_VERSION}): "
                                     f"upgrade onnxaom")
                counts = {name: data[f"counts_{i}"] for i, name in enumerate(header["layers"])}
                sizes = data["class_sizes"]
            return cls(counts, sizes, tuple(header["class_names"]), header["metadata"])
        except StatsError as exc:
            if str(path) in str(exc):
                raise
            raise StatsError(f"{path}: {exc}") from exc
        except Exception as exc:  # a damaged or hand-edited file: whatever numpy/json raise
            raise StatsError(f"cannot read statistics file {path}: {exc}") from exc

    def __repr__(self) -> str:
        return (
            f"OccurrenceStats(layers={list(self.layer_names)}, classes={self.num_classes}, "
            f"samples={self.num_samples})"
        )


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays in metadata, as JSON takes them."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {_short(value, 60)} is not JSON-able")


def _pad_classes(array: np.ndarray, c: int, axis: int = 1) -> np.ndarray:
    missing = c - array.shape[axis]
    if missing == 0:
        return array
    pad = [(0, 0)] * array.ndim
    pad[axis] = (0, missing)
    return np.pad(array, pad)


def _names(names: Sequence[str], limit: int = 5) -> str:
    """Up to ``limit`` quoted names, then how many more."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _short(value: object, limit: int = 200) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."
