#!/usr/bin/env python3
"""What metering adds to a call: the meter with a loopback Valkey against metering off.

    python bench/metering.py            # 5 rounds of 20,000 calls per arm
    python bench/metering.py --quick    # 3 rounds of 5,000

In one process and one event loop, each round runs every arm back to back on 1-row
calls of one principal (rate and quota set far above what the run spends):
- off: the call without a meter (an awaited no-op: what a server does with no limit);
- lease: `Meter.admit` on a Valkey store with the default lease (64 rows per round trip);
- memory: the same on the in-process memory store;
- no lease: `lease_rows=0`, one store round trip per call (what the lease saves).
Prints p50/p99 per call, CPU per call of this process and of valkey-server, and the
added p50 against off (the median of the rounds). Target (issue 17): the lease arm adds
at most 0.1 ms at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _valkey import Valkey  # noqa: E402
from stealguard.server.metering import Limits, MemoryStore, Meter, open_store  # noqa: E402

LIMITS = Limits.of(rate=1e9, burst=10**9, quotas=["1000000000/1d"])


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def nothing(principal: str, rows: int) -> None:
    return None


async def measure(admit, calls: int, store_pid: int) -> dict:
    latencies = []
    cpu0, store0 = time.process_time(), cpu_of(store_pid)
    for _ in range(calls):
        start = time.perf_counter_ns()
        await admit("bench", 1)
        latencies.append(time.perf_counter_ns() - start)
    cpu, store = time.process_time() - cpu0, cpu_of(store_pid) - store0
    latencies.sort()
    return {"p50_us": latencies[len(latencies) // 2] / 1e3,
            "p99_us": latencies[int(len(latencies) * 0.99)] / 1e3,
            "cpu_us": cpu / calls * 1e6, "store_cpu_us": store / calls * 1e6}


async def run(rounds: int, calls: int, valkey: Valkey) -> dict[str, list[dict]]:
    meters = {"lease": Meter(LIMITS, open_store(valkey.url)),
              "memory": Meter(LIMITS, MemoryStore()),
              "no lease": Meter(LIMITS, open_store(valkey.url), lease_rows=0)}
    arms = {"off": nothing, **{name: m.admit for name, m in meters.items()}}
    results: dict[str, list[dict]] = {name: [] for name in arms}
    for admit in arms.values():  # warm connections and scripts
        await measure(admit, 200, valkey.pid)
    for _ in range(rounds):
        for name, admit in arms.items():
            results[name].append(await measure(admit, calls, valkey.pid))
    for meter in meters.values():
        await meter.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 5,000 calls")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    rounds, calls = (3, 5000) if args.quick else (args.rounds, args.calls)
    with tempfile.TemporaryDirectory(prefix="stealguard-bench-") as directory:
        valkey = Valkey(Path(directory)).start()
        try:
            results = asyncio.run(run(rounds, calls, valkey))
        finally:
            valkey.stop()
    off = results["off"]
    print(f"{rounds} rounds of {calls} one-row calls per arm, loopback valkey-server")
    print(f"{'arm':<10} {'p50 us':>8} {'p99 us':>8} {'cpu us/call':>12} "
          f"{'store cpu us/call':>18} {'added p50 us':>13} {'cpu ratio':>10}")
    for name, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        added = statistics.median(r["p50_us"] - o["p50_us"] for r, o in zip(rows, off, strict=True))
        ratio = statistics.median(r["cpu_us"] / o["cpu_us"] for r, o in zip(rows, off, strict=True))
        print(f"{name:<10} {med['p50_us']:8.2f} {med['p99_us']:8.2f} {med['cpu_us']:12.2f} "
              f"{med['store_cpu_us']:18.2f} {added:13.2f} {ratio:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
