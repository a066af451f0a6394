"""The frame codec shared by server and client.

A frame is the protobuf encoding of ``annserve.v1.BatchFrame``: field 1 (the
small :class:`BatchHeader`) written by protobuf, field 2 (``payload``) written
here directly from the arrays' buffers, so the bulk bytes are copied once when
the frame is built and never when it is read. Field 3 (``padding``, zero bytes)
places the payload at a 64-byte aligned offset of the frame, and each array starts
at a 64-byte aligned offset of the payload: in a buffer that is itself aligned (a
shared-memory segment, a bulk record, a pooled buffer) every array is, so numpy
and torch take their aligned loops (a reduction over an unaligned array copies it
through a buffer first).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Protocol

import numpy as np

from annserve.errors import FrameDecodeError
from annserve.v1 import annserve_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    #: A buffer of a frame, as ``os.pwritev`` and ``bytes.join`` take it.
    Buffer = bytes | memoryview | np.ndarray

#: Largest message either side accepts, bytes; frames are sized far below it (a few MB;
#: the server enforces its ``--max-message-bytes`` on each frame).
MAX_MESSAGE_BYTES = 256 << 20


class Codec(Protocol):
    """A numcodecs-style byte codec."""

    def encode(self, buf: bytes) -> bytes: ...  # noqa: D102
    def decode(self, buf: bytes | memoryview) -> bytes: ...  # noqa: D102


@cache
def payload_codec(compression: int, level: int = 0) -> Codec | None:
    """Return the numcodecs codec of a ``Compression`` value, None for ``COMPRESSION_NONE``.

    Parameters
    ----------
    compression
        A ``pb.Compression`` value.
    level
        Codec level, 0 for the codec's default (ZSTD 1-22, BLOSC 1-9; ignored by LZ4).

    Raises
    ------
    ValueError
        If ``compression`` is not a known value.
    """
    if compression == pb.COMPRESSION_NONE:
        return None
    import numcodecs  # only streams that ask for compression need it

    if compression == pb.COMPRESSION_ZSTD:
        return numcodecs.Zstd(level=level or 1)
    if compression == pb.COMPRESSION_LZ4:
        return numcodecs.LZ4()
    if compression == pb.COMPRESSION_BLOSC:
        return numcodecs.Blosc(cname="lz4", clevel=level or 5, shuffle=numcodecs.Blosc.NOSHUFFLE)
    msg = f"unknown compression {compression}; allowed {list(pb.Compression.keys())}"
    raise ValueError(msg)


_PAYLOAD_KEY = b"\x12"  # field 2, wire type 2 (length-delimited)
_PADDING_KEY = b"\x1a"  # field 3, wire type 2
#: Alignment of the payload in the frame and of each array in the payload, bytes
#: (a cache line; below 128, so a padding field's length is one varint byte).
ALIGN = 64
_ALLOWED_KINDS = frozenset("biuf")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while pos < len(buf) and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    msg = "frame truncated inside a varint"
    raise FrameDecodeError(msg)


#: Buffers in one list of :func:`frame_buffers`: Linux's ``UIO_MAXIOV``, what one
#: ``os.pwritev`` takes at most.
IOV_MAX = 1024


@dataclass(frozen=True, slots=True)
class Pieces:
    """A 1-d array sent as the concatenation of slices of one contiguous array.

    Attributes
    ----------
    values
        The array the slices are cut from: 1-d, C-contiguous, little-endian.
    starts, stops
        Slice ``i`` is ``values[starts[i]:stops[i]]``, in wire order; shape ``(n,)``,
        int64, elements.
    length
        Total elements of the slices.
    """

    values: np.ndarray
    starts: np.ndarray
    stops: np.ndarray
    length: int

    @property
    def dtype(self) -> np.dtype:
        """The slices' dtype."""
        return self.values.dtype

    def views(self, size: int = IOV_MAX) -> Iterator[list[np.ndarray]]:
        """Yield the slices, in order, in lists of at most ``size``.

        They are numpy views: the garbage collector does not track those. Memoryviews
        (tracked), a whole batch's ~8k of them alive at once, set off collections of
        the daemon's entire heap, ~1-2 us/cell (measured).
        """
        values = self.values
        starts, stops = self.starts.tolist(), self.stops.tolist()
        for i in range(0, len(starts), size):
            yield [
                values[a:b] for a, b in zip(starts[i : i + size], stops[i : i + size], strict=True)
            ]


