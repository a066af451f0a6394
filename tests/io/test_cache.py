"""The decoded-chunk cache (``--cache-gb``): bit-exact, bounded, keyed per array, errors kept.

Stores are annbatch-layout Blosc-LZ4 collections of real data (pbmc3k's first 1,000
cells and wu2020, three groups; see ``collection_stores``), read through the zarrs
codec pipeline as the daemon reads them.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import threading
import urllib.request

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from annserve.client import Connection, Output, RemoteLoader
from annserve.errors import DataLossError
from annserve.server import open_store
from annserve.server.io import cache as cache_module
from annserve.server.io.cache import (
    ENTRY_OVERHEAD,
    CachedRanges,
    ChunkCache,
    caching,
    default_cache_bytes,
    narrowed,
)
from annserve.server.io.ranges import ZARRS_PIPELINE, range_reader
from collection_stores import annbatch_collection, write_annbatch_collection  # noqa: F401
from conftest import as_scipy, real_path
from ops_support import RPC_TIMEOUT, Daemon, annserve_command

ROW_SETS = 25  # random row sets compared per test
THREADS = 4
READS_PER_THREAD = 15
GB = 10**9


@pytest.fixture(autouse=True)
def zarrs_pipeline():
    with zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE}):
        yield


def row_sets(n_obs: int, count: int = ROW_SETS, seed: int = 0) -> list[np.ndarray]:
    """Sorted random row sets: single rows, scattered rows, runs of 32 (sampler chunks)."""
    rng = np.random.default_rng(seed)
    sets = [np.array([0]), np.array([n_obs - 1]), np.arange(n_obs)]
    for _ in range(count):
        if rng.random() < 0.5:
            rows = rng.choice(n_obs, int(rng.integers(1, min(400, n_obs))), replace=False)
        else:
            blocks = n_obs // 32
            count = int(rng.integers(1, min(12, blocks + 1)))
            starts = rng.choice(blocks, count, replace=False) * 32
            rows = np.concatenate([np.arange(s, min(s + 32, n_obs)) for s in starts])
        sets.append(np.sort(rows).astype(np.int64))
    return sets


def assert_same_rows(got, want) -> None:
    for name in ("indptr", "indices", "data"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=name)


def cached_store(path, cache: ChunkCache, started: bool = True):
    """The store at ``path`` read through ``cache``; ``started``: its first reads are done.

    The first read of each array goes around the cache (CachedRanges); one read of every
    100th row makes it for every group's arrays, so that the test's reads are cached.
    """
    with caching(cache):
        store = open_store(path)
    if started:
        store.read_rows(np.arange(0, store.n_obs, 100, dtype=np.int64))
    return store


def test_reads_through_the_cache_are_bit_exact(annbatch_collection):  # noqa: F811
    path = annbatch_collection.path
    plain, cache = open_store(path), ChunkCache(GB)
    store = cached_store(path, cache)
    for rows in row_sets(plain.n_obs):
        assert_same_rows(store.read_rows(rows), plain.read_rows(rows))
    # pbmc3k counts narrow to uint16 in the cache; reads still return the store's dtypes
    x = store.read_rows(np.arange(store.n_obs))
    assert x.data.dtype == np.float32
    assert cache.stats().entries > 0
    assert any(e.dtype == np.uint16 for e in cache._entries.values())


def assert_same_values(got, want) -> None:
    """``got`` holds ``want``'s rows, its ``indices`` and ``data`` perhaps narrower."""
    np.testing.assert_array_equal(got.indptr, want.indptr)
    for name in ("indices", "data"):
        a, b = getattr(got, name), getattr(want, name)
        np.testing.assert_array_equal(a.astype(b.dtype).view(np.uint8), b.view(np.uint8))


