"""``AnnServeDataModule``: annserve's loaders as a Lightning ``LightningDataModule``.

Needs the ``lightning`` extra (``pip install 'annserve[client,lightning]'``). The train,
val and test loaders are :class:`~annserve.client.RemoteLoader` streams of one
deterministic split of the store (:class:`~annserve.client.Split`, by blocks of rows
or by an obs column), each rank of a DDP run streaming its own shard (rank and world
size from the trainer). Checkpoints carry the position of the train stream, so
``trainer.fit(model, datamodule, ckpt_path=...)`` resumes mid-epoch with exactly the
batches the interrupted run had not trained on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningDataModule

from annserve.client.loader import RemoteLoader
from annserve.client.options import Sharding, Split
from annserve.errors import InvalidRequestError
from annserve.sampling import DEFAULT_SPLIT_FRACTIONS, SPLIT_NAMES

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping, Sequence

#: RemoteLoader arguments the data module sets itself.
_OWN_ARGUMENTS = frozenset({"batch_size", "shuffle", "seed", "split", "sharding", "drop_last"})


class AnnServeDataModule(LightningDataModule):
    """Train, val and test splits of an annserve store for a Lightning ``Trainer``.

    Parameters
    ----------
    address
        Server address, ``host:port`` or ``unix:/path``, or several replicas, as
        :class:`~annserve.client.RemoteLoader`'s ``address``.
    batch_size
        Rows (cells) per training batch.
    eval_batch_size
        Rows per val/test batch; None: ``batch_size``.
    fractions
        Expected share of rows of train, val (and test), adding up to 1; the splits
        are disjoint and computed by the server (:class:`~annserve.client.Split`).
    split_by
        obs column whose values go to one split whole (e.g. ``"donor"``); None assigns
        blocks of 1,024 contiguous rows.
    split_seed
        Seed of the split assignment.
    seed
        Seed of the training order (an int: a resumed run must draw the same one); with
        the trainer's epoch it fixes each epoch's order.
    drop_last
        Drop each training epoch's final short batch.
    even_batches
        Give every DDP rank the same number of batches (as ``DistributedSampler``: the
        epoch's first rows pad the last shard); uneven counts make DDP hang.
    loader
        Further :class:`~annserve.client.RemoteLoader` arguments, the same for every
        split (``store``, ``layer``, ``var_names``, ``obs_keys``, ``output``,
        ``connection``, ``transform``, ...); not those set here (``batch_size``,
        ``shuffle``, ``seed``, ``split``, ``sharding``, ``drop_last``).

    Raises
    ------
    InvalidRequestError
        If ``loader`` names an argument set here, or ``fractions`` does not have 2 or
        3 entries.

    Examples
    --------
    >>> dm = AnnServeDataModule("127.0.0.1:50051", batch_size=1024, split_by="donor")
    >>> trainer = lightning.Trainer(max_epochs=10, strategy="ddp", devices=2)
    >>> trainer.fit(model, datamodule=dm)  # later: trainer.fit(..., ckpt_path="last.ckpt")
    """

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        batch_size: int = 4096,
        eval_batch_size: int | None = None,
        fractions: tuple[float, ...] = DEFAULT_SPLIT_FRACTIONS,
        split_by: str | None = None,
        split_seed: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        even_batches: bool = True,
        loader: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        clash = sorted(_OWN_ARGUMENTS & set(loader or {}))
        if clash:
            msg = f"loader: {clash} are set by AnnServeDataModule's own arguments"
            raise InvalidRequestError(msg)
        if not 2 <= len(fractions) <= len(SPLIT_NAMES):
            msg = f"fractions: 2 or 3 shares (train, val[, test]), got {list(fractions)}"
            raise InvalidRequestError(msg)
        self.address = address
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.fractions, self.split_by, self.split_seed = tuple(fractions), split_by, split_seed
        self.seed, self.drop_last, self.even_batches = seed, drop_last, even_batches
        self.loader_args = dict(loader or {})
        self._loaders: dict[str, RemoteLoader] = {}
        self._probe: RemoteLoader | None = None
        self._sharding: Sharding | None = None
        self._epoch = 0  # epoch the train stream is in
        self._trained = 0  # batches of it handed to the training loop
        self._resume: dict[str, int] | None = None  # from a checkpoint, for the next epoch

    # --- store facts (no trainer needed) -----------------------------------------
    @property
    def n_obs(self) -> int:
        """Rows (cells) in the store, all splits together."""
        return self._facts().n_obs

    @property
    def n_vars(self) -> int:
        """Genes of each row of X (the ``var_names`` subset's, when one is asked for)."""
        return self._facts().n_vars

    @property
    def var_names(self) -> list[str]:
        """Gene names of X's columns, length ``n_vars``."""
        return self._facts().var_names

    def _facts(self) -> RemoteLoader:
        if self._probe is None:
            self._probe = self._make("train", Sharding(rank=0, world_size=1))
        return self._probe

    # --- Lightning hooks -----------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Take this process's rank and the world size from the trainer."""
        trainer = self.trainer
        if trainer is not None:
            self._sharding = Sharding(
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                even_batches=self.even_batches,
            )

    def train_dataloader(self) -> Iterable[Any]:
        """Return the train split's stream: one epoch per pass, the trainer's epoch."""
        return _TrainEpochs(self, self._loader("train"))

    def val_dataloader(self) -> Iterable[Any]:
        """Return the val split's stream, unshuffled, the same rows each pass."""
        return _EvalPasses(self._loader("val"))

    def test_dataloader(self) -> Iterable[Any]:
        """Return the test split's stream (needs three ``fractions``).

        Raises
        ------
        InvalidRequestError
            If ``fractions`` has no test share.
        """
        if len(self.fractions) < len(SPLIT_NAMES):
            msg = f"test_dataloader: fractions {list(self.fractions)} have no test share"
            raise InvalidRequestError(msg)
        return _EvalPasses(self._loader("test"))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches the loop takes (Lightning fetches one ahead)."""
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self._trained += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Return the train stream's position: ``{"seed", "epoch", "batch"}``.

        ``batch`` counts the batches of ``epoch`` handed to the training loop, not those
        Lightning has fetched ahead, so a resumed run trains on the next one.
        """
        return {"seed": self.seed, "epoch": self._epoch, "batch": self._trained}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the train stream where :meth:`state_dict` was taken.

        Raises
        ------
        InvalidRequestError
            If the state was saved with another ``seed`` (it would resume another order).
        """
        if state_dict["seed"] != self.seed:
            msg = (
                f"state_dict was saved with seed {state_dict['seed']}, this module has {self.seed}"
            )
            raise InvalidRequestError(msg)
        self._resume = {"epoch": int(state_dict["epoch"]), "batch": int(state_dict["batch"])}

    # --- loaders -------------------------------------------------------------------
    def _loader(self, split: str) -> RemoteLoader:
        if split not in self._loaders:
            self._loaders[split] = self._make(split, self._sharding or Sharding())
        return self._loaders[split]

    def _make(self, split: str, sharding: Sharding) -> RemoteLoader:
        train = split == "train"
        return RemoteLoader(
            self.address,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=self.drop_last and train,
            seed=self.seed,
            split=Split(split, self.fractions, self.split_by, self.split_seed),
            sharding=sharding,
            **self.loader_args,
        )

    def _start_epoch(self, loader: RemoteLoader) -> None:
        """Point the train stream at the trainer's epoch, or at the checkpoint's batch."""
        epoch = self.trainer.current_epoch if self.trainer is not None else self._epoch
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] == epoch:
            state = loader.state_dict()
            loader.load_state_dict({**state, "epoch": epoch, "batch": resume["batch"]})
        else:
            loader.set_epoch(epoch)
        self._epoch, self._trained = epoch, loader.state_dict()["batch"]


class _TrainEpochs:
    """The train stream as Lightning iterates it: each pass streams the trainer's epoch."""

    def __init__(self, module: AnnServeDataModule, loader: RemoteLoader) -> None:
        self.module, self.loader = module, loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        # a generator: Lightning may call iter() before the epoch starts; the stream is
        # pointed (and a checkpoint's position taken) only once batches are asked for
        self.module._start_epoch(self.loader)
        yield from self.loader


class _EvalPasses:
    """A val/test stream: every pass the same rows in the same order (epoch 0, unshuffled)."""

    def __init__(self, loader: RemoteLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        self.loader.set_epoch(0)
        return iter(self.loader)
