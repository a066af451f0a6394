"""The client's gRPC connection: channel options, calls with deadlines, error mapping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from annserve.errors import (
    AnnServeError,
    InvalidRequestError,
    ServerUnavailableError,
    error_for_status,
)
from annserve.v1 import annserve_pb2 as pb
from annserve.wire import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from collections.abc import Iterator

_SERVICE = "/annserve.v1.AnnServe/"
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # detect a dead server during a long stream instead of waiting forever
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


@dataclass(frozen=True, slots=True)
class Credentials:
    """How a client proves who it is and checks the server: TLS material and a token.

    Attributes
    ----------
    root_certificates
        PEM CA certificates the server's certificate must chain to; None uses the
        system's roots. Any of the three PEM fields (or ``tls``) selects TLS.
    certificate_chain, private_key
        PEM client certificate and key, for servers requiring mutual TLS.
    token
        Bearer token sent as ``authorization: Bearer <token>`` metadata on every call.
    tls
        Use TLS even when no PEM field is given (system roots).
    """

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    token: str | None = None
    tls: bool = False

    @property
    def secure(self) -> bool:
        """Whether the channel uses TLS."""
        return self.tls or any(
            v is not None
            for v in (self.root_certificates, self.certificate_chain, self.private_key)
        )

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Return the call metadata carrying the token, None without one."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None


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


class Connection:
    """A channel to one annserve server.

    Parameters
    ----------
    address
        ``host:port`` or ``unix:/path``.
    timeout
        Deadline of unary calls and of waiting for the channel, seconds.
    credentials
        TLS material and token; None: plaintext, no token.

    Raises
    ------
    InvalidRequestError
        If only one of a client certificate and its key is given.
    """

    def __init__(
        self, address: str, timeout: float, credentials: Credentials | None = None
    ) -> None:
        self.address = address
        self.timeout = timeout
        credentials = credentials or Credentials()
        self._metadata = credentials.metadata()
        if (credentials.certificate_chain is None) != (credentials.private_key is None):
            msg = "certificate_chain and private_key go together (mutual TLS needs both)"
            raise InvalidRequestError(msg)
        if credentials.secure:
            channel_credentials = grpc.ssl_channel_credentials(
                credentials.root_certificates,
                credentials.private_key,
                credentials.certificate_chain,
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
        # no deserializer: frames arrive as bytes and are decoded without protobuf copies
        self._stream = self._channel.unary_stream(
            _SERVICE + "StreamBatches",
            request_serializer=pb.StreamBatchesRequest.SerializeToString,
        )

    def describe(self, store: str) -> pb.StoreInfo:
        """Call ``DescribeStore``.

        Raises
        ------
        ServerUnavailableError
            If no server answers at the address within ``timeout`` seconds.
        AnnServeError
            Any other failure, mapped from its status code (e.g. ``StoreNotFoundError``).
        """
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self.timeout)
        except grpc.FutureTimeoutError:
            msg = f"no annserve server answered at {self.address} within {self.timeout:g} s"
            raise ServerUnavailableError(msg) from None
        try:
            return self._describe(
                pb.DescribeStoreRequest(store=store), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise translate(e, self.address) from None

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
