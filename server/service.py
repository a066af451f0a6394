"""The gRPC servicer: validates requests, calls the core, maps errors to status codes."""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

import grpc

from annserve.errors import (
    AnnServeError,
    InvalidRequestError,
    StoreFormatError,
    StoreNotFoundError,
)
from annserve.prefetch import Prefetcher
from annserve.server.request import plan_stream
from annserve.server.selection import make_sampler
from annserve.server.stream import epoch_frames, epoch_span
from annserve.v1 import annserve_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from annserve.server.request import StreamPlan
    from annserve.server.sampler import Sampler
    from annserve.server.store import Store

logger = logging.getLogger(__name__)

SERVICE_NAME = "annserve.v1.AnnServe"

#: The one table from error class to gRPC status; the first matching class wins.
STATUS_OF: tuple[tuple[type[AnnServeError], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (StoreNotFoundError, grpc.StatusCode.NOT_FOUND),
    (StoreFormatError, grpc.StatusCode.FAILED_PRECONDITION),
)

#: Frames that may wait between the preload thread and the gRPC send loop.
FRAME_QUEUE = 64


def status_of(error: AnnServeError) -> grpc.StatusCode:
    """Return the gRPC status code for an annserve error (``INTERNAL`` when unmapped)."""
    return next((code for cls, code in STATUS_OF if isinstance(error, cls)),
                grpc.StatusCode.INTERNAL)


class AnnServeService:
    """Handlers of the ``annserve.v1.AnnServe`` service over a set of named stores.

    Parameters
    ----------
    stores
        Store by name; the first one is the default for requests naming none.
    """

    def __init__(self, stores: Mapping[str, Store]) -> None:
        if not stores:
            msg = "at least one store is required"
            raise ValueError(msg)
        self._stores = dict(stores)
        self._default = next(iter(self._stores))
        self._stream_ids = itertools.count(1)

    def _store(self, name: str) -> Store:
        try:
            return self._stores[name or self._default]
        except KeyError:
            msg = f"store: unknown store {name!r}; configured: {sorted(self._stores)}"
            raise StoreNotFoundError(msg) from None

    def describe_store(self, request: pb.DescribeStoreRequest,
                       context: grpc.ServicerContext) -> pb.StoreInfo:
        """Handle ``DescribeStore``."""
        try:
            store = self._store(request.store)
        except AnnServeError as e:
            context.abort(status_of(e), str(e))
        return pb.StoreInfo(
            name=request.store or self._default,
            n_obs=store.n_obs,
            n_vars=store.n_vars,
            var_names=store.var_names,
            obs_columns=[pb.ObsColumn(name=c.name, dtype=c.dtype, categories=c.categories,
                                      ordered=c.ordered) for c in store.obs.values()],
            x_sparse=store.x_sparse,
            x_dtype=store.x_dtype.name,
            layers=store.layers,
        )

    def _plan(self, request: pb.StreamBatchesRequest, context: grpc.ServicerContext
              ) -> tuple[Store, StreamPlan, Sampler]:
        """Validate a request and build its sampler, aborting the call on bad input."""
        try:
            store = self._store(request.store)
            plan = plan_stream(request, store)
            return store, plan, make_sampler(store, plan)
        except AnnServeError as e:
            context.abort(status_of(e), str(e))
        except Exception:
            logger.exception("cannot plan a stream for %s", request)
            context.abort(grpc.StatusCode.INTERNAL, "cannot plan this stream; see server log")
        raise AssertionError  # context.abort raises

    def count_batches(self, request: pb.StreamBatchesRequest,
                      context: grpc.ServicerContext) -> pb.EpochSize:
        """Handle ``CountBatches``: the shard's epoch size, computed without reading data."""
        _, plan, sampler = self._plan(request, context)
        span = epoch_span(sampler, plan)
        n_rows = span.stop - span.start
        return pb.EpochSize(n_rows=n_rows, n_batches=-(-n_rows // plan.batch_size))

    def stream_batches(self, request: pb.StreamBatchesRequest,
                       context: grpc.ServicerContext) -> Iterator[bytes]:
        """Handle ``StreamBatches``: yield serialized frames read ahead in a background thread."""
        store, plan, sampler = self._plan(request, context)
        stream_id = next(self._stream_ids)
        frames = Prefetcher(lambda: epoch_frames(store, sampler, plan), FRAME_QUEUE,
                            name=f"annserve-stream-{stream_id}")
        context.add_callback(frames.close)
        logger.info("stream %d: epoch %d of %s, batch_size=%d chunk_size=%d preload_nchunks=%d",
                    stream_id, plan.epoch, store.path, plan.batch_size, plan.chunk_size,
                    plan.preload_nchunks)
        try:
            yield from frames
        except AnnServeError as e:
            context.abort(status_of(e), str(e))
        except Exception:
            logger.exception("stream %d failed", stream_id)
            context.abort(grpc.StatusCode.INTERNAL, f"stream {stream_id} failed; see server log")
        finally:
            frames.close()
