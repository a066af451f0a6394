"""A daemon restarted five times in one epoch: the loader rides out every outage.

Each outage is separate: the reconnection budget is spent per outage, not per epoch.
The daemon is a subprocess on one fixed port, killed (SIGKILL) and started again while
the loader streams; every row of the epoch must arrive exactly once.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter

import pytest

from annserve.client import Connection, Output, RemoteLoader
from annserve.errors import ServerUnavailableError
from conftest import real_path
from ops_support import RPC_TIMEOUT, Daemon

pytestmark = pytest.mark.slow

RESTARTS = 5
EPOCH_LIMIT_S = 240.0  # seconds for the epoch and its five restarts (2 busy cores)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RestartingDaemon:
    """An ``annserve`` daemon on a fixed port that :meth:`restart` kills and starts again."""

    def __init__(self, store: str) -> None:
        self._args = ["--store", store, "--port", str(free_port())]  # the last --port wins
        self.daemon = Daemon(self._args)
        self.address = self.daemon.address
        self.restarts: list[float] = []  # seconds from the kill to the new daemon listening
        self._thread: threading.Thread | None = None

    def restart_in_background(self) -> None:
        """Kill the daemon now and start a new one in a thread (the loader sees an outage)."""
        self.wait()
        self.daemon.close()
        killed = time.monotonic()

        def start() -> None:
            self.daemon = Daemon(self._args)
            self.restarts.append(time.monotonic() - killed)

        self._thread = threading.Thread(target=start, name="restart", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Wait for the restart in progress, if any."""
        if self._thread is not None:
            self._thread.join(timeout=60)
            assert not self._thread.is_alive(), "the daemon did not start again"

    def close(self) -> None:
        self.wait()
        self.daemon.close()


def test_five_restarts_in_one_epoch_lose_and_repeat_nothing(caplog):
    path = real_path("mouse10x")
    server = RestartingDaemon(str(path))
    try:
        loader = RemoteLoader(
            server.address,
            batch_size=50,
            chunk_size=25,
            preload_nchunks=4,
            seed=0,
            return_index=True,
            output=Output(to_torch=False),
            connection=Connection(timeout=RPC_TIMEOUT),  # default retries and backoff
        )
        n_batches = len(loader)
        restart_at = {n_batches * (k + 1) // (RESTARTS + 2) for k in range(RESTARTS)}
        seen = []
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="annserve.client.loader"):
            try:
                for i, batch in enumerate(loader):
                    seen.extend(batch["index"].tolist())
                    if i in restart_at:
                        server.restart_in_background()
                    assert time.monotonic() - began < EPOCH_LIMIT_S
            except ServerUnavailableError as e:
                pytest.fail(f"failed at {len(seen):,} of 10,000 rows: {e}")
        elapsed = time.monotonic() - began
        counts = Counter(seen)
        server.wait()  # the epoch may end (prefetched) while the last restart is under way
        assert len(server.restarts) == RESTARTS
        assert set(counts) == set(range(10_000)), f"{len(counts)} of 10,000 rows"
        assert set(counts.values()) == {1}
        assert loader.epoch == 1
        resumes = [r.message for r in caplog.records if "resuming at epoch 0" in r.message]
        print(
            f"\n{RESTARTS} restarts ({', '.join(f'{s:.1f}' for s in server.restarts)} s each), "
            f"epoch {elapsed:.1f} s, {len(resumes)} reconnections"
        )
    finally:
        server.close()


def test_an_outage_longer_than_max_wait_fails_after_it():
    server = RestartingDaemon(str(real_path("pbmc3k")))
    try:
        loader = RemoteLoader(
            server.address,
            batch_size=64,
            output=Output(to_torch=False),
            connection=Connection(timeout=RPC_TIMEOUT, retries=100, max_wait=3.0),
        )
        batches = iter(loader)
        next(batches)
        server.daemon.close()  # and never back
        lost = time.monotonic()
        with pytest.raises(ServerUnavailableError, match="no annserve server answered"):
            list(batches)
        assert 3.0 - 0.5 <= time.monotonic() - lost < 3.0 + 2.0
    finally:
        server.close()
