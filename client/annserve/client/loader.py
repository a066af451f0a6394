"""``RemoteLoader``: a torch ``IterableDataset`` of minibatches streamed from annserve."""

from __future__ import annotations

import logging
import os
import time
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from annserve.buffers import BufferPool
from annserve.client._assemble import BatchAssembler
from annserve.client._bulk import BulkConnection, bulk_host
from annserve.client._device import DeviceDelivery, DeviceStage, HostRing, new_ring
from annserve.client._rpc import Channel, frames_of, grpc_target, several_replicas
from annserve.client._shm import SharedMemorySession
from annserve.client._torch import to_device, to_torch
from annserve.client.options import Connection, Output, Sharding
from annserve.errors import InvalidRequestError, ServerUnavailableError, quoted
from annserve.memory import retain_freed_memory
from annserve.prefetch import Prefetcher
from annserve.sampling import Shard
from annserve.shm import MAX_SLOTS, side_socket
from annserve.v1 import annserve_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import grpc

    from annserve.client.options import Balanced, Split

logger = logging.getLogger(__name__)

#: Longest wait between reconnection attempts, seconds.
_MAX_BACKOFF_S = 8.0
#: Longest wait for a closed stream's decoding thread to end, seconds. Generous: a process
#: that exits (a DataLoader worker told to stop mid-epoch) while that daemon thread is
#: still inside grpc or torch C++ code can abort ("terminate called without an active
#: exception", seen once at load ~12 with 1 s); the cancel wakes the thread within ms.
_CLOSE_TIMEOUT_S = 3.0
#: Shared-memory slots beyond ``Output.prefetch``: the batch the loop holds, the one
#: being assembled, and three the daemon writes ahead (with one ahead, the daemon waited
#: on the loop: ~60-80k against ~120-130k cells/s on the 50k x 20k benchmark atlas).
_SLOTS_BEYOND_PREFETCH = 5
_MISSING_GENES = {"error": pb.MISSING_GENES_ERROR, "zeros": pb.MISSING_GENES_ZEROS}


