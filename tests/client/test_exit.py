"""A training script that ends with its loader's stream still open exits at once.

Each script runs in its own interpreter against a real server of this process, takes
a few batches, prints ``ready`` and ends without closing the iterator; the time from
``ready`` to the process's exit is what is measured.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from conftest import real_path

EXIT_LIMIT_S = 5.0  # seconds from the script's last line to its exit
START_TIMEOUT_S = 60.0  # seconds to import torch and take the first batches (2 busy cores)

LOADER = """
import sys
from annserve.client import Output, RemoteLoader
loader = RemoteLoader(
    sys.argv[1], batch_size=16, chunk_size=16, preload_nchunks=2, seed=0,
    output=Output(to_torch={to_torch}),
)
"""
SCRIPTS = {
    "iterator": "it = iter(loader)\nfor _ in range(3):\n    next(it)\n",
    "dataloader": (
        "from torch.utils.data import DataLoader\n"
        "it = iter(DataLoader(loader, batch_size=None, num_workers=0))\n"
        "for _ in range(3):\n    next(it)\n"
    ),
    "abandoned-generator": (
        "def batches():\n    yield from loader\n"
        "gen = batches()\n"
        "for i, _ in enumerate(gen):\n    if i == 3:\n        break\n"
    ),
    "max-steps-in-a-function": (
        "def train(max_steps):\n"
        "    it = iter(loader)\n"
        "    for _ in range(max_steps):\n        next(it)\n"
        "    return it\n"
        "kept = train(3)\n"
    ),
}


def seconds_to_exit(script: str, address: str) -> float:
    """Run ``script``; return seconds from its ``ready`` line to its exit (code 0)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script + "print('ready', flush=True)\n", address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "ready\n", proc.communicate(timeout=START_TIMEOUT_S)
        ready = time.monotonic()
        _, err = proc.communicate(timeout=EXIT_LIMIT_S)
        elapsed = time.monotonic() - ready
    except subprocess.TimeoutExpired:
        pytest.fail(f"the script did not exit within {EXIT_LIMIT_S} s of its last line")
    finally:
        proc.kill()
        proc.communicate(timeout=START_TIMEOUT_S)
    assert proc.returncode == 0, err
    return elapsed


@pytest.mark.parametrize("to_torch", [True, False], ids=["torch", "numpy"])
@pytest.mark.parametrize("pattern", list(SCRIPTS))
def test_script_ending_with_the_stream_open_exits_within_seconds(serve, pattern, to_torch):
    address = serve(real_path("pbmc3k"))
    script = textwrap.dedent(LOADER.format(to_torch=to_torch)) + SCRIPTS[pattern]
    assert seconds_to_exit(script, address) < EXIT_LIMIT_S
