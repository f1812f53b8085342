#!/usr/bin/env python3
"""A bare grpc.aio server of stealguard.v1.Defense that echoes the request's tensor.

The baseline for the sidecar benchmarks: the same protobuf parsing and serialising and the
same transport as the sidecar, with no codec, no validation and no defense. Also serves
TorchServe's ``Predictions`` (echoing the ``data`` input as the prediction) so the load
tester's ``--method predictions`` has a baseline too, and grpc.health.v1 (SERVING at once).

    python bench/echo_server.py --listen 127.0.0.1:50052 [--workers 2]
    python bench/echo_server.py --listen 127.0.0.1:0           # prints the port it bound
    python bench/echo_server.py --listen ... --stall 200ms --stall-every 1s

``--stall`` pauses the whole process (a blocking sleep in the event loop, as a GC pause or
SIGSTOP would) once per ``--stall-every``: the server that shows coordinated omission.
Prints ``listening on HOST:PORT`` on stdout once it accepts calls.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import sys
import time

from stealguard.server.launch import prefer_poller

prefer_poller()  # before grpc is imported: the gRPC I/O the stealguard commands use

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc
from stealguard.v1 import defense_pb2, defense_pb2_grpc


class Stall:
    """Blocks the process for ``seconds`` at most once per ``every`` seconds."""

    def __init__(self, seconds: float, every: float) -> None:
        self.seconds = seconds
        self.every = every
        self.next_at = time.monotonic() + every

    def maybe(self) -> None:
        if self.seconds <= 0:
            return
        now = time.monotonic()
        if now >= self.next_at:
            self.next_at = now + self.every
            time.sleep(self.seconds)  # deliberately blocks the event loop: a process pause


class EchoDefense(defense_pb2_grpc.DefenseServicer):
    def __init__(self, stall: Stall) -> None:
        self.stall = stall

    async def Perturb(self, request, context):
        self.stall.maybe()
        return defense_pb2.PerturbResponse(
            probabilities=request.probabilities, policy="echo", request_id=request.request_id
        )

    async def PerturbStream(self, request_iterator, context):
        async for request in request_iterator:
            self.stall.maybe()
            yield defense_pb2.PerturbResponse(
                probabilities=request.probabilities, policy="echo", request_id=request.request_id
            )

    async def ListPolicies(self, request, context):
        return defense_pb2.ListPoliciesResponse(
            policies=[defense_pb2.Policy(name="echo", defense="none")]
        )


class EchoPredictions(inference_pb2_grpc.InferenceAPIsServiceServicer):
    def __init__(self, stall: Stall) -> None:
        self.stall = stall

    async def Ping(self, request, context):
        return inference_pb2.TorchServeHealthResponse(health='{"status": "Healthy"}')

    async def Predictions(self, request, context):
        self.stall.maybe()
        return inference_pb2.PredictionResponse(prediction=request.input.get("data", b""))


async def serve(listen: str, stall: Stall, announce: bool = True) -> None:
    """Serve until SIGTERM/SIGINT; prints ``listening on HOST:PORT`` when ready."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 1),
        ]
    )
    defense_pb2_grpc.add_DefenseServicer_to_server(EchoDefense(stall), server)
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(EchoPredictions(stall), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", "stealguard.v1.Defense"):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise SystemExit(f"echo_server: cannot listen on {listen}")
    await server.start()
    host = listen.rsplit(":", 1)[0]
    if announce:
        print(f"listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def _duration(text: str) -> float:
    from stealguard.client.load.config import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _worker(listen: str, stall_s: float, every_s: float) -> None:
    asyncio.run(serve(listen, Stall(stall_s, every_s), announce=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:50052", help="HOST:PORT (port 0: any)")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    parser.add_argument("--stall", type=_duration, default=0.0, help="pause length, e.g. 200ms")
    parser.add_argument("--stall-every", type=_duration, default=1.0, help="pause period")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers > 1 and args.listen.endswith(":0"):
        parser.error("--workers > 1 needs a fixed port in --listen")
    extra = []
    ctx = multiprocessing.get_context("spawn")
    for _ in range(args.workers - 1):
        proc = ctx.Process(target=_worker, args=(args.listen, args.stall, args.stall_every))
        proc.start()
        extra.append(proc)
    try:
        asyncio.run(serve(args.listen, Stall(args.stall, args.stall_every)))
    finally:
        for proc in extra:
            if proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
            proc.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
