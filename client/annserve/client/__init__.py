"""Trainer-side client of annserve (imports grpcio, protobuf, numpy, pandas, torch only)."""

from annserve.client._assemble import CSRArrays
from annserve.client.loader import RemoteLoader
from annserve.client.options import Balanced, Split

__all__ = ["Balanced", "CSRArrays", "RemoteLoader", "Split"]