@dataclass(frozen=True, slots=True)
class Iovecs:
    """A 1-d array sent as the concatenation of memory ranges that only the kernel reads.

    E.g. rows in the page cache of a store's files, mapped read-only: a gathering
    writer (``pwritev``) copies them, and a file that shrinks under its mapping makes
    that write fail (``EFAULT``), where touching the memory from Python would kill the
    process (``SIGBUS``). :func:`encode_frame` therefore refuses them.

    Attributes
    ----------
    iov
        Shape ``(n, 2)``, uint64, C-contiguous: each range's address and length in
        bytes, in wire order (the layout of Linux's ``struct iovec``).
    dtype
        The elements' dtype, little-endian.
    length
        Total elements of the ranges.
    owners
        What keeps the ranges' memory mapped while this object lives.
    """

    iov: np.ndarray
    dtype: np.dtype
    length: int
    owners: tuple[object, ...]


#: One array of a frame, as :func:`frame_parts` takes it.
FrameArray = np.ndarray | Pieces | Iovecs
#: A part of a serialized frame: a buffer, or pieces gathered when the frame is written.
Part = bytes | memoryview | np.ndarray | Pieces | Iovecs


def encode_frame(
    header: pb.BatchHeader,
    arrays: Sequence[tuple[str, FrameArray]],
    compression: pb.Compression = pb.COMPRESSION_NONE,
    level: int = 0,
) -> bytes:
    """Serialize a frame; fills ``header.arrays`` with the payload layout.

    The payload is assembled by a single ``bytes.join`` over the arrays' buffers,
    so :class:`Pieces` (e.g. one slice of a preload buffer per row) are gathered
    by that same copy and never materialised on their own.

    Parameters
    ----------
    header
        Frame header without ``arrays``; modified in place.
    arrays
        ``(name, array)`` pairs; each a numeric or bool array of any shape, or pieces.
    compression, level
        Payload compression (a ``pb.Compression`` value) and its level, see
        :func:`payload_codec`; the payload is then joined once more, compressed.

    Returns
    -------
    The serialized ``BatchFrame``.
    """
    return _join(frame_parts(header, arrays, compression, level)[0])


def frame_parts(
    header: pb.BatchHeader,
    arrays: Sequence[tuple[str, FrameArray]],
    compression: pb.Compression = pb.COMPRESSION_NONE,
    level: int = 0,
) -> tuple[list[Part], int]:
    """Return a serialized frame as the parts that, concatenated, make it, and its size.

    What :func:`encode_frame` joins; a writer that gathers buffers itself (e.g.
    ``pwritev`` into shared memory, the daemon's ``annserve.server.rpc.gather``)
    copies the arrays' bytes only once. Parameters and effect on ``header`` as for
    :func:`encode_frame`; the size is in bytes.
    """
    parts: list[Part] = []
    offset = 0
    for name, array in arrays:
        pad = -offset % ALIGN
        if pad:
            parts.append(bytes(pad))
            offset += pad
        if isinstance(array, Pieces | Iovecs):
            dtype, shape, nbytes = array.dtype, (array.length,), array.length * array.dtype.itemsize
            parts.append(array)
        else:
            array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            dtype, shape, nbytes = array.dtype, array.shape, array.nbytes
            parts.append(array.reshape(-1).data)
        header.arrays.add(name=name, dtype=dtype.str, shape=shape, offset=offset)
        offset += nbytes
    header.payload_nbytes = offset
    codec = payload_codec(compression, level)
    if codec is not None:
        header.compression = compression
        encoded = codec.encode(_join(parts))
        parts, offset = [encoded], len(encoded)
    head = pb.BatchFrame(header=header).SerializeToString()
    payload_key = _PAYLOAD_KEY + _varint(offset)
    head += _padding(len(head) + len(payload_key)) + payload_key
    return [head, *parts], len(head) + offset


def _padding(nbytes: int) -> bytes:
    """Field 3 of ``BatchFrame``: with ``nbytes`` more, a multiple of :data:`ALIGN` bytes.

    ``nbytes`` counts the other bytes before the payload: the header field before the
    padding, the payload's key and length after it; the payload then starts aligned.
    """
    n = -(nbytes + len(_PADDING_KEY) + 1) % ALIGN  # its length takes one varint byte
    return _PADDING_KEY + _varint(n) + bytes(n)


def frame_buffers(parts: Sequence[Part], size: int = IOV_MAX) -> Iterator[Sequence[Buffer]]:
    """Yield the buffers of :func:`frame_parts`' parts in order, in lists of at most ``size``.

    :class:`Pieces` are cut into byte memoryviews one list at a time (see
    :meth:`Pieces.views`); other parts are passed on as they are.

    Raises
    ------
    TypeError
        For :class:`Iovecs`, which only a gathering writer may copy.
    """
    run: list[Buffer] = []
    for part in parts:
        if isinstance(part, Iovecs):
            msg = "Iovecs are copied only by a gathering writer (pwritev), never from Python"
            raise TypeError(msg)
        if isinstance(part, Pieces) or len(run) == size:
            if run:
                yield run
            run = []
        if isinstance(part, Pieces):
            yield from part.views(size)
        else:
            run.append(part)
    if run:
        yield run


