"""One save/resume harness for every sampler and for sharded loaders."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from annserve.client import Balanced, RemoteLoader, Sharding, Split
from annserve.errors import InvalidRequestError
from conftest import real_path

CONFIGS = {
    "chunk-shuffled": {},
    "sequential": {"shuffle": False},
    "drop-last": {"drop_last": True},
    "weighted": {"balance": Balanced("patient", num_samples=300)},
    "split-by-patient": {"split": Split("train", by="patient", seed=3)},
    "sharded-uneven": {"sharding": Sharding(rank=1, world_size=3, even_batches=False)},
    "sharded-even": {"sharding": Sharding(rank=2, world_size=3)},
}
BASE = {
    "batch_size": 16,
    "chunk_size": 4,
    "preload_nchunks": 3,
    "seed": 11,
    "return_index": True,
}


def signature(batch) -> tuple[bytes, bytes]:
    """What makes a batch that batch: its rows and its values, in order."""
    x = batch["X"]
    return batch["index"].numpy().tobytes(), x.values().numpy().tobytes()


def run(loader) -> list[tuple[bytes, bytes]]:
    return [signature(b) for b in loader]


@pytest.mark.parametrize("k", [0, 1, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_after_k_batches_matches_an_uninterrupted_run(serve, name, k):
    path = real_path("wu2020")
    options = {**BASE, **CONFIGS[name]}
    first_server, restarted_server = serve(path), serve(path)
    full = RemoteLoader(first_server, **options)
    full.set_epoch(2)
    expected = run(full)
    assert len(expected) > k

    interrupted = RemoteLoader(first_server, **options)
    interrupted.set_epoch(2)
    batches = iter(interrupted)
    head = [signature(next(batches)) for _ in range(k)]
    batches.close()
    state = interrupted.state_dict()

    resumed = RemoteLoader(restarted_server, **options)  # another server, same store
    resumed.load_state_dict(state)
    assert head + run(resumed) == expected
    assert resumed.epoch == 3


def test_resume_in_a_fresh_process(serve):
    address = serve(real_path("wu2020"))
    loader = RemoteLoader(address, **BASE)
    expected = [b["index"].numpy().tolist() for b in loader]
    loader.set_epoch(0)
    batches = iter(loader)
    next(batches), next(batches)
    batches.close()
    state = loader.state_dict()
    code = f"""
import json, sys
from annserve.client import RemoteLoader
loader = RemoteLoader({address!r}, **{ {k: v for k, v in BASE.items()}!r})
loader.load_state_dict(json.loads(sys.stdin.read()))
print(json.dumps([b["index"].numpy().tolist() for b in loader]))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(state),
        text=True,
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert json.loads(out.stdout) == expected[2:]


def test_state_of_another_configuration_is_refused(serve):
    address = serve(real_path("wu2020"))
    state = RemoteLoader(address, **BASE).state_dict()
    with pytest.raises(InvalidRequestError, match="state_dict"):
        RemoteLoader(address, **{**BASE, "batch_size": 17}).load_state_dict(state)


def test_position_skips_without_reading_everything(serve):
    address = serve(real_path("wu2020"))
    loader = RemoteLoader(address, **BASE)
    state = {**loader.state_dict(), "batch": len(loader) - 1}
    loader.load_state_dict(state)
    rest = run(loader)
    assert len(rest) == 1
    np.testing.assert_equal(len(np.frombuffer(rest[0][0], dtype=np.int64)), 200 - 16 * 12)
