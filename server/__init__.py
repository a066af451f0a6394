"""The annserve daemon: stores, samplers, preload buffers and the gRPC service."""

from annserve.server.app import create_server
from annserve.server.sampler import ChunkSampler, Sampler, WeightedSampler
from annserve.server.store import Store, open_store

__all__ = ["ChunkSampler", "Sampler", "Store", "WeightedSampler", "create_server", "open_store"]
