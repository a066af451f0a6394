"""Trainer-side client of annserve (imports grpcio, protobuf, numpy, pandas, torch only)."""

from annserve.client._assemble import CSRArrays
from annserve.client.loader import RemoteLoader

__all__ = ["CSRArrays", "RemoteLoader"]
