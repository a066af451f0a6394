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
        ``{"X": CSRArrays | ndarray, "obs": DataFrame, "index"?: ndarray}``.
    to_dense
        Return X as a dense ``(n_rows, n_vars)`` float32 tensor even when it is sparse.
    pool
        Where the dense array comes from.

    Returns
    -------
    The same keys; ``X`` a sparse CSR or dense float32 tensor, ``index`` an int64 tensor.
    """
    out = dict(batch)
    x = batch["X"]
    if isinstance(x, CSRArrays):
        out["X"] = (
            _dense_from_csr(x, pool)
            if to_dense
            else torch.sparse_csr_tensor(
                torch.from_numpy(x.indptr),
                torch.from_numpy(x.indices),
                torch.from_numpy(x.data),
                size=x.shape,
                check_invariants=False,
            )
        )
    else:
        out["X"] = torch.from_numpy(x)
    if "index" in batch:
        out["index"] = torch.from_numpy(batch["index"])
    return out


def _dense_from_csr(x: CSRArrays, pool: BufferPool) -> torch.Tensor:
    dense = pool.empty(x.shape, np.float32)
    dense.fill(0)
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    dense[rows, x.indices] = x.data
    return torch.from_numpy(dense)


def to_device(batch: dict[str, object], device: torch.device) -> dict[str, object]:
    """Move the batch's tensors to ``device`` (non-blocking from pinned memory on CUDA)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
