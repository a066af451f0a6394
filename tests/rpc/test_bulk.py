"""The bulk channel of remote streams against real daemons on 127.0.0.1.

Bit-exact against the plain gRPC stream, every row once, on an h5ad and on a store
whose rows the daemon gathers from its mapped files; frames of a token the daemon does
not hold go inline; back-pressure (a client that reads no record stalls its own stream
only); bad hellos and requests; a client killed mid-stream frees its stream; no port
without it (``bulk_port=None``), and what each transport choice does then.
"""

from __future__ import annotations

import re
import socket
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from annserve import bulk
from annserve.client import Connection, RemoteLoader
from annserve.client._bulk import BulkConnection, bulk_host
from annserve.errors import InvalidRequestError, ServerUnavailableError
from annserve.server import open_store
from annserve.server.convert import convert
from annserve.server.io.cache import ChunkCache, caching
from annserve.server.plan.limits import Limits
from annserve.server.rpc.app import build_server
from annserve.v1 import annserve_pb2 as pb
from collection_stores import annbatch_collection, write_annbatch_collection  # noqa: F401
from conftest import real_path, stop_now
from ops_support import Daemon
from transport_support import (
    BOUND_S,
    epoch,
    epoch_rows,
    same_batches,
    sigkilled_client,
    spy_reads,
    wait_until,
)

_STREAM = "/annserve.v1.AnnServe/StreamBatches"


@pytest.fixture(scope="module")
def narrow_pbmc3k(tmp_path_factory):
    """pbmc3k as ``annserve convert --compression none`` writes it (rows sent as mapped)."""
    path = tmp_path_factory.mktemp("narrow") / "pbmc3k.zarr"
    convert([real_path("pbmc3k")], path, compression="none", progress=False)
    return path


@pytest.fixture
def tcp_server(narrow_pbmc3k):
    """A server on 127.0.0.1 serving pbmc3k's h5ad, pbmc68k (dense) and the narrow copy."""
    stores = {name: open_store(real_path(name)) for name in ("pbmc3k", "pbmc68k")}
    stores["narrow"] = open_store(narrow_pbmc3k)
    server = build_server(stores, ["127.0.0.1:0"], stall_timeout=1.0)
    try:
        yield server
    finally:
        stop_now(server.server)


def _address(server) -> str:
    return f"127.0.0.1:{server.ports[0]}"


