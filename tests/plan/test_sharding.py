"""Shards across ranks and DataLoader workers, balanced sampling and splits, end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DataLoader

from annserve.client import Balanced, RemoteLoader, Sharding, Split
from conftest import real_path

BASE = {
    "batch_size": 32,
    "chunk_size": 8,
    "preload_nchunks": 4,
    "seed": 5,
    "return_index": True,
}


def indices(loader) -> list[np.ndarray]:
    return [b["index"].numpy() for b in loader]


@pytest.mark.parametrize("even", [True, False])
@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_ranks_partition_the_epoch(serve, world_size, even):
    address = serve(real_path("wu2020"))
    per_rank = []
    for rank in range(world_size):
        sharding = Sharding(rank=rank, world_size=world_size, even_batches=even)
        loader = RemoteLoader(address, sharding=sharding, **BASE)
        batches = indices(loader)
        assert len(batches) == len(loader)
        per_rank.append(np.concatenate(batches))
    counts = Counter(np.concatenate(per_rank).tolist())
    assert set(counts) == set(range(200))  # every row served
    if even:
        assert len({len(r) for r in per_rank}) == 1  # same rows, so same batches, everywhere
        assert sum(counts.values()) - 200 < world_size  # padding repeats only a few rows
    else:
        assert set(counts.values()) == {1}  # disjoint: each row exactly once


def test_dataloader_workers_take_sub_shards(serve):
    loader = RemoteLoader(serve(real_path("wu2020")), sharding=Sharding(even_batches=False), **BASE)
    rows = np.concatenate(
        [
            b["index"].numpy()
            for b in DataLoader(
                loader, batch_size=None, num_workers=2, timeout=60, multiprocessing_context="spawn"
            )
        ]
    )
    np.testing.assert_array_equal(np.sort(rows), np.arange(200))


WORKER = """
import json, os, sys
import torch.distributed as dist
from annserve.client import RemoteLoader
dist.init_process_group("gloo", init_method="env://")
loader = RemoteLoader(sys.argv[1], **json.loads(sys.argv[2]))
rows = [b["index"].tolist() for b in loader]
print(json.dumps({"rank": dist.get_rank(), "len": len(loader), "rows": rows}))
dist.barrier()
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_torch_distributed_gloo(serve):
    address = serve(real_path("wu2020"))
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, address, json.dumps(BASE)],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert results[0]["len"] == results[1]["len"] == len(results[0]["rows"])  # no DDP hang
    rows = [r for res in results for batch in res["rows"] for r in batch]
    assert set(rows) == set(range(200))
    assert len(rows) - 200 < 2


def test_class_balanced_sampling_reaches_equal_proportions(serve, real_adata):
    labels = real_adata("pbmc68k").obs["bulk_labels"]
    loader = RemoteLoader(
        serve(real_path("pbmc68k")),
        balance=Balanced("bulk_labels", num_samples=20_000),
        **{**BASE, "batch_size": 1000},
    )
    rows = np.concatenate(indices(loader))
    assert len(rows) == 20_000
    shares = labels.iloc[rows].value_counts(normalize=True)
    target = 1 / labels.nunique()
    # tolerance: 5 standard deviations of a share when draws come 8 at a time from a chunk
    assert np.abs(shares - target).max() < 0.03, shares
    raw = labels.value_counts(normalize=True)
    assert (raw.max() - raw.min()) > 0.1  # the store itself is far from balanced


def test_explicit_category_weights(serve, real_adata):
    labels = real_adata("pbmc68k").obs["bulk_labels"]
    weights = {"CD14+ Monocyte": 3.0, "CD19+ B": 1.0}
    loader = RemoteLoader(
        serve(real_path("pbmc68k")),
        **{**BASE, "batch_size": 1000},
        balance=Balanced("bulk_labels", weights=weights, num_samples=8000),
    )
    shares = labels.iloc[np.concatenate(indices(loader))].value_counts(normalize=True)
    assert set(shares[shares > 0].index) == set(weights)
    assert abs(shares["CD14+ Monocyte"] - 0.75) < 0.03


def split_rows(address, name, **split) -> np.ndarray:
    loader = RemoteLoader(address, split=Split(name, **split), **BASE)
    return np.concatenate([np.zeros(0, np.int64), *indices(loader)])


@pytest.mark.parametrize("by", [None, "patient"])
def test_splits_are_disjoint_cover_all_and_stable(serve, real_adata, by):
    dataset = "wu2020" if by else "mouse10x"
    n_obs = real_adata(dataset).n_obs
    address = serve(real_path(dataset))
    split = {"by": by, "seed": 0, "fractions": (0.6, 0.2, 0.2)}
    parts = {name: split_rows(address, name, **split) for name in ("train", "val", "test")}
    assert all(len(rows) for rows in parts.values())
    together = np.concatenate(list(parts.values()))
    np.testing.assert_array_equal(np.sort(together), np.arange(n_obs))
    again = split_rows(serve(real_path(dataset)), "val", **split)  # a "restarted" server
    np.testing.assert_array_equal(np.sort(again), np.sort(parts["val"]))
    if by:
        patients = {
            name: set(real_adata(dataset).obs[by].iloc[rows]) for name, rows in parts.items()
        }
        assert not patients["train"] & patients["val"]
        assert not patients["train"] & patients["test"]


def vm_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.slow
def test_eight_concurrent_clients_then_memory_returns(tmp_path):
    log = tmp_path / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "annserve.server.rpc.cli",
                "--store",
                str(real_path("pbmc3k")),
                "--port",
                "0",
            ],
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 60
        while "listening on" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        port = log.read_text().split("listening on 127.0.0.1:")[1].split()[0]
        address = f"127.0.0.1:{port}"
        indices(RemoteLoader(address, **BASE))  # warm up: imports, caches
        idle = vm_rss_mb(proc.pid)
        results, errors = {}, []

        def client(i: int) -> None:
            try:
                loader = RemoteLoader(
                    address,
                    **{**BASE, "seed": i, "batch_size": 64 + i, "chunk_size": 16 * (1 + i % 3)},
                )
                results[i] = np.sort(np.concatenate(indices(loader)))
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors
        assert all(np.array_equal(r, np.arange(2700)) for r in results.values())
        assert len(results) == 8
        time.sleep(2)
        after = vm_rss_mb(proc.pid)
        print(f"server RSS idle {idle:.0f} MB, after 8 clients {after:.0f} MB")
        assert after < idle + 150
    finally:
        proc.terminate()
        proc.wait(timeout=30)
