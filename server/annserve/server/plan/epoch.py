"""Positions in an epoch's row sequence: shards (ranks x workers), resume points, padding.

Elastic resume (a job restarted with another world size mid-epoch) re-partitions the
positions no earlier world consumed (:func:`unconsumed`); every function below works
on that sequence, which is the whole epoch for a stream with no earlier world.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from annserve.errors import InvalidRequestError, OutOfRangeError
from annserve.sampling import Shard

if TYPE_CHECKING:
    import threading
    from collections.abc import Iterator

    import numpy as np

    from annserve.server.plan.sampler import Sampler


@dataclass(frozen=True, slots=True)
class Span:
    """The positions ``[start, stop)`` of the epoch's row sequence one stream serves.

    Positions at or past the sequence's length wrap to its start (padding).
    """

    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class EarlierWorld:
    """A world that consumed part of an epoch before the current one (elastic resume).

    Attributes
    ----------
    shard_count
        Its shards (world_size x DataLoader workers), >= 1.
    batches
        Batches each of its shards consumed, >= 0: DDP ranks consume in lockstep, so
        one rank's checkpoint says how far every rank got.
    """

    shard_count: int
    batches: int


@dataclass(frozen=True, slots=True)
class Unconsumed:
    """The positions of an epoch's row sequence that no earlier world consumed.

    Shards and resume points of the current world are spans of this sequence
    ("virtual" positions ``0..length-1``); :meth:`positions` maps them back to the
    epoch's positions.

    Attributes
    ----------
    spans
        The epoch positions, ascending and disjoint.
    n_rows
        Rows in the epoch's sequence (one lap).
    """

    spans: tuple[Span, ...]
    n_rows: int

    @property
    def length(self) -> int:
        """Positions in the sequence."""
        return sum(s.stop - s.start for s in self.spans)

    def positions(self, span: Span) -> tuple[Span, ...]:
        """Return the epoch positions of the sequence's positions ``span``, ascending.

        Positions at or past :attr:`length` wrap to the sequence's start (padding), in
        the epoch's next lap (``+ n_rows``), as :func:`pieces_in_spans` expects.
        """
        if self.spans == (Span(0, self.n_rows),):
            return (span,) if span.start < span.stop else ()
        out, length = [], self.length
        for lap in range(span.start // max(length, 1), -(-span.stop // max(length, 1))):
            at = lap * length  # virtual position of this lap's first position
            for s in self.spans:
                n = s.stop - s.start
                a, b = max(span.start - at, 0), min(span.stop - at, n)
                if a < b:
                    shift = lap * self.n_rows + s.start
                    out.append(Span(shift + a, shift + b))
                at += n
        return tuple(out)


def unconsumed(
    n_rows: int,
    earlier: tuple[EarlierWorld, ...],
    batch_size: int,
    *,
    even: bool,
    drop_last: bool,
) -> Unconsumed:
    """Return the positions of the epoch left after the earlier worlds consumed theirs.

    The first world partitions the epoch into shards (:func:`shard_span`); each of its
    shards consumed the first ``batches`` batches of its span. The next world
    partitions what is left the same way, and so on. Rows a world never reached (the
    rest of each shard, and the rows ``drop_last`` left out of every shard) stay.

    Parameters
    ----------
    n_rows
        Rows in the epoch's sequence.
    earlier
        The earlier worlds, oldest first; empty for the whole epoch.
    batch_size
        Rows per batch.
    even, drop_last
        As :class:`~annserve.sampling.Shard` ``even`` and :func:`shard_span`; the same
        for every world.

    Raises
    ------
    InvalidRequestError
        If a world has more shards than rows were left.
    OutOfRangeError
        If a world's ``batches`` is past its shards' batch count.
    """
    left = Unconsumed((Span(0, n_rows),), n_rows)
    for i, world in enumerate(earlier):
        length = left.length
        count = world.shard_count
        spans = [
            shard_span(length, Shard(k, count, even), batch_size, drop_last=drop_last)
            for k in range(count)
        ]
        most = max(-(-(s.stop - s.start) // batch_size) for s in spans)
        if world.batches > most:
            msg = (
                f"earlier_worlds[{i}].batches must be in 0..{most} (the batches of that "
                f"world's shards), got {world.batches}"
            )
            raise OutOfRangeError(msg)
        taken = [Span(s.start, min(s.start + world.batches * batch_size, s.stop)) for s in spans]
        kept = _complement(taken, length)
        left = Unconsumed(tuple(p for span in kept for p in left.positions(span)), n_rows)
    return left


def _complement(taken: list[Span], length: int) -> list[Span]:
    """Return the spans of ``0..length-1`` outside ``taken`` (ascending, maybe past length)."""
    out, at = [], 0
    for span in taken:
        if span.start > at:
            out.append(Span(at, min(span.start, length)))
        at = max(at, span.stop)
    if at < length:
        out.append(Span(at, length))
    return [s for s in out if s.start < s.stop]


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


def rows_in_spans(
    sampler: Sampler,
    epoch: int,
    spans: tuple[Span, ...],
    cancelled: threading.Event | None = None,
) -> Iterator[np.ndarray]:
    """Yield the rows at positions ``spans`` of the epoch, one piece per preload buffer and span.

    Buffers before the first span in its lap are generated (index arithmetic only) but
    never read; whole laps before it are skipped without generating them.

    Parameters
    ----------
    sampler
        The epoch's row sequence.
    epoch
        Epoch number.
    spans
        Positions to yield, ascending and disjoint (one span, or an elastic resume's
        :meth:`Unconsumed.positions`); positions past the sequence wrap (padding).
    cancelled
        Set when the stream is over: generation stops at the next preload buffer.

    Yields
    ------
    Global row indices, int64, in yield order; they add up to the spans' lengths
    (fewer once ``cancelled`` is set).
    """
    for piece in pieces_in_spans(sampler, epoch, spans, cancelled):
        yield piece.rows


@dataclass(frozen=True, slots=True)
class Piece:
    """The part of one preload buffer a span covers, and where that buffer is.

    Attributes
    ----------
    buffer
        ``(lap, k)``: the epoch's ``k``-th preload buffer in lap ``lap`` of the row
        sequence (laps past 0 only when a span wraps, padding); non-decreasing along
        the spans (a buffer that several spans meet gives one piece per span).
    start, stop
        The piece is rows ``[start, stop)`` of that buffer, in yield order.
    rows
        Global row indices of the piece, shape ``(stop - start,)``, int64.
    """

    buffer: tuple[int, int]
    start: int
    stop: int
    rows: np.ndarray


def pieces_in_spans(
    sampler: Sampler,
    epoch: int,
    spans: tuple[Span, ...],
    cancelled: threading.Event | None = None,
) -> Iterator[Piece]:
    """Yield what :func:`rows_in_spans` yields, with the buffer each piece comes from.

    Streams with the same sampler and epoch that meet the same piece read the same rows
    (:mod:`annserve.server.stream.shared`). Parameters as :func:`rows_in_spans`.
    """
    lap = sampler.n_rows
    todo = [s for s in spans if s.start < s.stop]
    if lap == 0 or not todo:
        return
    position = todo[0].start - todo[0].start % lap
    while todo:  # a later lap only when a span wraps (padding)
        for k, rows in enumerate(sampler.preloads(epoch)):
            if cancelled is not None and cancelled.is_set():
                return
            end = position + len(rows)
            for span in todo:
                a, b = max(span.start - position, 0), min(span.stop - position, len(rows))
                if a < b:
                    yield Piece((position // lap, k), a, b, rows[a:b])
            todo = [s for s in todo if s.stop > end]
            position = end
            if not todo:
                return
