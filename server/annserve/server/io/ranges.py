"""Read many ``[start, stop)`` ranges of one on-disk array (h5py dataset or zarr array)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import h5py
import numpy as np
from zarr.core.buffer import default_buffer_prototype
from zarr.core.indexing import BasicIndexer, ChunkProjection, get_chunk_shape
from zarr.core.sync import sync as zarr_sync

from annserve.server.io.chunkfiles import ChunkFileRanges

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    import zarr

logger = logging.getLogger(__name__)

#: zarr codec pipeline of the ``zarrs`` package (Rust): decodes chunks several times faster.
ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"


class RangeReader(Protocol):
    """Reads several ``[start, stop)`` element ranges of one 1-d or 2-d on-disk array."""

    def read(self, ranges: Sequence[tuple[int, int]], out: np.ndarray | None = None) -> np.ndarray:
        """Return the ranges concatenated along axis 0, in the given order.

        ``out``, when given, receives them (C-contiguous, the array's dtype, the total
        length along axis 0) and is returned.
        """
        ...


class _H5Ranges:
    """Range reads of an h5py dataset: one HDF5 read of the union of the ranges' hyperslabs.

    A single ``H5Dread`` over a multi-hyperslab selection costs about half of one
    high-level h5py read per range (measured on 256 ranges of ~32 CSR rows).
    """

    def __init__(self, dataset: h5py.Dataset) -> None:
        self._ds = dataset

    def read(self, ranges: Sequence[tuple[int, int]], out: np.ndarray | None = None) -> np.ndarray:
        ranges = [(a, b) for a, b in ranges if b > a]
        tail = self._ds.shape[1:]
        if out is None:
            out = np.empty((sum(b - a for a, b in ranges), *tail), self._ds.dtype)
        if not ranges:
            return out
        file_space = self._ds.id.get_space()
        file_space.select_none()
        for a, b in ranges:
            file_space.select_hyperslab(
                (a, *(0,) * len(tail)), (b - a, *tail), op=h5py.h5s.SELECT_OR
            )
        self._ds.id.read(h5py.h5s.create_simple(out.shape), file_space, out)
        return out


@dataclass(frozen=True, slots=True)
class _RangesIndexer:
    """The chunk projections of several row ranges, their outputs concatenated along axis 0.

    Handing all ranges of a preload buffer to zarr's codec pipeline in one call lets
    it fetch and decode every chunk in one batch: one ``getitem`` per range costs
    ~0.3 ms of Python each, which dominated reads of 32-row chunks. The projections
    of 1-d arrays (CSR ``data``/``indices``) are computed here directly, as zarr's
    ``SliceDimIndexer`` would: building a ``BasicIndexer`` per range cost ~30 us, a
    quarter of a 32-row range read.
    """

    shape: tuple[int, ...]
    projections: tuple[ChunkProjection, ...]

    @classmethod
    def build(cls, ranges: Sequence[tuple[int, int]], array: zarr.AsyncArray) -> _RangesIndexer:
        grid = array.metadata.chunk_grid
        if len(array.shape) == 1:
            projections = _projections_1d(ranges, get_chunk_shape(grid)[0], array.shape[0])
        else:
            projections, offset = [], 0
            for a, b in ranges:
                projections.extend(_shifted(BasicIndexer(slice(a, b), array.shape, grid), offset))
                offset += b - a
        n = sum(b - a for a, b in ranges)
        return cls((n, *array.shape[1:]), tuple(projections))

    def __iter__(self) -> Iterator[ChunkProjection]:
        return iter(self.projections)


def _projections_1d(
    ranges: Sequence[tuple[int, int]], chunk: int, length: int
) -> list[ChunkProjection]:
    """Chunk projections of ``[a, b)`` ranges of a 1-d array, outputs concatenated."""
    out, offset = [], 0
    for a, b in ranges:
        if b <= a:  # an empty range (rows without non-zeros) touches no chunk
            continue
        for k in range(a // chunk, -(-b // chunk)):
            first, limit = k * chunk, min(length, (k + 1) * chunk)
            lo, hi = max(a, first), min(b, limit)
            out.append(
                ChunkProjection(
                    (k,),
                    (slice(lo - first, hi - first, 1),),
                    (slice(offset + lo - a, offset + hi - a),),
                    lo == first and b >= limit,
                )
            )
        offset += b - a
    return out


def _shifted(indexer: BasicIndexer, offset: int) -> Iterator[ChunkProjection]:
    """Yield the indexer's projections with their output rows moved down by ``offset``."""
    for p in indexer:
        rows = p.out_selection[0]
        out = (slice(rows.start + offset, rows.stop + offset), *p.out_selection[1:])
        yield ChunkProjection(p.chunk_coords, p.chunk_selection, out, p.is_complete_chunk)


