"""The frames of one epoch: sampler → preload buffer → batches → frames."""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from annserve.buffers import BufferPool
from annserve.prefetch import Prefetcher
from annserve.server.plan.epoch import (
    Span,
    Unconsumed,
    from_batch,
    pieces_in_spans,
    rows_in_spans,
    shard_span,
    unconsumed,
)
from annserve.server.stream.encode import (
    frame_arrays,
    obs_arrays,
    prepare,
    raw_rows,
    select_columns,
    sent_as_stored,
)
from annserve.server.stream.shared import frame_key
from annserve.v1 import annserve_pb2 as pb
from annserve.wire import encode_frame

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Iterator

    from annserve.server.io.store import Store
    from annserve.server.plan.request import StreamPlan
    from annserve.server.plan.sampler import Sampler
    from annserve.server.stream.encode import WireRows
    from annserve.server.stream.shared import Subscription
    from annserve.wire import FrameArray

    #: Serializes one frame, ``pack(header, arrays)``, as :func:`annserve.wire.encode_frame`.
    Pack = Callable[[pb.BatchHeader, list[tuple[str, FrameArray]]], bytes]
    #: A read piece of a preload buffer, as :func:`_read_ahead` yields it.
    Prepared = tuple[
        np.ndarray,
        np.ndarray,
        WireRows,
        dict[str, WireRows],
        dict[tuple[Hashable, int], "Future[Any]"],
    ]

T = TypeVar("T")

#: Most rows in one frame; frames this size measured fastest on loopback.
MAX_FRAME_ROWS = 1024
#: Target payload of one frame, bytes; 1-4 MB messages measured fastest.
TARGET_FRAME_BYTES = 2 << 20


