"""The bound on request bytes held at once (--max-request-bytes), on a real sidecar: 24
concurrent 60 MB calls, beyond the bound RESOURCE_EXHAUSTED at once, and the process's
peak resident memory (VmHWM, from /proc) stays under the bound plus a stated overhead.

The test process holds one 60 MB request (sent as bytes, not re-serialized per call);
gRPC copies it per call while sending, so the test peaks at about 1.5 GB, briefly.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
from _procs import start_sidecar
from stealguard.server.codec import array_to_tensor
from stealguard.v1 import defense_pb2, defense_pb2_grpc

MiB = 1 << 20
BOUND = 1024 * MiB
CALLS = 24
ROWS, CLASSES = 1_500_000, 10  # float32: 60 MB of probabilities
#: Besides what the bound counts (8x each request's bytes, `RequestBytesInterceptor.COST`):
#: gRPC's 64 KiB windows of the calls refused, the allocator's slack. Stated here and in
#: the README: peak RSS <= RSS before + bound + 128 MiB.
OVERHEAD = 128 * MiB

def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.slow
def test_concurrent_large_calls_beyond_the_bound_are_exhausted_and_memory_stays_bounded():
    process, address = start_sidecar("--max-request-bytes", str(BOUND),
                                     "--max-rows", str(ROWS))
    pid = process.popen.pid
    rows = np.full((ROWS, CLASSES), 1.0 / CLASSES, dtype=np.float32)
    raw = defense_pb2.PerturbRequest(probabilities=array_to_tensor(rows)).SerializeToString()
    del rows
    try:
        with grpc.insecure_channel(address, options=[
                ("grpc.max_send_message_length", 128 * MiB),
                ("grpc.max_receive_message_length", 128 * MiB)]) as channel:
            perturb = channel.unary_unary("/stealguard.v1.Defense/Perturb",
                                          request_serializer=None,
                                          response_deserializer=None)
            small = defense_pb2.PerturbRequest(
                probabilities=array_to_tensor(np.eye(3, dtype=np.float32)))
            perturb(small.SerializeToString(), timeout=30)  # warm
            baseline = status_kib(pid, "VmRSS")
            with open(f"/proc/{pid}/clear_refs", "w") as refs:
                refs.write("5")  # VmHWM := VmRSS: the peak from here on
            calls = [perturb.future(raw, timeout=120) for _ in range(CALLS)]
            for call in calls:
                call.exception()  # waits for it to end
        peak = status_kib(pid, "VmHWM")
    finally:
        process.stop()
    codes, details = [], []
    for call in calls:
        error = call.exception()
        codes.append(grpc.StatusCode.OK if error is None else error.code())
        details.append("" if error is None else error.details())
    exhausted = [d for c, d in zip(codes, details, strict=True)
                 if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
    print(f"baseline {baseline / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB, "
          f"bound {BOUND // MiB} MiB; {codes.count(grpc.StatusCode.OK)} OK, "
          f"{len(exhausted)} RESOURCE_EXHAUSTED")
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert all("--max-request-bytes" in d for d in exhausted), exhausted[:1]
    assert (peak - baseline) * 1024 <= BOUND + OVERHEAD


def test_streams_waiting_for_their_next_message_do_not_hold_the_bound_from_other_calls():
    # room for two full reservations (8 x 64 MiB each); six streams that sent one small
    # message and wait for the next once took all of it, and every other call was refused
    process, address = start_sidecar("--max-request-bytes", str(BOUND))
    small = defense_pb2.PerturbRequest(
        probabilities=array_to_tensor(np.eye(3, dtype=np.float32)))
    release = threading.Event()

    def one_then_silence():
        yield small
        release.wait()

    try:
        with grpc.insecure_channel(address) as channel:
            stub = defense_pb2_grpc.DefenseStub(channel)
            streams = [stub.PerturbStream(one_then_silence(), timeout=60) for _ in range(6)]
            answered = [next(stream).HasField("probabilities") for stream in streams]
            unary = [stub.Perturb(small, timeout=30).HasField("probabilities")
                     for _ in range(5)]
            second = stub.PerturbStream(iter([small, small]), timeout=30)
            replies = [r.HasField("probabilities") for r in second]
            release.set()
            for stream in streams:
                stream.cancel()
    finally:
        release.set()
        process.stop()
    assert answered == [True] * 6
    assert unary == [True] * 5 and replies == [True, True]


def test_a_read_that_does_not_fit_waits_its_turn_then_is_refused_in_time():
    from stealguard.server.platform.interceptors import RequestBytes

    async def scenario():
        budget = RequestBytes(10, wait=0.2)
        assert await budget.reserve(6)
        second = asyncio.ensure_future(budget.reserve(6))
        third = asyncio.ensure_future(budget.reserve(3))  # fits, but waits behind the second
        await asyncio.sleep(0.05)
        assert not second.done() and not third.done()
        budget.settle(6, 1)  # the first read ended: its message costs 1
        assert await second and await third
        assert (budget.held, budget.reserved) == (1, 9)
        late = budget.wait
        budget.wait = 0.05
        refused = await budget.reserve(5)  # 1 + 9 + 5 > 10 and nothing ends in time
        budget.wait = late
        budget.settle(6, 0)
        budget.settle(3, 0)
        assert await budget.reserve(9)  # the refused wait left nothing behind
        return refused

    assert asyncio.run(scenario()) is False
