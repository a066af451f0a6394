"""No metric label takes a client's text: random method paths and store names leave
``/metrics`` as small as it was.

In-process servers on 127.0.0.1 and ephemeral ports; the endpoint closed in ``finally``.
"""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from annserve.server import open_store
from annserve.server.rpc.metrics import UNKNOWN_METHOD, serve_metrics
from annserve.v1 import annserve_pb2 as pb
from ops_support import RPC_TIMEOUT, frame_rows, stream_call, write_tiny_store

TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
N_METHODS = 2000  # random method paths
N_STORES = 200  # random store names, per method naming a store
GROWTH = 1024  # bytes /metrics may grow by: a few new samples, never one per name
SERVICE = "/annserve.v1.AnnServe/"
PREFIXES = (SERVICE, "/grpc.health.v1.Health/", "/x.y/", "/")  # known services' too


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_store(tmp_path_factory.mktemp("tiny") / "tiny.h5ad")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def label_values(text: str, label: str) -> set[str]:
    return {
        s.labels[label]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if label in s.labels
    }


def call_all(channel: grpc.Channel, calls: list[tuple[str, bytes, tuple]]) -> None:
    """Make every ``(method, request, metadata)`` call at once; wait for them to end."""
    futures = [
        channel.unary_unary(method).future(request, timeout=RPC_TIMEOUT, metadata=metadata)
        for method, request, metadata in calls
    ]
    for future in futures:
        future.exception()


def test_client_text_never_becomes_a_label(start, tiny):
    server, address = start({"tiny": open_store(tiny)}, tokens=frozenset([TOKEN]))
    endpoint = serve_metrics(server.metrics, "127.0.0.1", 0)
    rng = np.random.default_rng(0)

    def names(n: int) -> list[str]:
        return [bytes(rng.integers(97, 123, 16, dtype=np.uint8)).decode() for _ in range(n)]

    try:
        with grpc.insecure_channel(address) as channel:
            # each label once: a known store streamed, unknown methods, unknown stores
            stream = stream_call(
                channel, metadata=AUTH, batch_size=64, chunk_size=32, preload_nchunks=4
            )
            assert frame_rows(list(stream)) == 200
            warmup = [
                (SERVICE + "DescribeStore", b"", ()),  # UNAUTHENTICATED
                ("/warm/up", b"", AUTH),
            ]
            warmup += [
                (SERVICE + m, pb.StreamBatchesRequest(store="nope").SerializeToString(), AUTH)
                for m in ("DescribeStore", "CountBatches", "StreamBatches")
            ]
            call_all(channel, warmup)
            before = scrape(endpoint.port)
            flood = [
                (f"{PREFIXES[i % len(PREFIXES)]}{name}", b"", AUTH if i % 2 else ())
                for i, name in enumerate(names(N_METHODS))
            ]
            flood += [
                (SERVICE + m, pb.StreamBatchesRequest(store=name).SerializeToString(), AUTH)
                for m in ("DescribeStore", "CountBatches", "StreamBatches")
                for name in names(N_STORES)
            ]
            call_all(channel, flood)
            after = scrape(endpoint.port)
    finally:
        endpoint.close()
    assert len(after) - len(before) < GROWTH, (len(before), len(after))
    assert label_values(after, "store") == {"tiny"}
    assert label_values(after, "method") == {
        UNKNOWN_METHOD,
        *(SERVICE + m for m in ("DescribeStore", "CountBatches", "StreamBatches")),
    }
    errors = server.metrics.registry.get_sample_value
    name = "annserve_rpc_errors_total"
    unknown = errors(name, {"method": UNKNOWN_METHOD, "code": "UNIMPLEMENTED"})
    assert unknown == N_METHODS + 1
    for method in ("DescribeStore", "CountBatches", "StreamBatches"):
        labels = {"method": SERVICE + method, "code": "NOT_FOUND"}
        assert errors(name, labels) == N_STORES + 1
    assert errors(name, {"method": SERVICE + "DescribeStore", "code": "UNAUTHENTICATED"}) == 1
    assert server.metrics.registry.get_sample_value("annserve_cells_total", {"store": "tiny"})
