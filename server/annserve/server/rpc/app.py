"""Build a gRPC server around :class:`AnnServeService`."""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from annserve.errors import InvalidRequestError
from annserve.server.plan.limits import Limits
from annserve.server.rpc.bulk import BulkListener
from annserve.server.rpc.health_service import HealthServicer
from annserve.server.rpc.metrics import Metrics, MetricsInterceptor
from annserve.server.rpc.security import (
    MAX_UNAUTHENTICATED_CALLS,
    TokenAuthInterceptor,
    UnauthenticatedCallLimit,
)
from annserve.server.rpc.service import (
    SERVICE_NAME,
    STALL_TIMEOUT_S,
    AnnServeService,
    status_of,
)
from annserve.server.rpc.shm import SharedMemoryListener
from annserve.server.stream.shared import REGISTRY
from annserve.shm import side_socket
from annserve.v1 import annserve_pb2 as pb
from annserve.wire import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from google.protobuf.message import Message

    from annserve.server.io.store import Store
    from annserve.server.rpc.security import TLSConfig
    from annserve.server.rpc.service import StreamSlots

logger = logging.getLogger(__name__)

#: Largest request accepted, bytes: a request lists at most all genes' names.
MAX_REQUEST_BYTES = 16 << 20
#: Seconds streams still in flight after the grace get to end with UNAVAILABLE, then
#: grpc cancels them.
STOP_SLACK_S = 1.0
#: RPC threads beyond ``max_streams``: unary calls, health checks and reflection.
EXTRA_WORKERS = 16
#: Seconds between the server's HTTP/2 pings on a connection (``--keepalive``).
KEEPALIVE_S = 30.0
#: Seconds a peer gets to answer a ping; a connection without an answer is closed and
#: its streams end (a dead host, a stopped process).
KEEPALIVE_TIMEOUT_S = 10.0
#: Most often a client may ping, milliseconds: the client pings every 30 s.
MIN_CLIENT_PING_INTERVAL_MS = 10_000


class AnnServer:
    """A started annserve gRPC server and the parts a daemon or a test drives.

    Attributes
    ----------
    server
        The grpc server.
    ports
        Bound port of each address (0 for unix sockets).
    service
        The ``annserve.v1.AnnServe`` servicer (its open streams, drain controls).
    health
        The ``grpc.health.v1.Health`` servicer: SERVING once started.
    metrics
        The server's Prometheus metrics.
    """

    def __init__(
        self,
        server: grpc.Server,
        ports: list[int],
        service: AnnServeService,
        health_servicer: HealthServicer,
    ) -> None:
        self.server, self.ports, self.service = server, ports, service
        self.health = health_servicer
        self.metrics = service.metrics

    def shutdown(self, grace: float) -> bool:
        """Stop gracefully within about ``grace`` + 1 seconds.

        Health turns NOT_SERVING and new streams get ``UNAVAILABLE`` while in-flight
        streams go on for up to ``grace`` seconds; those still running then end with
        ``UNAVAILABLE`` at their next frame (the message says the server is shutting
        down), and the server stops.

        Returns
        -------
        Whether every stream had finished within ``grace``.
        """
        self.health.enter_graceful_shutdown()
        self.service.drain()
        finished = self.service.wait_idle(grace)
        if not finished:
            logger.warning(
                "%d stream(s) still running after the %.1f s grace; ending them",
                self.service.open_streams(),
                grace,
            )
            self.service.stop_streams()
        # streams still blocked on a slow client after the slack are cancelled by grpc; a
        # finished handler's last frames may still be on their way (stop returns once
        # every call is done: 0 would cancel them)
        self.server.stop(STOP_SLACK_S).wait()
        self.health.close()
        if self.service.shared_memory is not None:
            self.service.shared_memory.close()
        if self.service.bulk is not None:
            self.service.bulk.close()
        return finished


