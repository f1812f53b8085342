#!/usr/bin/env python3
"""Envoy ext_proc: what the sidecar's ExternalProcessor adds to an answer passing through
Envoy, against the same Envoy without the filter.

    python bench/extproc.py            # 3000 pairs of calls
    python bench/extproc.py --quick    # 500 pairs
    python bench/extproc.py --format json

Starts `stealguard-sidecar` (Reverse Sigmoid, beta 1.5, gamma 0.3) and a real Envoy 1.40
(`.tools/envoy`, from `scripts/tools`) running deploy/envoy/envoy.yaml, with a second
listener identical but for the ext_proc filter. Both listeners proxy
`POST /predictions/bench` to a third listener of the same Envoy that answers a 1x10 JSON
probability list itself (`direct_response`), so the upstream adds little time or noise.
One client sends one call at a time, alternating the two listeners in one run (keep-alive
HTTP/1.1). Reports
p50/p99 of each, the added p50 (difference of the p50s, and p50 of the per-pair
differences) and the CPU per call the filter adds: the sidecar's CPU plus Envoy's extra
CPU, per call. Target: at most 1.0 ms added at p50.

Prints Markdown; writes {"headline": {...}} to $STEALGUARD_BENCH_JSON when set.
"""

from __future__ import annotations

import argparse
import copy
import http.client
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import numpy as np  # noqa: E402
from _extproc_helpers import Envoy  # noqa: E402 - the one way Envoy starts
from _procs import free_port, start_sidecar  # noqa: E402
from proxy import add_pair_flags, check_pair_flags, cpu_seconds, summary  # noqa: E402

CONFIG = "policies:\n  default: {defense: reverse_sigmoid, beta: 1.5, gamma: 0.3}\n"
PATH = "/predictions/bench"


def answer() -> str:
    """A 1x10 probability list, as TorchServe answers one image."""
    logits = np.linspace(0.0, 3.0, 10)
    return json.dumps((np.exp(logits) / np.exp(logits).sum()).tolist())