def _join(parts: Sequence[Part]) -> bytes:
    """Concatenate parts into one ``bytes`` (one copy of every piece)."""
    # numpy arrays are buffers; typeshed says so only from Python 3.12 on
    return b"".join([buf for run in frame_buffers(parts) for buf in run])  # type: ignore[misc]


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame: its header and read-only array views into the received bytes."""

    header: pb.BatchHeader
    arrays: dict[str, np.ndarray]


def decode_frame(buf: bytes | bytearray | memoryview) -> Frame:
    """Parse a serialized ``BatchFrame`` without copying its payload.

    Parameters
    ----------
    buf
        The frame as received, or a view of the shared memory it was written to;
        the arrays are writable views when ``buf`` is writable.

    Returns
    -------
    The header and, per array, a numpy view into ``buf`` (a copy when the payload
    is compressed).

    Raises
    ------
    FrameDecodeError
        If the frame is truncated, malformed, or its arrays do not fit the payload.
    """
    mv = memoryview(buf)
    header, payload = None, None
    pos = 0
    while pos < len(mv):
        key, pos = _read_varint(mv, pos)
        if key & 7 != 2:
            msg = f"unexpected wire type {key & 7} for field {key >> 3}"
            raise FrameDecodeError(msg)
        size, pos = _read_varint(mv, pos)
        if pos + size > len(mv):
            msg = f"frame truncated: field {key >> 3} needs {size} bytes, {len(mv) - pos} left"
            raise FrameDecodeError(msg)
        if key >> 3 == 1:
            header = _parse_header(mv[pos : pos + size])
        elif key >> 3 == 2:
            payload = mv[pos : pos + size]
        pos += size
    if header is None:
        msg = "frame has no header"
        raise FrameDecodeError(msg)
    payload = _decompress(header, payload if payload is not None else memoryview(b""))
    return Frame(header, {spec.name: _array_view(spec, payload) for spec in header.arrays})


def pointer_header(message: bytes, transport: str) -> pb.BatchHeader:
    """Return the header of a stream message that may point to a frame sent out of band.

    Parameters
    ----------
    message
        One serialized ``BatchFrame`` of a shared-memory or bulk stream: its header
        points to the frame (``shm_*`` or ``bulk_nbytes``), or it is an inline frame.
    transport
        The transport's name, for the error message (e.g. ``"bulk"``).

    Raises
    ------
    FrameDecodeError
        If the message does not parse.
    """
    try:
        return pb.BatchFrame.FromString(message).header
    except Exception as e:  # protobuf's DecodeError
        msg = f"{transport} frame pointer does not parse: {e}"
        raise FrameDecodeError(msg) from e


def _decompress(header: pb.BatchHeader, payload: memoryview) -> memoryview:
    try:
        codec = payload_codec(header.compression)
    except ValueError as e:
        raise FrameDecodeError(str(e)) from e
    if codec is None:
        return payload
    try:
        raw = memoryview(codec.decode(payload))
    except Exception as e:  # numcodecs raises RuntimeError/ValueError on corrupt input
        msg = f"payload does not decompress: {e}"
        raise FrameDecodeError(msg) from e
    if len(raw) != header.payload_nbytes:
        msg = f"payload decompressed to {len(raw)} bytes, header says {header.payload_nbytes}"
        raise FrameDecodeError(msg)
    return raw


def _parse_header(raw: memoryview) -> pb.BatchHeader:
    try:
        return pb.BatchHeader.FromString(bytes(raw))
    except Exception as e:  # protobuf's DecodeError
        msg = f"frame header does not parse: {e}"
        raise FrameDecodeError(msg) from e


def _array_view(spec: pb.ArraySpec, payload: memoryview) -> np.ndarray:
    try:
        dtype = np.dtype(spec.dtype)
    except TypeError as e:
        msg = f"array {spec.name!r}: unknown dtype {spec.dtype!r}"
        raise FrameDecodeError(msg) from e
    shape = tuple(spec.shape)
    if dtype.kind not in _ALLOWED_KINDS or dtype.byteorder == ">" or any(s < 0 for s in shape):
        msg = f"array {spec.name!r}: unsupported dtype {spec.dtype!r} or shape {shape}"
        raise FrameDecodeError(msg)
    count = int(np.prod(shape, dtype=np.int64))
    if spec.offset < 0 or spec.offset + count * dtype.itemsize > len(payload):
        msg = (
            f"array {spec.name!r} ({count} x {dtype.itemsize} bytes at offset {spec.offset}) "
            f"overruns the {len(payload)}-byte payload"
        )
        raise FrameDecodeError(msg)
    return np.frombuffer(payload, dtype=dtype, count=count, offset=spec.offset).reshape(shape)
