"""The bound on request bytes held at once (--max-request-bytes), on a real sidecar: 24
concurrent 60 MB calls, beyond the bound RESOURCE_EXHAUSTED at once, and the process's
peak resident memory (VmHWM, from /proc) stays under the bound plus a stated overhead.

The test process holds one 60 MB request (sent as bytes, not re-serialized per call);
gRPC copies it per call while sending, so the test peaks at about 1.5 GB, briefly.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from _procs import start_sidecar
from stealguard.server.codec import array_to_tensor
from stealguard.v1 import defense_pb2

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