class _ZarrRanges:
    """Range reads of a zarr array, decoded in one batch by zarr's codec pipeline.

    The batched read hands every chunk projection to the array's ``codec_pipeline.read``
    at once, as zarr's own ``_get_selection`` does (not public API; annbatch goes this
    way too), with each chunk's store path and ``ArraySpec`` built once and kept:
    building them per projection, as zarr does, cost ~40 us each, a third of a
    32-row range read. If a zarr release changes these internals, reads fall back to
    one public ``getitem`` per range, gathered concurrently, and a warning is logged once.
    """

    #: Chunks whose path and spec are kept (a sharded array has few: one per shard).
    MAX_CACHED_CHUNKS = 1 << 14

    def __init__(self, array: zarr.Array) -> None:
        self._async = array.async_array
        self._batched = True
        self._chunks: dict[tuple[int, ...], tuple[Any, Any]] = {}

    def read(self, ranges: Sequence[tuple[int, int]], out: np.ndarray | None = None) -> np.ndarray:
        if self._batched:
            try:
                return self._read_batched(ranges, out)
            except (AttributeError, TypeError) as e:
                logger.warning("zarr batched reads unavailable (%s); reading range by range", e)
                self._batched = False
        return self._read_each(ranges, out)

    def _read_batched(
        self, ranges: Sequence[tuple[int, int]], out: np.ndarray | None
    ) -> np.ndarray:
        indexer = _RangesIndexer.build(ranges, self._async)
        if out is None:
            out = np.empty(indexer.shape, self._async.dtype)
        if out.size == 0:
            return out
        batch = [
            (*self._chunk(p.chunk_coords), p.chunk_selection, p.out_selection, p.is_complete_chunk)
            for p in indexer
        ]
        target = default_buffer_prototype().nd_buffer.from_numpy_array(out)
        zarr_sync(self._async.codec_pipeline.read(batch, target, drop_axes=()))
        return out

    def _chunk(self, coords: tuple[int, ...]) -> tuple[Any, Any]:
        """Return the store path and ``ArraySpec`` of one chunk, as ``_get_selection`` builds."""
        found = self._chunks.get(coords)
        if found is None:
            array, meta = self._async, self._async.metadata
            config = array.config
            if meta.zarr_format == 2:  # v2 keeps its memory order in the metadata
                config = replace(config, order=meta.order)
            found = (
                array.store_path / meta.encode_chunk_key(coords),
                meta.get_chunk_spec(coords, config, prototype=default_buffer_prototype()),
            )
            if len(self._chunks) >= self.MAX_CACHED_CHUNKS:
                self._chunks.clear()
            self._chunks[coords] = found
        return found

    def _read_each(self, ranges: Sequence[tuple[int, int]], out: np.ndarray | None) -> np.ndarray:
        async def fetch() -> list[np.ndarray]:
            return await asyncio.gather(*(self._async.getitem(slice(a, b)) for a, b in ranges))

        parts = zarr_sync(fetch())
        if out is None:
            out = np.empty(
                (sum(b - a for a, b in ranges), *self._async.shape[1:]), dtype=self._async.dtype
            )
        if parts:
            np.concatenate(parts, out=out)
        return out


def range_reader(array: h5py.Dataset | zarr.Array) -> RangeReader:
    """Return the range reader suited to an h5py dataset or a zarr array.

    Uncompressed 1-d arrays in local files are read straight from them
    (:class:`~annserve.server.io.chunkfiles.ChunkFileRanges`); others through h5py or
    zarr's codec pipeline.
    """
    direct = ChunkFileRanges.open(array)
    if direct is not None:
        return direct
    return _H5Ranges(array) if isinstance(array, h5py.Dataset) else _ZarrRanges(array)


def row_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Split strictly increasing row indices into maximal ``[start, stop)`` runs.

    Parameters
    ----------
    rows
        Shape ``(n,)``, integer, strictly increasing.

    Returns
    -------
    Runs in increasing order; their lengths add up to ``n``.
    """
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.r_[0, breaks]]
    stops = rows[np.r_[breaks - 1, len(rows) - 1]] + 1
    return list(zip(starts.tolist(), stops.tolist(), strict=True))
