"""The one place annserve touches zarr-python beyond its public ``Array``/``Group`` API.

Batched range reads hand all chunk projections of a preload buffer to the array's
codec pipeline at once (``zarr.core.indexing``, ``codec_pipeline.read``, array
metadata: not public API; annbatch goes this way too), and direct chunk-file reads need
the on-disk layout of an array (its codecs, chunk grid and chunk keys). Both are
pinned here, and pyproject bounds zarr's minor version, so a zarr release that changes
them breaks this module alone; :class:`ZarrRanges` falls back to public reads.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import google_crc32c
import numpy as np
from zarr.abc.store import RangeByteRequest
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation
from zarr.codecs.bytes import Endian
from zarr.core.buffer import default_buffer_prototype
from zarr.core.indexing import BasicIndexer, ChunkProjection, get_chunk_shape
from zarr.core.sync import sync as zarr_sync
from zarr.storage import LocalStore

from annserve.errors import DataLossError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import zarr

__all__ = [
    "ZARRS_PIPELINE",
    "ChunkFileLayout",
    "RangesIndexer",
    "ShardIndex",
    "ZarrRanges",
    "absent_chunks",
    "chunk_file_layout",
    "chunk_label",
    "chunk_name",
]

logger = logging.getLogger(__name__)

#: zarr codec pipeline of the ``zarrs`` package (Rust): decodes chunks several times faster.
ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"
#: Offset and length of a chunk absent from its shard (zarr sharding spec).
MISSING = np.uint64(2**64 - 1)


@dataclass(frozen=True, slots=True)
class RangesIndexer:
    """The chunk projections of several row ranges, their outputs concatenated along axis 0.

    Handing all ranges of a preload buffer to zarr's codec pipeline in one call lets
    it fetch and decode every chunk in one batch: one ``getitem`` per range costs
    ~0.3 ms of Python each, which dominated reads of 32-row chunks. The projections
    of 1-d arrays (CSR ``data``/``indices``) are computed here directly, as zarr's
    ``SliceDimIndexer`` would: building a ``BasicIndexer`` per range cost ~30 us, a
    quarter of a 32-row range read.
    """

    shape: tuple[int, ...]
    """Shape of the concatenated output."""
    projections: tuple[ChunkProjection, ...]
    """Every chunk piece of every range, in output order."""

    @classmethod
    def build(cls, ranges: Sequence[tuple[int, int]], array: zarr.AsyncArray[Any]) -> RangesIndexer:
        """Project ``[start, stop)`` ranges along axis 0 of ``array`` onto its chunks."""
        grid = array.metadata.chunk_grid
        projections: list[ChunkProjection] = []
        if len(array.shape) == 1:
            projections = _projections_1d(ranges, get_chunk_shape(grid)[0], array.shape[0])
        else:
            offset = 0
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
        # a BasicIndexer over a slice projects onto slices along every axis
        rows = p.out_selection[0]  # type: ignore[index]  # typed as any selection
        assert isinstance(rows, slice)
        out = (slice(rows.start + offset, rows.stop + offset), *p.out_selection[1:])  # type: ignore[index]  # as above
        yield ChunkProjection(p.chunk_coords, p.chunk_selection, out, p.is_complete_chunk)


class ZarrRanges:
    """Range reads of a zarr array, decoded in one batch by zarr's codec pipeline.

    The batched read hands every chunk projection to the array's ``codec_pipeline.read``
    at once, as zarr's own ``_get_selection`` does, with each chunk's store path and
    ``ArraySpec`` built once and kept: building them per projection, as zarr does, cost
    ~40 us each, a third of a 32-row range read. If a zarr release changes these
    internals, reads fall back to one public ``getitem`` per range, gathered
    concurrently, and a warning is logged once.

    Parameters
    ----------
    array
        The array.
    name
        Names the array in error messages, e.g. ``"store.zarr: X/data"``.
    complete
        Every chunk a read touches must be stored (CSR ``data``/``indices``): zarr reads
        an absent one as the fill value. Only for 1-d arrays.
    """

    #: Chunks whose path and spec are kept (a sharded array has few: one per shard).
    MAX_CACHED_CHUNKS = 1 << 14

    def __init__(self, array: zarr.Array[Any], name: str = "", complete: bool = False) -> None:
        self._async = array.async_array
        self._name = name or str(array.store_path)
        self._complete = complete
        self._batched = True
        self._chunks: dict[tuple[int, ...], tuple[Any, Any]] = {}

    def read(self, ranges: Sequence[tuple[int, int]], out: np.ndarray | None = None) -> np.ndarray:
        """Return the ranges concatenated along axis 0 (``out`` receives them if given).

        Raises
        ------
        DataLossError
            If ``complete`` and a chunk (or shard) file the ranges touch is not in the
            store once read (deleted while served): it read as the fill value.
        """
        if self._batched:
            try:
                out = self._read_batched(ranges, out)
            except (AttributeError, TypeError) as e:
                logger.warning("zarr batched reads unavailable (%s); reading range by range", e)
                self._batched = False
        if not self._batched:
            out = self._read_each(ranges, out)
        if self._complete:
            self._check_stored(ranges)
        assert out is not None  # read by one of the two paths
        return out

    def _check_stored(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Raise :class:`DataLossError` if a chunk file the ranges touch is absent."""
        outer = int(get_chunk_shape(self._async.metadata.chunk_grid)[0])
        files = sorted({k for a, b in ranges if b > a for k in range(a // outer, -(-b // outer))})
        paths = [self._chunk((k,))[0] for k in files]
        for k, stored in zip(files, _stored(paths), strict=True):
            if not stored:
                key = self._async.metadata.encode_chunk_key((k,))
                msg = (
                    f"{self._name}: chunk {key} is missing from the store (deleted while "
                    "served?); its values are lost"
                )
                raise DataLossError(msg)

    def _read_batched(
        self, ranges: Sequence[tuple[int, int]], out: np.ndarray | None
    ) -> np.ndarray:
        indexer = RangesIndexer.build(ranges, self._async)
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
            parts = await asyncio.gather(*(self._async.getitem(slice(a, b)) for a, b in ranges))
            return [np.asarray(p) for p in parts]

        parts = zarr_sync(fetch())
        if out is None:
            out = np.empty(
                (sum(b - a for a, b in ranges), *self._async.shape[1:]), dtype=self._async.dtype
            )
        if parts:
            np.concatenate(parts, out=out)
        return out


def _stored(paths: Sequence[Any]) -> list[bool]:
    """Whether each ``StorePath`` is a key of its store (a stat per file in local stores)."""
    local = [p for p in paths if isinstance(p.store, LocalStore)]
    if len(local) == len(paths):
        return [os.path.isfile(Path(p.store.root) / p.path) for p in paths]

    async def exist() -> list[bool]:
        return list(await asyncio.gather(*(p.exists() for p in paths)))

    return zarr_sync(exist())


@dataclass(frozen=True, slots=True)
class ShardIndex:
    """Where a shard file keeps its ``(offset, nbytes)`` index of chunks."""

    at_end: bool
    """The index closes the file (else it opens it)."""
    checksum: bool
    """A crc32c of the index (4 bytes, little-endian) follows it."""

    @classmethod
    def of(cls, shard: ShardingCodec) -> ShardIndex | None:
        """Return the index layout of a sharding codec; None unless plain bytes (+ crc32c)."""
        index = shard.index_codecs
        checksum = len(index) == 2 and isinstance(index[1], Crc32cCodec)
        if not (_plain_bytes(index) or (_plain_bytes(index[:1]) and checksum)):
            return None
        return cls(shard.index_location == ShardingCodecIndexLocation.end, checksum)

    def nbytes(self, n: int) -> int:
        """Bytes of the index of a shard of ``n`` chunks."""
        return 16 * n + 4 * self.checksum

    def decode(self, raw: bytes, n: int, file_size: int, where: str) -> np.ndarray:
        """Check and decode the index of a shard of ``n`` chunks.

        Parameters
        ----------
        raw
            The index as stored, :meth:`nbytes` long unless the file is shorter.
        n
            Chunks per shard.
        file_size
            Bytes of the shard file.
        where
            Names the shard in error messages.

        Returns
        -------
        ``(offset, nbytes)`` of each chunk in the file, shape ``(n, 2)``, uint64;
        :data:`MISSING` for chunks the shard does not hold.

        Raises
        ------
        DataLossError
            If the file is shorter than the index, the checksum does not match, or a
            chunk lies past the end of the file (a truncated or corrupt shard).
        """
        if len(raw) != self.nbytes(n):
            msg = f"{where}: shard file is shorter than its index (truncated shard?)"
            raise DataLossError(msg)
        body = bytes(raw[: 16 * n])
        if self.checksum and google_crc32c.value(body) != int.from_bytes(raw[16 * n :], "little"):
            msg = f"{where}: shard index checksum mismatch (corrupt or truncated shard)"
            raise DataLossError(msg)
        index = np.frombuffer(body, "<u8").reshape(n, 2)
        offsets, sizes = index[index[:, 0] != MISSING].T
        size = np.uint64(file_size)
        if np.any(offsets > size) or np.any(sizes > size - np.minimum(offsets, size)):
            msg = f"{where}: shard index points past the end of the file (truncated shard?)"
            raise DataLossError(msg)
        return index

    async def load(self, store_path: Any, n: int, where: str) -> np.ndarray:
        """Read and :meth:`decode` the index of one shard (``StorePath``) of ``n`` chunks."""
        size = await store_path.store.getsize(store_path.path)
        nbytes = self.nbytes(n)
        raw = b""
        if size >= nbytes:
            start = size - nbytes if self.at_end else 0
            buffer = await store_path.get(
                default_buffer_prototype(), RangeByteRequest(start, start + nbytes)
            )
            raw = b"" if buffer is None else buffer.to_bytes()
        return self.decode(raw, n, size, where)


def _sharding(meta: Any) -> ShardingCodec | None:
    """Return the sharding codec of a zarr v3 array when it is the array's only codec."""
    codecs: tuple[object, ...] = tuple(meta.codecs) if meta.zarr_format == 3 else ()
    return codecs[0] if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) else None


def chunk_label(key: str, inner: int, per_shard: int) -> str:
    """Name a chunk by its file's key, and its place in that file when it is a shard."""
    return key if per_shard == 1 else f"{key} (inner chunk {inner} of that shard)"


def chunk_name(array: zarr.Array[Any], k: int) -> str:
    """Name chunk ``k`` of a 1-d array by its store key relative to the array.

    ``c/3`` (v3), ``3`` (v2), or ``c/0 (inner chunk 7 of that shard)`` when sharded.
    """
    meta = array.metadata
    per = int(get_chunk_shape(meta.chunk_grid)[0]) // int(array.chunks[0])
    return chunk_label(str(meta.encode_chunk_key((k // per,))), k % per, per)


def absent_chunks(array: zarr.Array[Any], stop: int, name: str) -> list[str]:
    """Name the chunks holding elements ``[0, stop)`` of a 1-d array that are not stored.

    Lists the array's keys once and, when sharded, reads each shard's index (16 bytes
    per chunk); no chunk is read. Shard indexes stored other than as plain bytes (with
    or without a crc32c) are not read: then only the shard files are checked.

    Parameters
    ----------
    array
        A 1-d array.
    stop
        Elements that must be stored, counted from the first.
    name
        Names the array in error messages, e.g. ``"store.zarr: X/data"``.

    Returns
    -------
    The absent chunks: chunk (or shard) files, then inner chunks of shards, each as
    :func:`chunk_name` names them.

    Raises
    ------
    DataLossError
        If a shard index is corrupt or points past the end of its file.
    """
    meta = array.metadata
    outer = int(get_chunk_shape(meta.chunk_grid)[0])
    prefix = f"{array.path}/" if array.path else ""

    async def listed() -> set[str]:
        return {k.removeprefix(prefix) async for k in array.store.list_prefix(prefix)}

    stored = zarr_sync(listed())
    keys = [str(meta.encode_chunk_key((i,))) for i in range(-(-stop // outer))]
    absent = [k for k in keys if k not in stored]
    shard = _sharding(meta)
    index = None if shard is None else ShardIndex.of(shard)
    if shard is None or index is None:
        return absent
    per = outer // int(shard.chunk_shape[0])
    shards = [i for i, k in enumerate(keys) if k in stored]

    async def indexes() -> list[np.ndarray]:
        loads = (
            index.load(array.store_path / keys[i], per, f"{name}: shard {keys[i]}") for i in shards
        )
        return list(await asyncio.gather(*loads))

    wanted = -(-stop // int(shard.chunk_shape[0]))  # inner chunks holding [0, stop)
    for i, found in zip(shards, zarr_sync(indexes()), strict=True):
        absent.extend(
            chunk_name(array, i * per + int(j))
            for j in np.flatnonzero(found[: wanted - i * per, 0] == MISSING)
        )
    return absent


@dataclass(frozen=True, slots=True)
class ChunkFileLayout:
    """Where the plain-byte chunks of an uncompressed 1-d zarr v3 array lie on disk."""

    directory: Path
    """The array's directory in its local store."""
    per_file: int
    """Elements per chunk file: a chunk, or a shard of several chunks."""
    chunk: int
    """Elements per chunk (``per_file`` when not sharded)."""
    shard: ShardIndex | None
    """The shard index of each file; None when every file is one chunk."""
    fill_value: object
    """Value of the elements of absent chunks."""
    chunk_key: Callable[[int], str]
    """Path of chunk file ``i`` relative to ``directory``."""


def _plain_bytes(codecs: Sequence[object]) -> bool:
    return (
        len(codecs) == 1
        and isinstance(codecs[0], BytesCodec)
        and codecs[0].endian in (None, Endian.little)
    )


def chunk_file_layout(array: zarr.Array[Any]) -> ChunkFileLayout | None:
    """Return the chunk file layout of a 1-d array, or None if zarr must decode it.

    None unless the array is zarr v3, 1-d, in a local store, and its chunks are plain
    little-endian bytes, unsharded or in shards whose index is plain bytes (with or
    without a crc32c).
    """
    meta = array.metadata
    store = array.store
    if meta.zarr_format != 3 or len(array.shape) != 1 or not isinstance(store, LocalStore):
        return None
    directory = Path(store.root) / array.path
    outer = int(get_chunk_shape(meta.chunk_grid)[0])

    def key(i: int) -> str:
        return meta.encode_chunk_key((i,))

    codecs = meta.codecs
    if _plain_bytes(codecs):
        return ChunkFileLayout(directory, outer, outer, None, meta.fill_value, key)
    shard = _sharding(meta)
    index = None if shard is None or not _plain_bytes(shard.codecs) else ShardIndex.of(shard)
    if shard is None or index is None:
        return None
    return ChunkFileLayout(directory, outer, int(shard.chunk_shape[0]), index, meta.fill_value, key)
