"""``AnnServeSCVIDataModule``: train scvi-tools models from an annserve daemon.

scvi-tools 1.3 added ``model.train(datamodule=...)`` for data that is not an in-memory
AnnData (its lamindb ``MappedCollectionDataModule`` and ``TileDBDataModule``; 1.5 its
``AnnbatchDataModule``). Such a module gives the model a ``registry`` (what
``setup_anndata`` would have registered: genes, the batch and label categories) and
batches of registry keys: ``X`` (cells x genes, float32, dense) and ``batch`` /
``labels`` (codes of the obs columns, ``(cells, 1)``, int64). This module builds both
from the daemon's description of the store and each streamed batch::

    dm = AnnServeSCVIDataModule("127.0.0.1:50051", batch_key="batch", layer="counts")
    model = scvi.model.SCVI(registry=dm.registry)
    model.train(datamodule=dm, max_epochs=20)

Needs the ``lightning`` extra; scvi-tools itself is imported by the caller only (this
module reads its version from the installed distribution's metadata).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from annserve.client.lightning import AnnServeDataModule
from annserve.client.options import Output
from annserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import pandas as pd

#: Registry keys of scvi-tools (``scvi.REGISTRY_KEYS``) this module fills.
X_KEY, BATCH_KEY, LABELS_KEY = "X", "batch", "labels"


class AnnServeSCVIDataModule(AnnServeDataModule):
    """An :class:`~annserve.client.lightning.AnnServeDataModule` shaped for scvi-tools.

    Parameters
    ----------
    address
        Server address, ``host:port`` or ``unix:/path``, or several replicas, as
        :class:`~annserve.client.RemoteLoader`'s ``address``.
    batch_key
        Categorical obs column of the experimental batch (scvi's ``batch_key``); None:
        one batch (codes 0).
    labels_key
        Categorical obs column of the cell labels (scvi's ``labels_key``); None: one
        label (codes 0).
    unlabeled_category
        Label of unlabeled cells (semi-supervised models); appended to the categories
        of ``labels_key`` when absent. Cells whose label is missing get it.
    model_name
        scvi-tools model class the registry is for, e.g. ``"SCVI"``.
    batch_size, fractions, split_by, split_seed, seed
        As :class:`~annserve.client.lightning.AnnServeDataModule`; defaults are
        scvi-tools' (128 cells per batch, 90% train and 10% validation).
    loader
        Further :class:`~annserve.client.RemoteLoader` arguments (``store``,
        ``layer="counts"``, ``var_names``, ``connection``, ...). X is always served
        dense: scvi-tools' modules take dense tensors.

    Raises
    ------
    InvalidRequestError
        If ``batch_key`` or ``labels_key`` is not a categorical obs column of the store
        (naming the store's categorical columns), or as the parent class.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        batch_key: str | None = None,
        labels_key: str | None = None,
        unlabeled_category: str = "Unknown",
        model_name: str = "SCVI",
        batch_size: int = 128,
        fractions: tuple[float, ...] = (0.9, 0.1),
        split_by: str | None = None,
        split_seed: int = 0,
        seed: int = 0,
        loader: Mapping[str, Any] | None = None,
    ) -> None:
        args = dict(loader or {})
        keys = [k for k in (batch_key, labels_key) if k is not None]
        args["obs_keys"] = list(dict.fromkeys([*args.get("obs_keys", ()), *keys]))
        args["output"] = dataclasses.replace(args.get("output", Output()), to_dense=True)
        super().__init__(
            address,
            batch_size=batch_size,
            fractions=fractions,
            split_by=split_by,
            split_seed=split_seed,
            seed=seed,
            loader=args,
        )
        self.batch_key, self.labels_key = batch_key, labels_key
        self.unlabeled_category, self.model_name = unlabeled_category, model_name
        self._categories = {k: self._store_categories(k) for k in keys}

    def _store_categories(self, key: str) -> list[str]:
        info = self._facts()._info  # the store's description (DescribeStore)
        columns = {c.name: c for c in info.obs_columns if c.dtype == "category"}
        if key not in columns:
            msg = f"{key!r} is not a categorical obs column; the store's are {sorted(columns)}"
            raise InvalidRequestError(msg)
        return list(columns[key].categories)

    # --- what scvi-tools reads -------------------------------------------------
    @property
    def batch_labels(self) -> np.ndarray:
        """Categories of ``batch_key`` in code order (``["0"]`` without one), object array."""
        cats = self._categories.get(self.batch_key, ["0"]) if self.batch_key else ["0"]
        return np.array(cats, dtype=object)

    @property
    def labels(self) -> np.ndarray:
        """Categories of ``labels_key`` in code order, then ``unlabeled_category``, object array."""
        if self.labels_key is None:
            return np.array(["0"], dtype=object)
        cats = self._categories[self.labels_key]
        extra = [] if self.unlabeled_category in cats else [self.unlabeled_category]
        return np.array([*cats, *extra], dtype=object)

    @property
    def n_batch(self) -> int:
        """Number of batches (categories of ``batch_key``)."""
        return len(self.batch_labels)

    @property
    def n_labels(self) -> int:
        """Number of labels, ``unlabeled_category`` included."""
        return len(self.labels)

    @property
    def registry(self) -> dict[str, Any]:
        """The registry of a ``setup_datamodule`` model: pass it as ``SCVI(registry=...)``.

        Laid out as scvi-tools' own custom data modules lay it out (1.3/1.4
        ``MappedCollectionDataModule``): X, batch and labels registered, the other
        fields (sample, size factor, extra covariates) empty.
        """
        empty: dict[str, Any] = {"data_registry": {}, "state_registry": {}, "summary_stats": {}}
        return {
            "scvi_version": importlib.metadata.version("scvi-tools"),
            "model_name": self.model_name,
            "setup_args": {
                "layer": self.loader_args.get("layer"),
                "batch_key": self.batch_key,
                "labels_key": self.labels_key,
                "size_factor_key": None,
                "categorical_covariate_keys": None,
                "continuous_covariate_keys": None,
            },
            "field_registries": {
                X_KEY: {
                    "data_registry": {"attr_name": "X", "attr_key": None},
                    "state_registry": {
                        "n_obs": self.n_obs,
                        "n_vars": self.n_vars,
                        "column_names": np.array(self.var_names, dtype=object),
                    },
                    "summary_stats": {"n_vars": self.n_vars, "n_cells": self.n_obs},
                },
                BATCH_KEY: {
                    "data_registry": {"attr_name": "obs", "attr_key": "_scvi_batch"},
                    "state_registry": {
                        "categorical_mapping": self.batch_labels,
                        "original_key": self.batch_key or "_scvi_batch",
                    },
                    "summary_stats": {"n_batch": self.n_batch},
                },
                LABELS_KEY: {
                    "data_registry": {"attr_name": "obs", "attr_key": "_scvi_labels"},
                    "state_registry": {
                        "categorical_mapping": self.labels,
                        "original_key": self.labels_key or "_scvi_labels",
                        "unlabeled_category": self.unlabeled_category,
                    },
                    "summary_stats": {"n_labels": self.n_labels},
                },
                "size_factor": dict(empty),
                "extra_categorical_covs": {
                    **empty,
                    "summary_stats": {"n_extra_categorical_covs": 0},
                },
                "extra_continuous_covs": {
                    **empty,
                    "summary_stats": {"n_extra_continuous_covs": 0},
                },
            },
            "setup_method_name": "setup_datamodule",
        }

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Turn a streamed batch into scvi-tools' tensors: ``X``, ``batch``, ``labels``.

        Raises
        ------
        InvalidRequestError
            If a cell's ``batch_key`` value is missing (scvi-tools has no code for it).
        """
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        x: torch.Tensor = batch["X"]
        obs: pd.DataFrame = batch["obs"]
        n = x.shape[0]
        codes = np.zeros(n, dtype=np.int64)
        if self.batch_key is not None:
            codes = np.asarray(obs[self.batch_key].cat.codes, dtype=np.int64)
            if (codes < 0).any():
                msg = f"batch_key {self.batch_key!r}: a cell has no value (scvi needs one)"
                raise InvalidRequestError(msg)
        labels = np.zeros(n, dtype=np.int64)
        if self.labels_key is not None:
            labels = np.asarray(obs[self.labels_key].cat.codes, dtype=np.int64)
            unlabeled = list(self.labels).index(self.unlabeled_category)
            labels[labels < 0] = unlabeled
        return {
            X_KEY: x.float(),
            BATCH_KEY: torch.from_numpy(codes)[:, None],
            LABELS_KEY: torch.from_numpy(labels)[:, None],
        }
