"""Container health probe: exit 0 when the gRPC server at ADDR is serving, 1 otherwise.

Usage:
  python3 healthcheck.py [ADDR] [--service NAME]   grpc.health.v1 Check (sidecar, model server)
  python3 healthcheck.py [ADDR] --torchserve       TorchServe's Ping says "Healthy" (for a real
                                                   TorchServe, which has no grpc.health)

ADDR defaults to $STEALGUARD_HEALTHCHECK_ADDR, else 127.0.0.1:50051. Docker's HEALTHCHECK
and Compose's healthcheck run it inside the container; Kubernetes uses its own gRPC probe.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc


def check_grpc_health(addr: str, service: str, timeout: float) -> tuple[bool, str]:
    """Ask grpc.health.v1.Health/Check at `addr` about `service`; True when SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def check_torchserve_ping(addr: str, timeout: float) -> tuple[bool, str]:
    """Call TorchServe's InferenceAPIsService/Ping at `addr`; True when it reports Healthy."""
    from google.protobuf import empty_pb2
    from stealguard.compat.torchserve import inference_pb2_grpc

    with grpc.insecure_channel(addr) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        reply = stub.Ping(empty_pb2.Empty(), timeout=timeout)
    try:
        status = json.loads(reply.health).get("status", "")
    except (ValueError, AttributeError):
        status = reply.health.strip()
    return status == "Healthy", status or "empty"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "addr",
        nargs="?",
        default=os.environ.get("STEALGUARD_HEALTHCHECK_ADDR", "127.0.0.1:50051"),
        help="host:port of the gRPC server",
    )
    parser.add_argument("--service", default="", help="health service name (default: server)")
    parser.add_argument("--torchserve", action="store_true", help="use TorchServe's Ping")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    args = parser.parse_args(argv)
    try:
        if args.torchserve:
            ok, status = check_torchserve_ping(args.addr, args.timeout)
        else:
            ok, status = check_grpc_health(args.addr, args.service, args.timeout)
    except grpc.RpcError as err:
        print(f"{args.addr}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    print(f"{args.addr}: {status}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
