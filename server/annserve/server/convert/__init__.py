"""``annserve convert``: write AnnData inputs into one preshuffled zarr collection.

The offline writer, apart from the serving path: it shares with the daemon only
the store format (:mod:`annserve.server.format`) and the zarr adapter.
"""

from annserve.server.convert.cli import convert_main
from annserve.server.convert.manifest import GroupEntry, Manifest, SourceEntry, read_manifest
from annserve.server.convert.pipeline import OutputExistsError, convert

__all__ = [
    "GroupEntry",
    "Manifest",
    "OutputExistsError",
    "SourceEntry",
    "convert",
    "convert_main",
    "read_manifest",
]
