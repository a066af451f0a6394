"""Several replicas behind one RemoteLoader: balancing, failover, drain, store fingerprints."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time

import pytest

from annserve.client import Connection, Output, RemoteLoader
from annserve.errors import StoreFormatError
from conftest import real_path
from ops_support import RPC_TIMEOUT, Daemon

N_OBS = 10_000  # mouse10x
STREAM_START = re.compile(r"stream (\d+) start")
STREAM_END = re.compile(r"stream (\d+) end")
EPOCH_LIMIT_S = 120.0
BASE = {
    "batch_size": 100,
    "chunk_size": 25,
    "preload_nchunks": 8,
    "seed": 11,
    "return_index": True,
    "output": Output(to_torch=False, prefetch=1),
    "connection": Connection(timeout=RPC_TIMEOUT, retry_backoff=0.1),
}


@pytest.fixture
def replicas():
    """Start daemons serving real stores (mouse10x unless named); all killed at teardown."""
    daemons: list[Daemon] = []

    def start(n: int, store: str = "mouse10x") -> list[Daemon]:
        path = str(real_path(store))
        for _ in range(n):
            daemons.append(Daemon(["--store", f"main={path}", "--grace", "0.5"]))
        return daemons[-n:]

    try:
        yield start
    finally:
        for daemon in daemons:
            daemon.close()


def streams_started(daemon: Daemon) -> int:
    return len(STREAM_START.findall(daemon.text()))


def serving(daemons: list[Daemon]) -> Daemon:
    """The daemon with a stream started and not ended."""
    for daemon in daemons:
        text = daemon.text()
        if set(STREAM_START.findall(text)) - set(STREAM_END.findall(text)):
            return daemon
    msg = "no daemon has an open stream"
    raise AssertionError(msg)


def test_streams_spread_over_every_replica(replicas):
    daemons = replicas(3)
    loader = RemoteLoader([d.address for d in daemons], **BASE)
    for _ in range(6):
        assert sum(len(b["index"]) for b in loader) == N_OBS
    counts = [streams_started(d) for d in daemons]
    assert sum(counts) == 6
    assert min(counts) >= 1, counts


def test_kill_and_drain_mid_epoch_lose_and_repeat_nothing(replicas, caplog):
    # pbmc3k in the raw encoding: ~18 MB an epoch, more than gRPC's flow-control windows
    # hold, so the stream is still open on its replica when it is killed or drained
    daemons = replicas(3, "pbmc3k")
    addresses = [d.address for d in daemons]
    args = {**BASE, "batch_size": 20}
    args["connection"] = Connection(timeout=RPC_TIMEOUT, retry_backoff=0.1, encoding="raw")
    reference = [b["index"].tolist() for b in RemoteLoader(addresses, **args)]
    loader = RemoteLoader(addresses, **args)
    seen, killed, drained = [], None, None
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="annserve.client.loader"):
        for i, batch in enumerate(loader):
            seen.append(batch["index"].tolist())
            time.sleep(0.02)  # a trainer's step: the epoch outlasts the drain's grace
            if i == 15:
                killed = serving(daemons)
                killed.proc.kill()
            if i == 50:
                drained = serving([d for d in daemons if d is not killed])
                drained.proc.terminate()
            assert time.monotonic() - began < EPOCH_LIMIT_S
    assert seen == reference
    assert drained is not None
    assert drained.proc.wait(timeout=30) == 0
    resumes = [r.message for r in caplog.records if "resuming at epoch 0" in r.message]
    assert len(resumes) == 2, resumes  # one after the kill, one after the drain's grace
    assert all("in 0.0 s" in r for r in resumes), resumes  # another replica: no pause
    survivor = next(d for d in daemons if d is not killed and d is not drained)
    assert streams_started(survivor) >= 1  # the rest of the epoch came from the third


def test_a_replica_of_another_store_is_refused(replicas):
    (mouse,) = replicas(1)
    (wu,) = replicas(1, "wu2020")
    expected = {RemoteLoader(d.address, **BASE).fingerprint for d in (mouse, wu)}
    assert len(expected) == 2

    def stream_epochs() -> None:
        for _ in range(4):  # round_robin: some call reaches the other replica
            for _ in RemoteLoader([mouse.address, wu.address], **BASE):
                pass

    with pytest.raises(StoreFormatError, match="store_fingerprint") as caught:
        stream_epochs()
    assert all(f in str(caught.value) for f in expected)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rolling_restart_of_every_replica_loses_and_repeats_nothing(replicas, caplog):
    path = str(real_path("pbmc3k"))
    ports = [free_port() for _ in range(3)]
    daemons = [
        Daemon(["--store", f"main={path}", "--grace", "0.5", "--port", str(p)]) for p in ports
    ]
    args = {**BASE, "batch_size": 20}
    args["connection"] = Connection(timeout=RPC_TIMEOUT, retry_backoff=0.1, encoding="raw")
    addresses = [d.address for d in daemons]
    try:
        reference = [b["index"].tolist() for b in RemoteLoader(addresses, **args)]
        restarted = threading.Event()

        def roll() -> None:  # SIGTERM (drain) each replica, start it again on its port, next
            for i, port in enumerate(ports):
                assert daemons[i].terminate() == 0
                daemons[i].close()
                daemons[i] = Daemon(
                    ["--store", f"main={path}", "--grace", "0.5", "--port", str(port)]
                )
            restarted.set()

        seen, roller = [], threading.Thread(target=roll, daemon=True)
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="annserve.client.loader"):
            for i, batch in enumerate(RemoteLoader(addresses, **args)):
                seen.append(batch["index"].tolist())
                if i == 5:
                    roller.start()
                if not restarted.is_set():
                    time.sleep(0.05)  # a trainer's step, until every replica was restarted
                assert time.monotonic() - began < EPOCH_LIMIT_S
        elapsed = time.monotonic() - began
        roller.join(timeout=60)
        assert restarted.is_set()
        assert seen == reference
        resumes = sum("resuming at epoch 0" in r.message for r in caplog.records)
        print(
            f"\nrolling restart of 3 replicas within one epoch of pbmc3k: {len(seen)} batches, "
            f"{sum(map(len, seen)) / elapsed:,.0f} cells/s over the epoch "
            f"(a 50 ms step per 20-cell batch until the last restart bounds it at ~400), "
            f"{resumes} failovers"
        )
    finally:
        for daemon in daemons:
            daemon.close()
