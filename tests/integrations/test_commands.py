"""``annserve inspect STORE`` and ``annserve bench ADDRESS`` print what they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from annserve.cli import main
from conftest import real_path

COMMAND_TIMEOUT_S = 120  # a subprocess imports torch and grpc on a busy 2-core machine


def test_inspect_h5ad(capsys):
    assert main(["inspect", str(real_path("pbmc3k"))]) == 0
    out = capsys.readouterr().out
    assert "2,700 x 32,738 in 1 group(s)" in out
    assert "X              csr float32, 32,738 columns" in out
    assert "barcode (str)" in out
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert "direct 1/1" in lines["X/data"]  # uncompressed h5ad: read by preadv
    assert "direct 1/1" in lines["X/indices"]
    assert "held in memory" in lines["X/indptr"]
    assert lines["direct"].split()[-1] == "X"


def test_inspect_zarr_json(capsys, zarr_stores):
    path = zarr_stores("wu2020", 3)  # written by anndata: compressed chunks
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["n_obs"], info["n_vars"], info["groups"]) == (200, 30727, 1)
    assert info["matrices"]["X"] == {"layout": "csr", "dtype": "float32", "n_cols": 30727}
    assert info["obs"]["patient"] == "category"
    data = info["arrays"]["X/data"]
    assert data["codecs"]  # a compressor: zarr decodes it, no direct read
    assert data["direct"] == 0


def test_inspect_missing_store(capsys, tmp_path):
    assert main(["inspect", str(tmp_path / "absent.h5ad")]) == 3
    assert "store not found" in capsys.readouterr().err


def test_bench_json(serve, capsys):
    address = serve(real_path("mouse10x"))
    argv = ["bench", address, "--batches", "5", "--batch-size", "256", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["batches"] == 5
    assert result["cells"] == 5 * 256
    assert (result["n_obs"], result["n_vars"]) == (10_000, 1000)
    for key in ("cells_per_s", "mb_per_s", "first_batch_s", "cpu_us_per_cell"):
        assert result[key] > 0, key
    assert main(["bench", "127.0.0.1:1", "--timeout", "0.5"]) == 3  # nothing listening
    assert main(["bench", address, "--batches", "0"]) == 2


def test_bench_console_script_runs_past_the_epoch(serve):
    script = Path(sys.executable).with_name("annserve")
    if not script.exists():
        pytest.skip("the annserve console script is not installed next to this interpreter")
    address = serve(real_path("wu2020"))  # 200 cells: 7 batches of 64 span two epochs
    proc = subprocess.run(
        [str(script), "bench", address, "--batches", "7", "--batch-size", "64"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr
    assert "batches       7 (" in proc.stdout
    for label in ("first batch", "cells/s", "MB/s", "client CPU"):
        assert label in proc.stdout
    assert "7/7" in proc.stderr  # the progress bar
    assert "UserWarning" not in proc.stderr
    help_text = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    ).stdout
    assert "--store" in help_text  # the daemon's command line is unchanged
    assert "bench ADDRESS" in help_text
