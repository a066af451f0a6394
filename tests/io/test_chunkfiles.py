"""Range reads and mapped gathers straight from uncompressed zarr and HDF5 files, against numpy."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import h5py
import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

from annserve.errors import DataLossError, StoreFormatError
from annserve.server.io import chunkfiles
from annserve.server.io.chunkfiles import ChunkFileRanges
from annserve.server.io.ranges import range_reader
from annserve.server.rpc.gather import pwrite_parts
from annserve.wire import Iovecs

if TYPE_CHECKING:
    from annserve.server.io.mapped import RowIovecs


@pytest.fixture(scope="module")
def counts(real_adata):
    """Non-zero counts of a real matrix (pbmc3k) as stored by convert, uint16."""
    return real_adata("pbmc3k").X.data[:40_000].astype(np.uint16)


def _sharded(inner, *, index_location="end", checksum=True):
    index = [BytesCodec(), Crc32cCodec()] if checksum else [BytesCodec()]
    return ShardingCodec(
        chunk_shape=(inner,),
        codecs=[BytesCodec()],
        index_codecs=index,
        index_location=index_location,
    )


LAYOUTS = {
    "chunks": {"chunks": (700,), "compressors": None},
    "shards": {"chunks": (3000,), "serializer": _sharded(250), "compressors": None},
    "shards-index-first": {
        "chunks": (3000,),
        "compressors": None,
        "serializer": _sharded(250, index_location="start"),
    },
    "shards-no-checksum": {
        "chunks": (1000,),
        "compressors": None,
        "serializer": _sharded(100, checksum=False),
    },
}


H5_LAYOUTS = {
    "h5-contiguous": {},
    "h5-chunks": {"chunks": (700,)},
    # a user block shifts every address in the file
    "h5-userblock": {"chunks": (700,), "file": {"userblock_size": 4096}},
}


def _array(path, values, layout, fill_value=0):
    """Write ``values`` in ``layout``; return the array (zarr) or dataset (HDF5, file kept open)."""
    if layout in H5_LAYOUTS:
        options = dict(H5_LAYOUTS[layout])
        f = h5py.File(path.with_suffix(".h5"), "w", **options.pop("file", {}))
        ds = f.create_dataset(
            "a", shape=values.shape, dtype=values.dtype, fillvalue=fill_value, **options
        )
        nonfill = np.flatnonzero(values != fill_value)  # HDF5 allocates only chunks written to
        if len(nonfill):
            ds[nonfill[0] : nonfill[-1] + 1] = values[nonfill[0] : nonfill[-1] + 1]
        f.flush()
        return ds
    array = zarr.create_array(
        path, shape=values.shape, dtype=values.dtype, fill_value=fill_value, **LAYOUTS[layout]
    )
    array[...] = values
    return array


def _ranges(rng, n, count):
    """Sorted ``[a, b)`` ranges of ``0..n`` with gaps, one of them empty."""
    cuts = np.sort(rng.choice(np.arange(1, n), size=2 * count, replace=False))
    ranges = [(int(a), int(b)) for a, b in cuts.reshape(-1, 2)]
    ranges.insert(1, (ranges[0][1], ranges[0][1]))
    return ranges


def _check_reads(reader, values, seed=0, rounds=10):
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        ranges = _ranges(rng, len(values), int(rng.integers(1, 60)))
        expected = np.concatenate([values[a:b] for a, b in ranges])
        np.testing.assert_array_equal(reader.read(ranges), expected)
        out = np.empty_like(expected)
        assert reader.read(ranges, out) is out
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("layout", [*LAYOUTS, *H5_LAYOUTS])
@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.float32, np.int64])
def test_reads_match_numpy(tmp_path, counts, layout, dtype):
    values = counts.astype(dtype)
    reader = range_reader(_array(tmp_path / "a.zarr", values, layout))
    assert isinstance(reader, ChunkFileRanges)
    _check_reads(reader, values)
    assert len(reader.read([(5, 5)])) == 0


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_absent_chunks_read_as_fill_value(tmp_path, counts, layout):
    # zarr writes no chunk (and no shard) that holds only the fill value
    values = counts.copy()
    values[:9000] = 7
    values[20_000:32_000] = 7
    reader = range_reader(_array(tmp_path / "a.zarr", values, layout, fill_value=7))
    stored = {p.name for p in (tmp_path / "a.zarr" / "c").iterdir()}
    assert "0" not in stored  # the first chunk file is absent
    _check_reads(reader, values, seed=1)


def test_unallocated_hdf5_chunks_read_as_fill_value(tmp_path, counts):
    values = np.full_like(counts, 7)
    values[9000:20_000] = counts[9000:20_000]  # chunks before and after are never written
    ds = _array(tmp_path / "a", values, "h5-chunks", fill_value=7)
    assert ds.id.get_num_chunks() < -(-len(values) // ds.chunks[0])
    reader = range_reader(ds)
    assert isinstance(reader, ChunkFileRanges)
    _check_reads(reader, values, seed=1)


def test_other_layouts_go_through_zarr(tmp_path, counts):
    compressed = zarr.create_array(
        tmp_path / "z.zarr", shape=counts.shape, dtype=counts.dtype, chunks=(700,)
    )
    dense = zarr.create_array(
        tmp_path / "d.zarr", shape=(10, 4), dtype=np.float32, chunks=(5, 4), compressors=None
    )
    v2 = zarr.create_array(
        tmp_path / "v2.zarr",
        shape=counts.shape,
        dtype=counts.dtype,
        chunks=(700,),
        compressors=None,
        zarr_format=2,
    )
    with h5py.File(tmp_path / "a.h5", "w") as f:
        gzip = f.create_dataset("gzip", data=counts, chunks=(700,), compression="gzip")
        shuffled = f.create_dataset("shuffle", data=counts, chunks=(700,), shuffle=True)
        big_endian = f.create_dataset("be", data=counts.astype(">u2"))
        for array in (compressed, dense, v2, gzip, shuffled, big_endian):
            assert not isinstance(range_reader(array), ChunkFileRanges), array


def test_concurrent_reads(tmp_path, counts):
    # streams share a store's readers, and with them the shard index cache
    reader = range_reader(_array(tmp_path / "a.zarr", counts, "shards"))
    with ThreadPoolExecutor(4) as pool:
        runs = [pool.submit(_check_reads, reader, counts, seed=s, rounds=20) for s in range(4)]
        for run in runs:
            run.result(timeout=60)  # re-raises a failed comparison


def test_corrupt_shard_index_is_refused(tmp_path, counts):
    _array(tmp_path / "a.zarr", counts, "shards")
    shard = tmp_path / "a.zarr" / "c" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # inside the index, before its checksum
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreFormatError, match="checksum"):  # on opening or reading
        range_reader(zarr.open_array(tmp_path / "a.zarr", mode="r")).read([(0, 10)])


@pytest.mark.parametrize("layout", ["chunks", "shards-no-checksum"])
def test_truncated_chunk_file_is_refused(tmp_path, counts, layout):
    _array(tmp_path / "a.zarr", counts, layout)
    first = tmp_path / "a.zarr" / "c" / "0"
    first.write_bytes(first.read_bytes()[:100])
    with pytest.raises(StoreFormatError, match=r"c/0"):
        range_reader(zarr.open_array(tmp_path / "a.zarr", mode="r")).read([(0, 600)])


def test_a_layout_read_wrongly_falls_back_to_the_library(tmp_path, counts, monkeypatch, caplog):
    ds = _array(tmp_path / "a", counts, "h5-chunks")
    real_locate = chunkfiles._H5Chunks.locate

    def shifted(self, k):  # as if chunk addresses were misunderstood
        path, offset = real_locate(self, k)
        return path, offset + 2

    monkeypatch.setattr(chunkfiles._H5Chunks, "locate", shifted)
    with caplog.at_level("WARNING", logger=chunkfiles.__name__):
        reader = range_reader(ds)
    assert not isinstance(reader, ChunkFileRanges)
    assert "layout not understood" in caplog.text
    _check_reads(reader, counts)


def _gathered(rows: RowIovecs, positions: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """What the kernel gathers from ``rows`` at ``positions``: ``pwritev`` into a memfd."""
    iov = rows.take(positions)
    nbytes = int(iov[:, 1].sum())
    fd = os.memfd_create("mapped-test")
    try:
        part = Iovecs(iov, np.dtype(dtype), nbytes // np.dtype(dtype).itemsize, rows.owners)
        assert pwrite_parts(fd, [part], 0) == nbytes
        return np.frombuffer(os.pread(fd, nbytes, 0), dtype)
    finally:
        os.close(fd)


@pytest.mark.parametrize("layout", [*LAYOUTS, *H5_LAYOUTS])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_mapped_rows_gather_like_numpy(tmp_path, counts, layout, dtype):
    values = counts.astype(dtype)
    reader = range_reader(_array(tmp_path / "a.zarr", values, layout))
    assert isinstance(reader, ChunkFileRanges)
    rng = np.random.default_rng(1)
    for _ in range(5):  # rows cross chunk (and shard) boundaries; one is empty
        ranges = np.array(_ranges(rng, len(values), int(rng.integers(1, 60))), np.int64)
        rows = reader.mapped().iovecs(ranges[:, 0], ranges[:, 1])
        positions = rng.permutation(len(ranges))
        expected = np.concatenate([values[a:b] for a, b in ranges[positions]])
        np.testing.assert_array_equal(_gathered(rows, positions, values.dtype), expected)
    assert len(rows.offsets) == len(ranges) + 1


@pytest.mark.parametrize(
    ("layout", "file", "named"),
    [("chunks", "a.zarr/c/1", "chunk c/1 "), ("h5-contiguous", "a.h5", "chunk 0 ")],
)
def test_a_file_truncated_before_rows_are_located_is_refused_by_chunk(
    tmp_path, counts, layout, file, named
):
    reader = range_reader(_array(tmp_path / "a.zarr", counts, layout))
    assert isinstance(reader, ChunkFileRanges)
    os.truncate(tmp_path / file, 100)  # before the rows [750, 800) (or the dataset's end)
    n = len(counts)
    with pytest.raises(DataLossError, match=f"{named}is cut short: its file is truncated"):
        reader.mapped().iovecs(np.array([750, n - 10]), np.array([800, n]))


def test_a_file_truncated_under_located_rows_fails_their_write_not_the_daemon(tmp_path, counts):
    reader = range_reader(_array(tmp_path / "a", counts, "h5-contiguous"))
    assert isinstance(reader, ChunkFileRanges)
    rows = reader.mapped().iovecs(np.array([0, 20_000]), np.array([100, 30_000]))
    gathered = _gathered(rows, np.arange(2), counts.dtype)
    np.testing.assert_array_equal(gathered, np.r_[counts[:100], counts[20_000:30_000]])
    os.truncate(tmp_path / "a.h5", 8192)  # the kernel's copy past the end fails: EFAULT
    with pytest.raises(DataLossError, match="shrank while its rows were being sent"):
        _gathered(rows, np.arange(2), counts.dtype)


@pytest.mark.parametrize("layout", ["chunks", "shards"])
def test_mapped_rows_in_an_absent_chunk_are_lost_data(tmp_path, counts, layout):
    values = counts.copy()
    values[:9000] = 7  # zarr writes no chunk (or shard) holding only the fill value
    reader = range_reader(_array(tmp_path / "a.zarr", values, layout, fill_value=7))
    assert isinstance(reader, ChunkFileRanges)
    rows = reader.mapped().iovecs(np.array([9000]), np.array([9500]))  # stored: fine
    np.testing.assert_array_equal(_gathered(rows, np.arange(1), values.dtype), values[9000:9500])
    with pytest.raises(DataLossError, match=r"chunk c/0.* is missing from the store"):
        reader.mapped().iovecs(np.array([100, 9000]), np.array([200, 9500]))
