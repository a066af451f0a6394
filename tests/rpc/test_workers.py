"""``annserve --workers N``: worker processes behind one TCP port, daemon-wide limits,
metrics and drain, no orphans.

Each test runs a real ``annserve --workers 2`` subprocess on 127.0.0.1 and an ephemeral
port. Which worker a connection reaches is the kernel's choice (``SO_REUSEPORT`` hashes
the connection's addresses), so tests that need both workers open fresh connections
(each channel with its own subchannel pool) until both have served, a bounded number
of times: the chance that ``n`` connections all reach one of two workers is 2**(1 - n).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from conftest import real_path
from ops_support import (
    RPC_TIMEOUT,
    STOP_TIMEOUT,
    Daemon,
    GoodClient,
    annserve_command,
    frame_rows,
    stream_call,
    write_tiny_store,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Fresh connections tried until both workers have been reached.
CONNECTIONS = 40
#: Seconds until processes are gone / slots are freed.
GONE_TIMEOUT = 20.0
#: Own subchannel pool: a new TCP connection per channel (grpc shares them by default).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
SMALL = {"batch_size": 16, "chunk_size": 16, "preload_nchunks": 4}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_store(tmp_path_factory.mktemp("workers") / "tiny.h5ad", n_obs=600)


def scrape(daemon: Daemon) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of the daemon's ``/metrics``."""
    url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=RPC_TIMEOUT) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def per_worker_streams(daemon: Daemon) -> dict[str, float]:
    """Streams admitted by each worker, by pid (``annserve_worker_streams``)."""
    return {
        dict(labels)["pid"]: value
        for (name, labels), value in scrape(daemon).items()
        if name == "annserve_worker_streams"
    }


