#!/usr/bin/env python3
"""The sidecar against a bare echo server: same client (stealguard-load), same run.

    python bench/service.py            # 3 rounds of 10 s per server and workload
    python bench/service.py --quick    # 3 rounds of 3 s

Four workloads — unary Perturb of 1x10 float32, the same against a sidecar started with
`--max-in-flight 0`, PerturbStream of 1x10, unary Perturb of 256x1000 — each against
bench/echo_server.py (protobuf parse + serialise, no codec, no validation, no defense)
and against stealguard-sidecar (Reverse Sigmoid, the default policy). The echo server has
no concurrency limiter; `--max-in-flight 0` gives the sidecar the same gRPC server options
(gRPC's limiter creates a task per call). Each round measures echo, then the sidecar, back
to back; the ratios are the median of the rounds' ratios, so a burst of load on the shared
machine moves one round, not the result. Prints throughput, p50/p99 and server CPU per
call for both (the round with the median CPU ratio), and the ratios.
Targets (issue 3): sidecar throughput >= 90% of echo's, CPU per call <= 1.15x echo's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _procs import Process, free_port, script, start_sidecar  # noqa: E402

WORKLOADS = [
    ("Perturb 1x10", ["--method", "perturb", "--batch", "1", "--classes", "10"]),
    ("Perturb 1x10, --max-in-flight 0",
     ["--method", "perturb", "--batch", "1", "--classes", "10"]),
    ("PerturbStream 1x10", ["--method", "perturb-stream", "--batch", "1", "--classes", "10"]),
    ("Perturb 256x1000", ["--method", "perturb", "--batch", "256", "--classes", "1000"]),
]


def load(address: str, pid: int, args: list[str], seconds: float, concurrency: int) -> dict:
    command = [script("stealguard-load"), "--target", address, "--concurrency",
               str(concurrency), "--duration", f"{seconds}s", "--warmup", "1s",
               "--server-pid", str(pid), "--format", "json", "--no-progress", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s per measurement")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3,
                        help="echo-then-sidecar rounds per workload; ratios are their median")
    args = parser.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    if args.rounds < 1 or seconds <= 0 or args.concurrency < 1:
        parser.error("--rounds and --concurrency must be at least 1, --seconds above 0")

    echo_port = free_port()
    echo = Process([sys.executable, str(ROOT / "bench" / "echo_server.py"), "--listen",
                    f"127.0.0.1:{echo_port}"])
    sidecar, sidecar_address = start_sidecar()
    unlimited, unlimited_address = start_sidecar("--max-in-flight", "0")
    try:
        echo.wait_healthy(f"127.0.0.1:{echo_port}")
        rows, headline = [], {}
        for name, workload in WORKLOADS:
            rounds = []
            for _ in range(args.rounds):
                base = load(f"127.0.0.1:{echo_port}", echo.pid, workload, seconds,
                            args.concurrency)
                server, address = ((unlimited, unlimited_address) if "in-flight" in name
                                   else (sidecar, sidecar_address))
                ours = load(address, server.pid, workload, seconds, args.concurrency)
                rounds.append((ours["rps"] / base["rps"],
                               ours["server"]["cpu_us_per_call"]
                               / base["server"]["cpu_us_per_call"], base, ours))
            throughput = statistics.median(r[0] for r in rounds)
            cpu = statistics.median(r[1] for r in rounds)
            _, _, base, ours = sorted(rounds, key=lambda r: r[1])[len(rounds) // 2]
            rows.append((name, base, ours, throughput, cpu))
            headline[f"{name}: sidecar/echo throughput"] = f"{throughput:.2f}"
            headline[f"{name}: sidecar/echo server CPU per call"] = f"{cpu:.2f}"
    finally:
        sidecar.stop()
        unlimited.stop()
        echo.stop(signal.SIGTERM)

    print(f"Closed loop, {args.concurrency} callers, {args.rounds} rounds of {seconds:g} s "
          f"per server and workload (ratios: median of the rounds), one client process, "
          f"{os.cpu_count()} cores shared by client and server.\n")
    print("| workload | server | calls/s | p50 ms | p99 ms | server CPU µs/call |")
    print("|---|---|---|---|---|---|")
    for name, base, ours, _, _ in rows:
        for label, r in (("echo", base), ("sidecar", ours)):
            print(f"| {name} | {label} | {r['rps']:.0f} | {r['latency_ms']['p50']:.2f} | "
                  f"{r['latency_ms']['p99']:.2f} | {r['server']['cpu_us_per_call']:.0f} |")
    print("\n| workload | throughput sidecar/echo (target ≥ 0.90) | CPU per call sidecar/echo "
          "(target ≤ 1.15) |")
    print("|---|---|---|")
    for name, _, _, throughput, cpu in rows:
        print(f"| {name} | {throughput:.2f} | {cpu:.2f} |")
    errors = {name: (b["error_count"], o["error_count"]) for name, b, o, _, _ in rows}
    if any(sum(pair) for pair in errors.values()):
        print(f"\nerrors (echo, sidecar): {errors}")
    if os.environ.get("STEALGUARD_BENCH_JSON"):
        Path(os.environ["STEALGUARD_BENCH_JSON"]).write_text(json.dumps({"headline": headline}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
