"""AsyncDefenseClient(stream=True) and DefenseClient(stream=True): one shared PerturbStream,
against a real sidecar."""

from __future__ import annotations

import asyncio
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from _procs import free_port, start_sidecar
from stealguard.client import (
    AsyncDefenseClient,
    DefenseClient,
    SidecarError,
    protect,
    protect_async,
)

LABELS = np.array([[1, 0, 0], [0, 0, 1]], dtype=np.float32)
PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)


def _rows(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.dirichlet(np.ones(10), size=int(rng.integers(1, 4))) for _ in range(count)]


def test_concurrent_calls_on_one_stream_get_their_own_answers(sidecar):
    rows = _rows(40)

    async def run():
        async with AsyncDefenseClient(sidecar, timeout=10, stream=True) as client:
            answers = await asyncio.gather(*(client.perturb(r, model="mnist") for r in rows))
            return answers, client._stream._stream

    answers, stream = asyncio.run(run())
    with DefenseClient(sidecar, timeout=10) as unary:
        for sent, got in zip(rows, answers, strict=True):
            assert got.tobytes() == unary.perturb(sent, model="mnist").tobytes()
    assert stream is not None  # the answers came over the stream, not unary calls


def test_one_rejected_request_gets_its_error_and_its_neighbours_their_answers(sidecar):
    """The sidecar answers a bad message with its error and the stream goes on."""
    rows = _rows(6, seed=1)
    bad = np.full((1, 10), np.nan)

    async def run():
        async with AsyncDefenseClient(sidecar, timeout=10, stream=True) as client:
            await client.perturb(rows[0])
            opened = client._stream._stream
            calls = [client.perturb(r) for r in rows[:3]] + [client.perturb(bad)] + \
                [client.perturb(r) for r in rows[3:]]
            results = await asyncio.gather(*calls, return_exceptions=True)
            after = await client.perturb(rows[0])
            kept = client._stream._stream is opened and not opened.ended
            return results, after, kept

    results, after, kept = asyncio.run(run())
    assert kept  # one stream carried all of it: no neighbour needed a second round trip
    error = results.pop(3)
    assert isinstance(error, SidecarError)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "row 0" in error.details and "not finite" in error.details
    with DefenseClient(sidecar, timeout=10) as unary:
        for sent, got in zip(rows, results, strict=True):
            assert got.tobytes() == unary.perturb(sent).tobytes()
        assert after.tobytes() == unary.perturb(rows[0]).tobytes()


def test_stalled_sidecar_times_out_each_call_and_protect_fails_closed():
    process, address = start_sidecar()
    try:
        async def run():
            async with AsyncDefenseClient(address, timeout=30, stream=True) as client:
                await client.perturb(PROBS)  # the stream is open
                process.popen.send_signal(signal.SIGSTOP)
                started = time.monotonic()
                with pytest.raises(SidecarError) as error:
                    await client.perturb(PROBS, timeout=0.2)
                assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                # the call's 0.2 s, not the client's 30 s: any busy machine is well below 15
                assert time.monotonic() - started < 15
                return await protect_async(client, PROBS, timeout=0.2)

        np.testing.assert_array_equal(asyncio.run(run()), LABELS)
    finally:
        process.popen.send_signal(signal.SIGCONT)
        process.stop()


def test_restarted_sidecar_is_reached_on_a_new_stream():
    process, address = start_sidecar()
    port = int(address.rsplit(":", 1)[1])
    try:
        async def run():
            nonlocal process
            async with AsyncDefenseClient(address, timeout=10, stream=True) as client:
                first = await client.perturb(PROBS)
                process.stop()
                down = await protect_async(client, PROBS, timeout=1)
                process, _ = start_sidecar(port=port)
                # the channel reconnects with backoff, as for unary calls: a model server's
                # next requests fail closed until it has
                deadline = time.monotonic() + 30
                while True:
                    try:
                        return first, down, await client.perturb(PROBS)
                    except SidecarError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.2)

        first, down, again = asyncio.run(run())
        np.testing.assert_array_equal(down, LABELS)  # sidecar gone: label-only, never raw
        assert again.tobytes() == first.tobytes()
    finally:
        process.stop()


def test_unreachable_sidecar_fails_closed_over_a_stream():
    async def run():
        async with AsyncDefenseClient(f"127.0.0.1:{free_port()}", timeout=0.5,
                                      stream=True) as client:
            return await protect_async(client, PROBS)

    np.testing.assert_array_equal(asyncio.run(run()), LABELS)


