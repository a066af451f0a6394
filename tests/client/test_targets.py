"""Addresses naming several replicas become one gRPC target."""

from __future__ import annotations

import pytest

from annserve.client._rpc import grpc_target, several_replicas
from annserve.errors import InvalidRequestError


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("dns:///annserve.ml.svc:50051", "dns:///annserve.ml.svc:50051"),
        (["127.0.0.1:5000", "10.0.0.2:5001"], "ipv4:127.0.0.1:5000,10.0.0.2:5001"),
        (["localhost:5000", "127.0.0.2:5000"], "ipv4:127.0.0.1:5000,127.0.0.2:5000"),
        (["[::1]:5000", "[fe80::1]:5001"], "ipv6:[::1]:5000,[fe80::1]:5001"),
        (("10.0.0.1:1",), "ipv4:10.0.0.1:1"),
    ],
)
def test_targets(address, target):
    assert grpc_target(address) == target


@pytest.mark.parametrize(
    ("address", "message"),
    [
        (["annserve-0:50051", "annserve-1:50051"], "dns:///NAME:PORT"),
        (["127.0.0.1:5000", "[::1]:5000"], "one IP version"),
        ([], "one or more"),
        (["127.0.0.1"], "IP:PORT"),
        (["unix:/tmp/a.sock"], "IP:PORT"),
    ],
)
def test_lists_that_name_no_ip_replicas_are_refused(address, message):
    with pytest.raises(InvalidRequestError, match=message):
        grpc_target(address)


@pytest.mark.parametrize(
    ("target", "several"),
    [
        ("127.0.0.1:5000", False),
        ("unix:/tmp/annserve.sock", False),
        ("ipv4:127.0.0.1:5000", False),
        ("ipv4:127.0.0.1:5000,127.0.0.2:5000", True),
        ("ipv6:[::1]:5000,[::1]:5001", True),
        ("dns:///annserve.ml.svc:50051", True),
    ],
)
def test_several_replicas(target, several):
    assert several_replicas(target) is several