def test_narrow_reads_come_back_as_the_cache_holds_them(annbatch_collection):  # noqa: F811
    """What the compact encoding reads: uint16 straight from the narrowed chunks."""
    path = annbatch_collection.path
    plain, cache = open_store(path), ChunkCache(GB)
    first = cached_store(path, cache, started=False)
    rows = np.arange(0, first.n_obs, 7, dtype=np.int64)
    assert_same_rows(first.read_rows(rows, narrow=True), plain.read_rows(rows))  # uncached
    store = cached_store(path, cache)
    for rows in row_sets(plain.n_obs):  # across the collection's three groups
        got, want = store.read_rows(rows, narrow=True), plain.read_rows(rows)
        assert (got.indices.dtype, got.data.dtype) == (np.uint16, np.uint16)
        assert_same_values(got, want)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, real_adata):
    """A collection of 400 pbmc3k cells (counts) then wu2020 as log1p (float32 fractions)."""
    counts = real_adata("pbmc3k")[:400].copy()
    counts.X = counts.X.astype(np.float32)
    logged = real_adata("wu2020").copy()
    logged.X = np.log1p(logged.X).astype(np.float32)
    path = tmp_path_factory.mktemp("mixed") / "mixed.zarr"
    write_annbatch_collection(
        path, [counts, logged], ["counts", "log1p"], dataset_size=400, shuffle=False
    )
    return path


def test_narrow_reads_of_chunks_that_do_not_narrow_are_as_stored(mixed):
    """log1p values stay float32; rows of both groups of a mixed collection widen."""
    plain, store = open_store(mixed), cached_store(mixed, ChunkCache(GB))
    for rows, dtype in [
        (np.arange(0, 400, 3), np.uint16),  # counts only
        (np.arange(400, plain.n_obs, 3), np.float32),  # log1p only
        (np.arange(0, plain.n_obs, 3), np.float32),  # both: one dtype, the wider
    ]:
        got = store.read_rows(rows.astype(np.int64), narrow=True)
        assert got.data.dtype == dtype
        assert_same_values(got, plain.read_rows(rows.astype(np.int64)))


def gathered(located) -> tuple[np.ndarray, np.ndarray]:
    """The indices and values a kernel gather of ``located`` (a LocatedCSR) would write."""

    def join(iovecs, dtype):
        raw = b"".join(ctypes.string_at(int(a), int(n)) for a, n in iovecs.iov)
        return np.frombuffer(raw, dtype)

    return join(located.indices, located.index_dtype), join(located.data, located.dtype)


def test_rows_are_located_in_the_cache_for_the_kernel_to_gather(annbatch_collection):  # noqa: F811
    """Same-host compact frames gather from the cached chunks: no copy into a buffer."""
    path = annbatch_collection.path
    plain, cache = open_store(path), ChunkCache(GB)
    first = cached_store(path, cache, started=False)
    rows = np.arange(0, first.n_obs, 5, dtype=np.int64)
    assert first.locate_rows(rows, narrow=True) is None  # the first read goes uncached
    first.read_rows(rows)
    assert cache.stats().entries == 0  # and locating did not take its turn
    store = cached_store(path, cache)
    for rows in row_sets(plain.n_obs):
        located, want = store.locate_rows(rows, narrow=True), plain.read_rows(rows)
        assert (located.index_dtype, located.dtype) == (np.uint16, np.uint16)
        np.testing.assert_array_equal(located.lengths, np.diff(want.indptr))
        indices, data = gathered(located)
        np.testing.assert_array_equal(indices, want.indices)
        np.testing.assert_array_equal(
            data.astype(np.float32).view(np.uint8), want.data.view(np.uint8)
        )
    # the values are held narrowed: not the stored float32 a raw stream sends
    assert store.locate_rows(rows) is None