class RemoteLoader(IterableDataset):
    """Minibatches of an AnnData store served by an ``annserve`` daemon.

    Each iteration streams (the rest of) one epoch. The server reads contiguous
    chunks into preload buffers ahead of the stream and shuffles rows within them
    (annbatch ``ChunkSampler`` semantics); this object decodes frames on a background
    thread so the training loop does not wait on parsing. Use it directly, or through
    ``torch.utils.data.DataLoader(loader, batch_size=None)``; with ``num_workers > 0`` pass
    ``multiprocessing_context="spawn"`` (or ``"forkserver"``): gRPC does not survive
    ``fork()`` in a process that has used it.

    Sharding: under ``torch.distributed`` (or with :class:`Sharding`), and in each
    ``DataLoader`` worker, the stream carries only this consumer's shard: a contiguous,
    disjoint part of the epoch's row sequence, chosen by the server.

    Resume: :meth:`state_dict` holds ``(seed, epoch, batches yielded)``; a loader built
    with the same arguments and given that state (:meth:`load_state_dict`) yields
    exactly the batches an uninterrupted run would have, from the next one on, from
    any server serving the same store. The state is that of the process iterating
    the loader (with ``DataLoader`` workers, use ``torchdata``'s ``StatefulDataLoader``).
    It does not depend on the rank: DDP ranks consume batches in lockstep, so rank 0's
    checkpoint says how far every rank got, and every rank may load it.

    Elastic resume: loaded into a world of another size (torchrun elastic, a preempted
    node), the state re-partitions the rest of the epoch: the rows no rank of the old
    world consumed (each old shard's rows after its first ``batch`` batches, and the rows
    ``drop_last`` left out) are split among the new world's shards as an epoch is, and
    the new world streams them from their first batch. Across the old and the new
    world every row of the epoch is then seen once (and padding rows, without
    ``drop_last``, repeat as usual); restarts may chain (2 -> 3 -> 2 ranks). The rule
    assumes lockstep: with ``Sharding(even_batches=False)`` a rank with fewer batches
    than rank 0's count is taken to have consumed all of its rows.

    Replicas: ``address`` may name several servers of one store (a list, ``ipv4:a,b``
    or a ``dns:///`` name resolving to each); each stream goes to the next replica
    that reports SERVING (gRPC ``round_robin`` with client-side health checking), and a
    replica lost or draining mid-epoch is left for another at the next batch not yet
    yielded. Every call carries the fingerprint of the store the first replica
    described (``StoreInfo.fingerprint``); a replica serving other content refuses
    it, naming both.

    The top-level arguments are those of annbatch's ``Loader`` and what picks the data;
    the rest come in groups (:mod:`annserve.client.options`). The server checks the
    configuration when the loader is built, so a bad size, obs key, layer or gene
    fails here, with the server's message naming the field.

    Parameters
    ----------
    address
        Server address, ``host:port`` or ``unix:/path``; or several replicas: a list of
        ``IP:port``, a ``dns:///name:port`` resolving to each of them, or
        ``ipv4:a:p,b:q`` (see :func:`annserve.client._rpc.grpc_target`).
    store
        Name of a store configured on the server; empty for its default store.
    layer
        Serve this layer (e.g. ``"counts"``) instead of X.
    use_raw
        Serve raw X (``adata.raw.X``) with ``adata.raw.var_names`` as the genes, as
        scanpy's ``use_raw``; not together with ``layer``.
    var_names
        Serve only these genes (of the served matrix), in this order; ``n_vars`` and
        ``var_names`` then describe the subset. A model's fixed gene vocabulary may
        name genes the store lacks: see ``missing_genes``.
    missing_genes
        What a gene of ``var_names`` absent from the store gets: ``"error"`` (default:
        the loader is refused, naming the genes) or ``"zeros"``: an all-zero column
        (CSR stays sparse), counted by :attr:`missing_genes`. A collection whose groups
        have different genes is served in their union (zeros where a group lacks a
        gene), and needs ``"zeros"``.
    batch_size
        Rows (cells) per minibatch; same meaning as annbatch ``Loader.batch_size``.
    chunk_size
        Contiguous rows read per chunk; same meaning as annbatch ``ChunkSampler.chunk_size``.
    preload_nchunks
        Chunks per preload buffer; same meaning as annbatch ``preload_nchunks``.
    shuffle
        Shuffle chunk order and rows within preload buffers each epoch.
    drop_last
        Drop the epoch's final batch when it has fewer than ``batch_size`` rows.
    seed
        Seed of the permutation: an int >= 0, a ``numpy.random.Generator`` (one seed is
        drawn from it now), or None (a fresh random seed). ``(seed, epoch)`` fixes an
        epoch's order.
    obs_keys
        obs columns to return with each batch, in the dtypes anndata reads them with:
        categoricals keep their categories (and their dtype), pandas nullable columns
        (``Int64``, ``boolean``, ``string``) their dtype and ``pd.NA``. ``batch["obs"]``
        is indexed by the rows' obs_names, as annbatch yields it.
    obsm_keys
        obsm arrays (e.g. ``"X_pca"``) to return with each batch as ``batch["obsm"][key]``:
        dense ``(batch, n_cols)`` (or sparse CSR when stored so), in ``dtype``.
    dtype
        dtype of X's values (and of obsm arrays) in the batches; default float32,
        torch's default floating type. None keeps the store's dtype (float64 stays
        float64; integer counts stay integers). The wire is lossless either way: the
        value is rounded only here, once, when ``dtype`` is narrower than the store's.
    return_index
        Also return the global row index (position in the store) of each row.
    split
        Stream one split of the store (:class:`Split`); None streams every row.
    balance
        Weighted sampling with replacement (:class:`Balanced`); None visits every row
        once per epoch.
    sharding
        Rank, world size and even batches (:class:`Sharding`); default: from
        ``torch.distributed``, every rank the same number of rows.
    output
        Tensor types, layout, device and prefetch depth (:class:`Output`).
    connection
        Timeout, retries, wire format, TLS and token (:class:`Connection`).
    transform
        Called on each batch (the dict described in :meth:`__iter__`, after the move
        to ``output.device``) in the process iterating the loader; its result is
        yielded instead, as the ``transform`` of anndata's ``AnnDataset`` and of torch
        datasets. With ``DataLoader`` workers it must pickle: a module-level function
        or a callable object, not a lambda.

    Raises
    ------
    ServerUnavailableError
        If no server answers at ``address`` within ``connection.timeout`` (a
        ``ConnectionError``); at once, naming the likely cause, if one answers but the
        TLS handshake fails.
    AuthenticationError
        If the server requires a token and ``connection.token`` is missing or wrong.
    StoreNotFoundError
        If the server has no store named ``store``.
    StoreFormatError
        From a replica (``FAILED_PRECONDITION``) whose store's fingerprint differs from
        the one the first replica described; the message names both.
    InvalidRequestError
        If the server rejects the configuration (a size is not positive, an obs key,
        layer or gene is unknown, ...; a ``ValueError`` naming the field), ``seed``
        is negative or ``missing_genes`` is not ``"error"`` or ``"zeros"``.

    Examples
    --------
    >>> loader = RemoteLoader("127.0.0.1:50051", batch_size=4096, obs_keys=["cell_type"])
    >>> for batch in loader:
    ...     x, obs = batch["X"], batch["obs"]  # (4096, n_vars) sparse CSR float32, DataFrame

    A transform normalising each cell to 10,000 counts and taking ``log1p`` (scanpy's
    ``normalize_total`` + ``log1p``), on dense X:

    >>> def normalize_log1p(batch):
    ...     x = batch["X"]
    ...     batch["X"] = torch.log1p(x / x.sum(1, keepdim=True).clamp(min=1) * 1e4)
    ...     return batch
    >>> loader = RemoteLoader(
    ...     "127.0.0.1:50051", output=Output(to_dense=True), transform=normalize_log1p
    ... )
    """

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        store: str = "",
        layer: str | None = None,
        use_raw: bool = False,
        var_names: Sequence[str] | None = None,
        missing_genes: str = "error",
        batch_size: int = 4096,
        chunk_size: int = 32,
        preload_nchunks: int = 256,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int | np.random.Generator | None = None,
        obs_keys: Sequence[str] = (),
        obsm_keys: Sequence[str] = (),
        dtype: npt.DTypeLike | None = np.float32,
        return_index: bool = False,
        split: Split | None = None,
        balance: Balanced | None = None,
        sharding: Sharding = Sharding(),  # noqa: B008 (frozen: one shared default is safe)
        output: Output = Output(),  # noqa: B008 (frozen)
        connection: Connection = Connection(),  # noqa: B008 (frozen)
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        super().__init__()
        self.address, self.store = grpc_target(address), store
        self.layer, self.use_raw = layer, use_raw
        self._var_subset = tuple(var_names) if var_names is not None else None
        if missing_genes not in _MISSING_GENES:
            msg = f"missing_genes must be one of {list(_MISSING_GENES)}, got {missing_genes!r}"
            raise InvalidRequestError(msg)
        self._missing_genes_mode = missing_genes
        self.transform = transform
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self.preload_nchunks = preload_nchunks
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed = _resolve_seed(seed)
        self.obs_keys, self.obsm_keys = tuple(obs_keys), tuple(obsm_keys)
        self.dtype = _resolve_dtype(dtype)
        self.return_index = return_index
        self.split, self.balance = split, balance
        self.sharding, self.output, self.connection = sharding, output, connection
        if connection.transport == "shm" and side_socket(self.address) is None:
            msg = f"transport='shm' needs a unix:PATH address, got {quoted(address)}"
            raise InvalidRequestError(msg)
        if connection.transport == "bulk" and not _bulk_possible(self.address, connection):
            msg = (
                "transport='bulk' needs one server's host:port address, no TLS (the bulk "
                "channel is plaintext) and no compression, got "
                f"{quoted(address)}, secure={connection.secure}, "
                f"compression={connection.compression!r}"
            )
            raise InvalidRequestError(msg)
        self.rank, self.world_size = _resolve_rank(sharding)
        self.device = torch.device(output.device) if output.device is not None else None
        self._pool: BufferPool | None = None
        self._ring: HostRing | None = None  # host buffers of device assembly, kept
        self._epoch = 0
        self._batch = 0  # batches of the current epoch already yielded
        # (shard count, batches) of each earlier world of this epoch (elastic resume)
        self._earlier: tuple[tuple[int, int], ...] = ()
        self._conn: Channel | None = None
        self._shm: SharedMemorySession | None = None  # reused by the epochs of this process
        self._shm_pid = os.getpid()
        self._no_shm = False  # the daemon offered no session: stream over gRPC
        self._no_bulk = False  # its bulk channel could not be reached: stream over gRPC
        self._conn_pid = os.getpid()
        self._info = self._connection().describe(store)
        len(self)  # the server checks the whole configuration now, not at the first epoch

    # --- store facts -------------------------------------------------------------
    @property
    def n_obs(self) -> int:
        """Rows (cells) in the store."""
        return self._info.n_obs

    @property
    def fingerprint(self) -> str:
        """Hex digest identifying the store's content (``StoreInfo.fingerprint``).

        Replicas serving the same store report the same one; every call of this
        loader carries it, and a replica serving other content refuses the call.
        """
        return self._info.fingerprint

    @property
    def n_vars(self) -> int:
        """Columns (genes) of the served matrix: all of its genes, or the ``var_names`` subset's."""
        return len(self.var_names)

    @property
    def var_names(self) -> list[str]:
        """Gene names of the served columns, length ``n_vars`` (raw genes with ``use_raw``)."""
        if self._var_subset is not None:
            return list(self._var_subset)
        return list(self._info.raw_var_names if self.use_raw else self._info.var_names)

    @property
    def missing_genes(self) -> int:
        """Genes of ``var_names`` the store lacks, served as all-zero columns (0 without)."""
        if self._var_subset is None:
            return 0
        served = set(self._info.raw_var_names if self.use_raw else self._info.var_names)
        return sum(v not in served for v in self._var_subset)

    @property
    def epoch(self) -> int:
        """Epoch the next iteration streams."""
        return self._epoch

    def __len__(self) -> int:
        """Batches per epoch of this shard (asks the server; no data is read).

        The rank's batches, or in a ``DataLoader`` worker the worker's; after an elastic
        resume, those of this world's part of the epoch.

        Raises
        ------
        AnnServeError
            If the server rejects the request.
        """
        request = self._request(self._epoch, self._shard(), 0)
        return self._connection().count_batches(request).n_batches

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration streams (as ``DistributedSampler.set_epoch``).

        Without calls to it, each iteration streams the epoch after the previous one,
        so successive passes are differently shuffled. The same ``(seed, epoch)``
        always gives the same order.

        Raises
        ------
        InvalidRequestError
            If ``epoch`` is negative.
        """
        if epoch < 0:
            msg = f"epoch must be >= 0, got {epoch}"
            raise InvalidRequestError(msg)
        self._epoch, self._batch, self._earlier = epoch, 0, ()

    def state_dict(self) -> dict[str, Any]:
        """Return the position of the stream.

        ``{"seed", "epoch", "batch", "shards", "earlier_worlds", "config"}``: ``batch``
        counts the batches of ``epoch`` this shard already yielded; ``shards`` is the
        shard count (world size x ``DataLoader`` workers) they were yielded in;
        ``earlier_worlds`` the ``[shards, batch]`` of the worlds that consumed part of
        the epoch before (elastic resume, see the class docstring); ``config`` the
        arguments that shape the epoch, checked by :meth:`load_state_dict`. The same on
        every rank.
        """
        return {
            "seed": self.seed,
            "epoch": self._epoch,
            "batch": self._batch,
            "shards": self._shard().count,
            "earlier_worlds": [list(w) for w in self._earlier],
            "config": self._config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next iteration continues after its batch.

        A state saved with another shard count (world size x ``DataLoader`` workers)
        resumes elastically: the rows its world had not consumed are re-partitioned
        among this world's shards (see the class docstring).

        Raises
        ------
        InvalidRequestError
            If the state was saved by a loader configured differently (it would
            resume a different sequence), or lacks a key.
        """
        try:
            config, shards = state["config"], state["shards"]
            earlier = tuple((int(n), int(b)) for n, b in state["earlier_worlds"])
            seed, epoch, batch = state["seed"], state["epoch"], state["batch"]
        except (KeyError, TypeError, ValueError) as e:
            msg = f"state_dict: not a RemoteLoader state ({e!r})"
            raise InvalidRequestError(msg) from None
        if config != self._config():
            msg = f"state_dict was saved with {config}, this loader has {self._config()}"
            raise InvalidRequestError(msg)
        if shards != self._shard().count:  # the world changed size: re-partition the rest
            earlier, batch = (*earlier, (shards, batch)), 0
        self.seed, self._epoch, self._batch, self._earlier = seed, epoch, batch, earlier

    def _config(self) -> dict[str, Any]:
        """Return what shapes the epoch's row sequence: the request but its position."""
        request = self._request(0, Shard(), 0)
        del request.earlier_worlds[:]
        return {"request": request.SerializeToString(deterministic=True).hex()}

    # --- iteration ---------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Stream one epoch of batches ``{"X", "obs", "obsm"?, "index"?}``.

        Raises
        ------
        AnnServeError
            If the server rejects the request or fails mid-stream (mapped from its status).
        ServerUnavailableError
            If the server is lost mid-epoch and does not stream again within
            ``connection.retries`` reconnections and ``connection.max_wait`` seconds
            (per outage: each batch that arrives ends one).
        FrameDecodeError
            If a received frame is malformed; no batch built from it is yielded.
        """
        if self._pool is None:  # kept across epochs: later epochs reuse the first one's buffers
            # batches alive at once: the training loop's, the queued ones, the one being
            # assembled; each holds two pooled arrays (indices and data, or dense X); and
            # the bulk channel's records: those read ahead and the one being assembled
            prefetch = self.output.prefetch
            self._pool = BufferPool(max_buffers=2 * (prefetch + 2) + _bulk_depth(prefetch) + 1)
        pool = self._pool
        attempt, deadline = 0, 0.0  # reconnections of the current outage; when it must end
        while True:
            yielded = self._batch
            try:
                if attempt:
                    self._connection().wait_until_ready(deadline - time.monotonic())
                yield from self._transformed(self._stream_from_cursor(pool))
            except ServerUnavailableError:
                if attempt == 0 or self._batch > yielded:  # a batch arrived: a new outage
                    attempt, deadline = 0, time.monotonic() + self.connection.max_wait
                attempt += 1
                delay = self._reconnection_delay(attempt, deadline)
                if delay is None:
                    raise
                time.sleep(delay)
            else:
                self._epoch, self._batch, self._earlier = self._epoch + 1, 0, ()
                return

    def _transformed(self, batches: Iterator[dict[str, Any]]) -> Iterator[Any]:
        """Apply :attr:`transform` to each batch; closing this closes ``batches``."""
        if self.transform is None:
            return batches
        return _mapped(self.transform, batches)

    def _reconnection_delay(self, attempt: int, deadline: float) -> float | None:
        """Return the pause before an outage's reconnection ``attempt`` (1, 2, ...), seconds.

        None if the outage has used its ``retries`` or would outlast ``deadline``
        (``time.monotonic()`` seconds); else the reconnection is logged.
        """
        connection = self.connection
        # with replicas the first reconnection goes at once: round_robin picks a healthy one
        paused = attempt - 1 if several_replicas(self.address) else attempt
        delay = min(connection.retry_backoff * 2 ** (paused - 1), _MAX_BACKOFF_S) if paused else 0.0
        if attempt > connection.retries or time.monotonic() + delay >= deadline:
            return None
        logger.warning(
            "annserve at %s unavailable; resuming at epoch %d batch %d once it answers, "
            "in %.1f s at the earliest (retry %d of %d, at most %.0f s more)",
            self.address,
            self._epoch,
            self._batch,
            delay,
            attempt,
            connection.retries,
            deadline - time.monotonic(),
        )
        return delay

    def _stream_from_cursor(self, pool: BufferPool) -> Iterator[dict[str, Any]]:
        """Stream the current epoch from the next batch not yet yielded."""
        conn = self._connection()
        stage, delivery = self._device_assembly()
        assembler = self._assembler(pool, stage)
        session = self._take_session() or self._open_bulk(pool)
        request = self._request(self._epoch, self._shard(), self._batch, session)
        call = conn.stream(request)
        output = self.output

        def produce() -> Iterator[dict[str, Any]]:
            messages = frames_of(call, conn.address)
            frames = messages if session is None else session.frames(messages)
            for batch in assembler.batches(frames):
                if output.to_torch:
                    batch = to_torch(batch, to_dense=output.to_dense, pool=pool)
                yield batch

        batches = Prefetcher(produce, output.prefetch, name="annserve-decode")
        # closed once: when the epoch ends or is abandoned, or at interpreter exit if it is
        # left open (weakref.finalize runs from atexit, while threads still run); a call
        # cancelled later, as the interpreter finalizes, waits forever on a lock held by
        # a grpc thread that finalization has already stopped
        close = weakref.finalize(batches, _close_stream, call, batches)
        try:
            if delivery is not None:  # X built on the device, uploads issued a batch ahead
                for batch in delivery.deliver(iter(batches)):
                    self._batch += 1
                    yield batch
                return
            for batch in batches:
                self._batch += 1
                yield to_device(batch, self.device) if self.device is not None else batch
        finally:
            if stage is not None:
                stage.closed.set()
            close()
            self._give_back(session)
            if stage is not None:
                stage.ring.release_all()
                stage.ring.busy = False

    def _device_assembly(self) -> tuple[DeviceStage | None, DeviceDelivery | None]:
        """Return the stage and delivery of device assembly (``Output.assemble_on_device``)."""
        device = self.output.assembly_device
        if device is None:
            return None, None
        if self._ring is None or self._ring.busy:  # a second stream at once gets its own
            self._ring = new_ring(self.output.prefetch)
        self._ring.busy = True
        dtype = torch.from_numpy(np.empty(0, self._value_dtype())).dtype
        delivery = DeviceDelivery(
            self._ring, device, dtype, to_dense=self.output.to_dense, cupy=self.output.cupy
        )
        return DeviceStage(self._ring, self.n_vars), delivery

    @property
    def upload_stats(self) -> dict[str, int]:
        """X bytes uploaded by device assembly and the rows they held, since the loader began.

        ``{"bytes": int, "rows": int}`` (bytes of the narrow wire arrays copied to the
        device, all epochs); zeros without ``Output.assemble_on_device``.
        """
        ring = self._ring
        if ring is None:
            return {"bytes": 0, "rows": 0}
        return {"bytes": ring.uploaded_bytes, "rows": ring.uploaded_rows}

    def _take_session(self) -> SharedMemorySession | None:
        """Return a shared-memory session for the next stream; None for the gRPC stream.

        The process's session is reused from epoch to epoch (its slots stay mapped);
        a second stream at once gets its own.

        Raises
        ------
        ServerUnavailableError
            With ``transport="shm"``, if the daemon offers no session.
        """
        path = side_socket(self.address)
        if self.connection.transport == "grpc" or path is None or self._no_shm:
            return None
        if self._shm is not None and self._shm_pid != os.getpid():
            self._shm = None  # inherited through fork(): the daemon talks to the parent
        cached = self._shm
        if cached is not None and not cached.busy and cached.alive():
            cached.busy = True
            return cached
        n_slots = min(self.output.prefetch + _SLOTS_BEYOND_PREFETCH, MAX_SLOTS)
        try:
            session = SharedMemorySession(path, n_slots, self.connection.timeout)
        except ServerUnavailableError as e:
            if self.connection.transport == "shm":
                raise
            logger.info("%s; streaming over gRPC", e)
            self._no_shm = True
            return None
        session.busy = True
        if cached is None or not cached.alive():
            if cached is not None:
                cached.close()
            self._shm, self._shm_pid = session, os.getpid()
        return session

    def _open_bulk(self, pool: BufferPool) -> BulkConnection | None:
        """Return a connection to the daemon's bulk channel for the next stream, or None.

        None streams frames inside the gRPC messages: ``transport="grpc"``, TLS,
        compression, a ``unix:`` address or several replicas, a daemon that offers no
        bulk channel, or (with ``transport="auto"``) one that could not be reached.

        Raises
        ------
        ServerUnavailableError
            With ``transport="bulk"``, if the daemon offers none or it cannot be reached.
        """
        transport = self.connection.transport
        if transport not in ("auto", "bulk") or not _bulk_possible(self.address, self.connection):
            return None
        port = self._info.bulk_port
        if not port or self._no_bulk:
            if transport == "bulk":
                msg = f"the daemon at {self.address} offers no bulk channel (--no-bulk, TLS)"
                raise ServerUnavailableError(msg)
            return None
        depth = _bulk_depth(self.output.prefetch)
        try:
            return BulkConnection(
                str(bulk_host(self.address)), port, self.connection.timeout, depth, pool
            )
        except ServerUnavailableError as e:
            if transport == "bulk":
                raise
            logger.info("%s; streaming over gRPC", e)
            self._no_bulk = True
            return None

    def _give_back(self, session: SharedMemorySession | BulkConnection | None) -> None:
        if session is None:
            return
        if session is not self._shm:
            session.close()
        else:
            session.busy = False

    def _assembler(self, pool: BufferPool, stage: DeviceStage | None = None) -> BatchAssembler:
        """Return the assembler of this loader's batches, with the dtypes they take."""
        info = self._info
        obsm = {o.name: o for o in info.obsm}
        dtype = self.dtype
        return BatchAssembler(
            info.obs_columns,
            self.obs_keys,
            self.n_vars,
            pool,
            dtype=self._value_dtype(),
            obsm=[
                (obsm[k], np.dtype(obsm[k].dtype) if dtype is None else dtype)
                for k in self.obsm_keys
            ],
            index_name=info.obs_index_name or None,
            x_stage=stage,
        )

    def _stored_dtype(self) -> np.dtype:
        """Return the dtype of the served matrix's values as stored."""
        matrix = "raw/X" if self.use_raw else f"layers/{self.layer}" if self.layer else "X"
        return next(np.dtype(m.dtype) for m in self._info.matrices if m.name == matrix)

    def _value_dtype(self) -> np.dtype:
        """Return the dtype of X's values in the batches: ``dtype``, or the stored one."""
        return self.dtype if self.dtype is not None else self._stored_dtype()

    def _shard(self) -> Shard:
        """Return the shard of this consumer: rank x DataLoader worker."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return Shard(self.rank * workers + worker, self.world_size * workers)

    def _request(
        self,
        epoch: int,
        shard: Shard,
        start_batch: int,
        session: SharedMemorySession | BulkConnection | None = None,
    ) -> pb.StreamBatchesRequest:
        request = pb.StreamBatchesRequest(
            store=self.store,
            batch_size=self.batch_size,
            chunk_size=self.chunk_size,
            preload_nchunks=self.preload_nchunks,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            seed=self.seed,
            epoch=epoch,
            obs_keys=self.obs_keys,
            obsm_keys=self.obsm_keys,
            return_index=self.return_index,
            layer=self.layer or "",
            use_raw=self.use_raw,
            var_names=self._var_subset or (),
            missing_genes=_MISSING_GENES[self._missing_genes_mode],
            shard_index=shard.index,
            shard_count=shard.count,
            uneven_shards=not self.sharding.even_batches,
            start_batch=start_batch,
            store_fingerprint=self._info.fingerprint,
            earlier_worlds=[pb.EarlierWorld(shard_count=n, batches=b) for n, b in self._earlier],
        )
        self.connection.apply(request)
        if session is not None:  # frames of whole batches
            session.apply(request)
            if request.encoding == pb.ENCODING_NATIVE:
                request.value_dtype = self._value_dtype().str
        for option in (self.split, self.balance):
            if option is not None:
                option.apply(request)
        return request

    def _connection(self) -> Channel:
        # a channel inherited through fork() is unusable: each process opens its own
        if self._conn is None or self._conn_pid != os.getpid():
            if self.connection.retain_memory:  # before gRPC starts threads: one shared arena
                retain_freed_memory()
            self._conn = Channel(self.address, self.connection)
            self._conn_pid = os.getpid()
        return self._conn

    # channels do not pickle: DataLoader workers started by spawn reconnect lazily;
    # buffers are not worth pickling
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_conn": None, "_pool": None, "_shm": None, "_ring": None}


def _mapped(
    function: Callable[[dict[str, Any]], Any], batches: Iterator[dict[str, Any]]
) -> Iterator[Any]:
    """``map(function, batches)`` that closes the stream when it is closed itself."""
    try:
        for batch in batches:
            yield function(batch)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _close_stream(call: grpc.Call, batches: Prefetcher[dict[str, Any]]) -> None:
    """Cancel a stream's call, then stop its decoding thread (which the cancel wakes)."""
    call.cancel()
    batches.close(_CLOSE_TIMEOUT_S)


