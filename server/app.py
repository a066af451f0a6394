"""Build a gRPC server around :class:`AnnServeService`."""

from __future__ import annotations

from concurrent import futures
from typing import TYPE_CHECKING

import grpc

from annserve.server.service import SERVICE_NAME, AnnServeService
from annserve.v1 import annserve_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from annserve.server.store import Store

#: Largest message either side accepts, bytes; frames are sized far below it.
MAX_MESSAGE_BYTES = 256 << 20


def create_server(stores: Mapping[str, Store], addresses: Sequence[str] = ("127.0.0.1:0",),
                  max_workers: int = 32) -> tuple[grpc.Server, list[int]]:
    """Create and start a server for ``stores``.

    The stream method is registered without a response serializer: the servicer
    yields frames already serialized by :func:`annserve.wire.encode_frame`.

    Parameters
    ----------
    stores
        Store by name; the first is the default.
    addresses
        Where to listen: ``host:port`` (port 0 picks a free port) or ``unix:/path`` each.
    max_workers
        Threads serving RPCs; each open stream holds one.

    Returns
    -------
    The started server and the bound port of each address (0 for unix sockets).

    Raises
    ------
    OSError
        If the address cannot be bound.
    """
    service = AnnServeService(stores)
    handlers = {
        "DescribeStore": grpc.unary_unary_rpc_method_handler(
            service.describe_store,
            request_deserializer=pb.DescribeStoreRequest.FromString,
            response_serializer=pb.StoreInfo.SerializeToString,
        ),
        "CountBatches": grpc.unary_unary_rpc_method_handler(
            service.count_batches,
            request_deserializer=pb.StreamBatchesRequest.FromString,
            response_serializer=pb.EpochSize.SerializeToString,
        ),
        "StreamBatches": grpc.unary_stream_rpc_method_handler(
            service.stream_batches,
            request_deserializer=pb.StreamBatchesRequest.FromString,
        ),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="annserve-rpc"),
        handlers=[grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)],
        options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
    )
    ports = []
    for address in addresses:
        try:
            ports.append(server.add_insecure_port(address))
        except RuntimeError as e:
            msg = f"cannot bind {address}: {e}"
            raise OSError(msg) from e
    server.start()
    return server, ports
