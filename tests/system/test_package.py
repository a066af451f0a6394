"""Packaging facts: committed stubs are current, the client side stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUBS = ("annserve_pb2.py", "annserve_pb2.pyi", "annserve_pb2_grpc.py")


def test_regenerating_stubs_changes_nothing(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), str(tmp_path)],
        check=True,
        timeout=120,
    )
    for name in STUBS:
        fresh = (tmp_path / "annserve" / "v1" / name).read_text()
        committed = (ROOT / "src" / "annserve" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run python tools/gen_proto.py"


def test_client_import_pulls_no_store_libraries():
    code = (
        "import sys, annserve.client; "
        "print(','.join(m for m in ('anndata', 'zarr', 'h5py', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == ""


def test_generated_service_matches_registered_methods():
    from annserve.v1 import annserve_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["AnnServe"]
    assert {m.name for m in service.methods} == {"DescribeStore", "StreamBatches", "CountBatches"}
    assert service.full_name == "annserve.v1.AnnServe"
