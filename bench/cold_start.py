"""How long `stealguard-sidecar` takes from exec to SERVING, from an empty and a filled cache.

    python bench/cold_start.py              # 5 cold + 5 cached runs of this Python's sidecar
    python bench/cold_start.py --python /venv/bin/python --runs 5
    python bench/cold_start.py --config policies.yaml

A cold run gets an empty NUMBA_CACHE_DIR of its own, so numba compiles every kernel the
policies need; a cached run reuses the cache the first cold run filled (which waits for its
"N/N ready" log line: the parallel kernels compile after SERVING). Each run starts the
sidecar's console script next to `--python` on a free loopback port, polls gRPC health
every 20 ms (reconnecting every 20 ms too) and stops the sidecar by PID when it is
SERVING. Prints one markdown table: median, min and max seconds. Not a test: the numbers
depend on the machine and on what else it runs.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from proxy import free_port, stop  # bench/proxy.py's: a free loopback port, stop by PID

READY = re.compile(r"kernels for policies .*: (\d+)/\1 ready in ([0-9.]+) s")


def serving(stub: health_pb2_grpc.HealthStub) -> bool:
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def one_start(sidecar: str, cache: str, config: str | None, all_kernels: bool,
              timeout: float = 600.0) -> tuple[float, float | None]:
    """(seconds from exec to SERVING, seconds until every kernel was ready or None)."""
    address = f"127.0.0.1:{free_port()}"
    args = [sidecar, "--listen", address] + (["--config", config] if config else [])
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    # Reconnect at once: gRPC's default backoff after the refused first connects (1 s,
    # +-20%) would be measured as start time (it was: cached starts read 0.91-1.20 s while
    # the sidecar's own log had it ready at 0.88 s).
    options = [(f"grpc.{name}_reconnect_backoff_ms", 20) for name in ("initial", "min", "max")]
    with tempfile.TemporaryFile() as log, grpc.insecure_channel(address, options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        start = time.perf_counter()
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL)
        try:
            while not serving(stub):
                if process.poll() is not None or time.perf_counter() - start > timeout:
                    log.seek(0)
                    raise RuntimeError(f"sidecar not SERVING:\n{log.read().decode()}")
                time.sleep(0.02)
            to_serving = time.perf_counter() - start
            to_all = None
            while all_kernels and to_all is None:
                log.seek(0)
                found = READY.search(log.read().decode(errors="replace"))
                if found:
                    to_all = float(found.group(2))
                elif process.poll() is not None or time.perf_counter() - start > timeout:
                    raise RuntimeError("sidecar ended before its kernels were ready")
                else:
                    time.sleep(0.2)
            return to_serving, to_all
        finally:
            stop(process)


def summary(label: str, values: list[float]) -> str:
    return (f"| {label} | {len(values)} | {statistics.median(values):.2f} | "
            f"{min(values):.2f} | {max(values):.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable,
                        help="the Python whose stealguard-sidecar runs (default: this one)")
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind (default 5)")
    parser.add_argument("--config", help="a sidecar config (default: the built-in policy)")
    args = parser.parse_args()
    sidecar = str(Path(args.python).parent / "stealguard-sidecar")
    if not os.access(sidecar, os.X_OK):
        raise SystemExit(f"no {sidecar}: install the project into that environment first")
    cold, cold_all, cached = [], [], []
    with tempfile.TemporaryDirectory(prefix="stealguard-bench-") as tmp:
        for run in range(args.runs):  # the first waits for the parallel kernels too
            seconds, all_ready = one_start(sidecar, f"{tmp}/cold-{run}", args.config, run == 0)
            cold.append(seconds)
            if all_ready is not None:
                cold_all.append(all_ready)
            print(f"cold run {run + 1}: SERVING after {seconds:.2f} s"
                  + (f", every kernel ready {all_ready:.1f} s after warm-up began"
                     if all_ready is not None else ""), file=sys.stderr)
        for run in range(args.runs):  # the cache cold-0 filled, parallel kernels included
            seconds, _ = one_start(sidecar, f"{tmp}/cold-0", args.config, False)
            cached.append(seconds)
            print(f"cached run {run + 1}: SERVING after {seconds:.2f} s", file=sys.stderr)
    load = os.getloadavg()[0]
    print(f"stealguard-sidecar {sidecar}, {os.cpu_count()} CPUs, load average "
          f"{load:.1f} at the end\n")
    print("| start | runs | median s | min s | max s |")
    print("|---|---|---|---|---|")
    print(summary("empty numba cache: exec to SERVING", cold))
    print(summary("empty numba cache: warm-up to every kernel ready (first run)", cold_all))
    print(summary("filled cache: exec to SERVING", cached))
    return 0


if __name__ == "__main__":
    sys.exit(main())
