"""The client's gRPC connection: channel options, calls with deadlines, error mapping."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from annserve.errors import (
    AnnServeError,
    ServerUnavailableError,
    error_for_status,
)
from annserve.v1 import annserve_pb2 as pb
from annserve.wire import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from collections.abc import Iterator

    from annserve.client.options import Connection

_SERVICE = "/annserve.v1.AnnServe/"
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # detect a dead server during a long stream instead of waiting forever
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


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
