"""The server's resource limits, checked in one place (no gRPC here).

Every check raises :class:`~annserve.errors.ResourceExhaustedError` (mapped to
``RESOURCE_EXHAUSTED``) with a message naming the limit, its value, the daemon
flag that sets it and what the client can change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from annserve.errors import ResourceExhaustedError

if TYPE_CHECKING:
    from annserve.server.io.store import Store
    from annserve.server.plan.request import StreamPlan

#: Smallest accepted ``max_message_bytes``; frames of ~2 MB need at least 4 MiB in practice.
MIN_MESSAGE_BYTES = 64 << 10


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits that protect the server from a client (or many) asking too much.

    Attributes
    ----------
    max_streams
        Concurrent ``StreamBatches`` calls, all clients together.
    max_batch_size
        Largest ``batch_size`` a request may ask for, rows.
    max_message_bytes
        Largest frame the server sends, bytes. Frames are sized at about 2 MB, so a
        value below ~4 MiB rejects ordinary streams; the limit catches single rows (or
        runs of rows of one batch) wider than that.
    stream_memory_mb
        Per-stream memory budget, megabytes (10**6 bytes): a request whose preload
        buffer (``chunk_size * preload_nchunks`` rows times the store's mean bytes per
        row, once read) would exceed it is refused. A stream holds about two buffers
        (one being read, one being sent).
    """

    max_streams: int = 64
    max_batch_size: int = 65_536
    max_message_bytes: int = 64 << 20
    stream_memory_mb: float = 4096.0

    def __post_init__(self) -> None:
        for name in ("max_streams", "max_batch_size", "stream_memory_mb"):
            if not getattr(self, name) > 0:
                msg = f"{name} must be > 0, got {getattr(self, name)}"
                raise ValueError(msg)
        if self.max_message_bytes < MIN_MESSAGE_BYTES:
            msg = f"max_message_bytes must be >= {MIN_MESSAGE_BYTES}, got {self.max_message_bytes}"
            raise ValueError(msg)

    def check_streams(self, open_streams: int) -> None:
        """Refuse a new stream when ``open_streams`` already reach ``max_streams``.

        Raises
        ------
        ResourceExhaustedError
            Naming ``max_streams``.
        """
        if open_streams >= self.max_streams:
            msg = (
                f"max_streams: {open_streams} streams are open, this server's limit "
                f"(--max-streams {self.max_streams}); retry later or use another server"
            )
            raise ResourceExhaustedError(msg)

    def check_shared_memory(self, plan: StreamPlan, store: Store, n_slots: int) -> None:
        """Refuse a shared-memory stream whose slots would exceed the per-stream budget.

        Each of the session's ``n_slots`` slots holds one frame: up to a batch of rows
        (at most a preload buffer), in the wire's dtypes (counted at the stored size).

        Raises
        ------
        ResourceExhaustedError
            Naming ``stream_memory_mb``.
        """
        rows = min(plan.batch_size, preload_rows(plan, store))
        need = n_slots * rows * row_bytes(plan, store)
        if need > self.stream_memory_mb * 1e6:
            msg = (
                f"stream_memory_mb: {n_slots} shared-memory slots of {rows:,} rows need about "
                f"{need / 1e6:,.0f} MB, over this server's per-stream budget of "
                f"{self.stream_memory_mb:g} MB (--stream-memory-mb); lower batch_size or "
                "Output.prefetch"
            )
            raise ResourceExhaustedError(msg)

    def check_request(self, plan: StreamPlan, store: Store) -> None:
        """Refuse a request over ``max_batch_size`` or over the per-stream memory budget.

        Raises
        ------
        ResourceExhaustedError
            Naming ``max_batch_size`` or ``stream_memory_mb``.
        """
        if plan.batch_size > self.max_batch_size:
            msg = (
                f"max_batch_size: batch_size {plan.batch_size} is over this server's limit "
                f"of {self.max_batch_size} rows (--max-batch-size)"
            )
            raise ResourceExhaustedError(msg)
        rows = preload_rows(plan, store)
        need = rows * row_bytes(plan, store)
        if need > self.stream_memory_mb * 1e6:
            msg = (
                f"stream_memory_mb: a preload buffer of {rows:,} rows (chunk_size "
                f"{plan.chunk_size:,} x preload_nchunks {plan.preload_nchunks:,}) needs about "
                f"{need / 1e6:,.0f} MB, over this server's per-stream budget of "
                f"{self.stream_memory_mb:g} MB (--stream-memory-mb); lower chunk_size or "
                "preload_nchunks"
            )
            raise ResourceExhaustedError(msg)
        index = sampler_bytes(plan, store)
        if index > self.stream_memory_mb * 1e6:
            weighted = plan.balance is not None and plan.balance.num_samples
            cause = (
                f"num_samples {plan.balance.num_samples:,} drawn chunk_size {plan.chunk_size:,} "
                "at a time; lower num_samples or raise chunk_size"
                if weighted and plan.balance is not None
                else f"chunk_size {plan.chunk_size:,}; raise chunk_size"
            )
            msg = (
                f"stream_memory_mb: the epoch's row order needs about {index / 1e6:,.0f} MB of "
                f"indices, over this server's per-stream budget of {self.stream_memory_mb:g} MB "
                f"(--stream-memory-mb): {cause}"
            )
            raise ResourceExhaustedError(msg)

    def frame_too_large(self, nbytes: int) -> ResourceExhaustedError:
        """Return the error for a frame of ``nbytes`` bytes over ``max_message_bytes``."""
        msg = (
            f"max_message_bytes: a frame of {nbytes:,} bytes is over this server's limit of "
            f"{self.max_message_bytes:,} (--max-message-bytes); request a smaller batch_size "
            "or fewer var_names, obs_keys"
        )
        return ResourceExhaustedError(msg)


def row_bytes(plan: StreamPlan, store: Store) -> float:
    """Return the mean bytes of one row a stream reads: its matrix and obsm arrays, as stored."""
    return sum(store.mean_row_bytes(k) for k in (plan.matrix, *plan.obsm))


def preload_rows(plan: StreamPlan, store: Store) -> int:
    """Return the rows of one preload buffer of ``plan``.

    ``chunk_size * preload_nchunks``, at most the store's rows, or, for weighted
    sampling (rows drawn with replacement), at most the epoch's ``num_samples``.
    """
    rows = plan.chunk_size * plan.preload_nchunks
    if plan.balance is None:
        return min(rows, store.n_obs)
    return min(rows, plan.balance.num_samples or store.n_obs)


def sampler_bytes(plan: StreamPlan, store: Store) -> int:
    """Return the bytes of the indices a stream's sampler holds for its epoch's row order.

    The chunk order (8 bytes per chunk) and, for weighted sampling, the chunk draws
    (8 bytes each, and as much again while drawing).
    """
    chunk = max(1, min(plan.chunk_size, store.n_obs))
    n_chunks = -(-store.n_obs // chunk) + len(store.group_offsets)  # a short chunk per group
    if plan.balance is None:
        return 8 * n_chunks
    draws = -(-(plan.balance.num_samples or store.n_obs) // plan.chunk_size)
    return 8 * n_chunks + 16 * draws
