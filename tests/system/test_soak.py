"""Soak: clients that read, stall, vanish and reconnect at random against one daemon.

One ``annserve`` subprocess with a small ``--max-streams`` and a short stall timeout
serves a real dataset for a bounded time (``SOAK_S``) to:

- readers: ``RemoteLoader`` epochs, each checked for every row exactly once (a reader
  refused a slot, ``RESOURCE_EXHAUSTED``, tries again from where it was);
- stallers: raw streams that take a few frames, then stop reading for a random time
  (some past the stall timeout) and read on or hang up;
- vanishers: client processes killed (SIGKILL) in the middle of a stream;
- reconnecters: loaders that stop mid-epoch and resume in a new loader from their
  ``state_dict``, which must complete the epoch exactly once.

At the end the daemon must be back near idle: no stream open, RSS within a bound of
its idle RSS, as many threads and file descriptors as when idle.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from annserve.client import Connection, Output, RemoteLoader
from annserve.errors import ResourceExhaustedError
from annserve.server.rpc.app import EXTRA_WORKERS
from conftest import real_path
from ops_support import Daemon, rss_mb, stream_call

pytestmark = pytest.mark.slow

SOAK_S = 40.0  # seconds of random load
STALL_S = 2.0  # the daemon's --stall-timeout
MAX_STREAMS = 4  # the daemon's --max-streams
REQUEST = {"batch_size": 256, "chunk_size": 32, "preload_nchunks": 8}
#: RSS the daemon may keep above idle once every client is gone, MB
RSS_SLACK_MB = 96


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"Threads:\s+(\d+)", status).group(1))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _loader(address: str, seed: int) -> RemoteLoader:
    return RemoteLoader(
        address,
        **REQUEST,
        seed=seed,
        return_index=True,
        output=Output(to_torch=False),
        connection=Connection(timeout=10.0, retries=20, max_wait=30.0),
    )


def _epoch_rows(loader: RemoteLoader, stop: threading.Event) -> np.ndarray | None:
    """Stream one whole epoch (again from the cursor when refused a slot); None if stopped."""
    parts = []
    while not stop.is_set():
        try:
            parts.extend(b["index"] for b in loader)
            return np.concatenate(parts)
        except ResourceExhaustedError:  # --max-streams reached: the cursor keeps its place
            time.sleep(0.2)
    return None


class Actors:
    """The random clients, each a thread; failures are collected."""

    def __init__(self, address: str, n_obs: int, seed: int) -> None:
        self.address, self.n_obs = address, n_obs
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.epochs = {"reader": 0, "reconnecter": 0}
        self.events = {"stalled": 0, "vanished": 0}
        self._threads: list[threading.Thread] = []

    def start(self, role: str, n: int) -> None:
        for i in range(n):
            thread = threading.Thread(target=self._run, args=(role, i), daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self, timeout: float) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a soak client did not stop"

    def _run(self, role: str, i: int) -> None:
        try:
            while not self.stop.is_set():
                getattr(self, f"_{role}")(i)
        except BaseException as e:  # reported at the end
            self.errors.append(e)

    def _check(self, rows: np.ndarray | None, role: str) -> None:
        if rows is None:
            return
        assert np.array_equal(np.sort(rows), np.arange(self.n_obs)), (
            f"{role}: lost or repeated rows"
        )
        self.epochs[role] += 1

    def _reader(self, i: int) -> None:
        self._check(_epoch_rows(_loader(self.address, seed=i), self.stop), "reader")

    def _reconnecter(self, i: int) -> None:
        first = _loader(self.address, seed=100 + i)
        taken = self.rng.randint(1, len(first) - 1)
        parts = []
        try:
            for batch in first:
                parts.append(batch["index"])
                if len(parts) == taken:
                    break  # the trainer stops mid-epoch (preempted)
        except ResourceExhaustedError:
            return
        state = first.state_dict()
        time.sleep(self.rng.uniform(0, 1))
        resumed = _loader(self.address, seed=100 + i)
        resumed.load_state_dict(state)
        rest = _epoch_rows(resumed, self.stop)
        if rest is not None:
            self._check(np.concatenate([*parts, rest]), "reconnecter")

    def _staller(self, i: int) -> None:
        with grpc.insecure_channel(self.address) as channel:
            call = stream_call(channel, timeout=30.0, **REQUEST, seed=200 + i)
            try:
                frames = iter(call)
                for _ in range(self.rng.randint(1, 3)):
                    next(frames)
                time.sleep(self.rng.uniform(0.5, 2 * STALL_S))  # half of them past the timeout
                if self.rng.random() < 0.5:
                    for _ in frames:  # read on: the rest, or the stall's DEADLINE_EXCEEDED
                        pass
            except grpc.RpcError as e:
                if e.code() not in (
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                ):
                    raise
            finally:
                call.cancel()
        self.events["stalled"] += 1

    def _vanisher(self, i: int) -> None:
        script = textwrap.dedent(f"""
            from annserve.client import Output, RemoteLoader
            loader = RemoteLoader({self.address!r}, batch_size=256, output=Output(to_torch=False))
            for batch in loader:
                print("batch", flush=True)
        """)
        proc = subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            proc.stdout.readline()  # a batch arrived: the stream is open
            time.sleep(self.rng.uniform(0, 0.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
        self.events["vanished"] += 1


def test_random_clients_leave_the_daemon_as_they_found_it():
    path = real_path("pbmc3k")  # ~27 MB an epoch: more than a stalled stream's windows hold
    args = [
        "--store",
        str(path),
        "--max-streams",
        str(MAX_STREAMS),
        "--stall-timeout",
        str(STALL_S),
    ]
    with Daemon([*args, "--metrics-port", "0"]) as daemon:
        pid = daemon.proc.pid
        warm = _loader(daemon.address, seed=0)
        n_obs = warm.n_obs
        assert len(np.concatenate([b["index"] for b in warm])) == n_obs  # heap and threads warm
        time.sleep(1.5)
        idle = {"rss": rss_mb(pid), "threads": _threads(pid), "fds": _fds(pid)}

        actors = Actors(daemon.address, n_obs, seed=0)
        for role, n in (("reader", 2), ("reconnecter", 1), ("staller", 2), ("vanisher", 1)):
            actors.start(role, n)
        peak = 0.0
        began = time.monotonic()
        while time.monotonic() - began < SOAK_S and not actors.errors:
            peak = max(peak, rss_mb(pid))
            time.sleep(0.5)
        actors.join(timeout=90)
        if actors.errors:
            raise actors.errors[0]

        deadline = time.monotonic() + 15  # the stall timeout and the trim of freed memory
        while time.monotonic() < deadline and rss_mb(pid) > idle["rss"] + RSS_SLACK_MB:
            time.sleep(0.25)
        time.sleep(STALL_S)
        end = {"rss": rss_mb(pid), "threads": _threads(pid), "fds": _fds(pid)}
        print(
            f"\nsoak {SOAK_S:g} s: epochs {actors.epochs}, events {actors.events}; daemon RSS "
            f"idle {idle['rss']:.0f} MB, peak {peak:.0f} MB, end {end['rss']:.0f} MB; threads "
            f"{idle['threads']} -> {end['threads']}; fds {idle['fds']} -> {end['fds']}"
        )
        ends = re.findall(r"stream \d+ end: status=(\w+)", daemon.text())
        starts = re.findall(r"stream \d+ start:", daemon.text())
        print(f"{len(starts)} streams started, {len(ends)} ended: {Counter(ends)}")
        assert actors.epochs["reader"] >= 2
        assert actors.epochs["reconnecter"] >= 1
        assert actors.events["stalled"] >= 2
        assert actors.events["vanished"] >= 1
        assert len(ends) == len(starts)  # every stream that started has ended
        # gRPC's worker pool keeps the threads it grew (at most --max-streams + EXTRA_WORKERS);
        # two threads leaked per stream would be hundreds more
        assert end["threads"] <= idle["threads"] + MAX_STREAMS + EXTRA_WORKERS
        assert end["fds"] <= idle["fds"] + 2  # a connection the kernel has not closed yet
        assert end["rss"] <= idle["rss"] + RSS_SLACK_MB
