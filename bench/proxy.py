#!/usr/bin/env python3
"""Proxy mode: what the proxy adds to a call, against calling the model server directly.

    python bench/proxy.py                   # stealguard-modelserver, model mnist-open
    python bench/proxy.py --quick           # fewer calls
    python bench/proxy.py --upstream echo   # bench/echo_server.py: no model, only transport
    python bench/proxy.py --calls 5000 --format json

Starts the upstream (`stealguard-modelserver`, whose `mnist-open` answers unprotected
probabilities, or the echo server, which answers the JSON probability vector it is sent)
and `stealguard-sidecar proxy --protocol torchserve` in front of it (Reverse Sigmoid, beta
1.5, gamma 0.3). One client sends a single MNIST test sample (.npy, 1x28x28) as TorchServe
`Predictions`, one call at a time, alternating direct and through-the-proxy calls in the
same run, so both see the same machine. Reports p50/p99/mean of each, the proxy's added
latency (the difference of the p50s and the p50 of the per-pair differences), and the CPU
time the proxy process spends per call (steadier than latency on a busy machine).

Prints Markdown; writes {"headline": {...}} to $STEALGUARD_BENCH_JSON when set.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stealguard.server.launch import prefer_poller

prefer_poller()  # before grpc is imported: the gRPC I/O the stealguard commands use

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc

HERE = Path(__file__).resolve().parent
CONFIG = "policies:\n  default: {defense: reverse_sigmoid, beta: 1.5, gamma: 0.3}\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def console_script(name: str) -> str:
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if not found:
        raise SystemExit(f"bench/proxy.py: {name} is not installed: pip install -e '.[lab]'")
    return found


def start(args: list[str], address: str, log: Path, timeout: float,
          cpus: set[int] | None = None) -> subprocess.Popen:
    """Start a server process (on `cpus`, when given, as `taskset -c` would) and wait until
    its gRPC health says SERVING."""
    mine = os.sched_getaffinity(0)
    if cpus:  # a child inherits the affinity of the thread that starts it
        os.sched_setaffinity(0, cpus)
    try:
        proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    finally:
        os.sched_setaffinity(0, mine)
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"{args[0]} exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return proc
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{args[0]} not SERVING after {timeout:.0f}s:\n{log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mnist_sample() -> np.ndarray:
    from stealguard.modelserver.datasets import load_dataset

    return load_dataset("mnist").test_x[0]  # float32 (1, 28, 28)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def measure(direct: str, proxy: str, request, calls: int, warmup: int) -> dict:
    """Alternate direct and proxied calls; latencies in milliseconds."""
    stubs = [inference_pb2_grpc.InferenceAPIsServiceStub(grpc.insecure_channel(a))
             for a in (direct, proxy)]
    for _ in range(warmup):
        for stub in stubs:
            stub.Predictions(request, timeout=10)
    times = np.empty((calls, 2))
    for i in range(calls):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            start = time.perf_counter_ns()
            stubs[which].Predictions(request, timeout=10)
            times[i, which] = (time.perf_counter_ns() - start) / 1e6
    return {"direct": times[:, 0], "proxy": times[:, 1]}


def summary(ms: np.ndarray) -> dict:
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean())}


def add_pair_flags(parser: argparse.ArgumentParser) -> None:
    """--calls, --warmup, --quick and --format of a paired latency benchmark."""
    parser.add_argument("--calls", type=int, default=3000, help="pairs of calls measured")
    parser.add_argument("--warmup", type=int, default=200, help="pairs of calls not measured")
    parser.add_argument("--quick", action="store_true", help="500 pairs")
    parser.add_argument("--format", choices=["markdown", "json"], default="markdown")


def check_pair_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Apply --quick (or $STEALGUARD_BENCH_QUICK) and check --calls and --warmup."""
    if args.quick or os.environ.get("STEALGUARD_BENCH_QUICK"):
        args.calls, args.warmup = min(args.calls, 500), min(args.warmup, 100)
    if args.calls < 10 or args.warmup < 0:
        parser.error("--calls must be at least 10 and --warmup at least 0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", choices=["modelserver", "echo"], default="modelserver",
                        help="the server behind the proxy (default modelserver)")
    add_pair_flags(parser)
    args = parser.parse_args(argv)
    check_pair_flags(parser, args)

    tmp = Path(tempfile.mkdtemp(prefix="stealguard-bench-proxy-"))
    upstream_address, proxy_address = (f"127.0.0.1:{free_port()}" for _ in range(2))
    if args.upstream == "modelserver":
        upstream_cmd = [console_script("stealguard-modelserver"), "--listen", upstream_address,
                        "--sidecar", f"127.0.0.1:{free_port()}",  # mnist-open never calls it
                        "--model-store", str(tmp / "store")]
        request = inference_pb2.PredictionsRequest(model_name="mnist-open",
                                                   input={"data": npy(mnist_sample())})
    else:
        upstream_cmd = [sys.executable, str(HERE / "echo_server.py"), "--listen",
                        upstream_address]
        probs = np.exp(np.linspace(0, 3, 10))
        request = inference_pb2.PredictionsRequest(
            model_name="mnist", input={"data": json.dumps((probs / probs.sum()).tolist())
                                       .encode()})
    (tmp / "proxy.yaml").write_text(CONFIG)
    proxy_cmd = [console_script("stealguard-sidecar"), "proxy", "--listen", proxy_address,
                 "--upstream", upstream_address, "--protocol", "torchserve",
                 "--config", str(tmp / "proxy.yaml")]
    procs = []
    try:
        procs.append(start(upstream_cmd, upstream_address, tmp / "upstream.log", 600))
        procs.append(start(proxy_cmd, proxy_address, tmp / "proxy.log", 600))
        load_before = os.getloadavg()[0]
        cpu_before = cpu_seconds(procs[1].pid)
        times = measure(upstream_address, proxy_address, request, args.calls, args.warmup)
        proxy_cpu_us = (cpu_seconds(procs[1].pid) - cpu_before) / (args.calls + args.warmup) * 1e6
        load_after = os.getloadavg()[0]
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)

    direct, proxied = summary(times["direct"]), summary(times["proxy"])
    added_p50 = proxied["p50_ms"] - direct["p50_ms"]
    paired_p50 = float(np.percentile(times["proxy"] - times["direct"], 50))
    result = {"upstream": args.upstream, "calls": args.calls, "direct": direct,
              "proxy": proxied, "added_p50_ms": added_p50, "paired_diff_p50_ms": paired_p50,
              "added_p99_ms": proxied["p99_ms"] - direct["p99_ms"],
              "proxy_cpu_us_per_call": proxy_cpu_us,
              "load_average": [load_before, load_after], "cores": os.cpu_count()}
    if os.environ.get("STEALGUARD_BENCH_JSON"):
        Path(os.environ["STEALGUARD_BENCH_JSON"]).write_text(json.dumps({"headline": {
            f"proxy added latency p50 ({args.upstream}, 1 MNIST sample)": f"{added_p50:.3f} ms",
            "proxy added latency p99": f"{result['added_p99_ms']:.3f} ms",
            "proxy CPU per call": f"{proxy_cpu_us:.0f} us",
        }}))
    if args.format == "json":
        print(json.dumps(result, indent=2))
        return 0
    what = ("`stealguard-modelserver`, model `mnist-open`, sent one MNIST test sample (.npy)"
            if args.upstream == "modelserver" else
            "`bench/echo_server.py`, sent a 10-class probability vector that it echoes")
    print(f"Upstream {what}. One `Predictions` call at a time, "
          f"{args.calls} direct and {args.calls} proxied calls alternating in one run "
          f"({args.warmup} pairs of warm-up); load average {load_before:.1f} -> "
          f"{load_after:.1f} on {os.cpu_count()} cores.\n")
    print("| path | p50 ms | p99 ms | mean ms |\n|---|---|---|---|")
    for name, s in (("direct to the upstream", direct), ("through the proxy", proxied)):
        print(f"| {name} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {s['mean_ms']:.3f} |")
    print(f"\nAdded by the proxy: **{added_p50:.3f} ms at p50** (p50 of per-pair differences "
          f"{paired_p50:.3f} ms), {result['added_p99_ms']:.3f} ms at p99. Target: at most "
          f"1 ms at p50. The proxy process used {proxy_cpu_us:.0f} us of CPU per call.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
