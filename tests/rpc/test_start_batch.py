"""``start_batch`` (resume): CountBatches counts what StreamBatches sends from it on."""

from __future__ import annotations

import grpc
import pytest

from annserve.v1 import annserve_pb2 as pb
from annserve.wire import decode_frame
from conftest import raw_stream, real_path

#: wu2020 has 200 rows: 13 batches of 16, the last one of 8 rows
REQUEST = {"batch_size": 16, "chunk_size": 4, "preload_nchunks": 3, "shuffle": True, "seed": 4}
N_BATCHES = 13


def count_batches(address: str, **fields) -> pb.EpochSize:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            "/annserve.v1.AnnServe/CountBatches",
            request_serializer=pb.StreamBatchesRequest.SerializeToString,
            response_deserializer=pb.EpochSize.FromString,
        )
        return call(pb.StreamBatchesRequest(**fields), timeout=30)


def sent(frames: list[bytes]) -> tuple[int, int]:
    """Rows and complete batches carried by ``frames``."""
    headers = [decode_frame(f).header for f in frames]
    n_batches = sum(h.row_start + h.n_rows == h.batch_rows for h in headers)
    return sum(h.n_rows for h in headers), n_batches


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"drop_last": True},
        {"shard_index": 1, "shard_count": 3},
        {"shard_index": 2, "shard_count": 3, "uneven_shards": True},
    ],
    ids=["whole", "drop-last", "even-shard", "uneven-shard"],
)
@pytest.mark.parametrize("start_batch", [0, 1, 4])
def test_count_batches_is_what_the_stream_sends_from_start_batch(serve, fields, start_batch):
    address = serve(real_path("wu2020"))
    request = {**REQUEST, **fields, "start_batch": start_batch}
    size = count_batches(address, **request)
    assert (size.n_rows, size.n_batches) == sent(raw_stream(address, **request))
    whole = count_batches(address, **{**request, "start_batch": 0})
    assert size.n_batches == whole.n_batches - start_batch
    assert size.n_rows == whole.n_rows - start_batch * REQUEST["batch_size"]


def test_start_batch_at_the_end_sends_nothing(serve):
    address = serve(real_path("wu2020"))
    size = count_batches(address, **REQUEST, start_batch=N_BATCHES)
    assert (size.n_rows, size.n_batches) == (0, 0)
    assert raw_stream(address, **REQUEST, start_batch=N_BATCHES) == []


@pytest.mark.parametrize("start_batch", [N_BATCHES + 1, 10**9])
def test_start_batch_past_the_end_is_out_of_range(serve, start_batch):
    address = serve(real_path("wu2020"))
    for rpc in (count_batches, raw_stream):
        with pytest.raises(grpc.RpcError) as refused:
            rpc(address, **REQUEST, start_batch=start_batch)
        assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE, rpc
        assert refused.value.details().startswith(f"start_batch must be in 0..{N_BATCHES}")
