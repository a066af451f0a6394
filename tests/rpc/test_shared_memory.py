"""The same-host shared-memory transport against real daemons on unix sockets.

Bit-exact against the gRPC stream, every row once; back-pressure (a loop keeping
every batch, a client that frees nothing); bad requests and side-socket messages;
nothing left behind when either process is SIGKILLed (no memfd in the survivor's
fds or mappings, nothing in /dev/shm).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import shutil
import signal
import socket
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from annserve import shm
from annserve.client import Connection, RemoteLoader
from annserve.client._shm import SharedMemorySession
from annserve.errors import (
    DataLossError,
    InvalidRequestError,
    ResourceExhaustedError,
    ServerUnavailableError,
)
from annserve.server import create_server, open_store
from annserve.server.convert import convert
from annserve.server.io.cache import ChunkCache, caching
from annserve.server.rpc.app import build_server
from annserve.v1 import annserve_pb2 as pb
from collection_stores import annbatch_collection  # noqa: F401
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

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="needs Linux memfd")


def memfds(pid: int | str = "self", kind: str = "") -> int:
    """Descriptors and mappings of a process that are annserve's memfds (``slot``, ``shared``)."""
    name = f"memfd:annserve-{kind}"
    fd_dir = Path(f"/proc/{pid}/fd")
    fds = 0
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            fds += name in os.readlink(fd)
    maps = Path(f"/proc/{pid}/maps").read_text().count(name)
    return fds + maps


@pytest.fixture
def unix_server(tmp_path):
    """A server on a unix socket (and TCP) serving pbmc3k; yields its unix address."""
    sock = tmp_path / "annserve.sock"
    stores = {name: open_store(real_path(name)) for name in ("pbmc3k", "pbmc68k")}
    server, _ = create_server(stores, ["127.0.0.1:0", f"unix:{sock}"])
    try:
        yield f"unix:{sock}"
    finally:
        stop_now(server)


STORES = {
    "pbmc3k": {},  # sparse counts
    "pbmc68k": {"obs_keys": ["bulk_labels", "n_genes"], "obsm_keys": ["X_pca"]},  # dense X
}


@pytest.mark.parametrize("encoding", ["native", "compact", "raw"])
@pytest.mark.parametrize("store", STORES)
def test_bit_exact_against_grpc_every_row_once(unix_server, store, encoding):
    kw = dict(store=store, batch_size=300, seed=3, return_index=True, **STORES[store])
    grpc_loader = RemoteLoader(unix_server, **kw, connection=Connection(transport="grpc"))
    shm_loader = RemoteLoader(
        unix_server, **kw, connection=Connection(transport="shm", encoding=encoding)
    )
    for _ in range(2):  # the second epoch reuses the session and its mapped slots
        expected, got = epoch(grpc_loader), epoch(shm_loader)
        same_batches(expected, got)
        rows = np.concatenate([b["index"].numpy() for b in got])
        np.testing.assert_array_equal(np.sort(rows), np.arange(shm_loader.n_obs))
    assert shm_loader._shm is not None
    assert shm_loader._shm.alive()


@pytest.fixture(scope="module", params=[False, True], ids=["uint16-counts", "float32-counts"])
def narrow_pbmc3k(tmp_path_factory, request):
    """pbmc3k as ``annserve convert --compression none`` writes it: plain bytes, uint16
    genes, and uint16 counts (or float32 with ``--keep-dtype``, as annbatch stores them)."""
    path = tmp_path_factory.mktemp("narrow") / "pbmc3k.zarr"
    convert(
        [real_path("pbmc3k")], path, compression="none", progress=False, keep_dtype=request.param
    )
    return path


def _serve_spied(
    path: Path, sock: Path, cache: ChunkCache | None = None
) -> tuple[grpc.Server, list[str]]:
    """Serve one store on ``sock``; return the server and the matrices read into buffers."""
    with caching(cache):
        store = open_store(path)
    reads = spy_reads(store)
    server, _ = create_server({"n": store}, [f"unix:{sock}"])
    return server, reads


