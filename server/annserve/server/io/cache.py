"""A process-wide, byte-bounded cache of decoded chunks of compressed CSR arrays.

Serving a compressed store (annbatch's Blosc-LZ4 collections, zarr's default zstd, a
gzip h5ad) costs the daemon most of its CPU in decoding: every epoch decodes every
chunk again, and a chunk holding more rows than a sampler chunk is decoded once per
sampler chunk it serves. :class:`ChunkCache` keeps decoded chunks of 1-d CSR arrays
(``data``, ``indices``) in memory, least recently used evicted first, within a bound in
bytes (``annserve --cache-gb``). :class:`CachedRanges` serves range reads from it,
decoding only the chunks it lacks, all of them in one batched read of the array's own
reader (zarr's codec pipeline or h5py, as without the cache): from the second epoch on
a read of cached chunks is a copy, and in the first each chunk is decoded once instead
of once per range that touches it.

Chunks are kept narrowed where that loses nothing: values of an unsigned 16-bit range
held as float32 or int32 (integer counts, gene indices) are kept as uint16, which
halves the memory for the usual single-cell counts; a chunk that does not narrow
bit-exactly (fractions, negatives, NaN, ``-0.0``) is kept as stored. Reads return the
store's dtype; :meth:`CachedRanges.read_narrow` returns uint16 where every chunk it
copies from is held so, for the ``compact`` encoding, which sends them narrow anyway
(widening into the preload buffer and narrowing it again cost a fresh daemon's LZ4
epochs 2.0 and 2.4 daemon µs/cell on a 50k-cell store), and :meth:`CachedRanges.iovecs`
hands out where rows lie in the cached chunks, for a same-host stream's kernel gather
with no copy into a preload buffer (a further 1.6 µs/cell from the second epoch, 4.8
against 3.2). The reading thread narrows
the chunks it decoded before it returns (a fill thread of its own measured slower on 2
cores); the cache's first epoch is bound by first touches of the memory it fills (see
:func:`annserve.memory.avoid_huge_pages`).

The first read of each array is served as without the cache, and caches nothing: whole
chunks are ~3x the bytes a preload buffer of 32-row sampler chunks needs from annbatch's
~65-row chunks, and a fresh daemon's first batch waits for that read (measured 0.28
against 0.13 s for 8,192 rows of the LZ4 collection). Its chunks are cached when a
later read touches them; the first epoch decodes ~2 µs/cell more on a 50k-cell store.

Entries are keyed by a key space per reader (:meth:`ChunkCache.key_space`, unique for
the life of the cache) and the chunk number, so two arrays or stores never share an
entry, whatever their paths. Errors of the underlying reader
(:class:`~annserve.errors.DataLossError`) surface as without the cache, and a chunk that
failed to read is never cached.

Stores opened inside ``with caching(cache):`` read their CSR arrays through ``cache``
(:func:`~annserve.server.io.ranges.range_reader` asks :func:`active_cache`); the daemon
opens its stores so, with one cache for all of them.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from annserve.server.io.mapped import RowIovecs, iovec_array, split_at_chunks

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

    from prometheus_client.metrics_core import Metric

    from annserve.server.format import Empty
    from annserve.server.io.ranges import RangeReader

__all__ = [
    "DEFAULT_MAX_GB",
    "DEFAULT_SHARE",
    "CacheStats",
    "CachedRanges",
    "ChunkCache",
    "active_cache",
    "caching",
    "default_cache_bytes",
    "narrowed",
]

logger = logging.getLogger(__name__)

#: Share of the memory available at start-up that the default cache may take.
DEFAULT_SHARE = 0.25
#: Largest default cache, GB (10**9 bytes).
DEFAULT_MAX_GB = 32.0
#: Bytes counted per entry on top of its array's: the array object, key and LRU links.
ENTRY_OVERHEAD = 256
#: The dtype chunks are narrowed to where every value survives unchanged.
NARROW = np.dtype(np.uint16)
#: Values narrowed and compared at a time (temporaries stay in the CPU cache).
BLOCK = 1 << 15
#: Bytes of decoded chunks one batched read of missing chunks holds at a time.
SCRATCH_BYTES = 16 << 20

_active: ContextVar[ChunkCache | None] = ContextVar("annserve_chunk_cache", default=None)


@contextmanager
def caching(cache: ChunkCache | None) -> Iterator[ChunkCache | None]:
    """Read the CSR arrays of stores opened in this block through ``cache`` (None: none).

    Scoped to the block and to the calling thread (or task): readers take the cache
    when they are built, so a store opened inside keeps it afterwards.
    """
    token = _active.set(cache)
    try:
        yield cache
    finally:
        _active.reset(token)


def active_cache() -> ChunkCache | None:
    """Return the cache of the innermost :func:`caching` block around the caller, if any."""
    return _active.get()


def default_cache_bytes(meminfo: str = "/proc/meminfo") -> int:
    """Return the default bound of the cache: :data:`DEFAULT_SHARE` of available memory.

    Available memory is ``MemAvailable`` of ``meminfo`` (Linux; elsewhere the free
    physical pages ``sysconf`` reports, or 4 GB if it reports none), at most
    :data:`DEFAULT_MAX_GB`.

    Parameters
    ----------
    meminfo
        The kernel's memory report.

    Returns
    -------
    Bytes.
    """
    available = None
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            available = 4 * 10**9
    return int(min(DEFAULT_SHARE * available, DEFAULT_MAX_GB * 1e9))


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of a :class:`ChunkCache` at one moment.

    Attributes
    ----------
    max_bytes
        The bound, bytes.
    nbytes
        Bytes held now (arrays plus :data:`ENTRY_OVERHEAD` per entry), at most ``max_bytes``.
    entries
        Chunks held now.
    hits, misses
        Chunk lookups that found / did not find their chunk, since creation.
    evictions
        Chunks dropped to make room, since creation.
    """

    max_bytes: int
    nbytes: int
    entries: int
    hits: int
    misses: int
    evictions: int


