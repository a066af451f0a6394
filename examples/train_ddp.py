"""Train the example model with DistributedDataParallel, each rank streaming its own shard.

The model, preprocessing and epoch loop are those of ``train.py``; here every rank
builds its ``RemoteLoader`` after ``torch.distributed`` is initialised, so the loader
takes rank and world size from it and the daemon streams each rank a disjoint shard
of the epoch, all shards of equal length (``Sharding``'s default, as DDP needs).
``--address`` may name several replicas serving the same store: each stream then
goes to one of them, and any of them can resume it. Backend: gloo on the CPU, nccl
(one GPU per rank) when CUDA is available.

Start two replicas, then two ranks::

    annserve --store data/pbmc68k_reduced.h5ad --port 5001 &
    annserve --store data/pbmc68k_reduced.h5ad --port 5002 &
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py \\
        --address ipv4:127.0.0.1:5001,127.0.0.1:5002 --label-key bulk_labels --epochs 3 \\
        --checkpoint ddp.pt

Each rank prints the rows it saw per epoch; rank 0 saves the model, optimizer and
its loader's ``state_dict()`` to ``--checkpoint`` after each epoch.

Elastic resume: ``--max-steps N`` stops every rank after N batches (a preempted job;
rank 0 checkpoints there, mid-epoch), and ``--resume PATH`` restarts from such a
checkpoint with any number of ranks. The loader state is the same on every rank (DDP
ranks step in lockstep), so rank 0's says how far all got; a world of another size
streams only the rows the old one had not reached, re-partitioned among its ranks::

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py ... \
        --checkpoint ddp.pt --max-steps 3
    torchrun --standalone --nproc_per_node=3 examples/train_ddp.py ... \
        --checkpoint ddp.pt --resume ddp.pt
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import train
from torch.nn.parallel import DistributedDataParallel

from annserve.client import Output
from annserve.errors import AnnServeError

if TYPE_CHECKING:
    import argparse

    from annserve.client import RemoteLoader

#: A collective that waits longer than this (a rank stopped) fails instead of hanging.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


def build_parser() -> argparse.ArgumentParser:
    """Return ``train.py``'s parser with the checkpoint and row-index outputs added."""
    parser = train.build_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        metavar="PATH",
        help="rank 0 saves model, optimizer and loader state here after each epoch",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="PATH",
        help="start from this checkpoint (model, optimizer, loader), with any world size",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help="stop after N batches in all (rank 0 checkpoints there), as if preempted",
    )
    parser.add_argument(
        "--index-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="each rank writes the global row indices it saw to DIR/rank{R}-epoch{E}.npy",
    )
    return parser


class SeenRows:
    """``RemoteLoader`` transform keeping a copy of each batch's global row indices."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []

    def __call__(self, batch: dict[str, object]) -> dict[str, object]:
        index = batch["index"]
        assert isinstance(index, torch.Tensor)
        self._parts.append(index.cpu().numpy().copy())  # the loader reuses batch memory
        return batch

    def take(self) -> np.ndarray:
        """Return the indices seen since the last call, int64, in stream order."""
        parts, self._parts = self._parts, []
        return np.concatenate(parts) if parts else np.empty(0, np.int64)


def say(line: str) -> None:
    """Print ``line`` in one write (``print`` writes text and newline apart, and the
    ranks share torchrun's stdout: two ranks' lines could run together)."""
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def checkpoint_state(
    task: train.Task, optimizer: torch.optim.Optimizer, loader: RemoteLoader
) -> dict[str, object]:
    """Return model (unwrapped from DDP), optimizer and loader state, for ``torch.save``.

    The loader's state is the same on every rank: a loader of any world size resumes it.
    """
    model = task.model
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "loader": loader.state_dict(),
    }


def save_checkpoint(path: Path, state: dict[str, object]) -> None:
    """Write ``state`` to ``path`` through a temporary file: a reader never sees half of it."""
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    partial.replace(path)


def fit(args: argparse.Namespace, device: torch.device | None) -> None:
    """Train until ``args.epochs`` (or ``args.max_steps``) on this rank's shard.

    Prints and saves as it goes; with ``args.resume``, starts where that checkpoint
    stopped.

    Raises
    ------
    AnnServeError
        If a stream fails.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    seen = SeenRows()
    loader = train.build_loader(args, Output(device=device), transform=seen)
    task = train.make_task(args.address, args.label_key, loader.n_vars)
    state = torch.load(args.resume, weights_only=True) if args.resume is not None else None
    if state is not None:
        task.model.load_state_dict(state["model"])
        loader.load_state_dict(state["loader"])  # another world size: the rest re-partitioned
    # DDP copies rank 0's initial weights to every rank and averages gradients
    task = dataclasses.replace(
        task,
        model=DistributedDataParallel(
            task.model.to(device), device_ids=[device] if device is not None else None
        ),
    )
    if rank == 0:
        say(f"{world_size} ranks; {train.describe(args, loader, task)}")
    optimizer = torch.optim.Adam(task.model.parameters(), lr=args.lr)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    first = loader.state_dict()["epoch"] if state is not None else 0
    steps_left = args.max_steps
    for epoch in range(first, args.epochs):
        stats = train.run_epoch(
            loader,
            task,
            optimizer,
            epoch,
            resume=state is not None and epoch == first,  # else set_epoch(epoch)
            max_batches=steps_left,
        )
        rows = seen.take()
        say(f"rank {rank}: {stats.cells} rows; {train.epoch_line(task, stats, epoch, args.epochs)}")
        if args.index_dir is not None:
            np.save(args.index_dir / f"rank{rank}-epoch{epoch}.npy", rows)
        if rank == 0 and args.checkpoint is not None:
            save_checkpoint(args.checkpoint, checkpoint_state(task, optimizer, loader))
        if steps_left is not None:
            steps_left -= stats.batches
            if steps_left <= 0:
                break


def main(argv: list[str] | None = None) -> int:
    """Join the process group torchrun set up, train, and return the exit code."""
    args = build_parser().parse_args(argv)
    if args.epochs <= 0:
        print(f"train_ddp: --epochs must be positive, got {args.epochs}", file=sys.stderr)
        return 2
    if args.max_steps is not None and args.max_steps <= 0:
        print(f"train_ddp: --max-steps must be positive, got {args.max_steps}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
    device = None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device else "gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        fit(args, device)
    except AnnServeError as e:
        print(f"train_ddp: rank {dist.get_rank()}: {e}", file=sys.stderr)
        return 1
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
