"""The client's gRPC connection: channel options, calls with deadlines, error mapping."""

from __future__ import annotations

import ipaddress
import json
import time
from typing import TYPE_CHECKING

import grpc

from annserve.errors import (
    AnnServeError,
    InvalidRequestError,
    ServerUnavailableError,
    error_for_status,
    quoted,
)
from annserve.v1 import annserve_pb2 as pb
from annserve.wire import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from annserve.client.options import Connection

SERVICE_NAME = "annserve.v1.AnnServe"
_SERVICE = f"/{SERVICE_NAME}/"
#: Every call goes to the next replica whose health service says SERVING for annserve's
#: service (gRPC client-side health checking): a draining or dead replica gets no new
#: stream. With one server this is what pick_first does, but a draining server is
#: skipped at once instead of answering UNAVAILABLE.
_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": SERVICE_NAME},
    }
)
_OPTIONS = [
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # detect a dead server during a long stream instead of waiting forever: a ping every
    # 30 s (the server accepts one every 10 s), answered within 10 s also while data
    # flows (grpc's ping timeout is otherwise 60 s), and kept up while no data arrives
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    # try a lost server again at least every second (grpc's default backoff grows to 120 s),
    # so that a restarted one is found within a second of listening again
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]
#: Called, without waiting for a connection, to learn whether a server answers.
_PROBE = "/grpc.health.v1.Health/Check"
#: Seconds between probes of a server that does not answer yet.
_POLL_S = 0.1
#: What a connection error most likely means, by a part of grpc's message.
_HANDSHAKE_CAUSES = (
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the server's certificate is not signed by a CA in Connection.root_certificates",
    ),
    (
        "WRONG_VERSION_NUMBER",
        "the server does not use TLS: connect without root_certificates, "
        "certificate_chain and private_key",
    ),
    ("handshake failed", "the TLS handshake failed"),
)
#: What a server closing the connection at once most likely means, by whether we use TLS.
_CLOSED_CAUSES = {
    False: "the server closed the connection at once: it likely requires TLS "
    "(give Connection(root_certificates=<its CA certificate>))",
    True: "the server closed the connection during the TLS handshake: it likely requires "
    "a client certificate signed by its CA (mutual TLS: give certificate_chain and "
    "private_key) and got none, or one from another CA",
}


def grpc_target(address: str | Sequence[str]) -> str:
    """Return the gRPC target naming the server or replicas of ``address``.

    Parameters
    ----------
    address
        One target as grpc reads it: ``host:port``, ``unix:/path``,
        ``dns:///name:port`` (every address the name resolves to is a replica, e.g. a
        Kubernetes headless Service), ``ipv4:a:p,b:q`` or ``ipv6:[a]:p,...``; or a list
        of ``host:port`` whose hosts are IP addresses (``localhost`` counts as
        127.0.0.1), joined into one ``ipv4:``/``ipv6:`` target.

    Raises
    ------
    InvalidRequestError
        If a list is empty, mixes IPv4 and IPv6, or names a host that is not an IP
        address (give one ``dns:///`` name that resolves to every replica instead).
    """
    if isinstance(address, str):
        return address
    hosts = [_ip_address(a) for a in address]
    versions = {version for version, _ in hosts}
    if len(versions) != 1:
        msg = f"address: a list of one or more host:port of one IP version, got {quoted(address)}"
        raise InvalidRequestError(msg)
    return f"ipv{versions.pop()}:" + ",".join(a for _, a in hosts)


def several_replicas(target: str) -> bool:
    """Whether a gRPC target may name several servers: ``dns:`` or a list in ``ipv4:``/``ipv6:``.

    A ``dns:`` name counts whatever it resolves to now: a headless Service may grow.
    """
    scheme, _, rest = target.partition(":")
    return scheme == "dns" or (scheme in ("ipv4", "ipv6") and "," in rest)


def _ip_address(address: str) -> tuple[int, str]:
    """Return the IP version and ``ip:port`` of one ``host:port`` of a list of replicas."""
    host, _, port = address.rpartition(":")
    host = "127.0.0.1" if host == "localhost" else host
    try:
        ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        ip = None
    if ip is None or not port.isdigit():
        msg = (
            f"address: each replica of a list is IP:PORT (grpc's ipv4:/ipv6: targets), got "
            f"{quoted(address)}; for host names give one dns:///NAME:PORT resolving to all"
        )
        raise InvalidRequestError(msg)
    return ip.version, f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def translate(error: grpc.RpcError, address: str) -> AnnServeError:
    """Map a failed call to the annserve error a caller can act on.

    Parameters
    ----------
    error
        The exception grpc raised; also a ``grpc.Call`` carrying code and details.
    address
        Server address, named in the message.
    """
    code, details = error.code(), error.details()
    cls = error_for_status(code.name)
    return cls(f"annserve at {address}: {code.name}: {details}")


