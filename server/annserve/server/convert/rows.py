"""Rows of the collection held in memory: ragged CSR rows, encoded strings, obs arrays.

A :class:`RowBlock` is what ``annserve convert`` moves between its passes: rows already
in the collection's gene space and obs types, with their obsm rows. Every field is a
numpy array with one row per cell (flat, or ``(n, *tail)`` for dense obsm) or a
:class:`Ragged` (per-row lengths plus flat values), so a block spills to disk and reads
back as raw bytes, and reordering rows is a vectorized gather done a slice of rows at a
time (bounded temporaries).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

#: Values gathered per step when reordering ragged rows; bounds the index temporaries.
_GATHER_VALUES = 1 << 21


@dataclass(frozen=True, slots=True)
class Ragged:
    """Variable-length rows: CSR rows (``values = (indices, data)``) or UTF-8 strings.

    Attributes
    ----------
    lengths
        Values of each row, shape ``(n,)``, int64.
    values
        Flat arrays sharing ``lengths``, each shape ``(lengths.sum(),)``.
    """

    lengths: np.ndarray
    values: tuple[np.ndarray, ...]

    def offsets(self) -> np.ndarray:
        """Row offsets into the values, shape ``(n + 1,)``, int64, starting at 0."""
        out = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=out[1:])
        return out

    def slice(self, start: int, stop: int) -> Ragged:
        """Rows ``[start, stop)``, as views."""
        offsets = self.offsets()
        a, b = int(offsets[start]), int(offsets[stop])
        return Ragged(self.lengths[start:stop], tuple(v[a:b] for v in self.values))

    def take(self, order: np.ndarray) -> Ragged:
        """Rows in the given order, shape ``(len(order),)`` int64 row numbers (a copy)."""
        offsets = self.offsets()
        lengths = self.lengths[order]
        out_offsets = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(lengths, out=out_offsets[1:])
        out = tuple(np.empty(int(out_offsets[-1]), dtype=v.dtype) for v in self.values)
        starts = offsets[:-1][order]
        row = 0
        while row < len(order):
            stop = int(np.searchsorted(out_offsets, out_offsets[row] + _GATHER_VALUES, "right"))
            stop = max(stop - 1, row + 1)
            a, b = int(out_offsets[row]), int(out_offsets[stop])
            src = np.repeat(starts[row:stop] - out_offsets[row:stop], lengths[row:stop])
            src += np.arange(a, b, dtype=np.int64)
            for dst, v in zip(out, self.values, strict=True):
                np.take(v, src, out=dst[a:b])
            row = stop
        return Ragged(lengths, out)

    @staticmethod
    def concat(parts: list[Ragged]) -> Ragged:
        """Rows of all parts, in order."""
        return Ragged(
            np.concatenate([p.lengths for p in parts]),
            tuple(np.concatenate(vs) for vs in zip(*(p.values for p in parts), strict=True)),
        )


def encode_strings(values: np.ndarray) -> Ragged:
    """UTF-8 encode strings, shape ``(n,)`` object array, into a :class:`Ragged` of bytes."""
    encoded = [str(v).encode("utf-8") for v in values.tolist()]
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    return Ragged(lengths, (np.frombuffer(b"".join(encoded), dtype=np.uint8),))


def decode_strings(strings: Ragged) -> np.ndarray:
    """Inverse of :func:`encode_strings`: shape ``(n,)`` object array of str."""
    raw = strings.values[0].tobytes()
    offsets = strings.offsets().tolist()
    text = raw.decode("utf-8")
    if len(text) == len(raw):  # ASCII: character offsets are byte offsets
        items = [text[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    else:
        items = [raw[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


@dataclass(frozen=True, slots=True)
class RowBlock:
    """Rows in the collection's gene space and obs types.

    Attributes
    ----------
    obs_names
        Cell names, UTF-8 :class:`Ragged`.
    matrices
        ``X``, layers and ``raw/X`` by key, :class:`Ragged` with ``values = (indices,
        data)``.
    columns
        obs columns by name: int32 category codes (-1 = missing), numeric arrays (both
        shape ``(n,)``) or UTF-8 :class:`Ragged`.
    masks
        Missing values of the nullable obs columns by name, shape ``(n,)`` bool.
    obsm
        obsm elements by key: dense rows, shape ``(n, *tail)``, or CSR :class:`Ragged`.
    """

    obs_names: Ragged
    matrices: dict[str, Ragged]
    columns: dict[str, np.ndarray | Ragged]
    masks: dict[str, np.ndarray]
    obsm: dict[str, np.ndarray | Ragged]

    @property
    def n_rows(self) -> int:
        """Rows held."""
        return len(self.obs_names.lengths)

    @property
    def nbytes(self) -> int:
        """Bytes held by all arrays."""
        return sum(a.nbytes for a in self.arrays())

    def arrays(self) -> list[np.ndarray]:
        """Every array of the block, in a fixed order (the spill record layout)."""
        out = _flat(self.obs_names)
        for field in self._fields():
            out += _flat(field)
        return out

    def _fields(self) -> list[np.ndarray | Ragged]:
        """Every field but the obs names, in the spill record order."""
        return [
            *self.matrices.values(),
            *self.columns.values(),
            *self.masks.values(),
            *self.obsm.values(),
        ]

    def map(
        self, ragged: Callable[[Ragged], Ragged], flat: Callable[[np.ndarray], np.ndarray]
    ) -> RowBlock:
        """Apply ``ragged`` to every :class:`Ragged` field and ``flat`` to every array."""

        def apply(field: np.ndarray | Ragged) -> np.ndarray | Ragged:
            return ragged(field) if isinstance(field, Ragged) else flat(field)

        return RowBlock(
            ragged(self.obs_names),
            {k: ragged(m) for k, m in self.matrices.items()},
            {k: apply(c) for k, c in self.columns.items()},
            {k: flat(m) for k, m in self.masks.items()},
            {k: apply(o) for k, o in self.obsm.items()},
        )

    def take(self, order: np.ndarray) -> RowBlock:
        """Rows in the given order, ``order`` shape ``(k,)`` int64 (a copy)."""
        return self.map(lambda r: r.take(order), lambda a: a[order])

    def slice(self, start: int, stop: int) -> RowBlock:
        """Rows ``[start, stop)``, as views."""
        return self.map(lambda r: r.slice(start, stop), lambda a: a[start:stop])

    @staticmethod
    def concat(blocks: list[RowBlock]) -> RowBlock:
        """Rows of all blocks, in order; the blocks share one layout."""
        first = blocks[0]
        return RowBlock(
            Ragged.concat([b.obs_names for b in blocks]),
            {k: Ragged.concat([b.matrices[k] for b in blocks]) for k in first.matrices},
            {k: _concat([b.columns[k] for b in blocks]) for k in first.columns},
            {k: np.concatenate([b.masks[k] for b in blocks]) for k in first.masks},
            {k: _concat([b.obsm[k] for b in blocks]) for k in first.obsm},
        )


def _concat(parts: list[np.ndarray | Ragged]) -> np.ndarray | Ragged:
    """Rows of all parts, in order; all are :class:`Ragged` or all arrays."""
    ragged = [p for p in parts if isinstance(p, Ragged)]
    if ragged:
        return Ragged.concat(ragged)
    return np.concatenate([p for p in parts if not isinstance(p, Ragged)])


def _flat(field: np.ndarray | Ragged) -> list[np.ndarray]:
    return [field.lengths, *field.values] if isinstance(field, Ragged) else [field]


def from_arrays(arrays: list[np.ndarray], like: RowBlock) -> RowBlock:
    """Rebuild a block from :meth:`RowBlock.arrays` output, with the layout of ``like``."""
    it = iter(arrays)

    def take_ragged(field: Ragged) -> Ragged:
        return Ragged(next(it), tuple(next(it) for _ in field.values))

    def take(field: np.ndarray | Ragged) -> np.ndarray | Ragged:
        if isinstance(field, Ragged):
            return take_ragged(field)
        return next(it).reshape(-1, *field.shape[1:])  # dense obsm rows are 2-d or more

    return RowBlock(
        take_ragged(like.obs_names),
        {k: take_ragged(m) for k, m in like.matrices.items()},
        {k: take(c) for k, c in like.columns.items()},
        {k: next(it) for k in like.masks},
        {k: take(o) for k, o in like.obsm.items()},
    )
