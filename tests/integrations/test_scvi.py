"""scvi-tools' SCVI trained through AnnServeSCVIDataModule (the ``datamodule=`` contract).

A bounded run on mouse10x (10,000 cells x 1,000 genes of counts; 3 epochs of 12
steps): the training ELBO of the last epoch is below that of the first. On wu2020 the
batch and label codes of each batch are those of the store's obs columns.
"""

from __future__ import annotations

import numpy as np
import pytest

from annserve.client import Connection, Sharding
from conftest import real_path

scvi = pytest.importorskip("scvi")
from annserve.client.scvi import AnnServeSCVIDataModule  # noqa: E402 (needs lightning)

pytestmark = [
    # scvi warns that a model built from a registry initialises its module on train; its
    # dependencies warn on import and about the CPU-only trainer
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]
CONNECTION = Connection(timeout=30.0)


@pytest.mark.slow
def test_scvi_elbo_falls(serve):
    dm = AnnServeSCVIDataModule(
        serve(real_path("mouse10x")), batch_size=256, seed=0, loader={"connection": CONNECTION}
    )
    assert dm.n_vars == 1000
    assert dm.n_obs == 10_000
    model = scvi.model.SCVI(registry=dm.registry, n_latent=8)
    model.train(
        datamodule=dm,
        max_epochs=3,
        limit_train_batches=12,  # bounded: 36 steps of 256 cells
        limit_val_batches=1,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        check_val_every_n_epoch=1,
    )
    elbo = model.history["elbo_train"].to_numpy(dtype=float).ravel()
    assert len(elbo) == 3
    assert np.isfinite(elbo).all()
    assert elbo[-1] < elbo[0]
    assert "elbo_validation" in model.history


def test_batch_and_label_codes_are_the_stores(serve, real_adata):
    adata = real_adata("wu2020")
    dm = AnnServeSCVIDataModule(
        serve(real_path("wu2020")),
        batch_key="batch",
        labels_key="cluster_orig",
        batch_size=50,
        loader={"return_index": True, "connection": CONNECTION},
    )
    assert dm.n_batch == adata.obs["batch"].cat.categories.size
    assert list(dm.labels[:-1]) == list(adata.obs["cluster_orig"].cat.categories)
    assert dm.labels[-1] == "Unknown"
    registry = dm.registry
    assert registry["field_registries"]["batch"]["summary_stats"]["n_batch"] == dm.n_batch
    loader = dm._make("train", Sharding(rank=0, world_size=1))
    for n, raw in enumerate(loader):
        assert n < 20
        index = raw["index"].numpy()
        tensors = dm.on_before_batch_transfer(raw, 0)
        assert tensors["X"].shape == (len(index), adata.n_vars)
        assert tensors["batch"].shape == (len(index), 1)
        np.testing.assert_array_equal(
            tensors["batch"][:, 0].numpy(), adata.obs["batch"].cat.codes.to_numpy()[index]
        )
        np.testing.assert_array_equal(
            tensors["labels"][:, 0].numpy(), adata.obs["cluster_orig"].cat.codes.to_numpy()[index]
        )
        np.testing.assert_array_equal(tensors["X"].numpy(), adata.X[index].toarray())
