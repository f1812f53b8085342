#!/usr/bin/env python3
"""How fast can stealguard-load drive a server? Its maximum rate against the bare echo server.

The echo server (bench/echo_server.py) does the least a Defense server can: parse the
request and send its tensor back. The rate stealguard-load reaches against it, with
``--procs 1`` and ``--procs 2``, is the ceiling of the generator on this host; a sidecar
figure well below it is the sidecar's, not the generator's.

    python bench/load_generator.py [--duration 5s] [--concurrency 32] [--quick]

Prints a Markdown table (and writes JSON to $STEALGUARD_BENCH_JSON when set, for
bench/run_all). Closed loop, Perturb of one 10-class float32 row. Client and server share
this host's cores, so on a small or busy machine both limits are mixed: the table gives
the client's CPU per process and the server's CPU per call so a reader can tell.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_serving(address: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"echo server exited with {proc.returncode}")
        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.1)
    raise SystemExit(f"echo server not SERVING on {address} after {timeout}s")


def load_command() -> list[str]:
    found = shutil.which("stealguard-load", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "stealguard.client.load.cli"]


def run_load(address: str, *args: str) -> dict:
    cmd = [*load_command(), "--target", address, "--no-progress", "--format", "json", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"stealguard-load failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


def measure(address: str, server_pid: int, procs: int, concurrency: int,
            duration: str) -> dict:
    """One closed-loop run at ``procs`` worker processes, after an unmeasured warm-up run."""
    common = ["--procs", str(procs), "--concurrency", str(concurrency)]
    run_load(address, *common, "--duration", "1s")  # warm: connections, caches
    return run_load(address, *common, "--duration", duration, "--server-pid", str(server_pid))


def verdict(run: dict) -> str:
    """Which side limited the run: the client, the server, or neither (a busy host)."""
    client = max(run["client"]["cpu_per_proc"])
    server = run["server"]["cpu_cores"]
    host = run["host"]["busy"]
    if client >= 0.9:
        return f"the generator was saturated ({client:.0%} of a core): this is its ceiling."
    if server >= 0.9:
        return (f"the echo server was saturated ({server:.2f} cores) with the generator "
                f"at {client:.0%} of a core: the generator has headroom.")
    return (f"neither the generator ({client:.0%}) nor the server ({server:.2f} cores) filled a "
            f"core; the host was {host:.0%} busy, so other work took the CPU and this rate "
            "is a floor.")


def markdown(rows: list[dict], duration: str, concurrency: int) -> str:
    load1 = os.getloadavg()[0]
    lines = [
        "### stealguard-load: maximum rate against the bare echo server",
        "",
        f"Closed loop, `Perturb` of 1x10 float32, concurrency {concurrency} in all, "
        f"{duration} per run after a 1 s warm-up; {os.cpu_count()} cores shared by client "
        f"and server (load average {load1:.1f} at the end; host CPU busy "
        f"{', '.join(format(r['host']['busy'], '.0%') for r in rows)} during the runs).",
        "",
        "| --procs | calls/s | p50 ms | p99 ms | client CPU per proc | client CPU per call "
        "| calls/s per client core | server CPU | server CPU per call |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat = r["latency_ms"]
        cpu = ", ".join(f"{u:.0%}" for u in r["client"]["cpu_per_proc"])
        per_call = r["client"]["cpu_us_per_call"]
        server = r["server"]
        lines.append(
            f"| {r['procs']} | {r['rps']:.0f} | {lat['p50']:.2f} | {lat['p99']:.2f} | {cpu} "
            f"| {per_call:.0f} us | {1e6 / per_call:.0f} | {server['cpu_cores']:.2f} cores "
            f"| {server['cpu_us_per_call']:.0f} us |"
        )
    lines += ["", "Calls/s per client core (1 / client CPU per call) is what one generator "
              "process sustains when it has a core to itself; compare it with a server's CPU "
              "per call to see which side a run can saturate first."]
    lines += ["", "Command: `python bench/load_generator.py --duration "
              f"{duration} --concurrency {concurrency}`"]
    for r in rows:
        lines.append(f"\n--procs {r['procs']}: {verdict(r)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", default="5s", help="measured time per run (default 5s)")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight in all")
    parser.add_argument("--quick", action="store_true", help="2 s runs")
    args = parser.parse_args(argv)
    duration = "2s" if args.quick else args.duration

    address = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen([sys.executable, str(HERE / "echo_server.py"), "--listen", address],
                              stdout=subprocess.DEVNULL)
    try:
        wait_serving(address, server)
        rows = [measure(address, server.pid, procs, args.concurrency, duration)
                for procs in (1, 2)]
    finally:
        server.terminate()
        server.wait(10)
    print(markdown(rows, duration, args.concurrency), end="")
    out = os.environ.get("STEALGUARD_BENCH_JSON")
    if out:
        headline = {f"stealguard-load max calls/s vs echo, --procs {r['procs']}": round(r["rps"])
                    for r in rows}
        headline["stealguard-load client CPU per call (us), --procs 1"] = round(
            rows[0]["client"]["cpu_us_per_call"])
        Path(out).write_text(json.dumps({"headline": headline, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