def test_rows_in_chunks_of_different_dtypes_are_not_located(mixed):
    plain, store = open_store(mixed), cached_store(mixed, ChunkCache(GB))
    assert store.locate_rows(np.arange(0, plain.n_obs, 3, dtype=np.int64), narrow=True) is None
    rows = np.arange(400, plain.n_obs, 3, dtype=np.int64)  # log1p: held as stored
    located = store.locate_rows(rows, narrow=True)
    assert located.dtype == np.float32
    _, data = gathered(located)
    np.testing.assert_array_equal(data.view(np.uint8), plain.read_rows(rows).data.view(np.uint8))


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, real_adata):
    """wu2020 written compressed by anndata in other layouts, with small chunks."""
    src = real_adata("wu2020")
    adata = ad.AnnData(X=src.X, obs=src.obs, var=src.var)
    root = tmp_path_factory.mktemp("compressed")
    paths = {"h5ad-gzip": root / "wu.h5ad"}
    bare = ad.AnnData(obs=adata.obs, var=adata.var)
    with h5py.File(paths["h5ad-gzip"], "w") as f:
        ad.io.write_elem(f, "/", bare)
        ad.io.write_elem(f, "X", adata.X, dataset_kwargs={"compression": "gzip", "chunks": (5000,)})
    for zarr_format in (2, 3):  # zarr's defaults: Blosc LZ4 (v2), zstd (v3)
        path = paths[f"zarr-v{zarr_format}"] = root / f"wu.v{zarr_format}.zarr"
        with ad.settings.override(zarr_write_format=zarr_format):
            group = zarr.open_group(path, mode="w", zarr_format=zarr_format)
            ad.io.write_elem(group, "/", bare)
            ad.io.write_elem(group, "X", adata.X, dataset_kwargs={"chunks": (5000,)})
    return paths


@pytest.mark.parametrize("layout", ["h5ad-gzip", "zarr-v2", "zarr-v3"])
def test_other_compressed_layouts_are_cached_bit_exactly(compressed, layout):
    plain, cache = open_store(compressed[layout]), ChunkCache(GB)
    store = cached_store(compressed[layout], cache)
    assert isinstance(store._groups[0].matrices["X"]._data, CachedRanges)
    for rows in row_sets(plain.n_obs, count=10):
        assert_same_rows(store.read_rows(rows), plain.read_rows(rows))
    assert cache.stats().hits > 0


def test_uncompressed_arrays_are_not_cached(tmp_path, real_adata):
    path = tmp_path / "wu.h5ad"
    real_adata("wu2020").write_h5ad(path)  # contiguous, read straight from the file
    with caching(ChunkCache(GB)):
        store = open_store(path)
    assert not isinstance(store._groups[0].matrices["X"]._data, CachedRanges)


class _Recording:
    """A range reader that records how many elements each read asks for."""

    def __init__(self, reader) -> None:
        self.reader, self.sizes = reader, []

    def read(self, ranges, out=None):
        self.sizes.append(sum(b - a for a, b in ranges))
        return self.reader.read(ranges, out)


def test_the_first_read_of_an_array_decodes_only_what_it_needs(annbatch_collection):  # noqa: F811
    data = zarr.open_group(annbatch_collection.path, mode="r")["dataset_0/X/data"]
    chunk = int(data.chunks[0])  # the inner chunk of a sharded array
    plain = range_reader(data, complete=True)
    recording = _Recording(plain)
    cache = ChunkCache(GB)
    cached = CachedRanges(recording, cache, chunk, data.shape[0], data.dtype)
    ranges = [(5, 40), (chunk + 3, chunk + 9)]
    want = plain.read(ranges)
    np.testing.assert_array_equal(cached.read(ranges), want)
    assert recording.sizes == [35 + 6]  # the ranges themselves, not their chunks
    assert cache.stats().entries == 0
    np.testing.assert_array_equal(cached.read(ranges), want)
    assert recording.sizes[1:] == [2 * chunk]  # then whole chunks, cached
    assert cache.stats().entries == 2


class _InMemory:
    """A range reader of an in-memory 1-d array (here: of a byte order zarr may store)."""

    def __init__(self, values) -> None:
        self.values = values

    def read(self, ranges, out=None):
        parts = [self.values[a:b] for a, b in ranges]
        return np.concatenate(parts, out=out) if parts else out


@pytest.mark.parametrize(
    ("values", "located"), [(np.arange(600.0), True), (np.arange(600) / 7, False)]
)
def test_big_endian_chunks_are_located_only_once_narrowed(values, located):
    """Frames carry little-endian bytes: big-endian fractions are read, not gathered."""
    stored = values.astype(">f4")
    cached = CachedRanges(_InMemory(stored), ChunkCache(GB), 100, len(stored), stored.dtype)
    cached.read([(0, 1)])  # the first read, uncached
    starts, stops = np.array([5, 150], np.int64), np.array([120, 460], np.int64)
    got = cached.iovecs(starts, stops, narrow=True)
    assert (got is not None) == located
    if got is not None:
        iovecs, dtype = got
        raw = b"".join(ctypes.string_at(int(a), int(n)) for a, n in iovecs.iov)
        want = np.concatenate([stored[5:120], stored[150:460]])
        np.testing.assert_array_equal(np.frombuffer(raw, dtype), want)
        assert dtype == np.uint16


