"""Trainer-side client of annserve (imports grpcio, protobuf, numpy, pandas, torch only)."""

from annserve.client._assemble import CSRArrays
from annserve.client.loader import RemoteLoader
from annserve.client.options import Balanced, Connection, Output, Sharding, Split

__all__ = ["Balanced", "CSRArrays", "Connection", "Output", "RemoteLoader", "Sharding", "Split"]
