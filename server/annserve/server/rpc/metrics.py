"""Prometheus metrics of one server, the interceptor counting errors, the HTTP endpoint.

The stream code calls :class:`StreamMeter` once per frame (never per row).

Each :class:`Metrics` has its own registry, so several servers may live in one
process (tests) without sharing counters. Nothing is registered at import.

With ``annserve --workers N`` every worker process counts into prometheus_client's
multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor before it starts
them) and the supervisor serves their sum (:func:`multiprocess_registry`): counters and
histograms add up over all workers, past ones too; the two gauges add up over the live
ones; ``annserve_worker_streams`` has one sample per worker ``pid``.

No label takes a client's text as it comes, so no client can grow ``/metrics``:
``method`` is a method the server serves (any other path is :data:`UNKNOWN_METHOD`),
``code`` a status code name, ``store`` a configured store's name (a stream is
counted once its store is found).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from annserve.server.rpc.handlers import is_non_blocking, rebuild_handler, status_set

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from wsgiref.simple_server import WSGIServer

    from annserve.server.stream.frames import Frame

#: Store read latency buckets, seconds: one preload buffer takes ms (cached) to seconds (cold).
READ_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Stream duration buckets, seconds: one epoch of a small store to a long epoch of an atlas.
STREAM_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
#: ``method`` label of calls to a method the server does not serve (the path is the client's).
UNKNOWN_METHOD = "unknown"


class Metrics:
    """The server's Prometheus metrics, in their own registry.

    Parameters
    ----------
    per_process
        Also count the streams each process admits, ``annserve_worker_streams`` (one
        sample per ``pid`` in multiprocess mode): for the workers of ``--workers N``.

    Attributes
    ----------
    registry
        Holds every metric below; serve it with :func:`serve_metrics`.
    """

    def __init__(self, *, per_process: bool = False) -> None:
        r = self.registry = CollectorRegistry()
        self.streams = Counter(
            "annserve_streams", "StreamBatches calls admitted", ["store"], registry=r
        )
        # multiprocess_mode: how the workers of --workers N add up (unused in one process)
        self.active_streams = Gauge(
            "annserve_active_streams",
            "StreamBatches calls in flight",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.frames_queued = Gauge(
            "annserve_frames_queued",
            "Frames encoded and waiting to be sent, all streams (preload buffer occupancy)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.worker_streams = (
            Gauge(
                "annserve_worker_streams",
                "StreamBatches calls admitted by each worker process (label pid)",
                multiprocess_mode="all",
                registry=r,
            )
            if per_process
            else None
        )
        self.frames = Counter("annserve_frames", "Frames sent", ["store"], registry=r)
        self.batches = Counter(
            "annserve_batches", "Minibatches sent complete", ["store"], registry=r
        )
        self.cells = Counter("annserve_cells", "Rows (cells) sent", ["store"], registry=r)
        self.sent_bytes = Counter("annserve_sent_bytes", "Frame bytes sent", ["store"], registry=r)
        self.store_read_seconds = Histogram(
            "annserve_store_read_seconds",
            "Time to read one preload buffer from a store",
            ["store"],
            buckets=READ_BUCKETS,
            registry=r,
        )
        self.preload_buffers = Counter(
            "annserve_preload_buffers",
            "Preload buffer pieces streams got: read from the store (source 'read') or "
            "from another stream's read of the same piece (source 'shared')",
            ["store", "source"],
            registry=r,
        )
        self.stream_seconds = Histogram(
            "annserve_stream_duration_seconds",
            "Duration of StreamBatches calls",
            buckets=STREAM_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "annserve_rpc_errors",
            "Calls that ended with a status other than OK",
            ["method", "code"],
            registry=r,
        )

    def preload_buffers_of(self, store: str) -> Callable[[str], None]:
        """Return the counter of a stream's preload buffer pieces by source, for ``store``."""
        counters = {s: self.preload_buffers.labels(store, s) for s in ("read", "shared")}
        return lambda source: counters[source].inc()

    def stream(self, store: str) -> StreamMeter:
        """Return the per-frame counters of one stream over ``store``."""
        self.streams.labels(store).inc()
        if self.worker_streams is not None:
            self.worker_streams.inc()
        return StreamMeter(self, store)


class StreamMeter:
    """Counters of one stream: :meth:`sent` once per frame, never per row.

    Attributes
    ----------
    frames, cells, nbytes
        What this stream sent so far: frames, rows, bytes.
    """

    def __init__(self, metrics: Metrics, store: str) -> None:
        self._frames = metrics.frames.labels(store)
        self._batches = metrics.batches.labels(store)
        self._cells = metrics.cells.labels(store)
        self._bytes = metrics.sent_bytes.labels(store)
        self.frames = self.cells = self.nbytes = 0

    def sent(self, frame: Frame) -> None:
        """Count one frame handed to gRPC to send, from the header it was built from.

        Called before the frame is yielded: a stream cancelled with that frame in
        flight counts it, one more than the client may have received.
        """
        header = frame.header
        self.frames += 1
        self.cells += header.n_rows
        nbytes = len(frame.data) + frame.beside  # also payloads beside the message
        self.nbytes += nbytes
        self._frames.inc()
        self._cells.inc(header.n_rows)
        self._bytes.inc(nbytes)
        if header.row_start + header.n_rows == header.batch_rows:
            self._batches.inc()


