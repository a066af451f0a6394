"""Train a small PyTorch model on minibatches streamed by a running annserve daemon.

With ``--label-key`` naming a categorical obs column, a small MLP classifier
predicts that label from log1p(CP10k-normalised) counts and reports held-out
accuracy. Otherwise a linear autoencoder (n_vars -> 32 -> n_vars) reconstructs
log1p(CP10k) expression and reports held-out reconstruction MSE.

Held-out rows are chosen by global row index (``index % 10 == 0``): they take no
part in gradient steps and are scored in eval mode, without gradients, as they
pass by in the same stream.

Start a daemon, then point the trainer at it::

    annserve --store data/pbmc3k_raw.h5ad --port 50051 &
    python examples/train.py --address 127.0.0.1:50051 --epochs 3
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch
from torch import nn

from annserve.client import Output, RemoteLoader, Sharding
from annserve.errors import AnnServeError

if TYPE_CHECKING:
    from collections.abc import Callable

#: Every row whose global index is a multiple of this is held out.
HELD_OUT_EVERY = 10
#: Target library size of the normalisation, counts per cell (CP10k).
TARGET_SUM = 1e4
#: Latent width of the autoencoder, hidden width of the classifier.
AE_LATENT = 32
CLS_HIDDEN = 64
#: Rows read to choose the preprocessing and the classes before training.
PROBE_ROWS = 256


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the example trainer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--address",
        default="127.0.0.1:50051",
        help="annserve daemon: host:port, unix:/path, or a gRPC target naming several "
        "replicas of one store (ipv4:HOST:PORT,HOST:PORT or dns:///NAME:PORT) "
        "(default %(default)s)",
    )
    parser.add_argument("--epochs", type=int, default=3, help="passes over the data (default 3)")
    parser.add_argument(
        "--batch-size", type=int, default=256, help="cells per minibatch (default %(default)s)"
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=32,
        help="contiguous cells read per chunk (default %(default)s)",
    )
    parser.add_argument(
        "--preload-nchunks",
        type=int,
        default=256,
        help="chunks per preload buffer (default %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds torch and the stream's shuffling (default %(default)s)",
    )
    parser.add_argument(
        "--label-key",
        default=None,
        metavar="COLUMN",
        help="categorical obs column to classify; omit to train an autoencoder",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    return parser


def log_cp10k(x: torch.Tensor) -> torch.Tensor:
    """Return log1p of counts scaled to ``TARGET_SUM`` per cell.

    Parameters
    ----------
    x
        Counts, shape ``(n_cells, n_vars)``, dense float32.

    Returns
    -------
    Same shape and dtype; cells with no counts stay all zero.
    """
    size = x.sum(dim=1, keepdim=True).clamp_min(1.0)
    return torch.log1p(x * (TARGET_SUM / size))


def identity(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` unchanged (for X that is not counts)."""
    return x


def dense_x(batch: dict[str, object]) -> torch.Tensor:
    """Return the batch's X as a dense float32 tensor, shape ``(n_cells, n_vars)``."""
    x = batch["X"]
    assert isinstance(x, torch.Tensor)
    return x.to_dense() if x.layout != torch.strided else x