def test_second_reads_hit_the_cache(annbatch_collection):  # noqa: F811
    cache = ChunkCache(GB)
    store = cached_store(annbatch_collection.path, cache)
    rows = np.arange(100, 900, dtype=np.int64)
    first = store.read_rows(rows)
    after_first = cache.stats()
    assert after_first.misses > 0
    again = store.read_rows(rows)
    after_second = cache.stats()
    assert after_second.misses == after_first.misses  # nothing decoded again
    assert after_second.hits > after_first.hits
    assert after_second.entries == after_first.entries
    assert_same_rows(again, first)


def test_the_byte_bound_holds_and_evicts(annbatch_collection):  # noqa: F811
    path = annbatch_collection.path
    plain = open_store(path)
    full = ChunkCache(GB)
    cached_store(path, full).read_rows(np.arange(plain.n_obs))
    held = full.stats().nbytes  # every chunk, narrowed
    bound = held // 4
    cache = ChunkCache(bound)
    store = cached_store(path, cache)
    for rows in row_sets(plain.n_obs, seed=1):
        assert_same_rows(store.read_rows(rows), plain.read_rows(rows))
        stats = cache.stats()
        assert 0 < stats.nbytes <= bound
    assert cache.stats().evictions > 0


def test_a_zero_bound_disables_the_cache(annbatch_collection):  # noqa: F811
    array = zarr.open_group(annbatch_collection.path, mode="r")["dataset_0/X/data"]
    off = range_reader(array, "data", complete=True, cache=ChunkCache(0))
    on = range_reader(array, "data", complete=True, cache=ChunkCache(GB))
    assert not isinstance(off, CachedRanges)
    assert isinstance(on, CachedRanges)
    assert not isinstance(range_reader(array, "data", complete=True), CachedRanges)
    with caching(ChunkCache(0)):
        store = open_store(annbatch_collection.path)
    assert not isinstance(store._groups[0].matrices["X"]._data, CachedRanges)


def test_two_stores_never_share_entries(tmp_path, annbatch_collection, real_adata):  # noqa: F811
    """Same layout, same group names, same array paths: different data."""
    other = write_annbatch_collection(
        tmp_path / "other.zarr",
        [real_adata("pbmc3k")[1000:2200].copy()],
        [str(real_path("pbmc3k"))],
        dataset_size=500,
        seed=1,
    )
    cache = ChunkCache(GB)
    stores = [cached_store(p, cache) for p in (annbatch_collection.path, other.path)]
    stores.append(cached_store(annbatch_collection.path, cache))  # the same path again
    plains = [open_store(p) for p in (annbatch_collection.path, other.path)]
    plains.append(plains[0])
    n = min(s.n_obs for s in stores)
    for rows in row_sets(n, count=10):
        for store, plain in zip(stores, plains, strict=True):
            assert_same_rows(store.read_rows(rows), plain.read_rows(rows))
    a, b = (s.read_rows(np.arange(n)) for s in stores[:2])
    assert not np.array_equal(a.data, b.data)  # the comparison above could tell them apart


def test_concurrent_readers_get_their_rows(annbatch_collection):  # noqa: F811
    path = annbatch_collection.path
    plain = open_store(path)
    sets = row_sets(plain.n_obs, count=READS_PER_THREAD * THREADS, seed=2)
    expected = [plain.read_rows(r) for r in sets]
    cache = ChunkCache(GB // 1000)  # ~1 MB: readers evict each other's chunks
    store = cached_store(path, cache)
    errors: list[BaseException] = []

    def read(k: int) -> None:
        try:
            for i in range(k, len(sets), THREADS):
                assert_same_rows(store.read_rows(sets[i]), expected[i])
        except BaseException as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=read, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]
    assert cache.stats().nbytes <= cache.max_bytes
    assert cache.stats().evictions > 0


