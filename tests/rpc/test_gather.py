"""pwrite_parts: a frame written into a memfd is byte for byte the frame encode_frame makes."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from annserve.server.rpc.gather import _advance, iovecs, pwrite_parts
from annserve.v1 import annserve_pb2 as pb
from annserve.wire import IOV_MAX, Pieces, encode_frame, frame_parts

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="needs Linux memfd")


def row_pieces(values: np.ndarray, n_rows: int, seed: int) -> Pieces:
    """Random rows of ``values`` in a random order, some of them empty."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(values), n_rows)
    stops = np.minimum(starts + rng.integers(0, 40, n_rows), len(values))
    return Pieces(values, starts, stops, int((stops - starts).sum()))


def written(parts, offset: int = 0) -> bytes:
    """What pwrite_parts leaves in a fresh memfd, from ``offset`` on."""
    fd = os.memfd_create("test-gather")
    try:
        n = pwrite_parts(fd, parts, offset)
        assert n == os.fstat(fd).st_size - offset
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize("n_rows", [0, 1, IOV_MAX - 1, 3 * IOV_MAX + 5])
def test_frame_written_equals_encoded_frame(n_rows: int) -> None:
    values = np.arange(50_000, dtype=np.uint16)
    data = np.random.default_rng(1).random(50_000, dtype=np.float32)
    indices, x = row_pieces(values, n_rows, seed=2), row_pieces(data, n_rows, seed=3)
    arrays = [("indptr", np.arange(n_rows + 1, dtype=np.int64)), ("indices", indices), ("x", x)]
    expected = encode_frame(pb.BatchHeader(batch=7, n_rows=n_rows), arrays)
    parts, nbytes = frame_parts(pb.BatchHeader(batch=7, n_rows=n_rows), arrays)
    got = written(parts, offset=123)
    assert len(got) == nbytes
    assert got == expected


def test_iovecs_point_into_the_parts() -> None:
    values = np.arange(100, dtype=np.int32)
    pieces = Pieces(values, np.array([10, 0]), np.array([12, 3]), 5)
    iov, owners = iovecs([b"head", pieces])
    assert iov.dtype == np.uint64
    assert iov.shape == (3, 2)
    base = values.ctypes.data
    assert iov[1:].tolist() == [[base + 40, 8], [base, 12]]
    assert iov[0, 1] == 4
    assert any(o is values for o in owners)


def test_a_partial_write_resumes_inside_the_entry() -> None:
    block = np.array([[1000, 3], [2000, 5], [3000, 2]], np.uint64)
    assert _advance(block, 4) == 1
    assert block.tolist() == [[1000, 3], [2001, 4], [3000, 2]]
    assert _advance(block[1:], 6) == 2


def test_zero_length_tail_is_consumed() -> None:
    block = np.array([[1000, 3], [2000, 0]], np.uint64)
    assert _advance(block, 3) == 2


def test_bad_descriptor_raises_oserror() -> None:
    with pytest.raises(OSError, match="Bad file descriptor") as err:
        pwrite_parts(-1, [b"abc"], 0)
    assert err.value.errno == errno.EBADF
