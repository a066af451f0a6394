from __future__ import annotations

import numpy as np
import pytest
import torch

from annserve.client import Output, RemoteLoader
from annserve.errors import InvalidRequestError
from conftest import real_path

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("to_dense", [False, True])
def test_batches_arrive_on_the_gpu(serve, real_adata, to_dense):
    adata = real_adata("wu2020")
    loader = RemoteLoader(
        serve(real_path("wu2020")),
        batch_size=64,
        return_index=True,
        output=Output(device="cuda", to_dense=to_dense),
        seed=0,
    )
    for batch in loader:
        assert batch["X"].is_cuda
        assert batch["index"].is_cuda
        idx = batch["index"].cpu().numpy()
        np.testing.assert_array_equal(batch["X"].to_dense().cpu().numpy(), adata.X[idx].toarray())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_a_device_is_a_clear_error(serve):
    with pytest.raises(InvalidRequestError, match="CUDA"):
        RemoteLoader(serve(real_path("wu2020")), output=Output(device="cuda"))
