"""Server encoding -> frames -> client assembly, without a server, for every encoding case."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from annserve.client._assemble import BatchAssembler, CSRArrays
from annserve.errors import FrameDecodeError
from annserve.server.io.store import open_store
from annserve.server.plan.request import plan_stream
from annserve.server.plan.selection import make_sampler
from annserve.server.stream.frames import _distinct, epoch_frames
from annserve.v1 import annserve_pb2 as pb
from annserve.wire import Pieces, decode_frame, encode_frame, frame_buffers, frame_parts

ENCODINGS = {"raw": pb.ENCODING_RAW, "compact": pb.ENCODING_COMPACT}
COMPRESSIONS = {
    "none": pb.COMPRESSION_NONE,
    "zstd": pb.COMPRESSION_ZSTD,
    "lz4": pb.COMPRESSION_LZ4,
    "blosc": pb.COMPRESSION_BLOSC,
}


def counts(rng, n_obs, n_vars, high, dtype=np.float32, density=0.2) -> sp.csr_matrix:
    x = sp.random(
        n_obs,
        n_vars,
        density=density,
        format="csr",
        random_state=rng,
        data_rvs=lambda k: rng.integers(1, high, k, endpoint=True),
    )
    x.data[0] = high  # the largest value is present
    return x.astype(dtype)


def write(tmp_path, x, name="store.h5ad"):
    path = tmp_path / name
    ad.AnnData(x).write_h5ad(path)
    return path


def stream(path, *, encoding="compact", compression="none", batch_size=7, shuffle=True):
    store = open_store(path)
    request = pb.StreamBatchesRequest(
        batch_size=batch_size,
        chunk_size=3,
        preload_nchunks=2,
        shuffle=shuffle,
        seed=0,
        return_index=True,
        encoding=ENCODINGS[encoding],
        compression=COMPRESSIONS[compression],
    )
    plan = plan_stream(request, store)
    sampler = make_sampler(store, plan)
    return [frame.data for frame in epoch_frames(store, sampler, plan)], store


def assemble(frames, n_vars):
    return list(BatchAssembler([], [], n_vars).batches(iter(frames)))


def dense_of(x) -> np.ndarray:
    if isinstance(x, CSRArrays):
        return sp.csr_matrix((x.data, x.indices, x.indptr), shape=x.shape).toarray()
    return x


def check_epoch(frames, x_expected):
    batches = assemble(frames, x_expected.shape[1])
    seen = []
    for batch in batches:
        idx = batch["index"]
        want = x_expected[idx]
        want = want.toarray() if sp.issparse(want) else want
        got = dense_of(batch["X"])
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.astype(np.float32))
        if isinstance(batch["X"], CSRArrays):  # sparsity pattern kept, not just values
            assert len(batch["X"].data) == sp.csr_matrix(want).nnz
        seen.append(idx)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(x_expected.shape[0]))


@pytest.mark.parametrize(
    ("high", "store_dtype", "wire_dtype"),
    [
        (255, np.float32, np.uint8),
        (256, np.float32, np.uint16),
        (65_535, np.float32, np.uint16),
        (70_000, np.float32, np.uint32),
        (300, np.float64, np.uint16),
        (9, np.int32, np.uint8),
        # counts stored narrow (annserve convert) go out as stored: no min/max pass, no copy
        (9, np.uint16, np.uint16),
        (300, np.uint16, np.uint16),
        (9, np.uint8, np.uint8),
    ],
)
@pytest.mark.parametrize("encoding", ["compact", "raw"])
def test_integer_counts_round_trip(tmp_path, high, store_dtype, wire_dtype, encoding):
    rng = np.random.default_rng(0)
    x = counts(rng, 40, 30, high, store_dtype)
    frames, _ = stream(write(tmp_path, x), encoding=encoding)
    data_dtypes = {decode_frame(f).arrays["data"].dtype for f in frames}
    if encoding == "compact":
        assert max(data_dtypes, key=lambda d: d.itemsize) == np.dtype(wire_dtype)
    else:
        assert data_dtypes == {np.dtype(store_dtype)}
    check_epoch(frames, x)


@pytest.mark.parametrize("encoding", ["compact", "raw"])
def test_non_integer_values_travel_as_float32(tmp_path, encoding):
    rng = np.random.default_rng(1)
    x = sp.random(30, 20, density=0.3, format="csr", random_state=rng, dtype=np.float32)
    x.data -= 0.25  # negative and fractional values
    frames, _ = stream(write(tmp_path, x), encoding=encoding)
    assert {decode_frame(f).arrays["data"].dtype for f in frames} == {np.dtype(np.float32)}
    check_epoch(frames, x)


def test_empty_rows_and_an_empty_store_region(tmp_path):
    rng = np.random.default_rng(2)
    x = counts(rng, 25, 12, 5).tolil()
    x[3:17] = 0  # whole chunks and preload buffers without a single non-zero
    x = x.tocsr()
    x.eliminate_zeros()
    frames, _ = stream(write(tmp_path, x))
    check_epoch(frames, x)


def test_batch_of_one_row(tmp_path):
    x = counts(np.random.default_rng(3), 5, 8, 3)
    frames, _ = stream(write(tmp_path, x), batch_size=1)
    assert len(assemble(frames, 8)) == 5
    check_epoch(frames, x)


def test_single_row_store(tmp_path):
    x = counts(np.random.default_rng(4), 1, 8, 3, density=0.5)
    frames, _ = stream(write(tmp_path, x), batch_size=64)
    check_epoch(frames, x)


@pytest.mark.parametrize("encoding", ["compact", "raw"])
@pytest.mark.parametrize("values", ["counts", "floats"])
def test_dense_x(tmp_path, encoding, values):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 300, (23, 9)) if values == "counts" else rng.normal(size=(23, 9))
    x = x.astype(np.float32)
    frames, _ = stream(write(tmp_path, x), encoding=encoding)
    assert all("X" in decode_frame(f).arrays for f in frames)
    check_epoch(frames, x)


@pytest.mark.parametrize("compression", ["zstd", "lz4", "blosc"])
def test_compressed_payloads_round_trip(tmp_path, compression):
    x = counts(np.random.default_rng(6), 50, 40, 1000)
    frames, _ = stream(write(tmp_path, x), compression=compression)
    assert all(decode_frame(f).header.compression == COMPRESSIONS[compression] for f in frames)
    check_epoch(frames, x)


def test_corrupt_compressed_payload_raises(tmp_path):
    x = counts(np.random.default_rng(7), 20, 40, 1000)
    frames, _ = stream(write(tmp_path, x), compression="zstd")
    frame = pb.BatchFrame.FromString(frames[0])
    frame.payload = frame.payload[: len(frame.payload) // 2]
    with pytest.raises(FrameDecodeError, match="decompress"):
        decode_frame(frame.SerializeToString())


def test_frames_out_of_sequence_raise(tmp_path):
    x = counts(np.random.default_rng(8), 20, 10, 5)
    frames, _ = stream(write(tmp_path, x), batch_size=4)
    with pytest.raises(FrameDecodeError, match="out of sequence"):
        assemble([frames[0], frames[2]], 10)
    partial = pb.BatchFrame.FromString(frames[0])
    partial.header.batch_rows += 1  # promises a row that never comes
    with pytest.raises(FrameDecodeError, match="inside batch"):
        assemble([partial.SerializeToString()], 10)


def test_inconsistent_csr_arrays_raise(tmp_path):
    x = counts(np.random.default_rng(9), 20, 10, 5)
    frames, _ = stream(write(tmp_path, x), batch_size=20, encoding="raw")
    frame = pb.BatchFrame.FromString(frames[0])
    spec = {a.name: a for a in frame.header.arrays}["indices"]
    spec.shape[0] -= 1  # one index fewer than the rows claim
    with pytest.raises(FrameDecodeError, match="disagree"):
        assemble([frame.SerializeToString(), *frames[1:]], 10)


def test_column_index_out_of_range_raises(tmp_path):
    x = counts(np.random.default_rng(10), 20, 10, 5)
    frames, _ = stream(write(tmp_path, x), batch_size=20)
    with pytest.raises(FrameDecodeError, match="out of range"):
        assemble(frames, 5)  # the client believes there are only 5 genes


def test_batch_denser_than_its_first_frame(tmp_path):
    # the client sizes a batch's arrays from its first frame; later, denser frames
    # (here a whole preload buffer of dense rows) make it move them to larger ones
    x = np.zeros((24, 40), np.float32)
    x[np.arange(6), np.arange(6)] = 1  # the first buffer: one count per row
    x[6:] = np.random.default_rng(11).integers(1, 50, (18, 40))
    frames, _ = stream(write(tmp_path, sp.csr_matrix(x)), batch_size=12, shuffle=False)
    assert len(frames) > len(assemble(frames, 40))  # batches of several frames
    check_epoch(frames, sp.csr_matrix(x))


def test_frame_buffers_are_the_frame_in_bounded_lists():
    # a writer gathering the buffers itself (shared memory) writes exactly encode_frame's
    # bytes, in lists of at most `size` buffers (what one pwritev takes)
    rng = np.random.default_rng(12)
    values = rng.integers(0, 1000, 500).astype(np.uint16)
    starts = rng.permutation(450)[:40]
    stops = starts + rng.integers(0, 50, 40)
    pieces = Pieces(values, starts, stops, int((stops - starts).sum()))
    arrays = [("row_nnz", (stops - starts).astype(np.uint8)), ("data", pieces), ("index", starts)]

    def header():
        return pb.BatchHeader(batch=0, batch_rows=40, n_rows=40, n_vars=1000, sparse=True)

    parts, nbytes = frame_parts(header(), arrays)
    runs = list(frame_buffers(parts, size=7))
    assert max(len(run) for run in runs) <= 7
    joined = b"".join(buf for run in runs for buf in run)
    assert len(joined) == nbytes
    assert joined == encode_frame(header(), arrays)
    expected = np.concatenate([values[a:b] for a, b in zip(starts, stops, strict=True)])
    np.testing.assert_array_equal(decode_frame(joined).arrays["data"], expected)


@pytest.mark.parametrize(
    "rows",
    [
        np.array([], np.int64),
        np.array([5], np.int64),
        np.random.default_rng(0).permutation(8192),
        np.random.default_rng(1).integers(0, 100, 1000),  # drawn with replacement
    ],
    ids=["empty", "one", "permutation", "repeats"],
)
def test_distinct_rows_match_unique_and_searchsorted(rows):
    distinct, positions = _distinct(rows)
    expected = np.unique(rows)
    np.testing.assert_array_equal(distinct, expected)
    np.testing.assert_array_equal(positions, np.searchsorted(expected, rows))
    np.testing.assert_array_equal(distinct[positions], rows)
