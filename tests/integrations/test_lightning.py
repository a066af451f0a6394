"""AnnServeDataModule under Lightning DDP (2 CPU ranks) on pbmc3k.

Each rank trains on its own shard of the train split (disjoint: together the split,
each row once but for the padding of an odd split), and a run interrupted after a
mid-epoch checkpoint resumes from it with exactly the batches the uninterrupted run
trained on after that step, on each rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from annserve.client import Connection, RemoteLoader, Sharding, Split
from conftest import real_path

pytest.importorskip("lightning")

SCRIPT = Path(__file__).with_name("lightning_script.py")
RUN_TIMEOUT_S = 240  # one DDP run: two processes import torch and lightning, then ~17 steps
STEPS_BEFORE_CHECKPOINT = 5


def train(address: str, out: Path, phase: str) -> list[list[np.ndarray]]:
    """Run one phase of the script; return each rank's batches (rows of each)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), address, str(out), phase],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env=env,
        cwd=out,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = []
    for rank in (0, 1):
        record = json.loads((out / f"{phase}.rank{rank}.json").read_text())
        assert record["world_size"] == 2
        if phase == "full":
            assert record["val_batches"] > 0
        ranks.append([np.array(b) for b in record["rows"]])
    return ranks


@pytest.mark.slow
def test_ddp_shards_and_mid_epoch_resume(serve, tmp_path):
    address = serve(real_path("pbmc3k"))
    split = RemoteLoader(
        address,
        batch_size=1000,
        shuffle=False,
        return_index=True,
        split=Split("train", by="barcode"),
        sharding=Sharding(rank=0, world_size=1),
        connection=Connection(timeout=30.0),
    )
    train_rows = np.concatenate([b["index"].numpy() for b in split])

    full = train(address, tmp_path, "full")
    per_rank = [np.concatenate(batches) for batches in full]
    assert len(full[0]) == len(full[1])  # even batches: DDP does not hang
    both = np.intersect1d(per_rank[0], per_rank[1])
    assert len(both) == len(train_rows) % 2  # disjoint but for the padding row
    np.testing.assert_array_equal(np.union1d(*per_rank), np.sort(train_rows))
    assert sum(len(r) for r in per_rank) == len(train_rows) + len(train_rows) % 2

    interrupted = train(address, tmp_path, "interrupted")
    assert (tmp_path / "ckpt" / f"step={STEPS_BEFORE_CHECKPOINT}.ckpt").exists()
    resumed = train(address, tmp_path, "resumed")
    for rank in (0, 1):
        assert len(interrupted[rank]) > STEPS_BEFORE_CHECKPOINT  # it went on past the checkpoint
        for got, want in zip(interrupted[rank], full[rank], strict=False):
            np.testing.assert_array_equal(got, want)
        remaining = full[rank][STEPS_BEFORE_CHECKPOINT:]
        assert len(resumed[rank]) == len(remaining)
        for got, want in zip(resumed[rank], remaining, strict=True):
            np.testing.assert_array_equal(got, want)
