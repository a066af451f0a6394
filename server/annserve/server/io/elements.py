"""Typed access to the elements of an AnnData store, h5py or zarr alike.

``group[key]`` of either library may return a group or an array (and zarr types it
so); these functions check which one a caller expects, so that reading code states its
expectation once and an unexpected layout is a :class:`~annserve.errors.StoreFormatError`
naming the element instead of an ``AttributeError`` deep in a read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeAlias

import h5py
import zarr

from annserve.errors import StoreFormatError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["ArrayNode", "GroupNode", "array_at", "attr_ints", "element_at", "group_at", "is_array"]

#: A group of an ``.h5ad`` file or a zarr store.
GroupNode: TypeAlias = h5py.Group | zarr.Group
#: An array of an ``.h5ad`` file or a zarr store.
ArrayNode: TypeAlias = h5py.Dataset | zarr.Array[Any]


def is_array(node: object) -> bool:
    """Whether ``node`` is an array (h5py dataset or zarr array) rather than a group."""
    return isinstance(node, h5py.Dataset | zarr.Array)


def element_at(group: GroupNode, key: str, where: str) -> GroupNode | ArrayNode:
    """Return the element ``group[key]``, a group or an array.

    Raises
    ------
    StoreFormatError
        If there is no such element.
    """
    if key not in group:
        msg = f"{where}: not an AnnData store (no {key!r} element)"
        raise StoreFormatError(msg)
    node: GroupNode | ArrayNode = group[key]
    return node


def group_at(group: GroupNode, key: str, where: str) -> GroupNode:
    """Return the group ``group[key]``.

    Raises
    ------
    StoreFormatError
        If there is no such element or it is an array.
    """
    node = element_at(group, key, where)
    if not isinstance(node, h5py.Group | zarr.Group):
        msg = f"{where}: {key!r} is not a group"
        raise StoreFormatError(msg)
    return node


def array_at(group: GroupNode, key: str, where: str) -> ArrayNode:
    """Return the array ``group[key]``.

    Raises
    ------
    StoreFormatError
        If there is no such element or it is a group.
    """
    node = element_at(group, key, where)
    if not isinstance(node, h5py.Dataset | zarr.Array):
        msg = f"{where}: {key!r} is not an array"
        raise StoreFormatError(msg)
    return node


def attr_ints(attrs: Mapping[str, object], key: str, where: str) -> tuple[int, ...]:
    """Return an attribute holding a list of integers (e.g. a sparse matrix's ``shape``).

    Raises
    ------
    StoreFormatError
        If the attribute is missing or not a list of integers.
    """
    value = attrs.get(key)
    try:
        if not isinstance(value, Iterable):
            raise TypeError  # noqa: TRY301  (one message for both failures)
        return tuple(int(v) for v in value)
    except (TypeError, ValueError) as e:
        msg = f"{where}: attribute {key!r} is {value!r}, not a list of integers"
        raise StoreFormatError(msg) from e
