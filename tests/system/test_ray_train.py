"""Ray Train: a TorchTrainer of two CPU workers trains examples/train_ray.py against two replicas.

The same checks as the torchrun example (:class:`test_torchrun.DistributedExampleChecks`):
each worker builds its loader with ``Sharding`` from Ray Train's context. Skipped where
``ray[train]`` is not installed (it is no dependency of annserve's, nor of its test extra).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import pytest
from test_torchrun import ROOT, DistributedExampleChecks, Run, run_example

if TYPE_CHECKING:
    from collections.abc import Iterator

pytest.importorskip("ray.train", reason="ray[train] not installed")

#: seconds for the whole run: Ray starts its services and two worker processes first
RAY_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    out = tmp_path_factory.mktemp("ray")
    launcher = [
        *(sys.executable, str(ROOT / "examples" / "train_ray.py")),
        *("--workers", "2", "--storage-path", str(out / "ray-results")),
    ]
    yield from run_example(out, launcher, RAY_TIMEOUT)


class TestRayTrain(DistributedExampleChecks):
    """The checks of every distributed example, on Ray Train's workers."""
