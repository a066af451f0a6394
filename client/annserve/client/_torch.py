"""Convert numpy minibatches to torch tensors and move them to a device."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from annserve.client._assemble import CSRArrays

if TYPE_CHECKING:
    from annserve.buffers import BufferPool


def to_torch(batch: dict[str, object], *, to_dense: bool, pool: BufferPool) -> dict[str, object]:
    """Wrap a numpy batch as torch tensors, sharing memory where possible.

    Parameters
    ----------
    batch
        ``{"X": CSRArrays | ndarray, "obs": DataFrame, "obsm"?: {name: CSRArrays |
        ndarray}, "index"?: ndarray}``.
    to_dense
        Return X as a dense ``(n_rows, n_vars)`` tensor even when it is sparse.
    pool
        Where the dense array comes from.

    Returns
    -------
    The same keys; ``X`` and each obsm array a sparse CSR or dense tensor of the
    values' dtype, ``index`` an int64 tensor. An X staged for device assembly
    (:class:`annserve.client._device.StagedCSR`) is left as it is.
    """
    out = dict(batch)
    x = batch["X"]
    if isinstance(x, CSRArrays | np.ndarray):  # else staged for device assembly (_device)
        dense = to_dense and isinstance(x, CSRArrays)
        out["X"] = _dense_from_csr(x, pool) if isinstance(x, CSRArrays) and dense else _tensor(x)
    obsm = batch.get("obsm")
    if isinstance(obsm, dict):
        out["obsm"] = {k: _tensor(v) for k, v in obsm.items()}
    if "index" in batch:
        out["index"] = torch.from_numpy(batch["index"])
    return out


def _tensor(x: CSRArrays | np.ndarray) -> torch.Tensor:
    """Wrap a dense array or CSR arrays as a torch tensor without copying."""
    if not isinstance(x, CSRArrays):
        return torch.from_numpy(x)
    return torch.sparse_csr_tensor(
        torch.from_numpy(x.indptr),
        torch.from_numpy(x.indices),
        torch.from_numpy(x.data),
        size=x.shape,
        check_invariants=False,
    )


def _dense_from_csr(x: CSRArrays, pool: BufferPool) -> torch.Tensor:
    dense = pool.empty(x.shape, x.data.dtype)
    dense.fill(0)
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    dense[rows, x.indices] = x.data
    return torch.from_numpy(dense)


def to_device(batch: dict[str, object], device: torch.device) -> dict[str, object]:
    """Move the batch's tensors to ``device`` (non-blocking from pinned memory on CUDA)."""
    return {k: _to(v, device) for k, v in batch.items()}


def _to(value: object, device: torch.device) -> object:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):  # obsm
        return {k: _to(v, device) for k, v in value.items()}
    return value