class ChunkCache:
    """A thread-safe LRU of decoded chunks, bounded in bytes.

    Lookups and insertions of one read take the lock once each; copies are made
    outside it (entries are never written once cached, so a reader may hold one while
    another thread evicts it).

    Parameters
    ----------
    max_bytes
        Most bytes held at once (arrays plus :data:`ENTRY_OVERHEAD` per entry); 0 holds
        nothing. A chunk larger than the bound is not cached.

    Raises
    ------
    ValueError
        If ``max_bytes`` is negative.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            msg = f"max_bytes must be >= 0, got {max_bytes}"
            raise ValueError(msg)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._nbytes = 0
        self._hits = self._misses = self._evictions = 0
        self._spaces = itertools.count()

    def key_space(self) -> int:
        """Return a number no other caller of this cache gets: one reader's key space."""
        return next(self._spaces)

    def get_many(self, space: int, chunks: Iterable[int]) -> dict[int, np.ndarray]:
        """Return the cached chunks among ``chunks`` of key space ``space``, by number.

        Found chunks become the most recently used.
        """
        found = {}
        with self._lock:
            for k in chunks:
                entry = self._entries.get((space, k))
                if entry is not None:
                    self._entries.move_to_end((space, k))
                    found[k] = entry
                else:
                    self._misses += 1
            self._hits += len(found)
        return found

    def put_many(self, space: int, chunks: Iterable[tuple[int, np.ndarray]]) -> None:
        """Cache decoded chunks ``(number, values)`` of key space ``space``.

        The values must not be written afterwards. Least recently used chunks are
        evicted until the new ones fit; a chunk larger than the bound is skipped.
        """
        with self._lock:
            for k, values in chunks:
                size = values.nbytes + ENTRY_OVERHEAD
                if size > self.max_bytes:
                    continue
                old = self._entries.pop((space, k), None)
                if old is not None:  # another thread decoded it meanwhile
                    self._nbytes -= old.nbytes + ENTRY_OVERHEAD
                while self._nbytes + size > self.max_bytes:
                    _, evicted = self._entries.popitem(last=False)
                    self._nbytes -= evicted.nbytes + ENTRY_OVERHEAD
                    self._evictions += 1
                self._entries[(space, k)] = values
                self._nbytes += size

    def stats(self) -> CacheStats:
        """Return the current counters."""
        with self._lock:
            return CacheStats(
                self.max_bytes,
                self._nbytes,
                len(self._entries),
                self._hits,
                self._misses,
                self._evictions,
            )

    def collect(self) -> Iterator[Metric]:
        """Yield the cache's Prometheus metrics (a custom collector's ``collect``).

        ``annserve_chunk_cache_hits_total``, ``..._misses_total`` and
        ``..._evictions_total`` (chunks), ``annserve_chunk_cache_bytes`` and
        ``annserve_chunk_cache_max_bytes``. Register the cache itself:
        ``registry.register(cache)``.
        """
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.stats()
        yield CounterMetricFamily(
            "annserve_chunk_cache_hits", "Decoded-chunk cache lookups served", value=s.hits
        )
        yield CounterMetricFamily(
            "annserve_chunk_cache_misses",
            "Decoded-chunk cache lookups that decoded the chunk",
            value=s.misses,
        )
        yield CounterMetricFamily(
            "annserve_chunk_cache_evictions",
            "Chunks evicted from the decoded-chunk cache to make room",
            value=s.evictions,
        )
        yield GaugeMetricFamily(
            "annserve_chunk_cache_bytes", "Bytes held by the decoded-chunk cache", value=s.nbytes
        )
        yield GaugeMetricFamily(
            "annserve_chunk_cache_max_bytes",
            "Bound of the decoded-chunk cache (--cache-gb)",
            value=s.max_bytes,
        )


