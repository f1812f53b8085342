"""The client library against a real sidecar, and its fail-closed behaviour without one."""

from __future__ import annotations

import asyncio
import signal

import grpc
import numpy as np
import pytest
from _defenses_helpers import default_defense
from _procs import free_port, start_sidecar
from stealguard.client import (
    AsyncDefenseClient,
    DefenseClient,
    SidecarError,
    label_only,
    protect,
    protect_async,
)

PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)
LABELS = np.array([[1, 0, 0], [0, 0, 1]], dtype=np.float32)


def test_perturb_returns_the_protected_rows(sidecar):
    with DefenseClient(sidecar, timeout=10) as client:
        got = client.perturb(PROBS, model="mnist")
    assert got.tobytes() == default_defense()(PROBS).tobytes()


def test_async_client_matches_the_sync_client(sidecar):
    async def run():
        async with AsyncDefenseClient(sidecar, timeout=10) as client:
            return await client.perturb(PROBS), await client.policies()

    got, policies = asyncio.run(run())
    assert got.tobytes() == DefenseClient(sidecar, timeout=10).perturb(PROBS).tobytes()
    assert policies[0]["name"] == "default"


def test_protect_passes_through_the_sidecar_answer(sidecar):
    got = protect(DefenseClient(sidecar, timeout=10), PROBS, model="mnist")
    assert got.tobytes() == default_defense()(PROBS).tobytes()


def test_unreachable_sidecar_gives_label_only_rows_never_raw():
    client = DefenseClient(f"127.0.0.1:{free_port()}", timeout=0.5)
    got = protect(client, PROBS, model="mnist")
    np.testing.assert_array_equal(got, LABELS)
    assert got.dtype == PROBS.dtype


def test_unreachable_sidecar_raises_when_asked_to():
    client = DefenseClient(f"127.0.0.1:{free_port()}", timeout=0.5)
    with pytest.raises(SidecarError) as error:
        protect(client, PROBS, on_error="raise")
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


def test_raw_probabilities_only_with_explicit_fail_open():
    client = DefenseClient(f"127.0.0.1:{free_port()}", timeout=0.5)
    np.testing.assert_array_equal(protect(client, PROBS, fail_open=True), PROBS)


def test_stalled_sidecar_times_out_into_label_only_rows():
    process, address = start_sidecar()
    try:
        process.popen.send_signal(signal.SIGSTOP)
        got = protect(DefenseClient(address, timeout=0.3), PROBS)
        np.testing.assert_array_equal(got, LABELS)
    finally:
        process.popen.send_signal(signal.SIGCONT)
        process.stop()


def test_per_call_timeout_overrides_the_clients_and_none_left_fails_closed():
    process, address = start_sidecar()
    try:
        process.popen.send_signal(signal.SIGSTOP)
        client = DefenseClient(address, timeout=30)
        with pytest.raises(SidecarError) as error:
            client.perturb(PROBS, timeout=0.2)  # not the client's 30 s
        assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        np.testing.assert_array_equal(protect(client, PROBS, timeout=0.0), LABELS)

        async def run():
            async with AsyncDefenseClient(address, timeout=30) as slow:
                return await protect_async(slow, PROBS, timeout=0.2)

        np.testing.assert_array_equal(asyncio.run(run()), LABELS)
    finally:
        process.popen.send_signal(signal.SIGCONT)
        process.stop()


def test_rows_the_sidecar_rejects_raise_instead_of_falling_back_to_labels(sidecar):
    bad = PROBS * 2  # rows sum to 2: INVALID_ARGUMENT
    with pytest.raises(SidecarError) as error:
        protect(DefenseClient(sidecar, timeout=10), bad)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "row 0" in error.value.details


@pytest.mark.parametrize("fail_open", [False, True])
def test_nan_row_raises_invalid_argument_in_every_mode(sidecar, fail_open):
    nan_row = np.array([[0.2, 0.3, np.nan]], dtype=np.float32)
    with pytest.raises(SidecarError) as error:
        protect(DefenseClient(sidecar, timeout=10), nan_row, fail_open=fail_open)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not finite" in error.value.details


def test_nan_row_raises_when_the_sidecar_is_unreachable_instead_of_a_label_from_nan():
    rows = np.array([[0.7, 0.2, 0.1], [0.2, 0.3, np.nan]])
    with pytest.raises(SidecarError) as error:
        protect(DefenseClient(f"127.0.0.1:{free_port()}", timeout=0.5), rows)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details == "row 1: value nan at column 2 is not finite"


def test_async_nan_row_raises_when_the_sidecar_is_unreachable():
    async def run():
        client = AsyncDefenseClient(f"127.0.0.1:{free_port()}", timeout=0.5)
        try:
            return await protect_async(client, np.array([np.inf, 0.0]))
        finally:
            await client.close()

    with pytest.raises(SidecarError, match="row 0: value inf at column 0 is not finite"):
        asyncio.run(run())


def test_async_protect_fails_closed():
    async def run():
        client = AsyncDefenseClient(f"127.0.0.1:{free_port()}", timeout=0.5)
        try:
            return await protect_async(client, PROBS)
        finally:
            await client.close()

    np.testing.assert_array_equal(asyncio.run(run()), LABELS)


def test_label_only_keeps_shape_for_one_row():
    np.testing.assert_array_equal(label_only(np.array([0.2, 0.5, 0.3])), [0, 1, 0])


def test_bad_on_error_value_is_rejected():
    with pytest.raises(ValueError, match="on_error must be one of"):
        protect(DefenseClient("127.0.0.1:1"), PROBS, on_error="ignore")


def test_non_positive_timeout_is_rejected():
    with pytest.raises(ValueError, match="timeout must be > 0"):
        DefenseClient("127.0.0.1:1", timeout=0)