@pytest.mark.parametrize("encoding", ["compact", "raw"])
def test_rows_gathered_from_the_store_files_are_bit_exact(tmp_path, narrow_pbmc3k, encoding):
    server, reads = _serve_spied(narrow_pbmc3k, tmp_path / "s.sock")
    address = f"unix:{tmp_path / 's.sock'}"
    kw = dict(store="n", batch_size=300, seed=3, return_index=True)
    try:
        grpc_loader, shm_loader = (
            RemoteLoader(address, **kw, connection=Connection(transport=t, encoding=encoding))
            for t in ("grpc", "shm")
        )
        for _ in range(2):  # the second epoch reuses the session and the mapped files
            reads.clear()
            expected = epoch(grpc_loader)
            assert "X" in reads  # the gRPC stream reads preload buffers
            reads.clear()
            got = epoch(shm_loader)
            assert reads == []  # X stayed in the store's files: the kernel gathered each frame
            same_batches(expected, got)
            rows = np.concatenate([b["index"].numpy() for b in got])
            np.testing.assert_array_equal(np.sort(rows), np.arange(shm_loader.n_obs))
    finally:
        stop_now(server)


@pytest.mark.parametrize("encoding", ["compact", "raw"])
def test_rows_gathered_from_the_chunk_cache_are_bit_exact(tmp_path, annbatch_collection, encoding):  # noqa: F811
    """annbatch's LZ4 collection, cached: compact frames gather from the cached chunks."""
    sock = tmp_path / "s.sock"
    server, reads = _serve_spied(annbatch_collection.path, sock, ChunkCache(10**9))
    kw = dict(store="n", batch_size=300, seed=3, return_index=True)
    try:
        grpc_loader, shm_loader = (
            RemoteLoader(
                f"unix:{sock}", **kw, connection=Connection(transport=t, encoding=encoding)
            )
            for t in ("grpc", "shm")
        )
        for _ in range(2):
            expected = epoch(grpc_loader)  # its first read is the store's first: uncached
            reads.clear()
            got = epoch(shm_loader)
            # compact: uint16 chunks, sent as they are held; raw: float32, so read and widened
            assert (reads == []) == (encoding == "compact")
            same_batches(expected, got)
            rows = np.concatenate([b["index"].numpy() for b in got])
            np.testing.assert_array_equal(np.sort(rows), np.arange(shm_loader.n_obs))
    finally:
        stop_now(server)


def test_a_file_truncated_while_served_from_its_mapping_ends_the_stream(tmp_path, narrow_pbmc3k):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(narrow_pbmc3k, copy)
    server, _ = _serve_spied(copy, tmp_path / "s.sock")
    try:
        loader = RemoteLoader(
            f"unix:{tmp_path / 's.sock'}", store="n", connection=Connection(transport="shm")
        )
        assert epoch_rows(loader) == loader.n_obs  # mapped and served
        (shard,) = (copy / "dataset_0" / "X" / "data" / "c").iterdir()
        os.truncate(shard, 4096)
        with pytest.raises(DataLossError, match="X/data: chunk .* is cut short"):
            epoch_rows(loader)
        assert RemoteLoader(loader.address, store="n").n_obs == loader.n_obs  # still serving
    finally:
        stop_now(server)


def test_native_batches_view_shared_memory_and_free_it_when_dropped(unix_server):
    loader = RemoteLoader(
        unix_server,
        batch_size=700,
        seed=0,
        connection=Connection(transport="shm", encoding="native"),
    )
    batches = iter(loader)
    first = next(batches)
    session = loader._shm
    assert session is not None
    values = first["X"].values()
    with memoryview(values.numpy()) as view:  # X's values lie in a mapped slot
        address = np.frombuffer(view, np.uint8).ctypes.data
    held = session.held()
    assert held
    assert any(
        int(a, 16) <= address < int(b, 16)
        for a, b in (line.split()[0].split("-") for line in _slot_maps())
    )
    del first, values
    second = next(batches)  # the loader lets go of a batch when asked for the next
    gc.collect()
    first_write = min(held)  # writes are numbered in order; later ones are read ahead
    wait_until(lambda: first_write not in session.held(), "the dropped batch's slot is freed")
    rest = list(batches)
    assert epoch_rows([second, *rest]) == loader.n_obs - 700