def narrowed(values: np.ndarray) -> np.ndarray:
    """Return a copy of a 1-d array, as uint16 when that keeps every value bit-exactly.

    Integer arrays narrow when every value is in ``0..65535``; float arrays when every
    value is an integer there and none is ``-0.0`` (widening the uint16 copy gives back
    the same bits). Checked :data:`BLOCK` values at a time: the first block that does
    not narrow ends the work.

    Parameters
    ----------
    values
        Shape ``(n,)``, numeric.

    Returns
    -------
    Shape ``(n,)``, uint16 or ``values.dtype``; never a view of ``values``.
    """
    if values.dtype.kind not in "iuf" or values.dtype.itemsize <= NARROW.itemsize:
        return values.copy()
    out = np.empty(values.shape, NARROW)
    floats = values.dtype.kind == "f"
    bits = np.dtype(f"u{values.dtype.itemsize}")
    with np.errstate(invalid="ignore", over="ignore"):  # losses are caught by the comparison
        for i in range(0, len(values), BLOCK):
            src, dst = values[i : i + BLOCK], out[i : i + BLOCK]
            np.copyto(dst, src, casting="unsafe")
            same = (
                np.array_equal(dst.astype(values.dtype).view(bits), src.view(bits))
                if floats
                else np.array_equal(dst, src)
            )
            if not same:
                return values.copy()
    return out