@dataclass(frozen=True, slots=True)
class Sharing:
    """How a stream shares the frames of a shared piece with the streams that frame alike.

    Attributes
    ----------
    kind
        Frames written by streams of one kind are interchangeable (``"grpc"`` bytes,
        ``"shm"`` shared-memory frames; the two also cut different frames).
    write
        Serializes a frame once for all of them, as ``pack`` does: ``write(header,
        arrays)`` returns what ``send`` takes.
    send
        Returns the message this stream sends for a written frame.
    beside
        Payload bytes of a written frame that travel beside the message (0: inside it).
    """

    kind: str
    write: Callable[[pb.BatchHeader, list[tuple[str, FrameArray]]], object]
    send: Callable[[Any], bytes]
    beside: Callable[[Any], int] = lambda _: 0


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame of a stream, serialized, with the header it was built from.

    Attributes
    ----------
    header
        The frame's ``BatchHeader``, for counting (batch number and rows; the payload
        layout too where this stream serialized the frame itself).
    data
        The serialized ``BatchFrame`` message, bytes, sent as is.
    beside
        Payload bytes that travel beside the message: in a shared-memory slot or
        memfd, or as a bulk record (0: the payload is in ``data``).
    """

    header: pb.BatchHeader
    data: bytes
    beside: int = 0


def epoch_span(sampler: Sampler, plan: StreamPlan) -> tuple[Unconsumed, Span]:
    """Return the epoch's rows no earlier world consumed, and the shard's span of them.

    Without ``plan.earlier_worlds`` the first is the whole epoch's row sequence and the
    span its positions (:mod:`annserve.server.plan.epoch`).
    """
    left = unconsumed(
        sampler.n_rows,
        plan.earlier_worlds,
        plan.batch_size,
        even=plan.shard.even,
        drop_last=plan.drop_last,
    )
    if plan.earlier_worlds and left.length == 0:  # the earlier worlds consumed every row
        return left, Span(0, 0)
    return left, shard_span(left.length, plan.shard, plan.batch_size, drop_last=plan.drop_last)


def epoch_frames(
    store: Store,
    sampler: Sampler,
    plan: StreamPlan,
    on_read: Callable[[float], None] | None = None,
    cancelled: threading.Event | None = None,
    pack: Pack | None = None,
    shared: Subscription | None = None,
    sharing: Sharing | None = None,
) -> Iterator[Frame]:
    """Yield the serialized frames of one shard's epoch, from batch ``plan.start_batch`` on.

    The epoch's rows are the sampler's preload buffers concatenated; the shard's
    span of them (:func:`epoch_span`) is cut into batches of ``plan.batch_size`` rows
    (leftover rows of a buffer open the next batch, as in annbatch), and each batch
    into frames that never span two buffers, so only one buffer is framed at a time
    while a background thread reads the next. Buffers before ``start_batch`` are
    skipped without reading the store; closing the generator stops that thread.

    Parameters
    ----------
    store
        Store to read.
    sampler
        Row order of the epoch.
    plan
        Validated request.
    on_read
        Called with the seconds each preload buffer's store read took (e.g. a
        Prometheus histogram's ``observe``), on the read-ahead thread.
    cancelled
        Set when the stream is over (the client left): the read-ahead thread stops at
        its next preload buffer, also while it skips to ``start_batch``.
    pack
        Serializes each frame instead of :func:`annserve.wire.encode_frame` (with the
        plan's compression), e.g. into a shared-memory slot; frames then hold whole
        batches, within one preload buffer, rather than about
        :data:`TARGET_FRAME_BYTES`.
    shared
        The stream's membership of the streams reading the same buffers
        (:mod:`annserve.server.stream.shared`): each piece of a buffer is read once for
        all of them; None reads and encodes every buffer for this stream alone.
    sharing
        With ``shared``, while other streams are attached, each frame is written once
        for the streams that frame alike (:func:`~annserve.server.stream.shared.frame_key`)
        and this kind of sharing; a lone stream keeps no frames. Without ``pack`` the
        default shares the encoded bytes; None with ``pack``: no frame is shared.

    Yields
    ------
    The frames, in order.
    """
    left, span = epoch_span(sampler, plan)
    # three preload buffers alive (the one framed, the one read ahead, the one being read),
    # each up to four pooled arrays (X as read and as converted), plus room to spare
    pool = BufferPool(max_buffers=20)
    n_emit = span.stop - span.start
    todo = from_batch(span, plan.batch_size, plan.start_batch)
    emitted = todo.start - span.start
    per_row = _row_extra_bytes(store, plan)
    whole_batches = pack is not None
    if pack is None:
        pack = functools.partial(
            encode_frame, compression=plan.compression, level=plan.compression_level
        )
        if sharing is None:  # frames in the gRPC stream are plain bytes: shared as they are
            sharing = Sharing("grpc", pack, _same)
    framing = None if shared is None or sharing is None else (sharing.kind, frame_key(plan))
    buffers = Prefetcher(
        lambda: _read_ahead(
            store, sampler, plan, left.positions(todo), pool, on_read, cancelled, shared
        ),
        1,
        name=f"{threading.current_thread().name}-read",
    )
    try:
        for rows, positions, wire, obsm, encoded in buffers:
            step = (
                plan.batch_size
                if whole_batches
                else _frame_rows(wire.nbytes + per_row * len(rows), len(rows))
            )
            start = 0
            while start < len(rows):
                batch, row_start = divmod(emitted, plan.batch_size)
                batch_rows = min(plan.batch_size, n_emit - batch * plan.batch_size)
                n = min(step, batch_rows - row_start, len(rows) - start)
                header = pb.BatchHeader(
                    batch=batch,
                    batch_rows=batch_rows,
                    row_start=row_start,
                    n_rows=n,
                    n_vars=plan.n_vars,
                    sparse=wire.sparse,
                )
                at = slice(start, start + n)
                frame = functools.partial(
                    _frame, header, wire, obsm, positions[at], rows[at], plan, store
                )
                if framing is None or shared is None or not shared.has_peers():
                    data = frame(pack)  # fills header
                    yield Frame(header, data, header.payload_nbytes if whole_batches else 0)
                else:
                    assert sharing is not None
                    written = _once(
                        encoded, (framing, emitted), functools.partial(frame, sharing.write)
                    )
                    yield Frame(header, sharing.send(written), sharing.beside(written))
                start += n
                emitted += n
    finally:
        buffers.close()


def _same(written: bytes) -> bytes:
    return written


def _frame(
    header: pb.BatchHeader,
    wire: WireRows,
    obsm: dict[str, WireRows],
    positions: np.ndarray,
    global_rows: np.ndarray,
    plan: StreamPlan,
    store: Store,
    pack: Callable[[pb.BatchHeader, list[tuple[str, FrameArray]]], T],
) -> T:
    """Gather and serialize one frame (``header`` gets its text obs and obs_names)."""
    arrays = frame_arrays(wire, positions, plan.encoding)
    for key, rows in obsm.items():
        parts = frame_arrays(rows, positions, pb.ENCODING_RAW)
        arrays += [(key if name == "X" else f"{key}/{name}", a) for name, a in parts]
    obs, strings = obs_arrays(plan.obs, global_rows)
    arrays += obs
    header.string_obs.extend(strings)
    header.obs_names.extend(store.obs_names[global_rows].tolist())
    if plan.return_index:
        arrays.append(("index", global_rows))
    return pack(header, arrays)


def _once(
    encoded: dict[tuple[Hashable, int], Future[Any]],
    key: tuple[Hashable, int],
    make: Callable[[], T],
) -> T:
    """Return the frame ``key`` of a shared piece, made by the first stream that needs it.

    That stream claims the frame with a future; streams reaching it meanwhile wait for
    it (streams in lock step would otherwise all encode it). If making it fails, the
    error is the claiming stream's: each waiting stream makes the frame itself.
    """
    mine: Future[T] = Future()
    claimed = encoded.setdefault(key, mine)  # atomic: one stream claims each frame
    if claimed is not mine:
        try:
            return claimed.result()
        except Exception:  # noqa: BLE001  (the claiming stream raises it)
            return make()
    try:
        frame = make()
    except BaseException as e:
        mine.set_exception(e)
        raise
    mine.set_result(frame)
    return frame


def _read_ahead(
    store: Store,
    sampler: Sampler,
    plan: StreamPlan,
    spans: tuple[Span, ...],
    pool: BufferPool,
    on_read: Callable[[float], None] | None,
    cancelled: threading.Event | None,
    shared: Subscription | None = None,
) -> Iterator[Prepared]:
    """Yield each preload buffer's piece of ``spans`` (epoch positions), read and prepared.

    Yields ``(rows, positions, wire, obsm, encoded)``: the buffer's rows in yield order,
    each row's position in ``wire``, the prepared buffer (rows sorted, each once), the
    requested obsm arrays at the same rows (as stored, by key), and the piece's frames
    claimed so far, by ``((sharing kind, frame_key), first row's epoch position)``
    (empty: streams that share the piece fill it, :func:`_once`). With ``shared`` a
    piece another stream of the group has read (or is reading) is taken from it, not
    read.
    """
    if shared is None:
        for rows in rows_in_spans(sampler, plan.epoch, spans, cancelled):
            yield _read_rows(store, plan, rows, pool, on_read)
        return
    for piece in pieces_in_spans(sampler, plan.epoch, spans, cancelled):
        item = shared.get(
            piece, functools.partial(_read_rows, store, plan, piece.rows, on_read=on_read), pool
        )
        if item is None:  # cancelled while another stream read the piece
            return
        yield item
    shared.finish()


def _read_rows(
    store: Store,
    plan: StreamPlan,
    rows: np.ndarray,
    pool: BufferPool,
    on_read: Callable[[float], None] | None,
) -> Prepared:
    """Read and prepare one piece of a preload buffer; see :func:`_read_ahead`."""
    unique_rows, positions = _distinct(rows)
    started = time.perf_counter()
    compact = plan.encoding == pb.ENCODING_COMPACT  # it narrows anyway: no widening first
    located = store.locate_rows(unique_rows, plan.matrix, narrow=compact) if plan.mapped else None
    block = (
        store.read_rows(unique_rows, plan.matrix, pool, narrow=compact) if located is None else None
    )
    obsm = {k: raw_rows(store.read_rows(unique_rows, k)) for k in plan.obsm}
    if on_read is not None:
        on_read(time.perf_counter() - started)
    if block is None:
        assert located is not None
        return rows, positions, located, obsm, {}
    if plan.columns is not None:
        block = select_columns(block, plan.columns, store.matrices[plan.matrix].n_cols)
    wire = prepare(block, plan.encoding, plan.n_vars, pool.empty, plan.value_dtype)
    return rows, positions, wire, obsm, {}


def stays_mapped(store: Store, plan: StreamPlan, *, remote: bool = False) -> bool:
    """Whether a stream's X rows may stay where they lie (``StreamPlan.mapped``).

    They may for CSR of all genes when either the stored dtypes may be sent as they
    are over the stream's link (:func:`~annserve.server.stream.encode.sent_as_stored`,
    ``remote`` for the bulk channel), or the stream is compact and the store's X
    values are read through the decoded-chunk cache: it holds each chunk in the dtype
    compact sends it in (uint16 counts; float32 values that are not counts), or one of
    the same width (uint16 for uint8, float32 for uint32), which the client reads alike.
    :meth:`~annserve.server.io.store.Store.locate_rows` may still say no, buffer by
    buffer: arrays read through zarr or h5py without the cache, chunks not yet cached,
    cached chunks of different dtypes; such buffers are read.
    """
    spec = store.matrices[plan.matrix]
    if not spec.sparse or plan.columns is not None:
        return False
    stored = spec.index_dtype is not None and sent_as_stored(
        spec.index_dtype,
        spec.dtype,
        plan.encoding,
        plan.n_vars,
        plan.value_dtype,
        remote=remote,
    )
    return stored or (plan.encoding == pb.ENCODING_COMPACT and store.cached(plan.matrix))


def _distinct(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the distinct rows, sorted, and the position of each of ``rows`` among them.

    What ``np.unique(rows)`` and ``np.searchsorted`` give (samplers drawing with
    replacement repeat rows), from one sort: ~0.3 ms for a preload buffer of 8,192
    rows against ~1.8 ms for the two (numpy 2.4).
    """
    order = np.argsort(rows)
    ordered = rows[order]
    new = np.empty(len(rows), bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    positions = np.empty(len(rows), np.intp)
    positions[order] = np.cumsum(new) - 1
    return ordered[new], positions


def _row_extra_bytes(store: Store, plan: StreamPlan) -> int:
    """Bytes a frame carries per row besides X: obs values, masks and text, obs_names, obsm.

    Frames are sized by all their bytes, so many or wide obs columns make frames of
    fewer rows instead of frames far over the target size.
    """
    per_row = 8 * plan.return_index + _text_bytes(store.obs_names)
    for col in plan.obs:
        per_row += _text_bytes(col.values) if col.kind == "str" else col.values.itemsize
        per_row += col.missing is not None
    return per_row + int(sum(store.mean_row_bytes(k) for k in plan.obsm))


def _text_bytes(values: np.ndarray, sample: int = 1000) -> int:
    """Mean bytes of one text value on the wire (UTF-8 and protobuf's tag and length)."""
    if len(values) == 0:
        return 0
    picked = values[:: max(1, len(values) // sample)]
    return 2 + -(-sum(len(str(v).encode()) for v in picked) // len(picked))


def _frame_rows(buffer_bytes: int, buffer_rows: int) -> int:
    per_row = max(1, buffer_bytes // max(1, buffer_rows))
    return int(np.clip(TARGET_FRAME_BYTES // per_row, 1, MAX_FRAME_ROWS))