def _slot_maps() -> list[str]:
    return [
        line for line in Path("/proc/self/maps").read_text().splitlines() if "annserve-slot" in line
    ]


def test_a_loop_keeping_every_batch_never_starves_the_daemon(unix_server):
    """More batches than slots, all kept: the last slots' frames are copied out."""
    loader = RemoteLoader(
        unix_server,
        batch_size=64,
        seed=1,
        return_index=True,
        connection=Connection(transport="shm"),
    )
    kept = list(loader)  # 43 batches, prefetch + 5 = 6 slots
    assert len(kept) > 4 * (loader._shm.n_slots)
    rows = np.concatenate([b["index"].numpy() for b in kept])
    np.testing.assert_array_equal(np.sort(rows), np.arange(loader.n_obs))
    assert len(loader._shm.held()) <= loader._shm.n_slots - 1
    reference = list(
        RemoteLoader(
            unix_server,
            batch_size=64,
            seed=1,
            return_index=True,
            connection=Connection(transport="grpc"),
        )
    )
    same_batches(reference, kept)


def test_abandoned_epochs_do_not_leak_slots(unix_server):
    loader = RemoteLoader(
        unix_server, batch_size=100, seed=2, connection=Connection(transport="shm")
    )
    for _ in range(6):  # each break leaves frames written that never arrived
        for i, _batch in enumerate(loader):
            if i == 3:
                break
    loader.load_state_dict({**loader.state_dict(), "batch": 0})
    assert epoch_rows(loader) == loader.n_obs


def test_a_client_that_frees_no_slot_gets_deadline_exceeded(tmp_path):
    sock = tmp_path / "a.sock"
    args = ["--store", str(real_path("pbmc3k")), "--unix", str(sock), "--stall-timeout", "1"]
    with Daemon(args) as daemon:
        wait_until(lambda: Path(f"{sock}.shm").exists(), "side socket")
        session = SharedMemorySession(f"{sock}.shm", 2, BOUND_S)
        try:
            request = _request(session.token, batch_size=100)
            with grpc.insecure_channel(f"unix:{sock}") as channel:
                call = channel.unary_stream("/annserve.v1.AnnServe/StreamBatches")(
                    request.SerializeToString(), timeout=BOUND_S
                )
                with pytest.raises(grpc.RpcError) as info:
                    for _ in call:  # pointers read, slots never released
                        pass
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "freed no shared-memory slot" in info.value.details()
            # the daemon serves others meanwhile and after
            loader = RemoteLoader(daemon.address, batch_size=1000)
            assert epoch_rows(loader) == loader.n_obs
        finally:
            session.close()


def test_identical_streams_share_frames_written_once(unix_server):
    """Three identical streams in lock step point to the same memfds; each gets its own bytes.

    One stream keeps every frame as the view it arrived as (past its slots the session
    copies): a memfd the daemon reused while a client still held it would change them.
    """
    path = shm.side_socket(unix_server)
    fields = {"batch_size": 100, "return_index": True, "shm_shared_frames": True}
    sessions = [SharedMemorySession(path, 4, BOUND_S) for _ in range(4)]
    try:
        with grpc.insecure_channel(unix_server) as channel:
            method = channel.unary_stream("/annserve.v1.AnnServe/StreamBatches")

            def call(session, headers):
                request = _request(session.token, **fields).SerializeToString()
                for message in method(request, timeout=BOUND_S):
                    headers.append(pb.BatchFrame.FromString(message).header)
                    yield message

            lone_headers: list[pb.BatchHeader] = []
            want = [bytes(f) for f in sessions[0].frames(call(sessions[0], lone_headers))]
            headers: list[list[pb.BatchHeader]] = [[], [], []]
            streams = [s.frames(call(s, h)) for s, h in zip(sessions[1:], headers, strict=True)]
            kept, copied, other = [], [], []
            for views in itertools.zip_longest(*streams):
                kept.append(views[0])
                copied.append(bytes(views[1]))
                other.append(bytes(views[2]))
                del views
    finally:
        for session in sessions:
            session.close()
    assert not any(h.shm_shared for h in lone_headers)  # alone: its own slots
    assert [bytes(v) for v in kept] == copied == other == want  # bit-exact, every frame
    ids = [{h[i].shm_shared for h in headers} for i in range(len(want))]
    shared = [i.pop() for i in ids if len(i) == 1 and 0 not in i]  # same memfd for all three
    assert len(shared) >= len(want) // 2
    assert len(set(shared)) < len(shared)  # memfds reused from frame to frame
    del kept
    gc.collect()
    wait_until(lambda: memfds(kind="shared") == 0, "no shared memfd left on either side")