class _Records:
    """Counts the records loaders took off bulk connections (a spy on the reader's hand-off)."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        take = BulkConnection._next_record

        def counted(connection):
            self.count += 1
            return take(connection)

        monkeypatch.setattr(BulkConnection, "_next_record", counted)


STORES = {
    "pbmc3k": {},  # sparse counts of an h5ad, read into preload buffers
    "narrow": {},  # uncompressed zarr: frames gathered from the mapped files
    "pbmc68k": {"obs_keys": ["bulk_labels", "n_genes"], "obsm_keys": ["X_pca"]},  # dense X
}


@pytest.mark.parametrize("encoding", ["compact", "raw", "native"])
@pytest.mark.parametrize("store", STORES)
def test_bit_exact_against_grpc_every_row_once(tcp_server, monkeypatch, store, encoding):
    records = _Records(monkeypatch)
    kw = dict(store=store, batch_size=300, seed=3, return_index=True, **STORES[store])
    address = _address(tcp_server)
    plain = RemoteLoader(address, **kw, connection=Connection(transport="grpc"))
    forced = RemoteLoader(address, **kw, connection=Connection(transport="bulk", encoding=encoding))
    for _ in range(2):
        expected = epoch(plain)
        assert records.count == 0
        got = epoch(forced)
        assert records.count == len(got)  # whole-batch frames, each one record
        records.count = 0
        same_batches(expected, got)
        rows = np.concatenate([b["index"].numpy() for b in got])
        np.testing.assert_array_equal(np.sort(rows), np.arange(forced.n_obs))
    wait_until(lambda: tcp_server.service.open_streams() == 0, "streams end")


@pytest.mark.parametrize("encoding", ["compact", "raw"])
def test_rows_sent_from_the_chunk_cache_are_bit_exact(annbatch_collection, encoding):  # noqa: F811
    """annbatch's LZ4 collection (float32 counts), cached: compact records gather from
    the cached uint16 chunks; raw ones, and compact ones before the cache holds the
    chunks, are read into preload buffers."""
    with caching(ChunkCache(10**9)):
        store = open_store(annbatch_collection.path)
    reads = spy_reads(store)
    server = build_server({"n": store}, ["127.0.0.1:0"])
    kw = dict(store="n", batch_size=300, seed=3, return_index=True)
    plain, forced = (
        RemoteLoader(_address(server), **kw, connection=Connection(transport=t, encoding=encoding))
        for t in ("grpc", "bulk")
    )
    try:
        for n_epoch in range(2):
            expected = epoch(plain)  # its first read is the store's first: uncached
            reads.clear()
            got = epoch(forced)
            assert (reads == []) == (encoding == "compact"), n_epoch
            same_batches(expected, got)
            rows = np.concatenate([b["index"].numpy() for b in got])
            np.testing.assert_array_equal(np.sort(rows), np.arange(forced.n_obs))
    finally:
        stop_now(server.server)


def test_cached_values_that_do_not_narrow_are_sent_as_the_cache_holds_them(tmp_path, real_adata):
    """Halved counts stay float32 in the cache, what compact sends them as: a remote
    stream's records gather them from the cached chunks too, bit-exact."""
    adata = real_adata("pbmc3k")[:600].copy()
    adata.X = adata.X * np.float32(0.5)
    path = tmp_path / "halved.zarr"
    write_annbatch_collection(path, [adata], [str(real_path("pbmc3k"))], dataset_size=300)
    with caching(ChunkCache(10**9)):
        store = open_store(path)
    reads = spy_reads(store)
    server = build_server({"n": store}, ["127.0.0.1:0"])
    kw = dict(store="n", batch_size=200, seed=1, return_index=True)
    plain, forced = (
        RemoteLoader(_address(server), **kw, connection=Connection(transport=t))
        for t in ("grpc", "bulk")
    )
    try:
        expected = epoch(plain)  # the store's first read: uncached, then cached as float32
        reads.clear()
        got = epoch(forced)
        assert reads == []
        assert not torch.equal(got[0]["X"].values(), got[0]["X"].values().round())  # halves
        same_batches(expected, got)
    finally:
        stop_now(server.server)


def test_auto_takes_the_bulk_channel_on_tcp(tcp_server, monkeypatch):
    records = _Records(monkeypatch)
    loader = RemoteLoader(_address(tcp_server), batch_size=1000)
    assert epoch_rows(loader) == loader.n_obs
    assert records.count == 3


def _hello(port: int, rcvbuf: int = 0) -> tuple[socket.socket, bytes]:
    """Open a bulk connection by hand (a receive buffer of ``rcvbuf`` bytes, 0: default)."""
    sock = socket.socket()
    if rcvbuf:  # before connecting: it bounds the window TCP announces
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(BOUND_S)
    sock.connect(("127.0.0.1", port))
    sock.sendall(bulk.HELLO)
    answer = sock.recv(bulk.ANSWER_BYTES, socket.MSG_WAITALL)
    return sock, bulk.parse_answer(answer)


def _request(token: bytes, **fields) -> bytes:
    return pb.StreamBatchesRequest(
        chunk_size=32, preload_nchunks=8, seed=0, bulk_session=token, **fields
    ).SerializeToString()


def test_a_token_the_daemon_does_not_hold_gets_its_frames_inline(tcp_server):
    with grpc.insecure_channel(_address(tcp_server)) as channel:
        messages = list(channel.unary_stream(_STREAM)(_request(b"x" * 16, batch_size=1000)))
    headers = [pb.BatchFrame.FromString(m).header for m in messages]
    assert sum(h.n_rows for h in headers) == 2700
    assert all(h.bulk_nbytes == 0 and h.payload_nbytes > 0 for h in headers)