def test_a_corrupt_chunk_still_raises_data_loss(tmp_path, annbatch_collection):  # noqa: F811
    path = tmp_path / "broken.zarr"
    shutil.copytree(annbatch_collection.path, path)
    cache = ChunkCache(GB)
    store = cached_store(path, cache)
    group = 1  # dataset_1: rows 500-999
    start = int(store.group_offsets[group])
    shard = path / f"dataset_{group}" / "X" / "data" / "c" / "0"
    raw = bytearray(shard.read_bytes())
    raw[:16] = b"\xab" * 16  # the header of the shard's first inner chunk
    shard.write_bytes(bytes(raw))
    rows = np.arange(start, start + 8, dtype=np.int64)
    for _ in range(2):  # a chunk that failed is not cached: the second read fails too
        with pytest.raises(DataLossError, match=r"dataset_1: X/data: chunk c/0 \(inner chunk 0"):
            store.read_rows(rows)
    # rows of other chunks still read
    fine = np.arange(0, 100, dtype=np.int64)
    assert_same_rows(store.read_rows(fine), open_store(annbatch_collection.path).read_rows(fine))


@pytest.mark.parametrize(
    ("values", "narrows"),
    [
        (np.array([0, 1, 7, 65535], np.float32), True),
        (np.array([0, 1, 65535], np.int32), True),
        (np.array([0, 1, 65535], np.int64), True),
        (np.array([0, 1, 65536], np.int32), False),
        (np.array([0, 1, 65536], np.float32), False),
        (np.array([0, 1.5], np.float32), False),
        (np.array([0, -1], np.float32), False),
        (np.array([0, -1], np.int32), False),
        (np.array([0, np.nan], np.float32), False),
        (np.array([1.0, -0.0], np.float64), False),  # -0.0 would widen to +0.0
        (np.array([3, 4], np.uint16), False),  # already narrow: kept as it is
    ],
)
def test_narrowing_keeps_every_bit(values, narrows):
    # values past the first block too: the check goes block by block
    values = np.concatenate([np.zeros(70_000, values.dtype), values])
    out = narrowed(values)
    assert out.dtype == (np.uint16 if narrows else values.dtype)
    assert not np.shares_memory(out, values)
    np.testing.assert_array_equal(out.astype(values.dtype).view(np.uint8), values.view(np.uint8))


def test_entries_count_their_overhead():
    cache = ChunkCache(2 * (800 + ENTRY_OVERHEAD))
    for k in range(3):
        cache.put_many(0, [(k, np.zeros(100, np.float64))])
    stats = cache.stats()
    assert (stats.entries, stats.evictions, stats.nbytes) == (2, 1, 2 * (800 + ENTRY_OVERHEAD))
    assert set(cache.get_many(0, range(3))) == {1, 2}  # least recently used went first
    cache.put_many(0, [(9, np.zeros(10_000))])  # larger than the bound: not cached
    assert 9 not in cache.get_many(0, [9])
    with pytest.raises(ValueError, match="max_bytes"):
        ChunkCache(-1)


def test_a_read_caches_its_chunks_narrowed_before_it_returns(annbatch_collection):  # noqa: F811
    cache = ChunkCache(GB)
    store = cached_store(annbatch_collection.path, cache)
    rows = np.arange(0, 300, dtype=np.int64)
    x = store.read_rows(rows)
    entries = list(cache._entries.values())
    assert entries
    assert {e.dtype for e in entries} == {np.dtype("u2")}  # pbmc3k's counts and gene indices
    # copies, not views of the array the read decoded into: no entry keeps that alive
    assert all(e.flags.owndata for e in entries)
    assert not any(np.shares_memory(e, a) for e in entries for a in (x.data, x.indices))
    assert cache.get_many(cache.key_space(), [0]) == {}  # another key space


