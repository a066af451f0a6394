"""Faults: SIGTERM mid-stream, a client that vanishes, a slow client, 16 clients at once.

All on 127.0.0.1, bounded in time; marked ``slow`` (``.ci/run`` runs them too).
Measured figures are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

import annserve.server.rpc.service as service_module
from annserve.client import Connection, Output, RemoteLoader
from annserve.errors import AnnServeError, ServerUnavailableError
from annserve.server import open_store
from conftest import real_path
from ops_support import (
    RPC_TIMEOUT,
    CountingStore,
    Daemon,
    GoodClient,
    frame_rows,
    rss_mb,
    stream_call,
    write_wide_rows_store,
)

pytestmark = pytest.mark.slow

#: Seconds the 16-client load test runs (ANNSERVE_LOAD_SECONDS overrides; the issue's 60 s
#: is ``ANNSERVE_LOAD_SECONDS=60``).
LOAD_SECONDS = float(os.environ.get("ANNSERVE_LOAD_SECONDS", "20"))
LOAD_CLIENTS = 16


def stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("annserve-stream-")]


# --- SIGTERM of the daemon mid-stream ---------------------------------------------------
def test_sigterm_mid_stream_gives_each_client_its_epoch_or_a_clear_status(real_adata, tmp_path):
    """A fast reader gets its whole epoch within the grace, a slow one UNAVAILABLE; exit 0.

    The slow reader streams a synthetic store of ~240 MB: pbmc3k's whole epoch (~17 MB)
    fits in loopback socket buffers (``tcp_rmem`` grows to 32 MB here), so a slow reader of
    it had been sent all but a few batches, and once all of them within the grace.
    """
    path = real_path("pbmc3k")
    n_obs = real_adata("pbmc3k").n_obs
    wide = write_wide_rows_store(tmp_path / "wide.h5ad", n_obs=20_000, n_vars=4_000, nnz=1_500)
    with Daemon(
        ["--store", str(path), "--store", f"wide={wide}", "--grace", "1.5"]
        + ["--metrics-port", "0", "--log-format", "json"]
    ) as daemon:
        outcomes: dict[str, object] = {}
        paused = threading.Barrier(3)
        sigterm = threading.Event()

        def client(name: str, store: str, pause: float) -> None:
            loader = RemoteLoader(
                daemon.address,
                store=store,
                batch_size=32,
                chunk_size=16,
                preload_nchunks=4,
                output=Output(to_torch=False),
                return_index=True,
                connection=Connection(timeout=RPC_TIMEOUT, retries=0),
            )  # the status, not a retry
            seen = []
            try:
                for i, batch in enumerate(loader):
                    seen.append(batch["index"])
                    if i == 0:
                        paused.wait(30)
                        sigterm.wait(30)
                    time.sleep(pause)
                outcomes[name] = np.sort(np.concatenate(seen))
            except AnnServeError as e:
                outcomes[name] = e

        threads = [
            threading.Thread(target=client, args=("fast", "", 0.0)),
            threading.Thread(target=client, args=("slow", "wide", 0.1)),
        ]  # 625 batches: 62.5 s
        for t in threads:
            t.start()
        paused.wait(30)  # both streams are in flight
        with urllib.request.urlopen(
            f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10
        ) as reply:
            assert "annserve_active_streams 2.0" in reply.read().decode()
        began = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        sigterm.set()
        code = daemon.proc.wait(timeout=30)
        took = time.monotonic() - began
        for t in threads:
            t.join(30)
        log = daemon.text()
    print(
        f"\nSIGTERM -> exit {code} in {took:.2f} s (grace 1.5 s); fast client: "
        f"{type(outcomes['fast']).__name__}, slow client: {outcomes['slow']}"
    )
    assert code == 0, log
    assert took < 1.5 + 1.0 + 1.0, log
    assert np.array_equal(outcomes["fast"], np.arange(n_obs))  # the whole epoch, once each
    assert isinstance(outcomes["slow"], ServerUnavailableError)
    assert "UNAVAILABLE" in str(outcomes["slow"])
    assert "shutting down" in str(outcomes["slow"]) or "Cancelling all calls" in str(
        outcomes["slow"]
    )
    assert "stopped (streams still running after the grace ended with UNAVAILABLE)" in log
    records = [json.loads(line) for line in log.splitlines()]  # every line one JSON object
    ends = [r for r in records if r["message"].startswith(f"stream {r.get('stream_id')} end:")]
    statuses = sorted(r["message"].split("status=")[1].split()[0] for r in ends)
    # the slow stream ends UNAVAILABLE from our drain, or CANCELLED when grpc's own hard stop
    # closes it first (the client sees UNAVAILABLE "Cancelling all calls" then): a race
    assert statuses in (["OK", "UNAVAILABLE"], ["CANCELLED", "OK"]), statuses


def _threads_taking(pid: int, sig: int) -> list[int]:
    """Thread ids of process ``pid`` that do not block ``sig`` (``SigBlk`` in /proc)."""
    tids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        blocked = int(status.split("SigBlk:")[1].split()[0], 16)
        if not blocked & (1 << (sig - 1)):
            tids.append(int(task.name))
    return tids


def test_sigterm_to_another_thread_stops_the_daemon():
    """The kernel may hand SIGTERM to any thread; the daemon still drains and exits 0.

    tgkill sends it to one of the daemon's other threads: Python's C handler runs there,
    and the Python handler only once the main thread runs bytecode again (an untimed
    wait of the main thread never returned).
    """
    tgkill = ctypes.CDLL(None, use_errno=True).tgkill  # glibc >= 2.30
    with Daemon(["--store", str(real_path("pbmc3k"))]) as daemon:
        pid = daemon.proc.pid
        others = [t for t in _threads_taking(pid, signal.SIGTERM) if t != pid]
        assert others, "no thread of the daemon besides its main thread takes SIGTERM"
        assert tgkill(pid, others[0], signal.SIGTERM) == 0, os.strerror(ctypes.get_errno())
        code = daemon.proc.wait(timeout=10)
        log = daemon.text()
    assert code == 0, log
    assert "shutting down" in log


# --- a client that vanishes ----------------------------------------------------------------
VANISHING_CLIENT = r"""
import sys, time, grpc
from annserve.v1 import annserve_pb2 as pb
channel = grpc.insecure_channel(sys.argv[1])
call = channel.unary_stream("/annserve.v1.AnnServe/StreamBatches",
                            request_serializer=pb.StreamBatchesRequest.SerializeToString)