def _bulk_depth(prefetch: int) -> int:
    """Return the records the bulk channel reads ahead: one beyond the batches decoded ahead."""
    return prefetch + 1


def _bulk_possible(address: str, connection: Connection) -> bool:
    """Whether frames may take the bulk channel: one server's TCP address, plaintext, raw."""
    return bulk_host(address) is not None and not connection.secure and not connection.compression


def _resolve_rank(sharding: Sharding) -> tuple[int, int]:
    rank, world_size = sharding.rank, sharding.world_size
    if rank is None and world_size is None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return rank or 0, world_size or 1


def _resolve_dtype(dtype: npt.DTypeLike | None) -> np.dtype | None:
    if dtype is None:
        return None
    try:
        resolved = np.dtype(dtype)
    except TypeError as e:
        msg = f"dtype: not a numpy dtype: {str(dtype)[:100]!r}"
        raise InvalidRequestError(msg) from e
    if resolved.kind not in "biuf":
        msg = f"dtype must be a numeric or bool dtype (e.g. float32), got {resolved}"
        raise InvalidRequestError(msg)
    return resolved


def _resolve_seed(seed: int | np.random.Generator | None) -> int:
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(2**63))
    if seed is None:
        return int(np.random.default_rng().integers(2**63))
    if seed < 0:
        msg = f"seed must be >= 0, got {seed}"
        raise InvalidRequestError(msg)
    return int(seed)