def _request(token: bytes, **fields) -> pb.StreamBatchesRequest:
    return pb.StreamBatchesRequest(
        chunk_size=32, preload_nchunks=8, shuffle=True, seed=0, shm_session=token, **fields
    )


def test_bad_requests_name_the_field_and_the_daemon_keeps_serving(unix_server):
    path = shm.side_socket(unix_server)
    session = SharedMemorySession(path, 2, BOUND_S)
    try:
        with grpc.insecure_channel(unix_server) as channel:
            stream = channel.unary_stream("/annserve.v1.AnnServe/StreamBatches")
            cases = {
                "shm_session": _request(b"x" * 16, batch_size=10),
                "compression": _request(
                    session.token, batch_size=10, compression=pb.COMPRESSION_LZ4
                ),
                "value_dtype": _request(
                    session.token, batch_size=10, encoding=pb.ENCODING_NATIVE, value_dtype="<U4"
                ),
            }
            for field, request in cases.items():
                with pytest.raises(grpc.RpcError) as info:
                    list(stream(request.SerializeToString(), timeout=BOUND_S))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
                assert field in info.value.details()
    finally:
        session.close()
    loader = RemoteLoader(unix_server, batch_size=1000, connection=Connection(transport="shm"))
    assert epoch_rows(loader) == loader.n_obs


@pytest.mark.parametrize(
    "hello",
    [b"", b"hello", shm.hello(0), shm.hello(shm.MAX_SLOTS + 1)],
    ids=["empty", "junk", "0", "17"],
)
def test_bad_hellos_are_refused(unix_server, hello):
    path = shm.side_socket(unix_server)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(BOUND_S)
        sock.connect(path)
        sock.send(hello)
        answer, fds, _, _ = socket.recv_fds(sock, shm.MAX_MESSAGE, shm.MAX_SLOTS)
    assert fds == []
    assert answer == b"" or answer.startswith(shm.REFUSED)
    with pytest.raises(ServerUnavailableError, match="refused"):
        SharedMemorySession(path, 0, BOUND_S)
    loader = RemoteLoader(unix_server, batch_size=1000, connection=Connection(transport="shm"))
    assert epoch_rows(loader) == loader.n_obs


def test_transport_choices(unix_server, tmp_path):
    with pytest.raises(InvalidRequestError, match="transport"):
        Connection(transport="udp")
    with pytest.raises(InvalidRequestError, match="unix:PATH"):
        RemoteLoader("127.0.0.1:1", connection=Connection(transport="shm", timeout=0.1))
    # a daemon without the side socket: auto streams over gRPC, shm is an error
    sock = tmp_path / "plain.sock"
    plain = build_server(
        {"p": open_store(real_path("pbmc3k"))}, [f"unix:{sock}"], shared_memory=False
    )
    try:
        auto = RemoteLoader(f"unix:{sock}", batch_size=1000)
        assert epoch_rows(auto) == auto.n_obs
        assert auto._shm is None
        forced = RemoteLoader(
            f"unix:{sock}", batch_size=1000, connection=Connection(transport="shm")
        )
        with pytest.raises(ServerUnavailableError, match="shared-memory"):
            next(iter(forced))
    finally:
        stop_now(plain.server)


