"""The annserve daemon: stores, samplers, preload buffers and the gRPC service."""

from annserve.server.rpc.app import create_server
from annserve.server.plan.sampler import ChunkSampler, Sampler, WeightedSampler
from annserve.server.io.store import Store, open_store

__all__ = ["ChunkSampler", "Sampler", "Store", "WeightedSampler", "create_server", "open_store"]