def test_missing_chunks_are_decoded_a_bounded_scratch_at_a_time(annbatch_collection, monkeypatch):  # noqa: F811
    data = zarr.open_group(annbatch_collection.path, mode="r")["dataset_0/X/data"]
    chunk = int(data.chunks[0])  # the inner chunk of a sharded array
    plain = range_reader(data, complete=True)
    recording = _Recording(plain)
    monkeypatch.setattr(cache_module, "SCRATCH_BYTES", 2 * chunk * data.dtype.itemsize)
    cached = CachedRanges(recording, ChunkCache(GB), chunk, data.shape[0], data.dtype)
    cached.read([(4 * chunk, 4 * chunk + 1)])  # the first read (not cached)
    recording.sizes.clear()
    assert data.shape[0] > 7 * chunk
    ranges = [(5, 3 * chunk + 3), (5 * chunk + 1, 7 * chunk)]  # chunks 0-3 and 5-6
    got = cached.read(ranges)
    np.testing.assert_array_equal(got.view(np.uint8), plain.read(ranges).view(np.uint8))
    assert recording.sizes == [2 * chunk] * 3  # 6 chunks, 2 at a time
    recording.sizes.clear()
    np.testing.assert_array_equal(cached.read(ranges), got)
    assert recording.sizes == []  # all cached


def test_default_bound_is_a_share_of_available_memory(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  8000000 kB\nMemAvailable:  4000000 kB\n")
    assert default_cache_bytes(str(meminfo)) == 4000000 * 1024 // 4
    meminfo.write_text("MemAvailable:  1000000000 kB\n")  # 1 TB available: capped
    assert default_cache_bytes(str(meminfo)) == 32 * GB


# --- the daemon's --cache-gb ----------------------------------------------------------
def scrape(daemon: Daemon) -> dict[str, float]:
    url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=RPC_TIMEOUT) as reply:
        text = reply.read().decode()
    found = re.findall(r"^(annserve_chunk_cache_\w+) (\S+)$", text, re.MULTILINE)
    return {name: float(value) for name, value in found}


def stream_epochs(address: str, n_obs: int, epochs: int):
    loader = RemoteLoader(
        address,
        batch_size=128,
        chunk_size=32,
        preload_nchunks=4,
        seed=3,
        return_index=True,
        output=Output(to_torch=False),
        connection=Connection(timeout=RPC_TIMEOUT),
    )
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        batches = list(loader)
        index = np.concatenate([b["index"] for b in batches])
        assert np.array_equal(np.sort(index), np.arange(n_obs))
        yield index, batches


@pytest.mark.parametrize("how", ["flag", "env"])
def test_daemon_serves_later_epochs_from_the_cache(annbatch_collection, how):  # noqa: F811
    coll = annbatch_collection
    args, env = ["--store", str(coll.path), "--metrics-port", "0"], {}
    if how == "flag":
        args += ["--cache-gb", "0.5"]
    else:
        env["ANNSERVE_CACHE_GB"] = "0.5"
    x = coll.adata.X.tocsr()
    with Daemon(args, env) as daemon:
        assert "decoded-chunk cache of compressed CSR arrays: up to 0.50 GB" in daemon.text()
        seen = []
        for index, batches in stream_epochs(daemon.address, coll.adata.n_obs, 2):
            got = sp.vstack([as_scipy(b["X"]) for b in batches], format="csr")
            assert (got != x[index]).nnz == 0
            seen.append(scrape(daemon))
        first, second = seen
        assert first["annserve_chunk_cache_max_bytes"] == 0.5e9
        assert 0 < first["annserve_chunk_cache_bytes"] <= 0.5e9
        # the second epoch decoded nothing: every chunk was cached in the first
        misses, hits = "annserve_chunk_cache_misses_total", "annserve_chunk_cache_hits_total"
        assert second[misses] == first[misses]
        assert second[hits] > first[hits]


def test_cache_gb_0_turns_the_cache_off(annbatch_collection):  # noqa: F811
    args = ["--store", str(annbatch_collection.path), "--metrics-port", "0", "--cache-gb", "0"]
    with Daemon(args) as daemon:
        assert "decoded-chunk cache off" in daemon.text()
        for _ in stream_epochs(daemon.address, annbatch_collection.adata.n_obs, 1):
            pass
        assert scrape(daemon) == {}


@pytest.mark.parametrize("value", ["-1", "inf", "nan"])
def test_a_cache_gb_out_of_range_is_a_bad_argument(annbatch_collection, value):  # noqa: F811
    done = subprocess.run(
        [*annserve_command(), "--store", str(annbatch_collection.path), "--cache-gb", value],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert f"--cache-gb must be a number of GB >= 0, got {float(value)}" in done.stderr
