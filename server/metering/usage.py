"""`stealguard-sidecar usage --store URL [--client NAME] [--format table|json]
[--detections]`: each principal's rows in each quota window (and `rate`: rows of its burst
in use), read from the store that the servers share; with `--detections`, each principal's
extraction-detection record instead: the escalation step it is on, the signal and evidence
that put it there, and since when."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict

from stealguard.server.metering.redis_store import open_store
from stealguard.server.metering.store import StoreError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stealguard-sidecar usage",
        description="Print each principal's rows in each window, from the metering store.")
    parser.add_argument("--store", default=os.environ.get("STEALGUARD_STORE"),
                        help="redis://HOST:PORT/DB or rediss://... (also STEALGUARD_STORE)")
    parser.add_argument("--client", help="only this principal")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    parser.add_argument("--detections", action="store_true",
                        help="print the principals escalated by extraction detection (step, "
                             "signal, evidence, since) instead of their rows")
    return parser


def _print_table(table: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> None:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for row in table:
        cells = [f"{c:>{w}}" if i in right else f"{c:<{w}}"
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip())


def _evidence(evidence: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in evidence.items())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `usage` subcommand; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.store or args.store == "memory":
        parser.exit(2, "stealguard-sidecar usage: error: --store must name a shared store "
                       "(redis://HOST:PORT/DB); a memory store lives inside its process\n")
    try:
        store = open_store(args.store, timeout=5.0)
    except ValueError as error:
        parser.exit(2, f"stealguard-sidecar usage: error: {error}\n")

    async def read():
        try:
            if args.detections:
                return await store.detections(args.client)
            return await store.usage(args.client)
        finally:
            await store.close()

    try:
        rows = asyncio.run(read())
    except StoreError as error:
        parser.exit(1, f"stealguard-sidecar usage: error: store {store.name}: {error}\n")
    if args.format == "json":
        json.dump([asdict(u) for u in rows], sys.stdout)
        sys.stdout.write("\n")
        return 0
    if args.detections:
        _print_table([("principal", "step", "from", "signal", "since", "evidence")] + [
            (d.principal, d.step + (" (dry run)" if d.dry_run else ""), d.previous, d.signal,
             d.since, _evidence(d.evidence)) for d in rows])
        return 0
    _print_table([("principal", "window", "rows")] + [(u.principal, u.window, str(u.rows))
                                                      for u in rows], right=(2,))
    return 0