def test_draining_sidecar_ends_an_idle_stream_at_once():
    """SIGTERM with a client's stream open: the sidecar stops without waiting out its
    grace period for a stream that has nothing in flight."""
    process, address = start_sidecar()
    try:
        async def run():
            async with AsyncDefenseClient(address, timeout=10, stream=True) as client:
                await client.perturb(PROBS)
                process.popen.send_signal(signal.SIGTERM)
                started = time.monotonic()
                while process.popen.poll() is None and time.monotonic() - started < 30:
                    await asyncio.sleep(0.05)
                return time.monotonic() - started

        assert asyncio.run(run()) < 9  # before its grace period of 10 s ends
        assert process.popen.returncode == 0
    finally:
        process.stop()


def test_blocking_client_shares_one_stream_between_threads(sidecar):
    rows = _rows(40, seed=2)
    bad = np.full((1, 10), np.nan)
    with DefenseClient(sidecar, timeout=10, stream=True) as client, \
            ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda r: client.perturb(r, model="mnist"), rows))
        with pytest.raises(SidecarError) as error:  # ends the stream; retried alone as unary
            client.perturb(bad)
        after = client.perturb(rows[0], model="mnist")  # on a new stream
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not finite" in error.value.details
    with DefenseClient(sidecar, timeout=10) as unary:
        for sent, got in zip(rows, answers, strict=True):
            assert got.tobytes() == unary.perturb(sent, model="mnist").tobytes()
        assert after.tobytes() == answers[0].tobytes()


def test_blocking_client_gets_a_rejected_requests_error_on_the_same_stream(sidecar):
    rows = _rows(8, seed=2)
    bad = np.full((2, 10), 0.5)  # rows that do not sum to 1
    with DefenseClient(sidecar, timeout=10, stream=True) as client:
        client.perturb(rows[0])
        opened = client._stream._stream
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client.perturb, r) for r in rows[:4]]
            rejected = pool.submit(client.perturb, bad)
            futures += [pool.submit(client.perturb, r) for r in rows[4:]]
            answers = [f.result() for f in futures]
            with pytest.raises(SidecarError) as error:
                rejected.result()
        assert client._stream._stream is opened and not opened.ended
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "row 0" in error.value.details
        with pytest.raises(SidecarError):  # invalid rows raise, they get no label
            protect(client, bad)
    with DefenseClient(sidecar, timeout=10) as unary:
        for sent, got in zip(rows, answers, strict=True):
            assert got.tobytes() == unary.perturb(sent).tobytes()


def test_blocking_client_times_out_on_a_stalled_sidecar_and_fails_closed():
    process, address = start_sidecar()
    try:
        with DefenseClient(address, timeout=30, stream=True) as client:
            client.perturb(PROBS)  # the stream is open
            process.popen.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(SidecarError) as error:
                client.perturb(PROBS, timeout=0.2)
            assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 15  # the call's 0.2 s, not the client's 30
            np.testing.assert_array_equal(protect(client, PROBS, timeout=0.2), LABELS)
            process.popen.send_signal(signal.SIGCONT)
            assert client.perturb(PROBS).shape == PROBS.shape  # the stream works again
    finally:
        process.popen.send_signal(signal.SIGCONT)
        process.stop()


def test_blocking_client_fails_closed_without_a_sidecar():
    with DefenseClient(f"127.0.0.1:{free_port()}", timeout=0.5, stream=True) as client:
        np.testing.assert_array_equal(protect(client, PROBS), LABELS)


def test_an_unreachable_sidecar_pauses_the_stream_so_each_call_tries_once():
    """After the stream fails with UNAVAILABLE, calls go straight to unary for a while:
    no new stream (and, for the blocking client, no new reader thread) per failing call."""
    address = f"127.0.0.1:{free_port()}"
    with DefenseClient(address, timeout=0.5, stream=True) as client:
        np.testing.assert_array_equal(protect(client, PROBS), LABELS)
        broken = client._stream._stream
        assert broken is not None and broken.ended
        for _ in range(20):
            np.testing.assert_array_equal(protect(client, PROBS), LABELS)
        assert client._stream._stream is broken  # no stream was opened again

    async def run():
        async with AsyncDefenseClient(address, timeout=0.5, stream=True) as client:
            await protect_async(client, PROBS)
            broken = client._stream._stream
            answers = [await protect_async(client, PROBS) for _ in range(20)]
            return broken, client._stream._stream, answers

    broken, after, answers = asyncio.run(run())
    assert after is broken
    for answer in answers:
        np.testing.assert_array_equal(answer, LABELS)