def with_bench_upstream(config: dict, body: str, port: int) -> dict:
    """A third listener, without ext_proc, answers PATH with `body` (a `direct_response`);
    both measured listeners proxy PATH to it, so the answer they protect comes over a real
    upstream connection, as a model server's would, from an upstream that adds little."""
    listeners = config["static_resources"]["listeners"]
    upstream = copy.deepcopy(listeners[-1])  # the raw listener: no ext_proc filter
    upstream["name"] = "bench_upstream"
    upstream["address"]["socket_address"]["port_value"] = port
    _routes(upstream)[:] = [{
        "match": {"path": PATH},
        "direct_response": {"status": 200, "body": {"inline_string": body}},
        "response_headers_to_add": [{"header": {"key": "content-type",
                                                "value": "application/json"}}]}]
    for listener in listeners:
        _routes(listener).insert(0, {"match": {"path": PATH},
                                     "route": {"cluster": "bench_upstream"}})
    listeners.append(upstream)
    config["static_resources"]["clusters"].append({
        "name": "bench_upstream", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "bench_upstream", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": port}}}}]}]}})
    return config


def _routes(listener: dict) -> list:
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager["route_config"]["virtual_hosts"][0]["routes"]


def measure(ports: tuple[int, int], calls: int, warmup: int) -> np.ndarray:
    """Alternate the raw and ext_proc listeners; (calls, 2) latencies in milliseconds."""
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for port in ports]
    body = b"{}"

    def call(which: int) -> bytes:
        connection = connections[which]
        connection.request("POST", PATH, body=body, headers={"content-type": "application/json"})
        reply = connection.getresponse()
        data = reply.read()
        if reply.status != 200:
            raise SystemExit(f"bench/extproc.py: listener {ports[which]} answered "
                             f"{reply.status}: {data[:200]!r}")
        return data

    if ports[0] != ports[1] and call(0) == call(1):
        raise SystemExit("bench/extproc.py: the ext_proc listener answered the raw body")
    for _ in range(warmup):
        call(0)
        call(1)
    times = np.empty((calls, 2))
    for i in range(calls):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = time.perf_counter_ns()
            call(which)
            times[i, which] = (time.perf_counter_ns() - start) / 1e6
    for connection in connections:
        connection.close()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_pair_flags(parser)
    args = parser.parse_args(argv)
    check_pair_flags(parser, args)

    tmp = Path(tempfile.mkdtemp(prefix="stealguard-bench-extproc-"))
    (tmp / "sidecar.yaml").write_text(CONFIG)
    sidecar, address = start_sidecar("--config", str(tmp / "sidecar.yaml"))
    envoy = None
    try:
        clusters = dict.fromkeys(("torchserve_rest", "kserve_v1", "torchserve_grpc", "v2_rest",
                                  "v2_grpc"), address)  # unused: PATH is answered by Envoy
        envoy = Envoy(tmp, {**clusters, "stealguard": address},
                      edit=lambda config: with_bench_upstream(config, answer(),
                                                              free_port()))
        load_before = os.getloadavg()[0]
        # warm-up first, outside the CPU count
        measure((envoy.raw_port, envoy.port), 0, args.warmup)
        cpu = [cpu_seconds(envoy.process.pid), cpu_seconds(sidecar.pid)]
        raw_start = time.perf_counter()
        times = measure((envoy.raw_port, envoy.port), args.calls, 0)
        wall = time.perf_counter() - raw_start
        envoy_cpu = cpu_seconds(envoy.process.pid) - cpu[0]
        sidecar_cpu = cpu_seconds(sidecar.pid) - cpu[1]
        load_after = os.getloadavg()[0]
        # Envoy's CPU when only the raw listener is called, to subtract its own share
        cpu_raw = cpu_seconds(envoy.process.pid)
        only_raw = measure((envoy.raw_port, envoy.raw_port), args.calls // 2, 0)
        envoy_raw_cpu_per_call = (cpu_seconds(envoy.process.pid) - cpu_raw) / (
            2 * (args.calls // 2))
    finally:
        if envoy is not None:
            envoy.stop()
        sidecar.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    raw, processed = summary(times[:, 0]), summary(times[:, 1])
    added_p50 = processed["p50_ms"] - raw["p50_ms"]
    paired_p50 = float(np.percentile(times[:, 1] - times[:, 0], 50))
    sidecar_us = sidecar_cpu / args.calls * 1e6
    # envoy_cpu covers `calls` raw and `calls` processed calls
    envoy_extra_us = (envoy_cpu / args.calls - 2 * envoy_raw_cpu_per_call) * 1e6
    result = {"calls": args.calls, "raw": raw, "ext_proc": processed,
              "added_p50_ms": added_p50, "paired_diff_p50_ms": paired_p50,
              "added_p99_ms": processed["p99_ms"] - raw["p99_ms"],
              "sidecar_cpu_us_per_call": sidecar_us, "envoy_extra_cpu_us_per_call": envoy_extra_us,
              "added_cpu_us_per_call": sidecar_us + envoy_extra_us,
              "only_raw_p50_ms": float(np.percentile(only_raw, 50)), "wall_seconds": wall,
              "load_average": [load_before, load_after], "cores": os.cpu_count()}
    if os.environ.get("STEALGUARD_BENCH_JSON"):
        Path(os.environ["STEALGUARD_BENCH_JSON"]).write_text(json.dumps({"headline": {
            "ext_proc added latency p50 (1x10 JSON)": f"{added_p50:.3f} ms",
            "ext_proc added CPU per call": f"{result['added_cpu_us_per_call']:.0f} us",
        }}))
    if args.format == "json":
        print(json.dumps(result, indent=2))
        return 0
    print(f"Envoy 1.40 (`--concurrency 1`) answering a 1x10 JSON probability list itself "
          f"(`direct_response`) behind two listeners, one with the ext_proc filter; "
          f"{args.calls} calls to each, alternating, one at a time ({args.warmup} pairs of "
          f"warm-up); load average {load_before:.1f} -> {load_after:.1f} on "
          f"{os.cpu_count()} cores.\n")
    print("| path | p50 ms | p99 ms | mean ms |\n|---|---|---|---|")
    for name, s in (("Envoy without ext_proc", raw), ("Envoy with stealguard ext_proc", processed)):
        print(f"| {name} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {s['mean_ms']:.3f} |")
    print(f"\nAdded by ext_proc: **{added_p50:.3f} ms at p50** (p50 of per-pair differences "
          f"{paired_p50:.3f} ms), {result['added_p99_ms']:.3f} ms at p99. Target: at most "
          f"1.0 ms at p50. CPU added per call: {result['added_cpu_us_per_call']:.0f} us "
          f"(sidecar {sidecar_us:.0f} us, Envoy's extra {envoy_extra_us:.0f} us).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
