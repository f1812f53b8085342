"""Check the compose detection profile's out/detection (written by `stealguard-attack detect
--target` and `stealguard-sidecar usage --detections --format json`).

Usage: python3 deploy/check_detection.py [DIR] [--max-queries 1000]

Passes (exit 0) when, through the real model server with the class mix on:
  - every thief was detected within MAX_QUERIES queries: from some query on it was answered
    labels only (the issue's target: Jacobian, Random and Knockoff before 1,000 queries);
  - the same Jacobian thief as the allow-listed principal was never answered labels only;
  - no honest client (each the 1,000 held-out test images in its own order) was;
  - the store holds a detection record for each thief, on the `labels` step by the
    `classmix` signal, and none for an honest client: what `stealguard-sidecar usage
    --detections` shows the operator, read from the store the replicas share.
Otherwise prints why and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def problems(result: dict, records: list[dict], max_queries: int) -> list[str]:
    """What fails the check (empty: it passes)."""
    out = []
    by_principal = {r["principal"]: r for r in records}
    if not result["attacks"]:
        out.append("no thief ran")
    for attack in result["attacks"]:
        name, first = attack["attack"], attack["labels_from"]
        if first is None or first > max_queries:
            out.append(f"{name}: not detected within {max_queries} queries "
                       f"(labels from {first})")
        record = by_principal.get(attack["principal"])
        if record is None:
            out.append(f"{name}: no detection record for {attack['principal']!r} in the store")
        elif (record["step"], record["signal"]) != ("labels", "classmix"):
            out.append(f"{name}: the store's record is step {record['step']!r} by "
                       f"{record['signal']!r}, expected 'labels' by 'classmix'")
    for run in result["without_detection"]:
        if run["labels_from"] is not None:
            out.append(f"{run['attack']} as the allow-listed {run['principal']!r} was answered "
                       f"labels only from query {run['labels_from']}")
    for client in result["benign"]["clients"]:
        if client["labels_from"] is not None:
            out.append(f"honest client {client['principal']} was answered labels only from "
                       f"query {client['labels_from']}")
        if client["principal"] in by_principal:
            out.append(f"honest client {client['principal']} has a detection record")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", nargs="?", default="out/detection", type=Path)
    parser.add_argument("--max-queries", type=int, default=1000)
    args = parser.parse_args(argv)
    try:
        result = json.loads((args.dir / "results.json").read_text())
        records = json.loads((args.dir / "usage.json").read_text())
    except (OSError, ValueError) as error:
        print(f"check_detection: cannot read {args.dir}: {error}", file=sys.stderr)
        return 1
    found = problems(result, records, args.max_queries)
    for line in found:
        print(f"check_detection: {line}", file=sys.stderr)
    if not found:
        detected = ", ".join(f"{a['attack']} at {a['labels_from']}" for a in result["attacks"])
        print(f"check_detection: passed: labels only from query {detected}; "
              f"{len(result['benign']['clients'])} honest clients never; "
              f"{len(records)} detection records in the store")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
