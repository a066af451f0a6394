"""Validate a ``StreamBatchesRequest`` into a :class:`StreamPlan` (no gRPC here)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from annserve.errors import InvalidRequestError, listed, quoted
from annserve.sampling import DEFAULT_SPLIT_FRACTIONS, SPLIT_NAMES, Shard
from annserve.server.plan.epoch import EarlierWorld
from annserve.server.plan.selection import (
    Balance,
    Split,
    gene_columns,
    value_names,
)
from annserve.v1 import annserve_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Sequence

    from annserve.server.io.obs import ObsColumnData
    from annserve.server.io.store import Store

_POSITIVE = ("batch_size", "chunk_size", "preload_nchunks")
#: Largest ``compression_level`` of each codec (0 = the codec's default).
_MAX_LEVEL = {
    pb.COMPRESSION_NONE: 0,
    pb.COMPRESSION_ZSTD: 22,
    pb.COMPRESSION_LZ4: 0,
    pb.COMPRESSION_BLOSC: 9,
}


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """A validated stream request.

    Attributes
    ----------
    batch_size
        Rows per minibatch; same meaning as annbatch ``Loader.batch_size``.
    chunk_size
        Contiguous rows per chunk; same meaning as annbatch ``ChunkSampler.chunk_size``.
    preload_nchunks
        Chunks per preload buffer; same meaning as annbatch ``preload_nchunks``.
    shuffle
        Permute chunks and rows within preload buffers.
    drop_last
        Drop the epoch's final batch when it is short.
    seed
        Generator seed; with ``epoch`` it fixes the permutation.
    epoch
        Epoch number, >= 0.
    obs
        The requested obs columns, in request order.
    return_index
        Send the global row index of every row.
    encoding
        ``pb.ENCODING_RAW``, ``pb.ENCODING_COMPACT`` or ``pb.ENCODING_NATIVE``.
    value_dtype
        dtype of X's values with ``pb.ENCODING_NATIVE``; None for the stored dtype.
    compression
        ``pb.Compression`` value applied to each frame's payload.
    compression_level
        Codec level, 0 for the codec's default.
    matrix
        Key of the served matrix in :attr:`Store.matrices`: ``"X"``, ``"layers/<name>"``
        or ``"raw/X"`` (``use_raw``, scanpy's ``adata.raw``).
    obsm
        Keys (``"obsm/<name>"``) of the obsm arrays sent with each batch, in request order.
    columns
        Positions of the requested genes in the matrix's gene space (the store's
        var_names, or raw_var_names for raw X), in request order, shape ``(n_vars,)``,
        int64, -1 for a gene the store lacks (served as zeros, ``missing_genes``); None
        for all genes.
    n_vars
        Genes per served row.
    shard
        The part of the epoch this stream serves.
    start_batch
        First batch of the shard's epoch to send (resume point).
    earlier_worlds
        The worlds that consumed part of the epoch before this one (elastic resume,
        :func:`annserve.server.plan.epoch.unconsumed`), oldest first; empty for none.
    split
        The split the epoch draws from; None for all rows.
    balance
        Weighted sampling; None for the chunk sampler.
    mapped
        Leave X's rows in the store's mapped files where they can stay
        (:meth:`~annserve.server.io.store.Store.locate_rows`) instead of reading them
        into preload buffers: set for shared-memory and bulk streams, whose frames only
        the kernel gathers (:func:`annserve.server.stream.frames.stays_mapped`).
    """

    batch_size: int
    chunk_size: int
    preload_nchunks: int
    shuffle: bool
    drop_last: bool
    seed: int
    epoch: int
    obs: tuple[ObsColumnData, ...]
    return_index: bool
    encoding: int
    value_dtype: np.dtype | None
    compression: pb.Compression
    compression_level: int
    matrix: str
    obsm: tuple[str, ...]
    columns: np.ndarray | None
    n_vars: int
    shard: Shard
    start_batch: int
    earlier_worlds: tuple[EarlierWorld, ...]
    split: Split | None
    balance: Balance | None
    mapped: bool = False


def plan_stream(request: pb.StreamBatchesRequest, store: Store) -> StreamPlan:
    """Check a request against a store.

    Raises
    ------
    InvalidRequestError
        Naming the first bad field and its allowed values.
    """
    _check_sizes(request)
    for field in ("obs_keys", "obsm_keys"):
        _check_unique(getattr(request, field), field)
    for key in request.obs_keys:
        _obs_column(store, key, "obs_keys")
    _check_wire(request)
    matrix = _matrix(request, store)
    obsm = tuple(_obsm_key(key, store) for key in request.obsm_keys)
    names = store.raw_var_names if matrix == "raw/X" else store.var_names
    columns = _columns(request, store, matrix, names)
    return StreamPlan(
        batch_size=request.batch_size,
        chunk_size=request.chunk_size,
        preload_nchunks=request.preload_nchunks,
        shuffle=request.shuffle,
        drop_last=request.drop_last,
        seed=request.seed,
        epoch=request.epoch,
        obs=tuple(store.obs[k] for k in request.obs_keys),
        return_index=request.return_index,
        encoding=request.encoding or pb.ENCODING_COMPACT,
        value_dtype=_value_dtype(request),
        compression=request.compression,
        compression_level=request.compression_level,
        matrix=matrix,
        obsm=obsm,
        columns=columns,
        n_vars=len(names) if columns is None else len(columns),
        shard=_shard(request),
        start_batch=request.start_batch,
        earlier_worlds=_earlier_worlds(request),
        split=_split(request, store),
        balance=_balance(request, store),
    )


def _check_sizes(request: pb.StreamBatchesRequest) -> None:
    for field in _POSITIVE:
        if getattr(request, field) <= 0:
            msg = f"{field} must be a positive integer, got {getattr(request, field)}"
            raise InvalidRequestError(msg)
    for field in ("epoch", "start_batch", "num_samples"):
        if getattr(request, field) < 0:
            msg = f"{field} must be >= 0, got {getattr(request, field)}"
            raise InvalidRequestError(msg)


def _check_wire(request: pb.StreamBatchesRequest) -> None:
    if request.encoding not in pb.Encoding.values():
        msg = f"encoding: unknown value {request.encoding}; allowed {list(pb.Encoding.keys())}"
        raise InvalidRequestError(msg)
    if request.compression not in _MAX_LEVEL:
        msg = (
            f"compression: unknown value {request.compression}; "
            f"allowed {list(pb.Compression.keys())}"
        )
        raise InvalidRequestError(msg)
    if not 0 <= request.compression_level <= _MAX_LEVEL[request.compression]:
        name = pb.Compression.Name(request.compression)
        msg = (
            f"compression_level must be in 0..{_MAX_LEVEL[request.compression]} for {name}, "
            f"got {request.compression_level}"
        )
        raise InvalidRequestError(msg)
    if request.shm_session and request.compression != pb.COMPRESSION_NONE:
        msg = "compression must be COMPRESSION_NONE on a shared-memory stream (shm_session)"
        raise InvalidRequestError(msg)
    if request.bulk_session and request.compression != pb.COMPRESSION_NONE:
        msg = "compression must be COMPRESSION_NONE on a bulk-channel stream (bulk_session)"
        raise InvalidRequestError(msg)
    if request.bulk_session and request.shm_session:
        msg = "bulk_session and shm_session: a stream takes one transport, not both"
        raise InvalidRequestError(msg)


def _value_dtype(request: pb.StreamBatchesRequest) -> np.dtype | None:
    """Parse ``value_dtype``: a little-endian numeric numpy dtype of at most 8 bytes."""
    if not request.value_dtype:
        return None
    try:
        dtype = np.dtype(request.value_dtype)
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.kind not in "biuf" or dtype.byteorder == ">" or dtype.itemsize > 8:
        msg = (
            f"value_dtype: {quoted(request.value_dtype)} is not a little-endian numeric "
            "numpy dtype of at most 8 bytes (e.g. '<f4')"
        )
        raise InvalidRequestError(msg)
    return dtype


def _check_unique(names: Sequence[str], field: str) -> None:
    if len(set(names)) != len(names):
        repeated = sorted(v for v, n in Counter(names).items() if n > 1)
        msg = f"{field}: each name may be listed once, repeated {listed(repeated)}"
        raise InvalidRequestError(msg)


def _obs_column(store: Store, key: str, field: str) -> ObsColumnData:
    if key not in store.obs:
        msg = f"{field}: unknown obs column {quoted(key)}; the store has {listed(store.obs)}"
        raise InvalidRequestError(msg)
    return store.obs[key]


def _shard(request: pb.StreamBatchesRequest) -> Shard:
    count = request.shard_count or 1
    if count < 0 or not 0 <= request.shard_index < count:
        msg = (
            f"shard_index must be in 0..shard_count-1 and shard_count >= 1, got "
            f"shard_index={request.shard_index} shard_count={request.shard_count}"
        )
        raise InvalidRequestError(msg)
    return Shard(request.shard_index, count, even=not request.uneven_shards)


#: Earlier worlds a request may list: a job restarted this many times within one epoch.
MAX_EARLIER_WORLDS = 64


def _earlier_worlds(request: pb.StreamBatchesRequest) -> tuple[EarlierWorld, ...]:
    worlds = request.earlier_worlds
    if len(worlds) > MAX_EARLIER_WORLDS:
        msg = f"earlier_worlds: at most {MAX_EARLIER_WORLDS} worlds, got {len(worlds):,}"
        raise InvalidRequestError(msg)
    for i, world in enumerate(worlds):
        if world.shard_count < 1 or world.batches < 0:
            msg = (
                f"earlier_worlds[{i}]: shard_count must be >= 1 and batches >= 0, got "
                f"shard_count={world.shard_count} batches={world.batches}"
            )
            raise InvalidRequestError(msg)
    return tuple(EarlierWorld(w.shard_count, w.batches) for w in worlds)


def _split(request: pb.StreamBatchesRequest, store: Store) -> Split | None:
    fractions = tuple(request.split_fractions) or DEFAULT_SPLIT_FRACTIONS
    if not request.split:
        if request.split_fractions or request.split_by:
            msg = f"split: name one of {list(SPLIT_NAMES)} to use split_fractions/split_by"
            raise InvalidRequestError(msg)
        return None
    if (
        not 2 <= len(fractions) <= len(SPLIT_NAMES)
        or not all(math.isfinite(f) and f >= 0 for f in fractions)
        or abs(sum(fractions) - 1) > 1e-6
    ):
        msg = (
            f"split_fractions must be 2 or 3 finite non-negative numbers adding up to 1, "
            f"got {listed(fractions)}"
        )
        raise InvalidRequestError(msg)
    names = SPLIT_NAMES[: len(fractions)]
    if request.split not in names:
        msg = f"split: unknown split {quoted(request.split)}; allowed {list(names)}"
        raise InvalidRequestError(msg)
    by = _obs_column(store, request.split_by, "split_by") if request.split_by else None
    return Split(names.index(request.split), fractions, by, request.split_seed)


def _balance(request: pb.StreamBatchesRequest, store: Store) -> Balance | None:
    if request.sampler not in pb.SamplerKind.values():
        msg = f"sampler: unknown value {request.sampler}; allowed {list(pb.SamplerKind.keys())}"
        raise InvalidRequestError(msg)
    if request.sampler != pb.SAMPLER_WEIGHTED:
        return None
    if not request.balance_by:
        msg = "balance_by: SAMPLER_WEIGHTED needs the obs column to weight"
        raise InvalidRequestError(msg)
    column = _obs_column(store, request.balance_by, "balance_by")
    weights = dict(request.category_weights) or None
    if weights is not None:
        allowed = set(value_names(column))
        unknown = sorted(set(weights) - allowed)
        values = list(weights.values())
        if unknown or not all(math.isfinite(w) and w >= 0 for w in values) or not any(values):
            msg = (
                f"category_weights: need finite non-negative weights, not all 0, for values of "
                f"{quoted(request.balance_by)}; unknown {listed(unknown)}, allowed "
                f"{listed(sorted(allowed))}"
            )
            raise InvalidRequestError(msg)
    return Balance(column, weights, request.num_samples)


def _matrix(request: pb.StreamBatchesRequest, store: Store) -> str:
    """Return the key of the matrix a request serves: X, a layer or raw X."""
    if request.use_raw:
        if request.layer:
            msg = f"use_raw: serves raw X; it cannot be combined with layer {quoted(request.layer)}"
            raise InvalidRequestError(msg)
        if "raw/X" not in store.matrices:
            msg = "use_raw: this store has no .raw (raw X with raw var_names in every group)"
            raise InvalidRequestError(msg)
        return "raw/X"
    if request.layer and request.layer not in store.layers:
        msg = f"layer: unknown layer {quoted(request.layer)}; the store has {listed(store.layers)}"
        raise InvalidRequestError(msg)
    return f"layers/{request.layer}" if request.layer else "X"


def _obsm_key(name: str, store: Store) -> str:
    if name not in store.obsm:
        msg = f"obsm_keys: unknown obsm array {quoted(name)}; the store has {listed(store.obsm)}"
        raise InvalidRequestError(msg)
    return f"obsm/{name}"


def _columns(
    request: pb.StreamBatchesRequest, store: Store, matrix: str, names: Sequence[str]
) -> np.ndarray | None:
    """Positions of the requested genes among ``names`` (the served matrix's genes)."""
    if request.missing_genes not in pb.MissingGenes.values():
        msg = (
            f"missing_genes: unknown value {request.missing_genes}; "
            f"allowed {list(pb.MissingGenes.keys())}"
        )
        raise InvalidRequestError(msg)
    zeros = request.missing_genes == pb.MISSING_GENES_ZEROS
    if store.mixed_genes and matrix != "raw/X" and not zeros:
        msg = (
            "missing_genes: the groups of this collection have different genes; it is served "
            f"in their union ({len(store.var_names)} genes, zeros where a group lacks one) "
            "only with missing_genes=MISSING_GENES_ZEROS"
        )
        raise InvalidRequestError(msg)
    return gene_columns(request.var_names, names, zeros=zeros)
