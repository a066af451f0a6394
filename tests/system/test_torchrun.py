"""torchrun: two DDP ranks train examples/train_ddp.py against two annserve replicas.

Two real daemons serve the same real store on 127.0.0.1 (ephemeral ports); torchrun
(``python -m torch.distributed.run --standalone``) starts two gloo ranks that reach
both through one gRPC target, ``ipv4:A,B``. The example is run once; the tests check
what it wrote (row indices per rank and epoch, the checkpoint), what it printed, and
what each daemon logged. :class:`DistributedExampleChecks` holds the checks every
distributed example passes (tests/system/test_ray_train.py runs them on Ray Train).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from conftest import real_path
from ops_support import Daemon

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[2]
N_OBS = 700  # pbmc68k_reduced
RANKS = 2
EPOCHS = 2
BATCH_SIZE = 64
SEED = 3
#: seconds for the whole torchrun (two ranks importing torch on two busy cores)
TRAIN_TIMEOUT = 180.0
#: a training stream's start line in a daemon's log (the example's probe uses other sizes)
TRAINING_STREAM = re.compile(
    rf"stream \d+ start: .* epoch=(\d+) batch_size={BATCH_SIZE} .* shard=(\d+)/{RANKS} "
)


@dataclass(frozen=True)
class Run:
    """One run of a distributed example: its exit code and output, and what it wrote."""

    returncode: int
    output: str
    index_dir: Path
    checkpoint: Path
    daemons: tuple[Daemon, ...]


def run_bounded(command: list[str], timeout: float) -> tuple[int, str]:
    """Run ``command`` in its own process group; kill the whole group after ``timeout`` s."""
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the launcher and every rank share one group
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{command[:3]} did not finish within {timeout} s:\n{output}")
    return proc.returncode, output


def run_example(out: Path, launcher: list[str], timeout: float) -> Iterator[Run]:
    """Start two replicas of one real store, run ``launcher`` + the example's flags, yield it.

    ``launcher`` starts the example (e.g. torchrun and the script); the flags added
    point it at both replicas and make it write row indices and a checkpoint to ``out``.
    """
    args = ["--store", str(real_path("pbmc68k"))]  # 700 cells, 10 types in "bulk_labels"
    with Daemon(args) as first, Daemon(args) as second:
        daemons = (first, second)
        command = [
            *launcher,
            *("--address", "ipv4:" + ",".join(d.address for d in daemons)),
            *("--label-key", "bulk_labels", "--epochs", str(EPOCHS), "--seed", str(SEED)),
            *("--batch-size", str(BATCH_SIZE), "--chunk-size", "16", "--preload-nchunks", "8"),
            *("--index-dir", str(out), "--checkpoint", str(out / "checkpoint.pt")),
        ]
        returncode, output = run_bounded(command, timeout)
        yield Run(returncode, output, out, out / "checkpoint.pt", daemons)


class DistributedExampleChecks:
    """What a distributed example shows after a run; a subclass provides the ``run`` fixture."""

    def test_exits_0(self, run):
        assert run.returncode == 0, run.output

    def test_ranks_together_see_every_row_once_per_epoch(self, run):
        assert run.returncode == 0, run.output
        orders = []
        for epoch in range(EPOCHS):
            parts = [np.load(run.index_dir / f"rank{r}-epoch{epoch}.npy") for r in range(RANKS)]
            assert len({len(p) for p in parts}) == 1  # equal shards: no rank waits in DDP
            rows = np.concatenate(parts)
            np.testing.assert_array_equal(np.sort(rows), np.arange(N_OBS))  # each exactly once
            orders.append(rows)
        assert not np.array_equal(orders[0], orders[1])  # set_epoch: each epoch its own shuffle

    def test_rank0_checkpoint_holds_model_optimizer_and_loader_state(self, run):
        assert run.returncode == 0, run.output
        state = torch.load(run.checkpoint, weights_only=True)
        assert set(state) == {"model", "optimizer", "loader"}
        assert not any(key.startswith("module.") for key in state["model"])  # unwrapped
        assert state["loader"]["seed"] == SEED
        # every epoch streamed to its end: the next iteration starts epoch EPOCHS at batch 0
        assert (state["loader"]["epoch"], state["loader"]["batch"]) == (EPOCHS, 0)

    def test_both_replicas_served_training_streams(self, run):
        assert run.returncode == 0, run.output
        served = [
            {(int(epoch), int(shard)) for epoch, shard in TRAINING_STREAM.findall(d.text())}
            for d in run.daemons
        ]
        assert all(served), served  # each replica streamed some rank's epoch
        assert set().union(*served) == {(e, r) for e in range(EPOCHS) for r in range(RANKS)}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    launcher = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        *(f"--nproc_per_node={RANKS}", str(ROOT / "examples" / "train_ddp.py")),
    ]
    yield from run_example(tmp_path_factory.mktemp("torchrun"), launcher, TRAIN_TIMEOUT)


class TestTorchrun(DistributedExampleChecks):
    def test_each_rank_prints_its_rows_per_epoch(self, run):
        assert run.returncode == 0, run.output
        for rank in range(RANKS):
            lines = re.findall(rf"^rank {rank}: (\d+) rows; epoch (\d+)/{EPOCHS}", run.output, re.M)
            assert [int(epoch) for _, epoch in lines] == list(range(1, EPOCHS + 1)), run.output
            assert {int(rows) for rows, _ in lines} == {N_OBS // RANKS}  # even shards


def test_a_preempted_two_rank_job_resumes_on_three_ranks(tmp_path):
    """Elastic resume: 2 ranks stop mid-epoch (--max-steps), 3 ranks finish that epoch."""
    checkpoint = tmp_path / "checkpoint.pt"
    args = ["--store", str(real_path("pbmc68k"))]
    with Daemon(args) as first, Daemon(args) as second:
        address = "ipv4:" + ",".join(d.address for d in (first, second))

        def torchrun(ranks: int, name: str, *flags: str) -> list[np.ndarray]:
            out = tmp_path / name
            out.mkdir()
            command = [
                *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
                *(f"--nproc_per_node={ranks}", str(ROOT / "examples" / "train_ddp.py")),
                *("--address", address, "--label-key", "bulk_labels", "--epochs", "1"),
                *("--seed", str(SEED), "--batch-size", str(BATCH_SIZE), "--chunk-size", "16"),
                *("--preload-nchunks", "8", "--index-dir", str(out)),
                *("--checkpoint", str(checkpoint), *flags),
            ]
            returncode, output = run_bounded(command, TRAIN_TIMEOUT)
            assert returncode == 0, output
            return [np.load(out / f"rank{r}-epoch0.npy") for r in range(ranks)]

        before = torchrun(2, "before", "--max-steps", "3")
        assert torch.load(checkpoint, weights_only=True)["loader"]["batch"] == 3
        after = torchrun(3, "after", "--resume", str(checkpoint))
    assert [len(p) for p in before] == [3 * BATCH_SIZE] * 2  # preempted after 3 steps
    assert len({len(p) for p in after}) == 1  # the rest in equal shards
    consumed, rest = np.concatenate(before), np.concatenate(after)
    assert len(np.unique(consumed)) == len(consumed)
    assert not np.isin(rest, consumed).any()  # nothing the old world saw is seen again
    np.testing.assert_array_equal(np.union1d(consumed, rest), np.arange(N_OBS))  # every row
    assert len(rest) - len(np.unique(rest)) < 3  # only the 3-rank world's padding repeats
    state = torch.load(checkpoint, weights_only=True)["loader"]
    assert (state["epoch"], state["batch"], state["earlier_worlds"]) == (1, 0, [])