frames = call(pb.StreamBatchesRequest(batch_size=16, chunk_size=16, preload_nchunks=4),
              timeout=120)
next(frames); next(frames)
print("reading", flush=True)
time.sleep(120)
"""


def test_vanished_client_stream_thread_stops_within_a_second(start):
    server, address = start({"pbmc3k": open_store(real_path("pbmc3k"))})
    child = subprocess.Popen(
        [sys.executable, "-c", VANISHING_CLIENT, address], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "reading"
        assert len(stream_threads()) == 2  # the stream's framing thread and its reader
        assert server.service.open_streams() == 1
        child.kill()  # SIGKILL: no goodbye, the kernel closes its socket
        began = time.monotonic()
        while stream_threads() or server.service.open_streams():
            assert time.monotonic() - began < 5, "stream thread still running 5 s later"
            time.sleep(0.005)
        released = time.monotonic() - began
    finally:
        child.kill()
        child.wait(10)
        child.stdout.close()
    print(
        f"\nvanished client: stream thread stopped and its buffers released "
        f"{released * 1000:.0f} ms after SIGKILL"
    )
    assert released < 1.0
    assert server.service.frames_queued() == 0

    def errors() -> list[tuple[str, float]]:
        return [
            (s.labels["code"], s.value)
            for m in server.metrics.registry.collect()
            for s in m.samples
            if s.name == "annserve_rpc_errors_total"
        ]

    deadline = time.monotonic() + 5  # the interceptor counts the call when grpc finishes it
    while not errors() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert errors() == [("CANCELLED", 1.0)]


# --- a slow client ---------------------------------------------------------------------------
def test_slow_client_memory_bounded_while_another_client_completes(start, tmp_path, monkeypatch):
    """A stalled reader makes the server read ahead only its frame queue and flow-control
    window, not its epoch; another client's epochs complete meanwhile.
    """
    monkeypatch.setattr(service_module, "FRAME_QUEUE", 4)  # so the bound is visible here
    wide = write_wide_rows_store(tmp_path / "wide.h5ad")
    slow_store = CountingStore(open_store(wide))
    fast_store = open_store(wide)
    n_obs = slow_store.store.n_obs
    server, address = start({"slow": slow_store.store, "fast": fast_store})
    rss_before = rss_mb()
    with grpc.insecure_channel(address) as channel:
        stalled = stream_call(
            channel, store="slow", batch_size=256, chunk_size=64, preload_nchunks=16
        )
        next(stalled)
        good = GoodClient(
            address, n_obs, store="fast", batch_size=1024, chunk_size=64, preload_nchunks=16
        )
        began = time.monotonic()
        queued, peak_rss = [], rss_before
        try:
            good.wait_epochs(2, timeout=60)
            while time.monotonic() - began < 3:  # the slow client stays stalled >= 3 s
                queued.append(server.service.frames_queued())
                peak_rss = max(peak_rss, rss_mb())
                time.sleep(0.05)
        finally:
            good.stop()
        fast_seconds = time.monotonic() - began
        read_ahead = slow_store.rows
        rest = frame_rows(list(stalled))  # then it reads on: nothing was lost
    print(
        f"\nslow client stalled {fast_seconds:.1f} s: server read {read_ahead} of {n_obs} "
        f"rows for it (frame queue of 4 frames + flow-control window), frames queued "
        f"max {max(queued)}, RSS +{peak_rss - rss_before:.0f} MB; the other client "
        f"completed {good.epochs} epochs ({good.rows / fast_seconds:,.0f} cells/s)"
    )
    assert good.epochs >= 2
    assert read_ahead < 0.6 * n_obs
    assert max(queued) <= 4 + 4  # the stalled stream's queue + the good client's
    assert peak_rss - rss_before < 400
    assert rest + 256 == n_obs


# --- load --------------------------------------------------------------------------------------
def test_16_concurrent_clients_for_a_bounded_time_without_errors():
    path = real_path("pbmc3k")
    with Daemon(["--store", str(path), "--max-streams", "32"]) as daemon:
        rss = [rss_mb(daemon.proc.pid)]
        cells = [0] * LOAD_CLIENTS
        epochs = [0] * LOAD_CLIENTS
        errors: list[BaseException] = []
        deadline = [0.0]

        def set_deadline() -> None:  # runs once all have arrived, before any goes on
            deadline[0] = time.monotonic() + LOAD_SECONDS

        start = threading.Barrier(LOAD_CLIENTS + 1, action=set_deadline)

        def client(i: int) -> None:
            try:
                loader = RemoteLoader(
                    daemon.address,
                    batch_size=256,
                    chunk_size=32,
                    preload_nchunks=16,
                    seed=i,
                    output=Output(to_torch=False),
                    connection=Connection(timeout=RPC_TIMEOUT),
                )
                start.wait(60)
                while time.monotonic() < deadline[0]:
                    for batch in loader:
                        cells[i] += len(batch["X"].indptr) - 1
                        if time.monotonic() >= deadline[0]:
                            break
                    else:
                        epochs[i] += 1
            except BaseException as e:  # counted: the test requires none
                errors.append(e)

        threads = [
            threading.Thread(target=client, args=(i,), name=f"load-{i}")
            for i in range(LOAD_CLIENTS)
        ]
        for t in threads:
            t.start()
        start.wait(120)
        began = deadline[0] - LOAD_SECONDS
        while any(t.is_alive() for t in threads):
            rss.append(rss_mb(daemon.proc.pid))
            for t in threads:
                t.join(0.02)
            assert time.monotonic() - began < LOAD_SECONDS + 60, "clients did not stop"
        elapsed = time.monotonic() - began
        assert daemon.terminate() == 0
    per_client = [c / elapsed for c in cells]
    print(
        f"\n{LOAD_CLIENTS} clients x {elapsed:.1f} s on pbmc3k (batch 256): "
        f"{sum(cells):,} cells, {sum(cells) / elapsed:,.0f} cells/s total; per client "
        f"min {min(per_client):,.0f} / median {statistics.median(per_client):,.0f} / "
        f"max {max(per_client):,.0f} cells/s; {sum(epochs)} whole epochs; "
        f"{len(errors)} errors; server RSS max {max(rss):.0f} MB"
    )
    assert not errors, errors[:3]
    assert all(c > 0 for c in cells)
    assert max(rss) < 3000
