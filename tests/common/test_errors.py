"""The one error table: server status map and client status -> exception map agree."""

from __future__ import annotations

import grpc
import pytest

from annserve import errors
from annserve.server.convert import OutputExistsError
from annserve.server.rpc.service import status_of

WIRE_ERRORS = [
    errors.InvalidRequestError,
    errors.StoreNotFoundError,
    errors.StoreFormatError,
    errors.ResourceExhaustedError,
    errors.AuthenticationError,
    errors.ServerUnavailableError,
    errors.DataLossError,
    errors.OutOfRangeError,
]


@pytest.mark.parametrize("cls", WIRE_ERRORS, ids=lambda c: c.__name__)
def test_server_status_maps_back_to_the_same_class(cls):
    code = status_of(cls("x"))
    assert code.name == cls.grpc_status
    assert errors.error_for_status(code.name) is cls


def test_extra_statuses_and_unclaimed_ones():
    assert errors.error_for_status("DEADLINE_EXCEEDED") is errors.ServerUnavailableError
    assert errors.error_for_status("PERMISSION_DENIED") is errors.AuthenticationError
    assert errors.error_for_status("INTERNAL") is errors.AnnServeError
    assert errors.error_for_status("DATA_LOSS") is errors.DataLossError
    assert errors.error_for_status("OUT_OF_RANGE") is errors.OutOfRangeError
    assert errors.error_for_status("ABORTED") is errors.AnnServeError
    assert status_of(errors.AnnServeError("x")) is grpc.StatusCode.INTERNAL


def test_exit_codes_of_the_commands():
    assert errors.InvalidRequestError.exit_code == 2
    assert errors.StoreNotFoundError.exit_code == errors.StoreFormatError.exit_code == 3
    assert errors.DataLossError.exit_code == 3
    assert errors.OutOfRangeError.exit_code == 2
    assert OutputExistsError.exit_code == 5
    assert errors.AnnServeError.exit_code == 1


def test_status_names_are_grpcs():
    assert {c.name for c in grpc.StatusCode} - {"OK"} == errors.STATUS_NAMES


@pytest.mark.parametrize(
    "attrs",
    [
        {"grpc_status": "NOT_A_STATUS"},
        {"grpc_status": "OK"},
        {"also_from": ("ABORTED", "NOPE")},
        {"exit_code": 0},
        {"exit_code": "3"},
    ],
    ids=["unknown-status", "ok", "unknown-also-from", "exit-0", "exit-str"],
)
def test_a_class_with_a_bad_status_or_exit_code_is_refused(attrs):
    with pytest.raises(TypeError, match="Bad"):
        type("Bad", (errors.AnnServeError,), attrs)
    assert errors.error_for_status("ABORTED") is errors.AnnServeError  # nothing entered
