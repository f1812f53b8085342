#!/usr/bin/env python3
"""What metering adds to a call: metering with a loopback Valkey against metering off.

    python bench/metering.py            # both parts: 5 rounds in process, 3 of 5 s end to end
    python bench/metering.py --quick    # 3 rounds of 5,000 calls; 3 rounds of 2 s

End to end: two sidecars run side by side, one without limits and one with
`--store redis://(loopback Valkey) --rate-limit 1e9 --rate-burst 1e9 --quota 1e9/1d`
(nothing is refused, every call is metered); `stealguard-load` sends one caller's
Perturb 1x10 (and PerturbStream 1x10) to each in turn, round after round. Prints p50 per
call, the sidecar's CPU per call (and Valkey's, its warm-up second included), the added
p50 and the CPU ratio, median of the rounds.

In process, one event loop, each round runs every arm back to back on 1-row calls of
one principal (rate and quota set far above what the run spends):
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
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _procs import script, start_sidecar  # noqa: E402
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


E2E_WORKLOADS = [("Perturb 1x10", ["--method", "perturb"]),
                 ("PerturbStream 1x10", ["--method", "perturb-stream"])]


def load(address: str, pid: int, args: list[str], seconds: float) -> dict:
    command = [script("stealguard-load"), "--target", address, "--concurrency", "1",
               "--duration", f"{seconds}s", "--warmup", "1s", "--batch", "1", "--classes",
               "10", "--server-pid", str(pid), "--format", "json", "--no-progress", *args]
    return json.loads(subprocess.run(command, capture_output=True, text=True,
                                     check=True).stdout)


def end_to_end(rounds: int, seconds: float, valkey: Valkey) -> list[tuple]:
    plain, plain_address = start_sidecar()
    metered, metered_address = start_sidecar(
        "--store", valkey.url, "--rate-limit", "1e9", "--rate-burst", str(10**9),
        "--quota", f"{10**9}/1d")
    rows = []
    try:
        for name, workload in E2E_WORKLOADS:
            results = []
            for _ in range(rounds):
                off = load(plain_address, plain.pid, workload, seconds)
                store0 = cpu_of(valkey.pid)
                on = load(metered_address, metered.pid, workload, seconds)
                store = (cpu_of(valkey.pid) - store0) / max(1, on["requests"]) * 1e6
                results.append((off, on, store))
            rows.append((name, results))
    finally:
        plain.stop()
        metered.stop()
    return rows


def print_end_to_end(rows: list[tuple], rounds: int, seconds: float) -> None:
    print(f"\nend to end: one caller, {rounds} rounds of {seconds:g} s per sidecar, "
          "loopback valkey-server")
    print("| workload | metering | p50 ms | sidecar CPU µs/call | valkey CPU µs/call |"
          " added p50 µs | CPU ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, results in rows:
        def med(pick, results=results):
            return statistics.median(pick(r) for r in results)
        p50_off = med(lambda r: r[0]["latency_ms"]["p50"])
        p50_on = med(lambda r: r[1]["latency_ms"]["p50"])
        cpu_off = med(lambda r: r[0]["server"]["cpu_us_per_call"])
        cpu_on = med(lambda r: r[1]["server"]["cpu_us_per_call"])
        added = med(lambda r: (r[1]["latency_ms"]["p50"] - r[0]["latency_ms"]["p50"]) * 1e3)
        ratio = med(lambda r: r[1]["server"]["cpu_us_per_call"]
                    / r[0]["server"]["cpu_us_per_call"])
        store = med(lambda r: r[2])
        print(f"| {name} | off | {p50_off:.3f} | {cpu_off:.0f} | — | | |")
        print(f"| {name} | on | {p50_on:.3f} | {cpu_on:.0f} | {store:.1f} | {added:.0f} | "
              f"{ratio:.2f} |")
        errors = sum(r[0]["error_count"] + r[1]["error_count"] for r in results)
        if errors:
            print(f"| {name} | errors | {errors} | | | | |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 5,000 calls")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    rounds, calls = (3, 5000) if args.quick else (args.rounds, args.calls)
    e2e_rounds, e2e_seconds = 3, (2.0 if args.quick else 5.0)
    with tempfile.TemporaryDirectory(prefix="stealguard-bench-") as directory:
        valkey = Valkey(Path(directory)).start()
        try:
            results = asyncio.run(run(rounds, calls, valkey))
            e2e = end_to_end(e2e_rounds, e2e_seconds, valkey)
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
    print_end_to_end(e2e, e2e_rounds, e2e_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
