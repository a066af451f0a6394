"""Stalled clients: a stream whose client takes no frame ends DEADLINE_EXCEEDED, freeing its slot.

In-process servers on 127.0.0.1 with short stall timeouts (seconds); every wait bounded.
Measured figures are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

import annserve.server.rpc.app as app_module
from annserve.client import Connection, Output, RemoteLoader
from annserve.server import open_store
from annserve.server.plan.limits import Limits
from ops_support import (
    RPC_TIMEOUT,
    frame_rows,
    stream_call,
    write_tiny_store,
    write_wide_rows_store,
)

pytestmark = pytest.mark.slow

STALL_S = 2.0  # the servers' stall timeout here, seconds
REQUEST = {"batch_size": 256, "chunk_size": 64, "preload_nchunks": 16}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A store of ~27 MB on the wire: more than a stalled stream's buffers and window hold."""
    return write_wide_rows_store(tmp_path_factory.mktemp("stalls") / "wide.h5ad")


def wait_for(condition, timeout: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds passed; return whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def serve_when_free(address: str, timeout: float) -> tuple[float, int]:
    """Open streams until one is admitted; return the seconds it took and the refusals."""
    began, refused = time.monotonic(), 0
    with grpc.insecure_channel(address) as channel:
        while time.monotonic() - began < timeout:
            try:
                frames = iter(stream_call(channel, **REQUEST))
                next(frames)
                frames.cancel()
                return time.monotonic() - began, refused
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                refused += 1
                time.sleep(0.1)
    msg = f"no stream slot within {timeout} s ({refused} RESOURCE_EXHAUSTED)"
    raise AssertionError(msg)


def test_stalled_streams_end_deadline_exceeded_and_free_their_slots(start, wide, caplog):
    caplog.set_level(logging.INFO, logger="annserve")
    server, address = start(
        {"wide": open_store(wide)}, limits=Limits(max_streams=2), stall_timeout=STALL_S
    )
    with grpc.insecure_channel(address) as channel:
        # two clients that open a stream and never read it
        stalled = [stream_call(channel, timeout=120, **REQUEST) for _ in range(2)]
        assert wait_for(lambda: server.service.open_streams() == 2, RPC_TIMEOUT)
        took, refused = serve_when_free(address, STALL_S + 10)
        outcomes = []
        for call in stalled:
            with pytest.raises(grpc.RpcError) as e:
                frame_rows(list(call))
            outcomes.append((e.value.code(), e.value.details()))
    assert wait_for(lambda: server.service.open_streams() == 0, 10)
    print(
        f"\n2 stalled streams (--max-streams 2, stall timeout {STALL_S:g} s): a third "
        f"client was served after {took:.1f} s and {refused} RESOURCE_EXHAUSTED"
    )
    for code, details in outcomes:
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "stall timeout" in details
        assert "--stall-timeout" in details
    ends = [r.getMessage() for r in caplog.records if " end: status=" in r.getMessage()]
    assert sum("status=DEADLINE_EXCEEDED" in m for m in ends) == 2, ends
    counted = server.metrics.registry.get_sample_value(
        "annserve_rpc_errors_total",
        {"method": "/annserve.v1.AnnServe/StreamBatches", "code": "DEADLINE_EXCEEDED"},
    )
    assert counted == 2  # as what they ended with (before: as CANCELLED)


def test_a_client_pausing_longer_than_the_stall_timeout_resumes_with_every_row_once(
    start, wide, caplog
):
    caplog.set_level(logging.INFO)
    store = open_store(wide)
    server, address = start({"wide": store}, stall_timeout=STALL_S)
    loader = RemoteLoader(
        address,
        **REQUEST,
        output=Output(to_torch=False),
        return_index=True,
        connection=Connection(timeout=RPC_TIMEOUT, retries=3, retry_backoff=0.1),
    )
    seen = []
    for i, batch in enumerate(loader):
        seen.append(batch["index"])
        if i == 2:
            time.sleep(STALL_S + 3)  # the stream fills its window, then stalls
    messages = [r.getMessage() for r in caplog.records]
    assert any("status=DEADLINE_EXCEEDED" in m for m in messages), messages
    assert any("unavailable; resuming" in m for m in messages), messages
    rows = np.sort(np.concatenate(seen))
    assert np.array_equal(rows, np.arange(store.n_obs))  # every row exactly once


STOPPED_CLIENT = r"""
import sys, time, grpc
from annserve.v1 import annserve_pb2 as pb
channel = grpc.insecure_channel(sys.argv[1])
call = channel.unary_stream("/annserve.v1.AnnServe/StreamBatches",
                            request_serializer=pb.StreamBatchesRequest.SerializeToString)
frames = call(pb.StreamBatchesRequest(batch_size=8, chunk_size=8, preload_nchunks=1),
              timeout=120)
next(frames)
print("reading", flush=True)
time.sleep(120)
"""
READ_S = 0.5  # seconds each preload buffer of the slow store takes: 25 of them per epoch


def test_keepalive_ends_the_stream_of_a_stopped_client(start, tmp_path, monkeypatch, caplog):
    """A SIGSTOPped client answers no ping: its connection closes long before its epoch ends.

    The store is slow and its frames small, so the stream is alive but sends little
    (no flow-control window or socket buffer fills up) and the stall timeout is far.
    """
    caplog.set_level(logging.INFO, logger="annserve")
    monkeypatch.setattr(app_module, "KEEPALIVE_TIMEOUT_S", 1.0)
    store = open_store(write_tiny_store(tmp_path / "tiny.h5ad"))
    read = store.read_rows
    monkeypatch.setattr(store, "read_rows", lambda *a, **k: time.sleep(READ_S) or read(*a, **k))
    server, address = start({"tiny": store}, stall_timeout=300, keepalive=1.0)
    child = subprocess.Popen(
        [sys.executable, "-c", STOPPED_CLIENT, address], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "reading"
        child.send_signal(signal.SIGSTOP)
        began = time.monotonic()
        ended = wait_for(lambda: server.service.open_streams() == 0, 8)
        took = time.monotonic() - began
    finally:
        child.kill()
        child.wait(10)
        child.stdout.close()
    print(f"\nSIGSTOPped client (keepalive 1 s, ping timeout 1 s): stream ended after {took:.1f} s")
    assert ended, "the stopped client's stream was still open 8 s later"
    assert any("status=CANCELLED" in r.getMessage() for r in caplog.records)