class MetricsInterceptor(grpc.ServerInterceptor):
    """Count every call that ends with a status other than OK, by method and code.

    A streaming call the client abandons (or the server cancels) counts as
    ``CANCELLED``; an exception that aborted nothing counts as ``UNKNOWN``. Calls to
    methods the server does not serve count as ``UNIMPLEMENTED`` under one label,
    :data:`UNKNOWN_METHOD`.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._errors = metrics.errors

    def intercept_service(
        self, continuation: Callable, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        """Wrap the method's handler with the counting."""
        handler = continuation(details)
        if handler is None:
            self._errors.labels(UNKNOWN_METHOD, grpc.StatusCode.UNIMPLEMENTED.name).inc()
            return None
        if is_non_blocking(handler):
            wrapper = _callback_wrapper
        else:
            wrapper = _stream_wrapper if handler.response_streaming else _unary_wrapper
        return rebuild_handler(handler, wrapper(self._errors, details.method))


def _code_name(context: grpc.ServicerContext, default: grpc.StatusCode) -> str:
    code, _ = status_set(context)
    return (code or default).name


def _count_failure(errors: Counter, method: str, context: grpc.ServicerContext) -> None:
    """Count a call that returned normally but set a non-OK status (e.g. ``context.abort``)."""
    code = _code_name(context, grpc.StatusCode.OK)
    if code != "OK":
        errors.labels(method, code).inc()


def _unary_wrapper(errors: Counter, method: str) -> Callable[[Callable], Callable]:
    def wrap(behavior: Callable) -> Callable:
        def call(request: object, context: grpc.ServicerContext) -> object:
            try:
                response = behavior(request, context)
            except Exception:
                errors.labels(method, _code_name(context, grpc.StatusCode.UNKNOWN)).inc()
                raise
            _count_failure(errors, method, context)
            return response

        return call

    return wrap


def _stream_wrapper(errors: Counter, method: str) -> Callable[[Callable], Callable]:
    def wrap(behavior: Callable) -> Callable:
        def call(request: object, context: grpc.ServicerContext) -> Iterator[object]:
            try:
                yield from behavior(request, context)
            except GeneratorExit:  # the client left, or the server ended the call (a stall)
                errors.labels(method, _code_name(context, grpc.StatusCode.CANCELLED)).inc()
                raise
            except Exception:
                errors.labels(method, _code_name(context, grpc.StatusCode.UNKNOWN)).inc()
                raise
            if context.is_active():
                _count_failure(errors, method, context)
            else:  # cancelled while the handler waited for its next response
                errors.labels(method, grpc.StatusCode.CANCELLED.name).inc()

        return call

    return wrap


def _callback_wrapper(errors: Counter, method: str) -> Callable[[Callable], Callable]:
    """Count a non-blocking call (health ``Watch``) when it terminates.

    It ends with the status set when the servicer sends None, or ``CANCELLED`` when
    it terminates before (the client left, the server stopped).
    """

    def wrap(behavior: Callable) -> Callable:
        def call(request: object, context: grpc.ServicerContext, send_response: Callable) -> None:
            ended: list[str] = []  # the code the call ended with, once it has

            def send(response: object) -> None:
                if response is None and not ended:
                    ended.append(_code_name(context, grpc.StatusCode.OK))
                send_response(response)

            def count() -> None:
                code = ended[0] if ended else grpc.StatusCode.CANCELLED.name
                if code != "OK":
                    errors.labels(method, code).inc()

            # added before the servicer's own: runs first when the call terminates
            context.add_callback(count)
            try:
                behavior(request, context, send)
            except Exception:
                ended.append(_code_name(context, grpc.StatusCode.UNKNOWN))
                raise

        return call

    return wrap


class MetricsEndpoint:
    """A running ``/metrics`` HTTP endpoint.

    Attributes
    ----------
    port
        Its bound port.
    """

    def __init__(self, server: WSGIServer) -> None:
        self._server = server
        self.port: int = server.server_port

    def close(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(metrics: Metrics, host: str, port: int) -> MetricsEndpoint:
    """Serve ``metrics`` at ``http://host:port/metrics`` from a daemon thread.

    Parameters
    ----------
    metrics
        What to expose.
    host, port
        Where to listen; port 0 picks a free one.

    Raises
    ------
    OSError
        If the address cannot be bound.
    """
    return serve_registry(metrics.registry, host, port)


def serve_registry(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    Raises
    ------
    OSError
        If the address cannot be bound.
    """
    server, _ = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(server)


def multiprocess_registry(path: str) -> CollectorRegistry:
    """Return a registry that reads the metrics every worker process wrote under ``path``.

    ``path`` is the ``PROMETHEUS_MULTIPROC_DIR`` of the workers; each scrape reads
    their files afresh.
    """
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return registry