def test_a_client_that_reads_no_record_stalls_only_its_stream(tcp_server):
    bulk_port = tcp_server.service.bulk.port
    sock, token = _hello(bulk_port, rcvbuf=65536)
    try:
        with grpc.insecure_channel(_address(tcp_server)) as channel:
            call = channel.unary_stream(_STREAM)(
                _request(token, batch_size=2700, encoding=pb.ENCODING_RAW), timeout=BOUND_S
            )
            with pytest.raises(grpc.RpcError) as info:
                for _ in call:  # pointers read, records never
                    pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "took no byte of its bulk connection" in info.value.details()
        loader = RemoteLoader(_address(tcp_server), batch_size=1000)  # others are served
        assert epoch_rows(loader) == loader.n_obs
    finally:
        sock.close()
    wait_until(lambda: tcp_server.service.open_streams() == 0, "the stalled stream ends")


def test_bad_requests_name_the_field(tcp_server):
    sock, token = _hello(tcp_server.service.bulk.port)
    try:
        cases = {
            "compression": _request(token, batch_size=10, compression=pb.COMPRESSION_LZ4),
            "shm_session": _request(token, batch_size=10, shm_session=b"y" * 16),
        }
        with grpc.insecure_channel(_address(tcp_server)) as channel:
            for field, request in cases.items():
                with pytest.raises(grpc.RpcError) as info:
                    list(channel.unary_stream(_STREAM)(request, timeout=BOUND_S))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
                assert field in info.value.details()
    finally:
        sock.close()


def _waiting_for_close(port: int) -> int:
    """Count this process's connections on ``port`` that their client closed, not the daemon."""
    close_wait = "08"  # /proc/net/tcp's state of a socket whose peer closed it
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    fields = [line.split() for line in lines]
    return sum(f[3] == close_wait and int(f[1].rsplit(":", 1)[1], 16) == port for f in fields)


def test_a_connection_its_client_closed_unclaimed_is_closed_at_once(tcp_server):
    port = tcp_server.service.bulk.port
    for _ in range(3):
        sock, _ = _hello(port)
        sock.close()  # e.g. a trainer killed before its stream reached the daemon
    wait_until(lambda: _waiting_for_close(port) == 0, "the daemon closes its ends", 5.0)


def test_a_refused_stream_closes_its_connection(narrow_pbmc3k):
    server = build_server(
        {"narrow": open_store(narrow_pbmc3k)}, ["127.0.0.1:0"], limits=Limits(max_streams=1)
    )
    try:
        with grpc.insecure_channel(_address(server)) as channel:
            stream = channel.unary_stream(_STREAM)
            held = stream(_request(b"", batch_size=10), timeout=BOUND_S)
            next(held)  # the one slot is taken
            sock, token = _hello(server.service.bulk.port)
            with sock:
                with pytest.raises(grpc.RpcError) as info:
                    list(stream(_request(token, batch_size=10), timeout=BOUND_S))
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert sock.recv(1) == b""  # closed by the daemon: no record, no wait
            held.cancel()
    finally:
        stop_now(server.server)


@pytest.mark.parametrize("hello", [b"", b"ABK", b"junk"], ids=["empty", "short", "junk"])
def test_bad_hellos_are_refused_and_the_daemon_serves_on(tcp_server, hello):
    with socket.create_connection(("127.0.0.1", tcp_server.service.bulk.port), BOUND_S) as sock:
        sock.sendall(hello)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(bulk.ANSWER_BYTES) == b""  # closed without a token
    loader = RemoteLoader(_address(tcp_server), batch_size=1000)
    assert epoch_rows(loader) == loader.n_obs