def build_server(
    stores: Mapping[str, Store],
    addresses: Sequence[str] = ("127.0.0.1:0",),
    *,
    limits: Limits | None = None,
    tls: TLSConfig | None = None,
    tokens: frozenset[str] | None = None,
    max_unauthenticated_calls: int = MAX_UNAUTHENTICATED_CALLS,
    metrics: Metrics | None = None,
    max_workers: int | None = None,
    stall_timeout: float = STALL_TIMEOUT_S,
    keepalive: float = KEEPALIVE_S,
    reuse_port: bool = False,
    slots: StreamSlots | None = None,
    shared_memory: bool = True,
    shared_reads: bool = True,
    bulk_port: int | None = 0,
) -> AnnServer:
    """Create and start a server for ``stores``, with health checking and reflection.

    The stream method is registered without a response serializer: the servicer
    yields frames already serialized by :func:`annserve.wire.encode_frame`. Requests
    are parsed here, so a malformed one gets ``INVALID_ARGUMENT``.

    Parameters
    ----------
    stores
        Store by name; the first is the default.
    addresses
        Where to listen: ``host:port`` (port 0 picks a free port) or ``unix:/path`` each.
    limits
        Stream limits; default :class:`Limits`.
    tls
        Serve TCP addresses over TLS (mutual TLS with ``tls.client_ca``); unix sockets,
        reachable only through the file system, stay plaintext.
    tokens
        Accepted bearer tokens; None accepts any caller.
    max_unauthenticated_calls
        Calls of each health method (exempt from the token) in flight at once; more
        get ``RESOURCE_EXHAUSTED``. Health ``Watch`` holds no worker thread.
    metrics
        Where to count; default: fresh metrics.
    max_workers
        Threads serving RPCs; each open stream holds one. Default ``max_streams + 16``.
    stall_timeout
        Seconds a stream may wait for its client to take a frame; then it ends with
        ``DEADLINE_EXCEEDED`` and frees its slot.
    keepalive
        Seconds between HTTP/2 pings on a connection; one unanswered for
        :data:`KEEPALIVE_TIMEOUT_S` is closed (its streams end ``CANCELLED``).
    reuse_port
        Bind TCP ports with ``SO_REUSEPORT``, so that other processes of the same user
        serve the same port (``annserve --workers N``; the kernel spreads connections
        over them). Off by default: a second daemon on a busy port must fail to bind.
    slots
        Count ``max_streams`` with the other processes serving the address; default:
        this server's streams only.
    shared_memory
        Offer the same-host shared-memory transport on the first unix socket of
        ``addresses``: a side socket at its path + ``".shm"``
        (:class:`~annserve.server.rpc.shm.SharedMemoryListener`).
    shared_reads
        Streams that read the same preload buffers (same store, genes, sampling and
        epoch) read each once, through the process's
        :data:`~annserve.server.stream.shared.REGISTRY`; False reads per stream.
    bulk_port
        Port of the bulk channel of remote streams
        (:class:`~annserve.server.rpc.bulk.BulkListener`), bound on the host of the
        first TCP address; 0 picks a free one, None offers none. Never with ``tls``:
        the channel is plaintext.

    Raises
    ------
    OSError
        If an address cannot be bound.
    ValueError
        If ``stall_timeout`` is not positive.
    """
    limits = limits if limits is not None else Limits()
    service = AnnServeService(
        stores,
        limits,
        metrics,
        stall_timeout,
        slots,
        shared_reads=REGISTRY if shared_reads else None,
    )
    handlers = {
        "DescribeStore": grpc.unary_unary_rpc_method_handler(
            _parsed(pb.DescribeStoreRequest, service.describe_store),
            response_serializer=pb.StoreInfo.SerializeToString,
        ),
        "CountBatches": grpc.unary_unary_rpc_method_handler(
            _parsed(pb.StreamBatchesRequest, service.count_batches),
            response_serializer=pb.EpochSize.SerializeToString,
        ),
        "StreamBatches": grpc.unary_stream_rpc_method_handler(
            _parsed_stream(pb.StreamBatchesRequest, service.stream_batches),
        ),
    }
    interceptors: list[grpc.ServerInterceptor] = [
        MetricsInterceptor(service.metrics),
        UnauthenticatedCallLimit(max_unauthenticated_calls),
    ]
    if tokens is not None:
        interceptors.append(TokenAuthInterceptor(tokens))
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=max_workers or limits.max_streams + EXTRA_WORKERS,
            thread_name_prefix="annserve-rpc",
        ),
        handlers=[grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)],
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            # grpc's default SO_REUSEPORT lets a second daemon bind a busy port silently;
            # the workers of one daemon share it (the supervisor checked it was free)
            ("grpc.so_reuseport", int(reuse_port)),
            *_keepalive_options(keepalive),
        ],
    )
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    ports = []
    for address in addresses:
        try:
            if tls is not None and not address.startswith("unix:"):
                ports.append(server.add_secure_port(address, tls.credentials()))
            else:
                ports.append(server.add_insecure_port(address))
        except RuntimeError as e:
            msg = f"cannot bind {address}: {e}"
            raise OSError(msg) from e
    unix = [a for a in addresses if side_socket(a) is not None]
    if shared_memory and unix:
        service.shared_memory = SharedMemoryListener(str(side_socket(unix[0])))
    tcp = [a for a in addresses if not a.startswith("unix")]
    if bulk_port is not None and tls is None and tcp:
        host = tcp[0].rsplit(":", 1)[0]
        try:
            service.bulk = BulkListener(host, bulk_port)
        except OSError as e:
            msg = f"cannot bind the bulk channel on {host}:{bulk_port}: {e}"
            raise OSError(msg) from e
        logger.info("bulk channel of remote streams on %s:%d", host, service.bulk.port)
    server.start()
    if service.bulk is not None:  # also for servers stopped without shutdown()
        threading.Thread(
            target=_close_when_stopped,
            args=(server, service.bulk),
            name="annserve-bulk-close",
            daemon=True,
        ).start()
    # the stores are open (the service holds them): ready
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return AnnServer(server, ports, service, health_servicer)