def children(pid: int) -> set[int]:
    """Child processes of ``pid``."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            found.update(int(c) for c in (task / "children").read_text().split())
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def workers_of(daemon: Daemon) -> set[int]:
    """The worker processes of a daemon (spawned ``multiprocessing`` children)."""
    pids = set()
    for child in children(daemon.proc.pid):
        with contextlib.suppress(FileNotFoundError):  # a child that ended meanwhile
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                pids.add(child)
    return pids


def slowly(frames, pause: float) -> Iterator[bytes]:
    """Yield ``frames``, one per ``pause`` seconds."""
    for frame in frames:
        time.sleep(pause)
        yield frame


def full_epoch(address: str, **fields: object) -> int:
    """Stream one epoch over a new connection; return its rows."""
    with grpc.insecure_channel(address, options=OWN_CONNECTION) as channel:
        return frame_rows(list(stream_call(channel, **fields)))


def health(address: str) -> str:
    with grpc.insecure_channel(address, options=OWN_CONNECTION) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def wait_until(condition, timeout: float = GONE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_both_workers_serve_every_row_once_and_metrics_add_up(tiny, tmp_path):
    args = ["--store", f"tiny={tiny}", "--workers", "2", "--metrics-port", "0"]
    with Daemon(args, {"TMPDIR": str(tmp_path)}) as daemon:
        assert len(list(tmp_path.glob("annserve-metrics-*"))) == 1
        assert len(workers_of(daemon)) == 2
        clients = [GoodClient(daemon.address, 600, seed=seed) for seed in range(3)]
        for client in clients:
            client.wait_epochs(2)
        rows = 0
        for client in clients:
            client.stop()
            assert client.epochs >= 2
            rows += client.rows
        for _ in range(CONNECTIONS):  # fresh connections until both workers served one
            assert full_epoch(daemon.address, **SMALL) == 600
            rows += 600
            if all(n > 0 for n in per_worker_streams(daemon).values()):  # 0 from the start
                break
        by_pid = per_worker_streams(daemon)
        assert set(by_pid) == {str(pid) for pid in workers_of(daemon)}
        assert all(n > 0 for n in by_pid.values())
        samples = scrape(daemon)
        streams = samples[("annserve_streams_total", (("store", "tiny"),))]
        assert streams == sum(by_pid.values())
        assert samples[("annserve_cells_total", (("store", "tiny"),))] == rows
        assert samples[("annserve_active_streams", ())] == 0
        assert daemon.terminate() == 0
        assert "[0]: stopped" in daemon.text()
        assert "[1]: stopped" in daemon.text()
    assert not list(tmp_path.glob("annserve-metrics-*"))  # removed by the supervisor


def test_max_streams_counts_the_streams_of_all_workers():
    pbmc = real_path("pbmc3k")
    args = ["--store", f"pbmc={pbmc}", "--workers", "2", "--max-streams", "2"]
    with Daemon(args) as daemon:
        channels = [grpc.insecure_channel(daemon.address, options=OWN_CONNECTION) for _ in range(2)]
        try:
            held = [stream_call(channel, **SMALL) for channel in channels]
            for call in held:
                next(call)  # admitted
            # each new connection reaches either worker: with per-worker counting one of
            # them would admit a third stream
            for _ in range(12):
                with (
                    grpc.insecure_channel(daemon.address, options=OWN_CONNECTION) as channel,
                    pytest.raises(grpc.RpcError) as refused,
                ):
                    next(stream_call(channel, **SMALL))
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert refused.value.details().startswith("max_streams: 2 streams are open")
            held[0].cancel()  # frees its slot, wherever it was
            codes = []

            def admitted() -> bool:
                try:
                    return full_epoch(daemon.address, **SMALL) == 2700
                except grpc.RpcError as e:  # until the server has seen the cancel
                    codes.append(e.code())
                    return False

            wait_until(admitted)
            assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED}
            held[1].cancel()
        finally:
            for channel in channels:
                channel.close()
        assert daemon.terminate() == 0


def test_sigterm_drains_every_worker_and_the_supervisor_exits_0():
    pbmc = real_path("pbmc3k")
    args = ["--store", f"pbmc={pbmc}", "--workers", "2", "--grace", "30"]
    with Daemon(args) as daemon:
        workers = workers_of(daemon)
        channels = []
        try:
            calls, firsts = [], []
            for _ in range(CONNECTIONS):  # until a stream is held on both workers
                channels.append(grpc.insecure_channel(daemon.address, options=OWN_CONNECTION))
                calls.append(stream_call(channels[-1], timeout=60, **SMALL))
                firsts.append(next(calls[-1]))
                if daemon.text().count("stream 1 start") == 2:  # each worker numbers its own
                    break
            assert daemon.text().count("stream 1 start") == 2
            daemon.proc.send_signal(signal.SIGTERM)
            daemon.wait_for(re.compile(r"\[0\]: shutting down"))
            daemon.wait_for(re.compile(r"\[1\]: shutting down"))
            results: list[tuple[int, grpc.StatusCode]] = []

            def finish(call: grpc.Call, first: bytes) -> None:  # a slow reader: ~3 s
                results.append((frame_rows([first, *slowly(call, 0.02)]), call.code()))

            readers = [
                threading.Thread(target=finish, args=pair, daemon=True)
                for pair in zip(calls, firsts, strict=True)
            ]
            for reader in readers:
                reader.start()
            for _ in range(10):  # whichever worker a connection reaches, none serves
                assert health(daemon.address) == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as refused:
                full_epoch(daemon.address, **SMALL)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            for reader in readers:  # streams in flight finish within the grace
                reader.join(60)
            assert results == [(2700, grpc.StatusCode.OK)] * len(calls)
            assert daemon.proc.wait(timeout=STOP_TIMEOUT) == 0
        finally:
            for channel in channels:
                channel.close()
        assert not any(alive(pid) for pid in workers)
        assert "stopped (all streams finished)" in daemon.text()


def test_sigkill_of_the_supervisor_leaves_no_worker(tmp_path):
    pbmc = real_path("pbmc3k")
    args = ["--store", f"pbmc={pbmc}", "--workers", "2", "--grace", "2"]
    with Daemon(args, {"TMPDIR": str(tmp_path)}) as daemon:  # its metrics dir stays there
        spawned = children(daemon.proc.pid)
        assert len(workers_of(daemon)) == 2
        with grpc.insecure_channel(daemon.address) as channel:
            call = stream_call(channel, **SMALL)
            next(call)  # a stream in flight
            daemon.proc.kill()
            daemon.proc.wait(timeout=STOP_TIMEOUT)
            wait_until(lambda: not any(alive(pid) for pid in spawned))
            call.cancel()


def test_a_dead_worker_is_restarted_and_its_slots_freed():
    pbmc = real_path("pbmc3k")
    args = ["--store", f"pbmc={pbmc}", "--workers", "2", "--max-streams", "2"]
    with Daemon(args) as daemon:
        victim, survivor = sorted(workers_of(daemon))
        os.kill(victim, signal.SIGKILL)
        daemon.wait_for(re.compile(rf"pid {victim}\) died"))
        wait_until(lambda: len(workers_of(daemon)) == 2)
        assert survivor in workers_of(daemon)
        assert victim not in workers_of(daemon)
        daemon.wait_for(re.compile(r"worker \d \(pid \d+\) serving"))
        assert health(daemon.address) == "SERVING"
        for _ in range(4):  # the daemon-wide slots are all free again
            assert full_epoch(daemon.address, **SMALL) == 2700
        assert daemon.terminate() == 0


def run_annserve(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANNSERVE_")}
    env["TMPDIR"] = str(tmp)
    return subprocess.run(
        [*annserve_command(), "--host", "127.0.0.1", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_startup_failures_keep_their_exit_codes(tmp_path, tiny):
    missing = run_annserve(
        ["--port", "0", "--workers", "2", "--store", str(tmp_path / "no.h5ad")], tmp_path
    )
    assert missing.returncode == 3, missing.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = run_annserve(
            ["--port", str(port), "--workers", "2", "--store", str(tiny)], tmp_path
        )
    assert taken.returncode == 4, taken.stderr
    assert f"cannot bind 127.0.0.1:{port}" in taken.stderr
    bad = run_annserve(["--port", "0", "--workers", "-1", "--store", str(tiny)], tmp_path)
    assert bad.returncode == 2
    assert not list(tmp_path.glob("annserve-metrics-*"))
