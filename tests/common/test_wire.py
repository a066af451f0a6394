from __future__ import annotations

import numpy as np
import pytest

from annserve.errors import FrameDecodeError
from annserve.server.stream.encode import compact_values
from annserve.v1 import annserve_pb2 as pb
from annserve.wire import ALIGN, decode_frame, encode_frame

ARRAYS = [
    ("row_nnz", np.array([3, 0, 2], dtype=np.uint16)),
    ("indices", np.array([0, 5, 9, 1, 2], dtype=np.uint16)),
    ("data", np.array([1, 2, 300, 4, 5], dtype=np.uint16)),
    ("index", np.array([10, 11, 12], dtype=np.int64)),
    ("obs/flag", np.array([True, False, True])),
    ("X", np.arange(12, dtype=np.float32).reshape(3, 4)),
]


def frame(arrays=ARRAYS) -> bytes:
    header = pb.BatchHeader(batch=2, batch_rows=3, row_start=0, n_rows=3, n_vars=10, sparse=True)
    return encode_frame(header, arrays)


def test_round_trip_keeps_arrays_and_header():
    decoded = decode_frame(frame())
    assert decoded.header.batch == 2
    assert decoded.header.n_rows == 3
    for name, array in ARRAYS:
        got = decoded.arrays[name]
        assert got.dtype == array.dtype
        np.testing.assert_array_equal(got, array)


def test_frame_is_a_valid_protobuf_message():
    parsed = pb.BatchFrame.FromString(frame())
    assert parsed.header.batch_rows == 3
    spec = {a.name: a for a in parsed.header.arrays}["X"]
    x = np.frombuffer(parsed.payload, dtype=spec.dtype, count=12, offset=spec.offset)
    np.testing.assert_array_equal(x, np.arange(12, dtype=np.float32))


def test_arrays_are_aligned_in_payload():
    for spec in pb.BatchFrame.FromString(frame()).header.arrays:
        assert spec.offset % ALIGN == 0


def aligned_copy(buf: bytes) -> np.ndarray:
    """``buf`` copied to a writable buffer starting at an ALIGN-byte aligned address."""
    room = np.empty(len(buf) + ALIGN, np.uint8)
    start = -room.ctypes.data % ALIGN
    out = room[start : start + len(buf)]
    out[:] = np.frombuffer(buf, np.uint8)
    return out


@pytest.mark.parametrize("n_names", [0, 1, 2, 3, 5, 8, 13, 40])
def test_arrays_of_a_frame_in_aligned_memory_are_aligned(n_names):
    # the header's length varies with its obs_names; the padding field absorbs it
    header = pb.BatchHeader(batch=1, batch_rows=3, n_rows=3, obs_names=["c"] * n_names)
    raw = encode_frame(header, ARRAYS)
    decoded = decode_frame(aligned_copy(raw).data)
    for name, array in ARRAYS:
        got = decoded.arrays[name]
        assert got.ctypes.data % ALIGN == 0, name
        assert got.flags.aligned
        np.testing.assert_array_equal(got, array)
    padding = pb.BatchFrame.FromString(raw).padding
    assert padding == bytes(len(padding))


def test_a_frame_without_padding_still_decodes():
    # a daemon from before BatchFrame.padding: payload right after the header
    header = pb.BatchHeader(batch=1, batch_rows=3, n_rows=3)
    arrays = decode_frame(frame()).header.arrays
    header.arrays.extend(arrays)
    payload = bytes(pb.BatchFrame.FromString(frame()).payload)
    old = pb.BatchFrame(header=header, payload=payload).SerializeToString()
    np.testing.assert_array_equal(decode_frame(old).arrays["X"], ARRAYS[-1][1])


def test_big_endian_input_is_sent_little_endian():
    be = np.arange(4, dtype=">u4")
    got = decode_frame(frame([("data", be)])).arrays["data"]
    assert got.dtype == np.dtype("<u4")
    np.testing.assert_array_equal(got, be)


def test_empty_arrays():
    got = decode_frame(frame([("indices", np.zeros(0, np.uint16))])).arrays["indices"]
    assert got.shape == (0,)


@pytest.mark.parametrize("cut", [1, 5, 40, -1, -100])
def test_truncated_frame_raises(cut):
    raw = frame()
    with pytest.raises(FrameDecodeError):
        decode_frame(raw[:cut])


def test_array_overrunning_payload_raises():
    header = pb.BatchHeader(n_rows=1)
    header.arrays.add(name="data", dtype="<f4", shape=[100], offset=0)
    raw = pb.BatchFrame(header=header, payload=b"\0" * 16).SerializeToString()
    with pytest.raises(FrameDecodeError, match="overruns"):
        decode_frame(raw)


@pytest.mark.parametrize("dtype", ["|O", ">f4", "not-a-dtype", "<U4"])
def test_unsafe_or_unknown_dtype_raises(dtype):
    header = pb.BatchHeader(n_rows=1)
    header.arrays.add(name="data", dtype=dtype, shape=[1], offset=0)
    raw = pb.BatchFrame(header=header, payload=b"\0" * 16).SerializeToString()
    with pytest.raises(FrameDecodeError):
        decode_frame(raw)


def test_frame_without_header_raises():
    with pytest.raises(FrameDecodeError, match="no header"):
        decode_frame(pb.BatchFrame(payload=b"abc").SerializeToString())


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        (np.array([0, 1, 255], np.float32), np.uint8),
        (np.array([0, 256, 7], np.float32), np.uint16),
        (np.array([70000, 1], np.float64), np.uint32),
        (np.array([3, 4], np.int64), np.uint8),
        (np.array([0.5, 1], np.float32), np.float32),
        (np.array([-1, 2], np.float32), np.float32),
        (np.array([np.nan, 2], np.float32), np.float32),
        (np.array([2.0**33], np.float64), np.float64),
        (np.array([0.1, 3], np.float64), np.float64),  # float32 would round 0.1
        (np.array([-5, 3], np.int64), np.int64),
        (np.array([-3, -1], np.int16), np.int16),
        (np.array([np.inf, 1], np.float32), np.float32),
        (np.array([65535, -65535], np.float32), np.float32),  # -65535 wraps to 1 in uint16
        (np.zeros(0, np.float32), np.uint8),
    ],
)
def test_compact_values_is_lossless(values, dtype):
    compact = compact_values(values)
    assert compact.dtype == dtype
    np.testing.assert_array_equal(compact, values)