def _close_when_stopped(server: grpc.Server, listener: BulkListener) -> None:
    server.wait_for_termination()
    listener.close()


def _keepalive_options(keepalive: float) -> list[tuple[str, int]]:
    """Return the options that ping every ``keepalive`` s and close a silent connection.

    Clients may ping every :data:`MIN_CLIENT_PING_INTERVAL_MS` ms, also with no call
    open or no data flowing (a stalled stream), without being told ``too_many_pings``.
    """
    timeout_ms = int(KEEPALIVE_TIMEOUT_S * 1000)
    return [
        ("grpc.keepalive_time_ms", int(keepalive * 1000)),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),  # a ping sent with data flowing
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging while a stream is blocked
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
    ]


def _bad_request(cls: type[Message], error: Exception, context: grpc.ServicerContext) -> None:
    bad = InvalidRequestError(f"request does not parse as {cls.DESCRIPTOR.full_name}: {error}")
    context.abort(status_of(bad), str(bad))


def _parsed(cls: type[Message], behavior: Callable) -> Callable:
    """Wrap a unary handler taking a message into one taking the request's bytes."""

    def handle(data: bytes, context: grpc.ServicerContext) -> object:
        try:
            request = cls.FromString(data)
        except DecodeError as e:
            _bad_request(cls, e, context)
        return behavior(request, context)

    return handle


def _parsed_stream(cls: type[Message], behavior: Callable) -> Callable:
    """Wrap a streaming handler taking a message into one taking the request's bytes."""

    def handle(data: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            request = cls.FromString(data)
        except DecodeError as e:
            _bad_request(cls, e, context)
        yield from behavior(request, context)

    return handle


def create_server(
    stores: Mapping[str, Store],
    addresses: Sequence[str] = ("127.0.0.1:0",),
    max_workers: int | None = None,
    *,
    stall_timeout: float = STALL_TIMEOUT_S,
    keepalive: float = KEEPALIVE_S,
) -> tuple[grpc.Server, list[int]]:
    """Create and start a plaintext server for ``stores`` with default limits.

    See :func:`build_server` (TLS, tokens, limits, metrics, graceful shutdown).

    Parameters
    ----------
    stores
        Store by name; the first is the default.
    addresses
        Where to listen: ``host:port`` (port 0 picks a free port) or ``unix:/path`` each.
    max_workers
        Threads serving RPCs; each open stream holds one.
    stall_timeout
        Seconds a stream may wait for its client to take a frame (``DEADLINE_EXCEEDED``).
    keepalive
        Seconds between HTTP/2 pings on a connection.

    Returns
    -------
    The started server and the bound port of each address (0 for unix sockets).

    Raises
    ------
    OSError
        If the address cannot be bound.
    ValueError
        If ``stall_timeout`` is not positive.
    """
    started = build_server(
        stores,
        addresses,
        max_workers=max_workers,
        stall_timeout=stall_timeout,
        keepalive=keepalive,
    )
    return started.server, started.ports