class CachedRanges:
    """Range reads (:class:`~annserve.server.io.ranges.RangeReader`) through a chunk cache.

    A read looks up every chunk its ranges touch, decodes the missing ones with reads
    of ``reader`` (whole chunks, in chunk order, :data:`SCRATCH_BYTES` at a time),
    caches them (:func:`narrowed`) and copies each range's pieces from the chunks into
    the output. The first read goes to ``reader`` as it is (see the module's notes).

    Parameters
    ----------
    reader
        Reads the array (its errors name the array and chunk).
    cache
        Where decoded chunks are kept; this reader takes its own key space.
    chunk
        Elements per chunk (the inner chunk of a sharded zarr array): the unit decoded.
    length
        Elements of the array.
    dtype
        The array's dtype: what reads return.
    """

    def __init__(
        self, reader: RangeReader, cache: ChunkCache, chunk: int, length: int, dtype: np.dtype
    ) -> None:
        self._reader = reader
        self._cache = cache
        self._space = cache.key_space()
        self._chunk = int(chunk)
        self._length = int(length)
        self._dtype = np.dtype(dtype)
        self._started = False  # a read has been served

    def read(self, ranges: Sequence[tuple[int, int]], out: np.ndarray | None = None) -> np.ndarray:
        """Return the ranges concatenated, in the given order (into ``out`` if given).

        Raises
        ------
        DataLossError
            If a chunk not yet cached cannot be read or decoded (as ``reader`` raises it).
        """
        if out is None:
            return self._serve(ranges, np.empty, narrow=False)
        return self._serve(ranges, lambda _shape, _dtype: out, narrow=False)

    def read_narrow(self, ranges: Sequence[tuple[int, int]], empty: Empty = np.empty) -> np.ndarray:
        """Return the ranges concatenated, as the cache holds them: uint16 where it can.

        Where every chunk the ranges touch is held narrowed (:func:`narrowed`), the
        result is uint16, copied from the chunks as they are: no widening to the
        array's dtype for a consumer that would narrow it again (the ``compact``
        encoding). Otherwise, and on the first read (served uncached), as :meth:`read`.

        Parameters
        ----------
        ranges
            ``[start, stop)`` element ranges.
        empty
            Allocates the result, ``empty(shape, dtype)`` (e.g. a stream's
            :meth:`~annserve.buffers.BufferPool.empty`).

        Returns
        -------
        Shape ``(total length,)``, uint16 or the array's dtype.

        Raises
        ------
        DataLossError
            As :meth:`read`.
        """
        return self._serve(ranges, empty, narrow=True)

    def _serve(
        self, ranges: Sequence[tuple[int, int]], empty: Empty, *, narrow: bool
    ) -> np.ndarray:
        """Serve a read into ``empty((n,), dtype)`` (:meth:`read`, :meth:`read_narrow`).

        ``dtype`` is uint16 if ``narrow`` and every chunk the ranges touch is held so,
        else the array's; the first read goes to the reader, uncached.
        """
        ranges = [(a, b) for a, b in ranges if b > a]
        n = sum(b - a for a, b in ranges)
        found = self._chunks(ranges) if ranges else None
        if found is None:
            out = empty((n,), self._dtype)
            return self._reader.read(ranges, out) if ranges else out
        held = narrow and all(v.dtype == NARROW for v in found.values())
        return self._copy(ranges, found, empty((n,), NARROW if held else self._dtype))

    def iovecs(
        self, starts: np.ndarray, stops: np.ndarray, narrow: bool = False
    ) -> tuple[RowIovecs, np.dtype] | None:
        """Return where elements ``[starts[i], stops[i])`` lie in the cached chunks, per row.

        What :meth:`~annserve.server.io.mapped.MappedArray.iovecs` gives for files, for
        chunks held in memory: a same-host stream's frames are then gathered by the
        kernel from the cache, with no copy into a preload buffer. Missing chunks are
        decoded and cached first.

        Parameters
        ----------
        starts, stops
            Shape ``(n,)``, int64, element positions; ``stops >= starts``.
        narrow
            Chunks held as uint16 may be handed out so (for the ``compact`` encoding).

        Returns
        -------
        The rows' ranges (their owners: the chunks, kept alive while it lives) and the
        dtype they hold; None before the first read has been served (see the
        module's notes), and where the chunks hold different dtypes, a narrowed
        dtype without ``narrow``, or big-endian values: the caller reads the rows instead.

        Raises
        ------
        DataLossError
            If a missing chunk cannot be read or decoded (as ``reader`` raises it).
        """
        if not self._started:
            return None
        offsets, k, begin, end = split_at_chunks(starts, stops, self._chunk)
        wanted = np.unique(k)
        chunks = wanted.tolist()
        found = self._found(chunks)
        held = [found[j] for j in chunks]
        dtypes = {v.dtype for v in held}
        dtype = dtypes.pop() if len(dtypes) == 1 else None
        if dtype is None or (dtype != self._dtype and not narrow) or dtype.byteorder == ">":
            return None  # frames carry little-endian bytes: a big-endian chunk is read
        bases = np.array([v.ctypes.data for v in held], np.uint64)
        iov = iovec_array(bases[np.searchsorted(wanted, k)], begin, end, dtype.itemsize)
        return RowIovecs(iov, offsets, tuple(held)), dtype

    def _chunks(self, ranges: list[tuple[int, int]]) -> dict[int, np.ndarray] | None:
        """Return every chunk the (non-empty) ranges touch, decoding missing ones.

        None for the first read of this reader, which is served uncached.
        """
        c = self._chunk
        wanted = sorted({k for a, b in ranges for k in range(a // c, (b - 1) // c + 1)})
        if not self._started:  # the first read (a first batch waits for it): as uncached
            self._cache.get_many(self._space, wanted)  # counted as lookups all the same
            self._started = True
            return None
        return self._found(wanted)

    def _found(self, wanted: list[int]) -> dict[int, np.ndarray]:
        """Return chunks ``wanted`` (increasing), decoding and caching the missing ones."""
        found = self._cache.get_many(self._space, wanted)
        if len(found) < len(wanted):
            self._decode([k for k in wanted if k not in found], found)
        return found

    def _copy(
        self, ranges: list[tuple[int, int]], found: dict[int, np.ndarray], out: np.ndarray
    ) -> np.ndarray:
        """Copy each range's pieces from the chunks ``found`` into ``out``, in order."""
        c, offset = self._chunk, 0
        for a, b in ranges:
            for k in range(a // c, (b - 1) // c + 1):
                first = k * c
                lo, hi = max(a, first), min(b, first + c)
                out[offset : offset + hi - lo] = found[k][lo - first : hi - first]
                offset += hi - lo
        return out

    def _decode(self, missing: list[int], found: dict[int, np.ndarray]) -> None:
        """Read the ``missing`` chunks (increasing) into ``found`` and cache them.

        :data:`SCRATCH_BYTES` of chunks at a time: a smaller scratch stays in the heap
        (below glibc's mmap threshold, :func:`annserve.memory.retain_freed_memory`) and
        is reused by the next batch without page faults.
        """
        step = max(1, SCRATCH_BYTES // (self._chunk * self._dtype.itemsize))
        for i in range(0, len(missing), step):
            self._decode_batch(missing[i : i + step], found)

    def _decode_batch(self, missing: list[int], found: dict[int, np.ndarray]) -> None:
        c = self._chunk
        spans: list[tuple[int, int]] = []
        for k in missing:  # runs of consecutive chunks read as one range
            a, b = k * c, min(self._length, (k + 1) * c)
            if spans and spans[-1][1] == a:
                spans[-1] = (spans[-1][0], b)
            else:
                spans.append((a, b))
        scratch = self._reader.read(spans, np.empty(sum(b - a for a, b in spans), self._dtype))
        decoded, offset = [], 0
        for k in missing:
            n = min(self._length, (k + 1) * c) - k * c
            found[k] = narrowed(scratch[offset : offset + n])  # as a later read finds it
            decoded.append((k, found[k]))
            offset += n
        self._cache.put_many(self._space, decoded)
