"""Positions in an epoch's row sequence: shards (ranks x workers), resume points, padding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from annserve.errors import InvalidRequestError, OutOfRangeError

if TYPE_CHECKING:
    import threading
    from collections.abc import Iterator

    import numpy as np

    from annserve.sampling import Shard
    from annserve.server.plan.sampler import Sampler


@dataclass(frozen=True, slots=True)
class Span:
    """The positions ``[start, stop)`` of the epoch's row sequence one stream serves.

    Positions at or past the sequence's length wrap to its start (padding).
    """

    start: int
    stop: int


def shard_span(n_rows: int, shard: Shard, batch_size: int, *, drop_last: bool) -> Span:
    """Return the rows of the epoch a shard serves, trimmed to whole batches with ``drop_last``.

    Parameters
    ----------
    n_rows
        Rows in the epoch's sequence (all shards).
    shard
        Which part.
    batch_size
        Rows per batch.
    drop_last
        Drop the shard's final short batch (and, for even shards, the rows that do
        not divide evenly among shards).

    Returns
    -------
    A contiguous span: shards are disjoint and, without ``drop_last``, cover every row.

    Raises
    ------
    InvalidRequestError
        If there are more shards than rows (each shard would only repeat rows).
    """
    n = shard.count
    if n > max(n_rows, 1):
        msg = (
            f"shard_count: {n:,} shards (world_size x DataLoader workers) for an epoch of "
            f"{n_rows:,} rows; use at most one shard per row"
        )
        raise InvalidRequestError(msg)
    if shard.even:
        per = n_rows // n if drop_last else -(-n_rows // n)
        start, stop = shard.index * per, (shard.index + 1) * per
    else:
        start, stop = shard.index * n_rows // n, (shard.index + 1) * n_rows // n
    if drop_last:
        stop -= (stop - start) % batch_size
    return Span(start, stop)


def from_batch(span: Span, batch_size: int, start_batch: int) -> Span:
    """Return the part of a shard's span a stream resumed at ``start_batch`` sends.

    Parameters
    ----------
    span
        The shard's positions (:func:`shard_span`).
    batch_size
        Rows per batch.
    start_batch
        First batch to send, >= 0; the span's number of batches (a checkpoint taken
        after the last batch) gives an empty span.

    Returns
    -------
    The positions from the first row of batch ``start_batch`` to the span's end.

    Raises
    ------
    OutOfRangeError
        If ``start_batch`` is past the span's number of batches.
    """
    n_batches = -(-(span.stop - span.start) // batch_size)
    if start_batch > n_batches:
        msg = (
            f"start_batch must be in 0..{n_batches} (the shard's batches this epoch), "
            f"got {start_batch}"
        )
        raise OutOfRangeError(msg)
    return Span(min(span.start + start_batch * batch_size, span.stop), span.stop)


def rows_in_span(
    sampler: Sampler, epoch: int, span: Span, cancelled: threading.Event | None = None
) -> Iterator[np.ndarray]:
    """Yield the rows at positions ``span`` of the epoch, one piece per preload buffer.

    Buffers before the span in its lap are generated (index arithmetic only) but never
    read; whole laps before it are skipped without generating them.

    Parameters
    ----------
    sampler
        The epoch's row sequence.
    epoch
        Epoch number.
    span
        Positions to yield; positions past the sequence wrap (padding).
    cancelled
        Set when the stream is over: generation stops at the next preload buffer.

    Yields
    ------
    Global row indices, int64, in yield order; they add up to ``span.stop - span.start``
    (fewer once ``cancelled`` is set).
    """
    for piece in pieces_in_span(sampler, epoch, span, cancelled):
        yield piece.rows


@dataclass(frozen=True, slots=True)
class Piece:
    """The part of one preload buffer a span covers, and where that buffer is.

    Attributes
    ----------
    buffer
        ``(lap, k)``: the epoch's ``k``-th preload buffer in lap ``lap`` of the row
        sequence (laps past 0 only when a span wraps, padding); increasing along a span.
    start, stop
        The piece is rows ``[start, stop)`` of that buffer, in yield order.
    rows
        Global row indices of the piece, shape ``(stop - start,)``, int64.
    """

    buffer: tuple[int, int]
    start: int
    stop: int
    rows: np.ndarray


def pieces_in_span(
    sampler: Sampler, epoch: int, span: Span, cancelled: threading.Event | None = None
) -> Iterator[Piece]:
    """Yield what :func:`rows_in_span` yields, with the buffer each piece comes from.

    Streams with the same sampler and epoch that meet the same piece read the same rows
    (:mod:`annserve.server.stream.shared`). Parameters as :func:`rows_in_span`.
    """
    lap = sampler.n_rows
    if lap == 0:
        return
    position = span.start - span.start % lap
    while position < span.stop:  # a second lap only when the span wraps (padding)
        for k, rows in enumerate(sampler.preloads(epoch)):
            if cancelled is not None and cancelled.is_set():
                return
            a, b = max(span.start - position, 0), min(span.stop - position, len(rows))
            if a < b:
                yield Piece((position // lap, k), a, b, rows[a:b])
            position += len(rows)
            if position >= span.stop:
                return
