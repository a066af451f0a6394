"""The annserve daemon: stores, samplers, preload buffers and the gRPC service."""

from annserve.server.io.store import Store, open_store
from annserve.server.plan.sampler import ChunkSampler, Sampler, WeightedSampler
from annserve.server.rpc.app import create_server

__all__ = ["ChunkSampler", "Sampler", "Store", "WeightedSampler", "create_server", "open_store"]
