#!/usr/bin/env python3
"""Model server: what protection adds to a `Predictions` call (`mnist` against `mnist-open`).

    python bench/modelserver.py               # 3,000 calls of each model
    python bench/modelserver.py --quick       # 500 of each
    python bench/modelserver.py --input png --batch 1 --calls 5000 --format json
    python bench/modelserver.py --sidecar-transport unary   # one Perturb call per request

Starts `stealguard-sidecar` (Reverse Sigmoid, beta 1.5, gamma 0.3) and
`stealguard-modelserver` on free loopback ports. One client sends MNIST test images (.npy
or PNG) as TorchServe `Predictions`, one call at a time, alternating `mnist` (protected:
inference, then the sidecar) and `mnist-open` (the same model, no protect step) in the same
run, so both see the same machine. The model server reaches the sidecar over one
long-lived PerturbStream (its default) or with one unary Perturb per request. Reports
p50/p99/mean of each, what protection adds (the difference of the p50s and the p50 of the
per-pair differences), and the round trips under it: the sidecar's for the same
probabilities, unary and as one message on an open stream, and the same two against
bench/echo_server.py (gRPC that does no work: the floor under any out-of-process hop); all
from the asyncio client the model server uses, and the sidecar's two again from the blocking
client the TorchServe handler uses.
Target: protection adds at most 0.5 ms at p50.

Prints Markdown; writes {"headline": {...}} to $STEALGUARD_BENCH_JSON when set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from stealguard.server.launch import prefer_poller

prefer_poller()  # before grpc is imported: the gRPC I/O the stealguard commands use

import grpc
import numpy as np

# The process helpers of the proxy benchmark, one copy for both.
from proxy import (
    CONFIG,
    add_pair_flags,
    check_pair_flags,
    console_script,
    free_port,
    mnist_sample,
    npy,
    start,
    stop,
    summary,
)
from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc

MODELS = ("mnist-open", "mnist")


def request_data(kind: str, batch: int) -> bytes:
    """`batch` MNIST test images as .npy (batch > 1: shape (N, 1, 28, 28)) or one PNG."""
    if kind == "png":
        import io

        from PIL import Image

        pixels = np.round(mnist_sample()[0] * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
        return buffer.getvalue()
    if batch == 1:
        return npy(mnist_sample())
    from stealguard.modelserver.datasets import load_dataset

    return npy(load_dataset("mnist").test_x[:batch])


def measure(address: str, data: bytes, calls: int, warmup: int) -> dict[str, np.ndarray]:
    """Alternate `mnist-open` and `mnist` calls; latencies in milliseconds."""
    stub = inference_pb2_grpc.InferenceAPIsServiceStub(grpc.insecure_channel(address))
    requests = [inference_pb2.PredictionsRequest(model_name=m, input={"data": data})
                for m in MODELS]
    for _ in range(warmup):
        for request in requests:
            stub.Predictions(request, timeout=10)
    times = np.empty((calls, 2))
    for i in range(calls):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            started = time.perf_counter_ns()
            stub.Predictions(requests[which], timeout=10)
            times[i, which] = (time.perf_counter_ns() - started) / 1e6
    return {model: times[:, k] for k, model in enumerate(MODELS)}


def measure_sidecar(address: str, probs: np.ndarray, calls: int, stream: bool) -> np.ndarray:
    """The round trip for `probs` to `address` in ms, from the asyncio client the model
    server uses: a unary Perturb, or one message on an open PerturbStream."""
    import asyncio

    from stealguard.client import AsyncDefenseClient

    async def run() -> np.ndarray:
        async with AsyncDefenseClient(address, timeout=10, stream=stream) as client:
            for _ in range(min(calls, 200)):
                await client.perturb(probs, model="mnist")
            times = np.empty(calls)
            for i in range(calls):
                started = time.perf_counter_ns()
                await client.perturb(probs, model="mnist")
                times[i] = (time.perf_counter_ns() - started) / 1e6
            return times

    return asyncio.run(run())


def measure_blocking(address: str, probs: np.ndarray, calls: int, stream: bool) -> np.ndarray:
    """The same round trip from the blocking client (the TorchServe handler's), in ms."""
    from stealguard.client import DefenseClient

    with DefenseClient(address, timeout=10, stream=stream) as client:
        for _ in range(min(calls, 200)):
            client.perturb(probs, model="mnist")
        times = np.empty(calls)
        for i in range(calls):
            started = time.perf_counter_ns()
            client.perturb(probs, model="mnist")
            times[i] = (time.perf_counter_ns() - started) / 1e6
    return times


LAYOUTS = {
    "shared": "the OS places every process on any core",
    "pinned": "the sidecar (and the echo server) on the last core, the model server and "
              "this client on the others: the README's deployment advice",
}


def cpus_of(layout: str) -> tuple[set[int] | None, set[int] | None]:
    """(the sidecar's CPUs, everything else's) for a layout; None: wherever the OS likes."""
    if layout == "shared":
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    return {cpus[-1]}, set(cpus[:-1])


def pin_this_process(cpus: set[int]) -> None:
    """Every thread of this process onto `cpus` (threads started later inherit it)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def run_layout(args: argparse.Namespace, data: bytes, layout: str) -> dict:
    """Start the processes placed as `layout` says, measure, stop them; the figures."""
    sidecar_cpus, other_cpus = cpus_of(layout)
    everywhere = os.sched_getaffinity(0)
    threads = args.torch_threads or (len(other_cpus) if other_cpus else 2)
    tmp = Path(tempfile.mkdtemp(prefix="stealguard-bench-modelserver-"))
    sidecar_address, address, echo_address = (f"127.0.0.1:{free_port()}" for _ in range(3))
    (tmp / "sidecar.yaml").write_text(CONFIG)
    procs = []
    try:
        procs.append(start([console_script("stealguard-sidecar"), "--listen", sidecar_address,
                            "--config", str(tmp / "sidecar.yaml")],
                           sidecar_address, tmp / "sidecar.log", 600, cpus=sidecar_cpus))
        procs.append(start([console_script("stealguard-modelserver"), "--listen", address,
                            "--sidecar", sidecar_address, "--model-store", str(tmp / "store"),
                            "--torch-threads", str(threads),
                            "--sidecar-transport", args.sidecar_transport],
                           address, tmp / "modelserver.log", 600, cpus=other_cpus))
        procs.append(start([sys.executable, str(Path(__file__).with_name("echo_server.py")),
                            "--listen", echo_address], echo_address, tmp / "echo.log", 60,
                           cpus=sidecar_cpus))
        if other_cpus:
            pin_this_process(other_cpus)
        load_before = os.getloadavg()[0]
        times = measure(address, data, args.calls, args.warmup)
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(grpc.insecure_channel(address))
        raw = np.array(json.loads(stub.Predictions(inference_pb2.PredictionsRequest(
            model_name="mnist-open", input={"data": data}), timeout=10).prediction))
        trips = {(name, stream): measure_sidecar(where, raw, args.calls, stream)
                 for name, where in (("sidecar", sidecar_address), ("echo", echo_address))
                 for stream in (False, True)}
        blocking = {stream: measure_blocking(sidecar_address, raw, args.calls, stream)
                    for stream in (False, True)}
        load_after = os.getloadavg()[0]
    finally:
        pin_this_process(everywhere)
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)

    open_, protected = summary(times["mnist-open"]), summary(times["mnist"])
    return {
        "layout": layout, "sidecar_cpus": sorted(sidecar_cpus or everywhere),
        "modelserver_cpus": sorted(other_cpus or everywhere), "torch_threads": threads,
        "mnist-open": open_, "mnist": protected,
        "sidecar_perturb": summary(trips["sidecar", False]),
        "sidecar_stream_message": summary(trips["sidecar", True]),
        "echo_perturb": summary(trips["echo", False]),
        "echo_stream_message": summary(trips["echo", True]),
        "blocking_sidecar_perturb": summary(blocking[False]),
        "blocking_sidecar_stream_message": summary(blocking[True]),
        "added_p50_ms": protected["p50_ms"] - open_["p50_ms"],
        "paired_diff_p50_ms": float(np.percentile(times["mnist"] - times["mnist-open"], 50)),
        "added_p99_ms": protected["p99_ms"] - open_["p99_ms"],
        "load_average": [load_before, load_after],
    }


def headline(args: argparse.Namespace, results: list[dict]) -> dict[str, str]:
    figures = {}
    for r in results:
        where = f"{r['layout']} cores"
        figures[f"protection added to Predictions p50 ({args.input}, batch {args.batch}, "
                f"{args.sidecar_transport}, {where})"] = f"{r['added_p50_ms']:.3f} ms"
        figures[f"protection added to Predictions p99 ({where})"] = f"{r['added_p99_ms']:.3f} ms"
        figures[f"sidecar round trip p50, unary / stream message ({where})"] = (
            f"{r['sidecar_perturb']['p50_ms']:.3f} / "
            f"{r['sidecar_stream_message']['p50_ms']:.3f} ms")
        figures[f"echo server round trip p50 (no work), unary / stream message ({where})"] = (
            f"{r['echo_perturb']['p50_ms']:.3f} / {r['echo_stream_message']['p50_ms']:.3f} ms")
        figures[f"sidecar round trip p50 from the blocking client, unary / stream message "
                f"({where})"] = (f"{r['blocking_sidecar_perturb']['p50_ms']:.3f} / "
                                 f"{r['blocking_sidecar_stream_message']['p50_ms']:.3f} ms")
    return figures


def print_layout(r: dict) -> None:
    print(f"### Cores {r['layout']}: {LAYOUTS[r['layout']]}\n")
    print(f"Sidecar on CPUs {r['sidecar_cpus']}, model server (--torch-threads "
          f"{r['torch_threads']}) on CPUs {r['modelserver_cpus']}; load average "
          f"{r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f}.\n")
    print("| model | p50 ms | p99 ms | mean ms |\n|---|---|---|---|")
    rows = (("`mnist-open` (no protect step)", "mnist-open"), ("`mnist` (protected)", "mnist"),
            ("sidecar `Perturb` alone (same probabilities), unary", "sidecar_perturb"),
            ("sidecar, one message on an open `PerturbStream`", "sidecar_stream_message"),
            ("echo server `Perturb` (same round trip, no work), unary", "echo_perturb"),
            ("echo server, one message on an open `PerturbStream`", "echo_stream_message"),
            ("sidecar from the blocking client (the TorchServe handler's), unary",
             "blocking_sidecar_perturb"),
            ("sidecar from the blocking client, one message on an open stream",
             "blocking_sidecar_stream_message"))
    for name, key in rows:
        s = r[key]
        print(f"| {name} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {s['mean_ms']:.3f} |")
    echo, echo_stream = r["echo_perturb"], r["echo_stream_message"]
    print(f"\nAdded by protection: **{r['added_p50_ms']:.3f} ms at p50** (p50 of per-pair "
          f"differences {r['paired_diff_p50_ms']:.3f} ms), {r['added_p99_ms']:.3f} ms at p99. "
          f"Target: at most 0.5 ms at p50. gRPC that does no work takes "
          f"{echo['p50_ms']:.3f} ms at p50 here for a unary call and "
          f"{echo_stream['p50_ms']:.3f} ms for a message on an open stream: the floors under "
          f"an out-of-process hop.\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", choices=["npy", "png"], default="npy",
                        help="request format (default npy)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (.npy only)")
    parser.add_argument("--layout", choices=["shared", "pinned", "both"], default="both",
                        help="where the processes run: " + "; ".join(
                            f"{k}: {v}" for k, v in LAYOUTS.items()) + " (default both)")
    parser.add_argument("--torch-threads", type=int,
                        help="the model server's --torch-threads (default: 2 with shared "
                             "cores, the model server's cores with pinned)")
    parser.add_argument("--sidecar-transport", choices=["stream", "unary"], default="stream",
                        help="the model server's --sidecar-transport (default stream)")
    add_pair_flags(parser)
    args = parser.parse_args(argv)
    check_pair_flags(parser, args)
    if args.batch < 1 or (args.input == "png" and args.batch != 1):
        parser.error("--batch must be at least 1, and 1 with --input png")
    if args.torch_threads is not None and args.torch_threads < 1:
        parser.error("--torch-threads must be at least 1")
    layouts = ["shared", "pinned"] if args.layout == "both" else [args.layout]
    if "pinned" in layouts and len(os.sched_getaffinity(0)) < 2:
        if args.layout == "pinned":
            parser.error("--layout pinned needs at least 2 CPUs (one for the sidecar)")
        layouts = ["shared"]

    data = request_data(args.input, args.batch)
    results = [run_layout(args, data, layout) for layout in layouts]
    if os.environ.get("STEALGUARD_BENCH_JSON"):
        Path(os.environ["STEALGUARD_BENCH_JSON"]).write_text(
            json.dumps({"headline": headline(args, results)}))
    if args.format == "json":
        print(json.dumps({"input": args.input, "batch": args.batch, "calls": args.calls,
                          "sidecar_transport": args.sidecar_transport,
                          "cores": os.cpu_count(), "layouts": results}, indent=2))
        return 0
    print(f"`stealguard-modelserver` with `stealguard-sidecar` (Reverse Sigmoid, beta 1.5, "
          f"gamma 0.3) on loopback, reached with --sidecar-transport "
          f"{args.sidecar_transport}; {args.batch} MNIST test image(s) as {args.input} per "
          f"`Predictions` call, one call at a time, {args.calls} calls of each model "
          f"alternating in one run ({args.warmup} pairs of warm-up) per layout; "
          f"{os.cpu_count()} cores.\n")
    for r in results:
        print_layout(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
