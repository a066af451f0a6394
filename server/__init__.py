"""The annserve daemon: stores, samplers, preload buffers and the gRPC service."""

from annserve.server.app import create_server
from annserve.server.sampler import ChunkSampler, Sampler
from annserve.server.store import Store, open_store

__all__ = ["Store", "ChunkSampler", "Sampler", "create_server", "open_store"]