def test_an_abandoned_epoch_closes_its_connection_and_resumes_exactly(tcp_server):
    forced = Connection(transport="bulk")
    loader = RemoteLoader(
        _address(tcp_server), batch_size=100, seed=1, return_index=True, connection=forced
    )
    batches = iter(loader)
    first = next(batches)["index"].numpy()
    batches.close()  # the loop breaks out of the epoch; records in flight are dropped
    wait_until(lambda: tcp_server.service.open_streams() == 0, "the abandoned stream ends")
    rest = np.concatenate([b["index"].numpy() for b in loader])  # resumes after batch 0
    rows = np.concatenate([first, rest])
    np.testing.assert_array_equal(np.sort(rows), np.arange(loader.n_obs))


_CLIENT = textwrap.dedent(
    """
    import sys, time
    from annserve.client import Connection, RemoteLoader
    loader = RemoteLoader(sys.argv[1], batch_size=100, connection=Connection(transport="bulk"))
    for i, batch in enumerate(loader):
        if i == 1:
            print("reading", flush=True)
            time.sleep(60)
    """
)


def test_sigkill_of_the_client_ends_its_stream(tmp_path):
    with Daemon(["--store", str(real_path("pbmc3k"))]) as daemon:
        with sigkilled_client(_CLIENT, daemon.address, ready="reading") as client:
            assert client.poll() is None  # mid-stream, its second batch held
        daemon.wait_for(re.compile(r"stream \d+ end: status="))
        loader = RemoteLoader(
            daemon.address, batch_size=1000, connection=Connection(transport="bulk")
        )
        assert epoch_rows(loader) == loader.n_obs


def test_transport_choices_without_a_bulk_channel():
    with pytest.raises(InvalidRequestError, match="transport='bulk'"):
        RemoteLoader("unix:/nowhere", connection=Connection(transport="bulk"))
    with pytest.raises(InvalidRequestError, match="compression='lz4'"):
        RemoteLoader("127.0.0.1:1", connection=Connection(transport="bulk", compression="lz4"))
    plain = build_server({"p": open_store(real_path("pbmc3k"))}, ["127.0.0.1:0"], bulk_port=None)
    try:
        address = f"127.0.0.1:{plain.ports[0]}"
        auto = RemoteLoader(address, batch_size=1000)
        assert auto._info.bulk_port == 0
        assert epoch_rows(auto) == auto.n_obs
        forced = RemoteLoader(address, batch_size=1000, connection=Connection(transport="bulk"))
        with pytest.raises(ServerUnavailableError, match="offers no bulk channel"):
            next(iter(forced))
    finally:
        stop_now(plain.server)


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("127.0.0.1:50051", "127.0.0.1"),
        ("localhost:50051", "localhost"),
        ("[::1]:50051", "::1"),
        ("ipv4:10.0.0.2:50051", "10.0.0.2"),
        ("ipv6:[fe80::1]:7", "fe80::1"),
        ("unix:/tmp/a.sock", None),
        ("dns:///annserve.ns.svc:50051", None),  # may resolve to several replicas
        ("ipv4:10.0.0.2:1,10.0.0.3:1", None),
        ("nohost", None),
    ],
)
def test_bulk_host(target, host):
    assert bulk_host(target) == host


def _every_row_once_through_workers(address: str, context: str) -> None:
    forced = Connection(transport="bulk")
    loader = RemoteLoader(address, batch_size=256, seed=5, return_index=True, connection=forced)
    workers = torch.utils.data.DataLoader(
        loader, batch_size=None, num_workers=2, multiprocessing_context=context, timeout=BOUND_S
    )
    for _ in range(2):  # a second epoch: new connections, buffers of the workers' pools
        rows = np.concatenate([b["index"].numpy() for b in workers])
        np.testing.assert_array_equal(np.sort(rows), np.arange(loader.n_obs))


def test_dataloader_workers_each_open_their_own_connections(tcp_server):
    _every_row_once_through_workers(_address(tcp_server), "spawn")


def test_forked_dataloader_workers_each_open_their_own_connections():
    # a daemon of its own: a process serving gRPC in-process must not fork (gRPC's rule)
    with Daemon(["--store", str(real_path("pbmc3k"))]) as daemon:
        _every_row_once_through_workers(daemon.address, "fork")
