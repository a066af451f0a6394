"""Option groups of :class:`~annserve.client.RemoteLoader`.

What an epoch draws (:class:`Split`, :class:`Balanced`), how it is divided among
consumers (:class:`Sharding`), what the training loop receives (:class:`Output`) and
how the loader talks to the server (:class:`Connection`). Each is a frozen value: build
one, pass it, reuse it across loaders. Checks here are only those that must fail before
connecting; the server checks everything it receives and names the field it rejects.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from annserve.errors import InvalidRequestError
from annserve.sampling import DEFAULT_SPLIT_FRACTIONS
from annserve.v1 import annserve_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Mapping

_ENCODINGS = {
    "compact": pb.ENCODING_COMPACT,
    "raw": pb.ENCODING_RAW,
    "native": pb.ENCODING_NATIVE,
}
_TRANSPORTS = ("auto", "shm", "bulk", "grpc")
_COMPRESSIONS = {
    None: pb.COMPRESSION_NONE,
    "zstd": pb.COMPRESSION_ZSTD,
    "lz4": pb.COMPRESSION_LZ4,
    "blosc": pb.COMPRESSION_BLOSC,
}


@dataclass(frozen=True, slots=True)
class Split:
    """A deterministic train/val/test split, computed by the server.

    The same ``seed`` gives the same split on every server restart. Splits are
    disjoint and together cover every row.

    Attributes
    ----------
    name
        ``"train"``, ``"val"`` or ``"test"`` (``"test"`` only with three fractions).
    fractions
        Expected share of rows of each split, adding up to 1.
    by
        obs column whose values go to one split whole (e.g. ``"donor"``: hold out
        whole donors; shares are then shares of values, not of rows). None assigns
        blocks of 1,024 contiguous rows.
    seed
        Seed of the assignment.
    """

    name: str
    fractions: tuple[float, ...] = DEFAULT_SPLIT_FRACTIONS
    by: str | None = None
    seed: int = 0

    def apply(self, request: pb.StreamBatchesRequest) -> None:
        """Write the split into a request."""
        request.split = self.name
        request.split_fractions.extend(self.fractions)
        request.split_by = self.by or ""
        request.split_seed = self.seed


@dataclass(frozen=True, slots=True)
class Balanced:
    """Weighted (e.g. class-balanced) sampling by an obs column, drawn with replacement.

    The server draws a chunk with probability proportional to its rows' weights,
    then ``chunk_size`` rows within it in proportion to theirs: each draw picks a
    row with exactly the target probability, reads stay whole chunks, but rows of
    one chunk arrive together (mixed within each preload buffer) and rows repeat.

    Attributes
    ----------
    by
        obs column to balance (e.g. ``"cell_type"``).
    weights
        Weight per value of ``by``; None gives every value the same total weight
        (equal class proportions). Values left out get weight 0.
    num_samples
        Rows per epoch; 0 = as many as the rows of the split.
    """

    by: str
    weights: Mapping[str, float] | None = field(default=None)
    num_samples: int = 0

    def apply(self, request: pb.StreamBatchesRequest) -> None:
        """Write the sampler choice into a request."""
        request.sampler = pb.SAMPLER_WEIGHTED
        request.balance_by = self.by
        request.category_weights.update(self.weights or {})
        request.num_samples = self.num_samples


@dataclass(frozen=True, slots=True)
class Sharding:
    """Place of this process among data-parallel ranks (DDP).

    Each ``DataLoader`` worker of a rank further gets its own part of the rank's shard.
    The default, ``Sharding()``, takes rank and world size from ``torch.distributed``
    when it is initialised, else 0 of 1.

    Attributes
    ----------
    rank
        This process's rank, 0 to ``world_size - 1``; None: from ``torch.distributed``
        (0 when it is not initialised).
    world_size
        Number of ranks; None: from ``torch.distributed`` (1 when it is not initialised).
    even_batches
        Give every rank the same number of rows, as ``DistributedSampler``: the epoch's
        first rows are repeated to pad, or with ``drop_last`` the remainder is dropped.
        Uneven counts make DDP hang; False gives each rank exactly its rows.

    Raises
    ------
    InvalidRequestError
        If ``rank`` is not in ``0..world_size-1``.
    """

    rank: int | None = None
    world_size: int | None = None
    even_batches: bool = True

    def __post_init__(self) -> None:
        if (self.rank, self.world_size) == (None, None):
            return
        rank, world_size = self.rank or 0, self.world_size or 1
        if not 0 <= rank < world_size:
            msg = (
                f"rank must be in 0..world_size-1, got rank={self.rank} "
                f"world_size={self.world_size}"
            )
            raise InvalidRequestError(msg)


@dataclass(frozen=True, slots=True)
class Output:
    """What the training loop receives: types, layout and placement of each batch.

    Attributes
    ----------
    to_torch
        Yield torch tensors; False yields numpy arrays (X as :class:`CSRArrays`, no
        scipy needed).
    to_dense
        Yield X dense, ``(batch, n_vars)``, even when the store is sparse.
    device
        Move tensors to this torch device (e.g. ``"cuda"``); None keeps them on the CPU.
    prefetch
        Decoded batches that may wait ahead of the training loop. The loader holds
        ``prefetch + 2`` batches at most (those waiting, the one being assembled, the
        one the loop has), reusing their memory from one batch to the next; 1 (default)
        measured as fast as 2 on a 2-core machine with ~35 MB less peak RSS.
    assemble_on_device
        Build sparse X on ``device`` from the narrow wire arrays (uint8/uint16 counts,
        uint16/uint32 gene indices, per-row counts) instead of widening on the CPU and
        moving float32 values and int32 indices: the bytes go through a small ring of
        reused host buffers (page-locked with CUDA) and are uploaded on a side CUDA
        stream one batch ahead; widening, ``crow_indices`` (a prefix sum of the row
        counts) and ``to_dense`` run on the device. Batches are the same bit for bit.
        None (default): on for CUDA devices, off otherwise; True also on the CPU
        (``device=None`` then means ``"cpu"``). Dense stored X keeps the CPU path.
    cupy
        Yield X as ``cupyx.scipy.sparse.csr_matrix`` (float32 data, int32 indices; with
        ``to_dense`` a ``cupy.ndarray``) and ``index`` as a ``cupy.ndarray``, viewing the
        torch tensors' memory through DLPack (no copy). Needs a CUDA ``device`` and the
        ``gpu`` extra (``cupy-cuda12x``). JAX takes the torch tensors the same way:
        ``jax.dlpack.from_dlpack(batch["X"].values())`` and so on.

    Raises
    ------
    InvalidRequestError
        If ``prefetch`` is below 1, ``device`` is a CUDA device and torch finds none,
        ``assemble_on_device`` or ``cupy`` is set with ``to_torch=False``, or ``cupy``
        without a CUDA ``device`` or without cupy installed.
    """

    to_torch: bool = True
    to_dense: bool = False
    device: str | torch.device | None = None
    prefetch: int = 1
    assemble_on_device: bool | None = None
    cupy: bool = False

    def __post_init__(self) -> None:
        if self.prefetch < 1:
            msg = f"prefetch must be a positive integer, got {self.prefetch}"
            raise InvalidRequestError(msg)
        if self.device is not None:
            device = torch.device(self.device)
            if device.type == "cuda" and not torch.cuda.is_available():
                msg = f"device {str(device)!r} requested but torch finds no CUDA device"
                raise InvalidRequestError(msg)
        if (self.assemble_on_device or self.cupy) and not self.to_torch:
            msg = "assemble_on_device and cupy build torch tensors: they need to_torch=True"
            raise InvalidRequestError(msg)
        if self.cupy:
            if self.device is None or torch.device(self.device).type != "cuda":
                msg = f"cupy=True needs a CUDA device (device='cuda'), got device={self.device!r}"
                raise InvalidRequestError(msg)
            if importlib.util.find_spec("cupy") is None:
                msg = "cupy=True needs cupy: pip install 'annserve[gpu]' (cupy-cuda12x)"
                raise InvalidRequestError(msg)

    @property
    def assembly_device(self) -> torch.device | None:
        """The device sparse X is assembled on (None: on the CPU, by the CPU path)."""
        if self.assemble_on_device is False or not self.to_torch:
            return None
        device = torch.device(self.device) if self.device is not None else None
        if self.assemble_on_device:
            return device if device is not None else torch.device("cpu")
        return device if device is not None and device.type == "cuda" else None


@dataclass(frozen=True, slots=True)
class Connection:
    """How the loader reaches the server: deadlines, retries, wire format, TLS, token.

    Attributes
    ----------
    timeout
        Deadline for connecting and for unary calls, seconds. A server that does not
        answer within it raises ``ServerUnavailableError``.
    retries
        Reconnections per outage: when the server becomes unavailable mid-epoch, reopen
        the stream up to this many times and resume at the first batch not yet yielded
        (no batch is lost or repeated). An outage ends when a batch arrives; the next
        one has all ``retries`` again.
    retry_backoff
        Pause before an outage's first reconnection, seconds; doubled before each
        further one (at most 8 s). Each reconnection then waits for the server to
        answer again, so a server restarting within ``max_wait`` costs one. When
        ``address`` names several replicas (a list, an ``ipv4:``/``ipv6:`` target of
        several, or a ``dns:`` name), the first reconnection goes at once, to a replica
        that gRPC's health checks still see serving, and the pauses start with the second.
    max_wait
        Longest the loader waits for the server in one outage, seconds, pauses
        included; then it raises the ``ServerUnavailableError``.
    transport
        ``"auto"`` (default): batches travel through shared memory when ``address`` is
        a ``unix:`` socket path of a daemon offering it (``annserve --unix``); on the
        bulk channel when it is one server's ``host:port`` without TLS and the daemon
        offers one (``--bulk-port``); else in the gRPC stream. ``"shm"``: shared memory
        or an error; ``"bulk"``: the bulk channel or an error; ``"grpc"``: always the
        gRPC stream. Over shared memory the daemon writes each batch into a memfd slot
        mapped by this process, and X is viewed there without a copy; the slot is
        reused once the batch is dropped (see :mod:`annserve.shm`). On the bulk channel
        each batch arrives on a plain TCP connection beside the gRPC stream, read into
        a reused buffer with one copy (see :mod:`annserve.bulk`): Python gRPC's
        receive costs several times that.
    encoding
        Wire encoding: ``"compact"`` (default: lossless narrow types, widened once
        here), ``"raw"`` (the store's dtypes) or ``"native"`` (int32 indices, values in
        the loader's ``dtype``). Over shared memory, native batches are X viewed in the
        slot with no copy in this process; the daemon then widens and writes twice the
        bytes, which cost both processes together as much or more than compact
        (measured on the 50k x 20k atlas: 8.9 against 8.5 us/cell on float32 counts
        with warm slots, 12.0 against 10.5 in a session's first epoch).
    compression
        Compress each frame's payload with this numcodecs codec: ``"zstd"``, ``"lz4"``,
        ``"blosc"``, or None (default). Pays only on slow links: measured through
        tc-shaped loopback (``benchmarks/results/bench_links.md``, 50k x 20k atlas),
        no compression was fastest at about 2 Gbit/s and above; below, ``"blosc"`` or
        ``"lz4"`` led (1.14x at 1.5 Gbit/s, 1.4x at 1 Gbit/s), at about twice the
        daemon's CPU per cell; ``"zstd"`` was never fastest. The default stays None:
        trainers mostly sit on >= 10 Gbit/s links to their data service.
    compression_level
        Codec level, 0 for the codec's default (zstd 1-22, blosc 1-9).
    retain_memory
        On connecting, raise glibc malloc's mmap and trim thresholds and keep one malloc
        arena for this process (:func:`annserve.memory.retain_freed_memory`): every
        received frame is a fresh multi-MB ``bytes`` object, and without this each one
        is page-faulted in again, about half of the client's CPU (measured). The
        process then keeps up to 512 MiB of freed memory for reuse. No effect off glibc.
        numpy's use of transparent huge pages is left as it is: the daemon turns it off
        for itself (:func:`annserve.memory.avoid_huge_pages`), but in a training process
        it would slow numpy's random reads of large arrays (the in-memory bound of
        ``benchmarks/bench_loaders.py`` ran at half speed without it); set
        ``NUMPY_MADVISE_HUGEPAGE=0`` to trade that for cheaper first touches.
    token
        Bearer token for a server started with ``--token-file``, sent as
        ``authorization: Bearer <token>`` metadata on every call.
    root_certificates
        PEM CA certificates (bytes) to verify a TLS server (``annserve --tls-cert``)
        against. Giving it, or ``certificate_chain``/``private_key``, connects over TLS
        (without it, against the system's roots).
    certificate_chain, private_key
        PEM client certificate and key (bytes), for a server requiring mutual TLS
        (``annserve --tls-client-ca``); both or neither.

    Raises
    ------
    InvalidRequestError
        If ``transport``, ``encoding`` or ``compression`` is not a name listed above, only
        one of
        ``certificate_chain`` and ``private_key`` is given, ``timeout`` or ``max_wait``
        is not positive or ``retries`` or ``retry_backoff`` is negative.
    """

    timeout: float = 10.0
    retries: int = 5
    retry_backoff: float = 0.5
    max_wait: float = 60.0
    transport: str = "auto"
    encoding: str = "compact"
    compression: str | None = None
    compression_level: int = 0
    retain_memory: bool = True
    token: str | None = None
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    def __post_init__(self) -> None:
        if self.transport not in _TRANSPORTS:
            msg = f"transport must be one of {list(_TRANSPORTS)}, got {self.transport!r}"
            raise InvalidRequestError(msg)
        if self.encoding not in _ENCODINGS:
            msg = f"encoding must be one of {sorted(_ENCODINGS)}, got {self.encoding!r}"
            raise InvalidRequestError(msg)
        if self.compression not in _COMPRESSIONS:
            msg = f"compression must be one of {list(_COMPRESSIONS)}, got {self.compression!r}"
            raise InvalidRequestError(msg)
        if (self.certificate_chain is None) != (self.private_key is None):
            msg = "certificate_chain and private_key go together (mutual TLS needs both)"
            raise InvalidRequestError(msg)
        for name in ("timeout", "max_wait"):
            if not getattr(self, name) > 0:
                msg = f"{name} must be > 0 seconds, got {getattr(self, name)}"
                raise InvalidRequestError(msg)
        if self.retries < 0 or self.retry_backoff < 0:
            msg = (
                f"retries and retry_backoff must be >= 0, got retries={self.retries} "
                f"retry_backoff={self.retry_backoff}"
            )
            raise InvalidRequestError(msg)

    @property
    def secure(self) -> bool:
        """Whether the channel uses TLS (any of the PEM fields is given)."""
        return any(
            v is not None
            for v in (self.root_certificates, self.certificate_chain, self.private_key)
        )

    def apply(self, request: pb.StreamBatchesRequest) -> None:
        """Write the wire format (encoding, compression) into a request."""
        request.encoding = _ENCODINGS[self.encoding]
        request.compression = _COMPRESSIONS[self.compression]
        request.compression_level = self.compression_level