@dataclass
class Task:
    """What is trained and how it is scored.

    Attributes
    ----------
    name
        ``"classifier"`` or ``"autoencoder"``.
    model
        The network.
    preprocess
        Maps dense X, shape ``(n_cells, n_vars)``, to model inputs of the same shape.
    label_key
        obs column holding the targets (classifier only).
    categories
        Class labels, in code order (classifier only).
    """

    name: str
    model: nn.Module
    preprocess: Callable[[torch.Tensor], torch.Tensor]
    label_key: str | None = None
    categories: tuple[str, ...] = ()

    @property
    def metric(self) -> str:
        """Name of the held-out metric."""
        return "held-out acc" if self.name == "classifier" else "held-out MSE"

    def inputs_targets(
        self, batch: dict[str, object]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return model inputs, targets, and a mask of rows with a usable target.

        Returns
        -------
        Inputs, shape ``(n_cells, n_vars)``, float32; targets, shape ``(n_cells,)``, int64
        class codes (classifier) or the inputs themselves (autoencoder); mask, shape
        ``(n_cells,)``, bool (False where the label is missing); all on X's device.
        """
        x = self.preprocess(dense_x(batch))
        if self.label_key is None:
            return x, x, torch.ones(len(x), dtype=torch.bool, device=x.device)
        obs = batch["obs"]
        assert isinstance(obs, pd.DataFrame)
        codes = torch.from_numpy(obs[self.label_key].cat.codes.to_numpy().astype("int64"))
        codes = codes.to(x.device)  # obs stays on the CPU; X may be on the model's device
        return x, codes, codes >= 0

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss: cross-entropy over cells, or MSE over cells and genes."""
        if self.name == "classifier":
            return nn.functional.cross_entropy(output, target)
        return nn.functional.mse_loss(output, target)

    def score(self, output: torch.Tensor, target: torch.Tensor) -> float:
        """Summed held-out metric of a batch: correct predictions, or squared error per cell."""
        if self.name == "classifier":
            return float((output.argmax(dim=1) == target).sum())
        return float(((output - target) ** 2).mean(dim=1).sum())


def make_task(address: str, label_key: str | None, n_vars: int) -> Task:
    """Choose model and preprocessing from the first ``PROBE_ROWS`` rows of the store.

    X is normalised (log1p CP10k) when those rows hold no negative values, i.e. look
    like counts; scaled data such as pbmc68k_reduced is used as it is.

    Raises
    ------
    AnnServeError
        If the probe stream fails.
    """
    # a short unshuffled stream: the server reads PROBE_ROWS rows, not a whole preload buffer
    probe = RemoteLoader(
        address,
        batch_size=PROBE_ROWS,
        chunk_size=PROBE_ROWS,
        preload_nchunks=1,
        shuffle=False,
        obs_keys=[label_key] if label_key else [],
    )
    stream = iter(probe)
    try:
        first = next(stream)
    finally:
        stream.close()  # cancels the rest of the probe stream
    x = dense_x(first)
    counts = bool((x >= 0).all())
    preprocess = log_cp10k if counts else identity
    if not counts:
        print("X has negative values (not counts): using it without normalisation", file=sys.stderr)
    if label_key is not None:
        obs = first["obs"]
        assert isinstance(obs, pd.DataFrame)
        dtype = obs[label_key].dtype
        if isinstance(dtype, pd.CategoricalDtype):
            categories = tuple(str(c) for c in dtype.categories)
            model = nn.Sequential(
                nn.Linear(n_vars, CLS_HIDDEN),
                nn.ReLU(),
                nn.Dropout(0.2),
                nn.Linear(CLS_HIDDEN, len(categories)),
            )
            return Task("classifier", model, preprocess, label_key, categories)
        print(
            f"obs column {label_key!r} is {dtype}, not categorical: training an autoencoder",
            file=sys.stderr,
        )
    model = nn.Sequential(nn.Linear(n_vars, AE_LATENT), nn.Linear(AE_LATENT, n_vars))
    return Task("autoencoder", model, preprocess)


@dataclass
class EpochStats:
    """Totals of one epoch.

    Attributes
    ----------
    batches
        Batches streamed.
    cells
        Cells streamed (train and held out).
    train_cells
        Cells used for gradient steps.
    train_loss
        Mean training loss per train cell.
    held_out_cells
        Held-out cells scored.
    held_out
        Held-out accuracy (fraction) or MSE per gene and cell.
    seconds
        Wall time of the epoch, seconds.
    """

    batches: int
    cells: int
    train_cells: int
    train_loss: float
    held_out_cells: int
    held_out: float
    seconds: float

    @property
    def cells_per_s(self) -> float:
        """Throughput, cells per second of wall time."""
        return self.cells / self.seconds if self.seconds > 0 else float("nan")


def run_epoch(
    loader: RemoteLoader,
    task: Task,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    *,
    resume: bool = False,
    max_batches: int | None = None,
) -> EpochStats:
    """Stream one epoch, stepping on training rows and scoring held-out rows.

    With ``resume`` the loader continues where its ``load_state_dict`` put it (within
    ``epoch``) instead of starting the epoch; ``max_batches`` stops after that many.

    Raises
    ------
    AnnServeError
        If the stream fails.
    """
    if not resume:
        loader.set_epoch(epoch)
    batches = cells = train_cells = held_cells = 0
    loss_sum = score_sum = 0.0
    start = time.perf_counter()
    for batch in loader:
        batches += 1
        index = batch["index"]
        assert isinstance(index, torch.Tensor)
        cells += len(index)
        x, target, usable = task.inputs_targets(batch)
        is_held_out = index % HELD_OUT_EVERY == 0
        held = is_held_out & usable
        train = ~is_held_out & usable
        if held.any():
            task.model.eval()
            with torch.no_grad():
                score_sum += task.score(task.model(x[held]), target[held])
            held_cells += int(held.sum())
        if train.any():
            task.model.train()
            optimizer.zero_grad()
            loss = task.loss(task.model(x[train]), target[train])
            loss.backward()
            optimizer.step()
            n = int(train.sum())
            loss_sum += loss.item() * n
            train_cells += n
        if batches == max_batches:
            break
    seconds = time.perf_counter() - start
    nan = float("nan")
    return EpochStats(
        batches,
        cells,
        train_cells,
        loss_sum / train_cells if train_cells else nan,
        held_cells,
        score_sum / held_cells if held_cells else nan,
        seconds,
    )


def build_loader(
    args: argparse.Namespace,
    output: Output | None = None,
    transform: Callable[[dict[str, object]], object] | None = None,
    sharding: Sharding | None = None,
) -> RemoteLoader:
    """Return the training loader of the parsed arguments (rows with their global index).

    Parameters
    ----------
    args
        Parsed :func:`build_parser` arguments.
    output
        Tensor placement (e.g. a CUDA ``device``); None: CPU tensors.
    transform
        Called on each batch, as ``RemoteLoader``'s ``transform``.
    sharding
        This process's rank and the world size; None: from ``torch.distributed``
        when it is initialised, else the whole epoch.

    Raises
    ------
    AnnServeError
        If no server answers or it rejects the configuration.
    """
    return RemoteLoader(
        args.address,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        preload_nchunks=args.preload_nchunks,
        seed=args.seed,
        obs_keys=[args.label_key] if args.label_key else [],
        return_index=True,
        output=output or Output(),
        transform=transform,
        sharding=sharding or Sharding(),
    )


def describe(args: argparse.Namespace, loader: RemoteLoader, task: Task) -> str:
    """Return the line announcing what is trained on which store."""
    what = (
        f"a classifier of {args.label_key!r} ({len(task.categories)} classes)"
        if task.name == "classifier"
        else "an autoencoder"
    )
    return (
        f"{args.address}: {loader.n_obs} cells x {loader.n_vars} genes, {len(loader)} "
        f"batches of {args.batch_size}; training {what}"
    )


def epoch_line(task: Task, stats: EpochStats, epoch: int, epochs: int) -> str:
    """Return the progress line of one epoch (``epoch`` counted from 0)."""
    return (
        f"epoch {epoch + 1}/{epochs}  train loss {stats.train_loss:.4f}  "
        f"{task.metric} {stats.held_out:.4f}  {stats.cells_per_s:,.0f} cells/s "
        f"({stats.cells} cells in {stats.seconds:.2f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    """Train for ``--epochs`` epochs and print one line per epoch; return the exit code."""
    args = build_parser().parse_args(argv)
    if args.epochs <= 0:
        print(f"train: --epochs must be positive, got {args.epochs}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    # RemoteLoader yields torch sparse CSR tensors, which torch flags as beta once per process
    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
    try:
        loader = build_loader(args)
        task = make_task(args.address, args.label_key, loader.n_vars)
        print(describe(args, loader, task), flush=True)
        optimizer = torch.optim.Adam(task.model.parameters(), lr=args.lr)
        history = []
        for epoch in range(args.epochs):
            stats = run_epoch(loader, task, optimizer, epoch)
            history.append(stats)
            print(epoch_line(task, stats, epoch, args.epochs), flush=True)
    except AnnServeError as e:
        print(f"train: {e}", file=sys.stderr)
        return 1
    total_cells = sum(s.cells for s in history)
    total_s = sum(s.seconds for s in history)
    last = history[-1]
    print(
        f"done: {task.name}, {args.epochs} epochs, {total_cells} cells in {total_s:.2f} s "
        f"({total_cells / total_s:,.0f} cells/s); final train loss {last.train_loss:.4f}, "
        f"{task.metric} {last.held_out:.4f} on {last.held_out_cells} held-out cells"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
