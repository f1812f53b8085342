"""One thief spread over several sidecar replicas is metered once, in their shared store.

Usage: python3 metering_check.py --replica HOST:PORT [--replica HOST:PORT ...]
                                 --store URL --quota N [--lease 64] [--rows 250]
                                 [--out metering.json]

Sends `Perturb` calls of ROWS rows, from this one principal (its peer address), to the
replicas in turn until every replica refuses with RESOURCE_EXHAUSTED, then asks the store
(`stealguard-sidecar usage --store URL`) what it counted. Passes (exit 0) when:
  - the rows admitted by all replicas together are at most N plus one lease per replica
    (the README's worst case: "one lease (<= 64 rows) per principal per serving process"),
    and at least N less one lease per replica and one call (leases stranded in the other
    processes, and the last call that did not fit);
  - every replica admitted some rows (the calls really were spread);
  - the store's count for the principal is the combined count: at least the rows admitted
    (every admitted row was charged there first) and at most N (a quota window that did
    not move holds no more; the unspent rest is leases).
Otherwise prints why and exits 1. Without a shared store each replica would admit about N
on its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import grpc
import numpy as np
from stealguard.server.codec import array_to_tensor
from stealguard.v1 import defense_pb2, defense_pb2_grpc

PRINCIPAL_KEY = "x-stealguard-principal"


def probability_rows(rows: int, classes: int = 10, seed: int = 0) -> np.ndarray:
    """`rows` valid probability rows (softmax of seeded normal logits)."""
    logits = np.random.default_rng(seed).normal(size=(rows, classes))
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def spend(replicas: list[str], rows: int, max_calls: int) -> tuple[dict[str, int], str]:
    """Call the replicas in turn until each has refused once; ({replica: rows admitted},
    the principal the sidecars named in their answers)."""
    request = defense_pb2.PerturbRequest(probabilities=array_to_tensor(probability_rows(rows)),
                                         model="mnist")
    channels = {r: grpc.insecure_channel(r) for r in replicas}
    stubs = {r: defense_pb2_grpc.DefenseStub(c) for r, c in channels.items()}
    admitted = dict.fromkeys(replicas, 0)
    refused: set[str] = set()
    principal = ""
    try:
        for call in range(max_calls):
            replica = replicas[call % len(replicas)]
            try:
                _, answer = stubs[replica].Perturb.with_call(request, timeout=10)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise SystemExit(f"metering_check: {replica} answered "
                                     f"{error.code().name}: {error.details()}") from None
                refused.add(replica)
                if refused == set(replicas):
                    return admitted, principal
                continue
            admitted[replica] += rows
            principal = principal or dict(answer.trailing_metadata()).get(PRINCIPAL_KEY, "")
    finally:
        for channel in channels.values():
            channel.close()
    raise SystemExit(f"metering_check: {max_calls} calls of {rows} rows and not every "
                     f"replica refused: admitted {admitted}")


def store_count(store: str, principal: str) -> int:
    """Rows the store holds for `principal` in its quota window (`stealguard-sidecar usage`)."""
    out = subprocess.run(["stealguard-sidecar", "usage", "--store", store, "--client",
                          principal, "--format", "json"], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    return usage_rows(json.loads(out), principal)


def usage_rows(usage: list[dict], principal: str) -> int:
    """The largest window count of `principal` in `usage --format json`'s answer
    ([{"principal", "window", "rows"}])."""
    return max((e["rows"] for e in usage if e["principal"] == principal), default=0)


def problems(admitted: dict[str, int], stored: int, quota: int, lease: int,
             rows: int) -> list[str]:
    """What the measurement fails, as sentences; empty when it passes."""
    total, slack = sum(admitted.values()), lease * len(admitted)
    found = []
    if total > quota + slack:
        found.append(f"{total} rows admitted, above the quota {quota} plus one lease per "
                     f"replica ({slack})")
    if total < quota - slack - rows:
        found.append(f"{total} rows admitted, below the quota {quota} less one lease per "
                     f"replica and one call ({slack + rows})")
    idle = [r for r, n in admitted.items() if n == 0]
    if idle:
        found.append(f"replica(s) {', '.join(idle)} admitted nothing: the calls were not spread")
    if not total <= stored <= quota:
        found.append(f"the store counts {stored} rows for the principal, not between the "
                     f"{total} admitted and the quota {quota}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replica", action="append", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--quota", type=int, required=True)
    parser.add_argument("--lease", type=int, default=64)
    parser.add_argument("--rows", type=int, default=250)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    max_calls = 2 * (args.quota // args.rows + 2 * len(args.replica))
    admitted, principal = spend(args.replica, args.rows, max_calls)
    stored = store_count(args.store, principal)
    result = {"principal": principal, "quota": args.quota, "lease": args.lease,
              "rows_per_call": args.rows, "admitted": admitted,
              "admitted_total": sum(admitted.values()), "store_count": stored}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"metering_check: {principal}: {result['admitted_total']} rows admitted "
          f"({', '.join(f'{r} {n}' for r, n in admitted.items())}) against a quota of "
          f"{args.quota} (+ {args.lease * len(admitted)} lease slack); the store counts "
          f"{stored}")
    found = problems(admitted, stored, args.quota, args.lease, args.rows)
    for problem in found:
        print(f"metering_check: FAIL: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
