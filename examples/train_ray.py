"""Train the example model with Ray Train: a TorchTrainer of CPU workers, each its own shard.

The model, preprocessing and epoch loop are those of ``train.py``. Each Ray Train
worker builds its ``RemoteLoader`` with ``Sharding(rank=world rank, world_size=world
size)`` from Ray Train's context, so the daemon streams each worker a disjoint shard of
the epoch, all of equal length; ``prepare_model`` wraps the model in
DistributedDataParallel. ``--address`` may name several replicas serving the same
store (``ipv4:A,B`` or ``dns:///NAME:PORT``).

Every epoch each worker reports its rows and loss, and rank 0 attaches a checkpoint
(model, optimizer and its loader's ``state_dict()``, the same on every rank) that Ray
keeps under ``--storage-path``; ``--checkpoint`` gets a copy of the last one.

Needs ``pip install 'ray[train]'`` beside the client::

    annserve --store data/pbmc68k_reduced.h5ad --port 5001 &
    annserve --store data/pbmc68k_reduced.h5ad --port 5002 &
    python examples/train_ray.py --address ipv4:127.0.0.1:5001,127.0.0.1:5002 \\
        --label-key bulk_labels --workers 2 --epochs 3 --checkpoint ray.pt
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import ray
import ray.train
import torch
import train
import train_ddp
from ray.train.torch import TorchTrainer, prepare_model

from annserve.client import Sharding

if TYPE_CHECKING:
    import argparse

#: The checkpoint's file inside each directory Ray keeps.
CHECKPOINT_FILE = "annserve.pt"


def build_parser() -> argparse.ArgumentParser:
    """Return ``train_ddp.py``'s parser with the Ray workers and storage added."""
    parser = train_ddp.build_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument(
        "--workers", type=int, default=2, help="Ray Train workers, one CPU each (default 2)"
    )
    parser.add_argument(
        "--storage-path",
        type=Path,
        default=None,
        metavar="DIR",
        help="where Ray keeps results and checkpoints (default: Ray's, ~/ray_results)",
    )
    return parser


def train_loop(config: dict[str, argparse.Namespace]) -> None:
    """Ray Train worker: stream this worker's shard for ``args.epochs`` epochs.

    Raises
    ------
    AnnServeError
        If a stream fails (Ray then fails the run).
    """
    args = config["args"]
    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    sharding = Sharding(rank=rank, world_size=context.get_world_size())
    seen = train_ddp.SeenRows()
    loader = train.build_loader(args, transform=seen, sharding=sharding)
    task = train.make_task(args.address, args.label_key, loader.n_vars)
    task = dataclasses.replace(task, model=prepare_model(task.model))  # DDP across workers
    optimizer = torch.optim.Adam(task.model.parameters(), lr=args.lr)
    for epoch in range(args.epochs):
        stats = train.run_epoch(loader, task, optimizer, epoch)  # calls loader.set_epoch(epoch)
        rows = seen.take()
        train_ddp.say(
            f"rank {rank}: {stats.cells} rows; {train.epoch_line(task, stats, epoch, args.epochs)}"
        )
        if args.index_dir is not None:
            np.save(args.index_dir / f"rank{rank}-epoch{epoch}.npy", rows)
        metrics = {"epoch": epoch, "rows": stats.cells, "train_loss": stats.train_loss}
        if rank != 0:
            ray.train.report(metrics)  # every worker reports each epoch
            continue
        with tempfile.TemporaryDirectory() as directory:
            state = train_ddp.checkpoint_state(task, optimizer, loader)
            torch.save(state, Path(directory) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def main(argv: list[str] | None = None) -> int:
    """Run the TorchTrainer and print rank 0's last metrics; return the exit code."""
    args = build_parser().parse_args(argv)
    if args.epochs <= 0 or args.workers <= 0:
        print("train_ray: --epochs and --workers must be positive", file=sys.stderr)
        return 2
    # workers import train.py and train_ddp.py from this directory
    ray.init(runtime_env={"working_dir": str(Path(__file__).parent)})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"args": args},
        scaling_config=ray.train.ScalingConfig(num_workers=args.workers, use_gpu=False),
        run_config=ray.train.RunConfig(
            name="annserve-ray",
            storage_path=str(args.storage_path.resolve()) if args.storage_path else None,
        ),
    )
    try:
        result = trainer.fit()
        if args.checkpoint is not None and result.checkpoint is not None:
            with result.checkpoint.as_directory() as directory:
                shutil.copyfile(Path(directory) / CHECKPOINT_FILE, args.checkpoint)
    except ray.train.TrainingFailedError as e:
        print(f"train_ray: {e}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    print(f"done: rank 0's last epoch {result.metrics}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
