"""A server killed mid-epoch and restarted: the client resumes, nothing lost or repeated."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING

import pytest

from annserve.client import Connection, RemoteLoader
from conftest import real_path

if TYPE_CHECKING:
    from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(store: Path, port: int, log: Path) -> subprocess.Popen:
    with open(log, "a") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "annserve.server.rpc.cli",
                "--store",
                str(store),
                "--port",
                str(port),
            ],
            stderr=err,
        )
    deadline = time.monotonic() + 60
    while f"listening on 127.0.0.1:{port}" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_sigkill_mid_epoch_then_restart_loses_and_repeats_nothing(tmp_path, caplog):
    store, port = real_path("pbmc3k"), free_port()
    daemons = [start_daemon(store, port, tmp_path / "first.log")]
    try:
        loader = RemoteLoader(
            f"127.0.0.1:{port}",
            batch_size=64,
            chunk_size=16,
            preload_nchunks=2,
            seed=0,
            return_index=True,
            connection=Connection(encoding="raw", retries=6, retry_backoff=0.5),
        )
        seen = []
        with caplog.at_level(logging.WARNING, logger="annserve.client.loader"):
            for i, batch in enumerate(loader):
                seen.extend(batch["index"].tolist())
                if i == 1:  # mid-epoch: the server dies without a goodbye, and comes back
                    daemons[0].kill()
                    daemons[0].wait(timeout=30)
                    daemons.append(start_daemon(store, port, tmp_path / "second.log"))
        assert any("resuming at epoch 0" in r.message for r in caplog.records)
        counts = Counter(seen)
        assert set(counts) == set(range(2700))  # 0 lost
        assert set(counts.values()) == {1}  # 0 duplicated
        assert loader.epoch == 1
    finally:
        for d in daemons:
            d.kill()
            d.wait(timeout=30)
