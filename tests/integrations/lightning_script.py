"""Train a tiny model through AnnServeDataModule; run by test_lightning.py.

``python lightning_script.py ADDRESS OUT PHASE``: PHASE ``full`` trains one epoch,
``interrupted`` saves a checkpoint after STEPS_BEFORE_CHECKPOINT steps and stops
after STOP_AT, ``resumed`` continues from that checkpoint. Lightning's DDP launcher
runs this script again for rank 1. Each rank writes the rows of every batch it trained
on to ``OUT/PHASE.rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from annserve.client import Connection
from annserve.client.lightning import AnnServeDataModule

STEPS_BEFORE_CHECKPOINT = 5
STOP_AT = 8


class Model(L.LightningModule):
    def __init__(self, n_vars: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(n_vars, 4)
        self.rows: list[list[int]] = []
        self.val_batches = 0

    def training_step(self, batch, batch_idx):
        self.rows.append(batch["index"].tolist())
        return self.layer(torch.log1p(batch["X"].to_dense())).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)

    def on_fit_end(self):
        path = Path(OUT) / f"{PHASE}.rank{self.global_rank}.json"
        record = {"rows": self.rows, "world_size": self.trainer.world_size}
        path.write_text(json.dumps({**record, "val_batches": self.val_batches}))


class StopAt(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= STOP_AT:
            trainer.should_stop = True


if __name__ == "__main__":
    ADDRESS, OUT, PHASE = sys.argv[1:4]
    dm = AnnServeDataModule(
        ADDRESS,
        batch_size=64,
        split_by="barcode",  # pbmc3k's one obs column: every cell drawn on its own
        seed=11,
        loader={"return_index": True, "connection": Connection(timeout=30.0)},
    )
    callbacks: list[L.Callback] = []
    if PHASE == "interrupted":
        callbacks = [
            ModelCheckpoint(
                dirpath=Path(OUT) / "ckpt",
                filename="{step}",
                every_n_train_steps=STEPS_BEFORE_CHECKPOINT,
                save_top_k=-1,
            ),
            StopAt(),
        ]
    trainer = L.Trainer(
        max_epochs=1,
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=PHASE == "interrupted",
        num_sanity_val_steps=0,
        default_root_dir=OUT,
    )
    ckpt = Path(OUT) / "ckpt" / f"step={STEPS_BEFORE_CHECKPOINT}.ckpt"
    trainer.fit(Model(dm.n_vars), datamodule=dm, ckpt_path=ckpt if PHASE == "resumed" else None)