_CLIENT = textwrap.dedent(
    """
    import sys, time
    from annserve.client import Connection, RemoteLoader
    loader = RemoteLoader(sys.argv[1], batch_size=200, connection=Connection(transport="shm"))
    kept = []
    for batch in loader:
        kept.append(batch)
        if len(kept) == 2:
            print("holding", flush=True)
            time.sleep(60)
    """
)


def test_sigkill_of_the_client_frees_the_daemons_slots(tmp_path):
    sock = tmp_path / "a.sock"
    shm_before = set(os.listdir("/dev/shm"))
    with Daemon(["--store", str(real_path("pbmc3k")), "--unix", str(sock)]) as daemon:
        wait_until(lambda: Path(f"{sock}.shm").exists(), "side socket")
        with sigkilled_client(_CLIENT, f"unix:{sock}", ready="holding"):
            assert memfds(daemon.proc.pid) > 0
        wait_until(lambda: memfds(daemon.proc.pid) == 0, "the daemon closes the session's memfds")
        loader = RemoteLoader(f"unix:{sock}", batch_size=1000)
        assert epoch_rows(loader) == loader.n_obs
    assert set(os.listdir("/dev/shm")) <= shm_before


def test_sigkill_of_the_daemon_leaves_the_client_nothing_once_batches_are_dropped(tmp_path):
    sock = tmp_path / "a.sock"
    shm_before = set(os.listdir("/dev/shm"))
    daemon = Daemon(["--store", str(real_path("pbmc3k")), "--unix", str(sock)])
    try:
        wait_until(lambda: Path(f"{sock}.shm").exists(), "side socket")
        loader = RemoteLoader(
            f"unix:{sock}",
            batch_size=200,
            connection=Connection(transport="shm", retries=0, max_wait=1.0),
        )
        batches = iter(loader)
        kept = [next(batches), next(batches)]
        assert memfds() > 0
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(timeout=BOUND_S)
        with pytest.raises(ServerUnavailableError):
            kept.extend(batches)
        assert int(kept[0]["X"].values().sum()) >= 0  # still readable after the daemon died
        del kept, batches, loader
        gc.collect()
        wait_until(lambda: memfds() == 0, "the client unmaps and closes every slot")
    finally:
        daemon.close()
    assert set(os.listdir("/dev/shm")) <= shm_before


def test_slots_count_against_the_stream_memory_budget(tmp_path):
    from annserve.server.plan.limits import Limits

    store = open_store(real_path("pbmc3k"))
    per_batch_mb = 2700 * store.mean_row_bytes() / 1e6  # a preload buffer = the whole store
    sock = tmp_path / "a.sock"
    limits = Limits(stream_memory_mb=2 * per_batch_mb)  # a buffer fits, 4 slots of it do not
    server = build_server({"p": store}, [f"unix:{sock}"], limits=limits)
    try:
        kw = dict(batch_size=2700, connection=Connection(transport="shm"))
        with pytest.raises(ResourceExhaustedError, match="shared-memory slots"):
            next(iter(RemoteLoader(f"unix:{sock}", **kw)))
        small = RemoteLoader(f"unix:{sock}", **{**kw, "batch_size": 300})
        assert epoch_rows(small) == small.n_obs
    finally:
        stop_now(server.server)


def test_dataloader_workers_each_open_their_own_session(unix_server):
    loader = RemoteLoader(
        unix_server,
        batch_size=256,
        seed=5,
        return_index=True,
        connection=Connection(transport="shm"),
    )
    workers = torch.utils.data.DataLoader(
        loader, batch_size=None, num_workers=2, multiprocessing_context="spawn", timeout=BOUND_S
    )
    rows = np.concatenate([b["index"].numpy() for b in workers])  # pickled out of the slots
    np.testing.assert_array_equal(np.sort(rows), np.arange(loader.n_obs))
