#!/usr/bin/env python3
"""The sidecar against a bare grpc.aio echo, measured by a harness that shares no code
with `stealguard-load` or `bench/echo_server.py` (issue 21's independent harness).

    python bench/parity.py                    # 1x10 and 256x1000, every variant, 3 rounds
    python bench/parity.py --quick            # 1x10 only, 2 s per run
    python bench/parity.py --variants default,no-memory-bound

The echo is a grpc.aio server with one generic handler for /stealguard.v1.Defense/Perturb
that answers every call with the same response bytes the sidecar gives for that request:
no parsing, no work. The client is one grpc.aio channel in this process with 64 calls in
flight, raw bytes both ways (no protobuf on the client). Each round runs the echo, then
every sidecar variant, for the same seconds; the ratio of each round is sidecar / echo
calls per second and the figure is the median over rounds. Server CPU per call is read
from /proc. The echo and the sidecars get the same GRPC_EXPERIMENTS as the stealguard
commands set for themselves (server/launch.py), unless the environment sets it.

Variants separate what the sidecar does per call beyond the defense:
- default: the sidecar as it ships;
- no-memory-bound: --max-request-bytes 0 (no RequestBytesInterceptor);
- no-slots: --max-calls-per-principal 0 --max-streams-per-principal 0 (no per-call identity);
- bare: both, and --max-in-flight 0 (no gRPC concurrency limiter).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from stealguard.server.launch import prefer_poller

prefer_poller()  # this client's gRPC I/O is the one the stealguard commands use

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from stealguard.server.codec import array_to_tensor  # noqa: E402
from stealguard.v1 import defense_pb2  # noqa: E402

METHOD = "/stealguard.v1.Defense/Perturb"
IN_FLIGHT = 64
VARIANTS = {
    "default": [],
    "no-memory-bound": ["--max-request-bytes", "0"],
    "no-slots": ["--max-calls-per-principal", "0", "--max-streams-per-principal", "0"],
    "bare": ["--max-request-bytes", "0", "--max-calls-per-principal", "0",
             "--max-streams-per-principal", "0", "--max-in-flight", "0"],
}
ECHO = textwrap.dedent("""
    import asyncio, sys
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    reply = open(sys.argv[2], "rb").read()
    async def answer(request, context):
        return reply
    handler = grpc.method_handlers_generic_handler("stealguard.v1.Defense", {
        "Perturb": grpc.unary_unary_rpc_method_handler(answer)})
    async def main():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        checks = health.aio.HealthServicer()
        await checks.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checks, server)
        server.add_insecure_port(sys.argv[1])
        await server.start()
        await server.wait_for_termination()
    asyncio.run(main())
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_env() -> dict[str, str]:
    """This process's environment, with the GRPC_EXPERIMENTS `prefer_poller` chose: what
    the stealguard commands give themselves (server/launch.py)."""
    return dict(os.environ)


def wait_serving(address: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise SystemExit(f"bench/parity.py: {address} did not report SERVING in {timeout:g} s")


async def drive(address: str, request: bytes, seconds: float) -> int:
    """Calls completed in `seconds` with IN_FLIGHT callers on one channel."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD)
        for _ in range(200):  # warm the connection
            await call(request)
        done = 0
        stop_at = time.perf_counter() + seconds

        async def caller():
            nonlocal done
            while time.perf_counter() < stop_at:
                await call(request)
                done += 1

        await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))
        return done


def measure(address: str, pid: int, request: bytes, seconds: float) -> tuple[float, float]:
    """(calls per second, server CPU microseconds per call)."""
    cpu = cpu_seconds(pid)
    start = time.perf_counter()
    calls = asyncio.run(drive(address, request, seconds))
    elapsed = time.perf_counter() - start
    return calls / elapsed, (cpu_seconds(pid) - cpu) / calls * 1e6


def start(args: list[str], address: str) -> subprocess.Popen:
    process = subprocess.Popen(args, env=server_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_serving(address)
    return process


def sidecar_answer(address: str, request: bytes) -> bytes:
    with grpc.insecure_channel(address) as channel:
        return channel.unary_unary(METHOD)(request, timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1x10 only, 2 s per run")
    parser.add_argument("--seconds", type=float, default=None, help="per run (default 5)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown[0] if unknown else 'empty'} "
                     f"(known: {', '.join(VARIANTS)})")
    if args.rounds < 1:
        parser.error("--rounds: must be at least 1")
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    sidecar_script = str(Path(sys.executable).with_name("stealguard-sidecar"))
    shapes = [(1, 10)] if args.quick else [(1, 10), (256, 1000)]
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for name in variants:
            address = f"127.0.0.1:{free_port()}"
            servers[name] = (start([sidecar_script, "--listen", address, "--log-level",
                                    "warning", *VARIANTS[name]], address), address)
        print(f"load average {os.getloadavg()[0]:.1f} at the start; {os.cpu_count()} CPUs; "
              f"{IN_FLIGHT} calls in flight on one grpc.aio channel; {seconds:g} s per run, "
              f"{args.rounds} interleaved rounds; GRPC_EXPERIMENTS="
              f"{server_env().get('GRPC_EXPERIMENTS', '')!r}\n")
        print("| request | server | calls/s (median) | CPU µs/call (median) | "
              "ratio to echo, calls/s (median of rounds) |\n|---|---|---|---|---|")
        for rows, classes in shapes:
            probs = np.random.default_rng(0).dirichlet(np.ones(classes), rows)
            request = defense_pb2.PerturbRequest(
                probabilities=array_to_tensor(probs.astype(np.float32))).SerializeToString()
            with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as file:
                file.write(sidecar_answer(servers[variants[0]][1], request))
            reply = Path(file.name)
            address = f"127.0.0.1:{free_port()}"
            echo = start([sys.executable, "-c", ECHO, address, str(reply)], address)
            try:
                results = {name: [] for name in ["echo", *variants]}
                for _ in range(args.rounds):
                    results["echo"].append(measure(address, echo.pid, request, seconds))
                    for name in variants:
                        process, target = servers[name]
                        results[name].append(measure(target, process.pid, request, seconds))
            finally:
                echo.terminate()
                echo.wait()
                reply.unlink()
            for name, runs in results.items():
                ratios = [r[0] / e[0] for r, e in zip(runs, results["echo"], strict=True)]
                ratio = "" if name == "echo" else f"{statistics.median(ratios):.2f}"
                print(f"| {rows}x{classes} | {name} | "
                      f"{statistics.median(r[0] for r in runs):,.0f} | "
                      f"{statistics.median(r[1] for r in runs):.0f} | {ratio} |")
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