def handshake_failure(error: str, *, secure: bool) -> str | None:
    """Return the likely cause of a connection error that is a failed handshake, else None.

    Parameters
    ----------
    error
        grpc's message for a call that found no connection (e.g. ``"... Tls handshake
        failed ..."``; ``"Connection refused"`` is not a handshake failure).
    secure
        Whether this side uses TLS.
    """
    for marker, cause in _HANDSHAKE_CAUSES:
        if marker in error:
            return cause
    return _CLOSED_CAUSES[secure] if "Socket closed" in error else None


class Channel:
    """A channel to one annserve server, with the calls of its service.

    Parameters
    ----------
    address
        ``host:port`` or ``unix:/path``.
    options
        Deadline, TLS material and token (:class:`annserve.client.Connection`).
    """

    def __init__(self, address: str, options: Connection) -> None:
        self.address = address
        self.timeout = options.timeout
        self.secure = options.secure
        token = options.token
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        if options.secure:
            channel_credentials = grpc.ssl_channel_credentials(
                options.root_certificates, options.private_key, options.certificate_chain
            )
            self._channel = grpc.secure_channel(address, channel_credentials, options=_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(address, options=_OPTIONS)
        self._describe = self._channel.unary_unary(
            _SERVICE + "DescribeStore",
            request_serializer=pb.DescribeStoreRequest.SerializeToString,
            response_deserializer=pb.StoreInfo.FromString,
        )
        self._count = self._channel.unary_unary(
            _SERVICE + "CountBatches",
            request_serializer=pb.StreamBatchesRequest.SerializeToString,
            response_deserializer=pb.EpochSize.FromString,
        )
        # bytes in, bytes out: the answer is not read
        self._probe_call = self._channel.unary_unary(_PROBE, None, None)
        # no deserializer: frames arrive as bytes and are decoded without protobuf copies
        self._stream = self._channel.unary_stream(
            _SERVICE + "StreamBatches",
            request_serializer=pb.StreamBatchesRequest.SerializeToString,
            response_deserializer=None,
        )

    def describe(self, store: str) -> pb.StoreInfo:
        """Call ``DescribeStore``.

        Raises
        ------
        ServerUnavailableError
            If no server answers at the address within ``timeout`` seconds, or the
            connection's handshake fails (see :meth:`wait_until_ready`).
        AnnServeError
            Any other failure, mapped from its status code (e.g. ``StoreNotFoundError``).
        """
        self.wait_until_ready(self.timeout)
        try:
            return self._describe(
                pb.DescribeStoreRequest(store=store), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise translate(e, self.address) from None

    def wait_until_ready(self, timeout: float) -> None:
        """Wait until a server answers at the address, up to ``timeout`` seconds.

        Raises
        ------
        ServerUnavailableError
            If none answers within ``timeout``; at once if one answers but the
            connection's handshake fails (TLS on one side only, a server certificate
            from another CA, a client certificate missing or from another CA), with
            the likely cause and grpc's reason.
        """
        deadline = time.monotonic() + timeout
        while (error := self._probe(deadline)) is not None:
            if cause := handshake_failure(error, secure=self.secure):
                msg = f"annserve at {self.address}: the handshake failed: {cause} ({error})"
                raise ServerUnavailableError(msg)
            if time.monotonic() >= deadline:
                msg = (
                    f"no annserve server answered at {self.address} within {timeout:g} s ({error})"
                )
                raise ServerUnavailableError(msg)
            time.sleep(_POLL_S)

    def _probe(self, deadline: float) -> str | None:
        """Return None if a server answers now (with any status), else grpc's reason."""
        timeout = max(deadline - time.monotonic(), _POLL_S)
        try:
            self._probe_call(b"", timeout=timeout, wait_for_ready=False)
        except grpc.RpcError as e:
            code = e.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return e.details() or code.name
        return None

    def count_batches(self, request: pb.StreamBatchesRequest) -> pb.EpochSize:
        """Call ``CountBatches``: the epoch size the request would stream.

        Raises
        ------
        AnnServeError
            Mapped from the call's status (e.g. ``InvalidRequestError``).
        """
        try:
            return self._count(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise translate(e, self.address) from None

    def stream(self, request: pb.StreamBatchesRequest) -> grpc.Call:
        """Open ``StreamBatches``; the result iterates serialized frames and can be cancelled."""
        return self._stream(request, metadata=self._metadata)

    def close(self) -> None:
        """Close the channel, cancelling its calls."""
        self._channel.close()


def frames_of(call: grpc.Call, address: str) -> Iterator[bytes]:
    """Iterate a stream's frames, turning a failed call into an :class:`AnnServeError`."""
    try:
        yield from call  # type: ignore[misc]
    except grpc.RpcError as e:
        raise translate(e, address) from None
