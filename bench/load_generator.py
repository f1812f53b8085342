#!/usr/bin/env python3
"""How fast can stealguard-load drive a server? Its maximum rate against the bare echo server.

The echo server (bench/echo_server.py) does the least a Defense server can: parse the
request and send its tensor back. The rate stealguard-load reaches against it, with
``--procs 1`` and ``--procs 2``, is the ceiling of the generator on this host; a sidecar
figure well below it is the sidecar's, not the generator's.

The same runs against ``stealguard-sidecar`` (default policy, Reverse Sigmoid) follow in
the same table, so the generator's ceiling and the sidecar's rate come from one run.

    python bench/load_generator.py [--duration 5s] [--concurrency 32] [--quick] [--no-sidecar]

Prints a Markdown table (and writes JSON to $STEALGUARD_BENCH_JSON when set, for
bench/run_all). Closed loop, Perturb of one 10-class float32 row. Client and server share
this host's cores, so on a small or busy machine both limits are mixed: the table gives
the client's CPU per process, the server's CPU per call and how busy the host was, so a
reader can tell which side was the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from _procs import Process, free_port, script, start_sidecar  # noqa: E402 - the one starter


def run_load(address: str, *args: str) -> dict:
    cmd = [script("stealguard-load"), "--target", address, "--no-progress", "--format", "json",
           *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"stealguard-load failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


def measure(address: str, server_pid: int, procs: int, concurrency: int,
            duration: str) -> dict:
    """One closed-loop run at ``procs`` worker processes, after 1 s of unmeasured load."""
    return run_load(address, "--procs", str(procs), "--concurrency", str(concurrency),
                    "--warmup", "1s", "--duration", duration, "--server-pid", str(server_pid))


def verdict(run: dict) -> str:
    """Which side limited the run: the client, the server, or neither (a busy host)."""
    client = max(run["client"]["cpu_per_proc"])
    server = run["server"]["cpu_cores"]
    host = run["host"]["busy"]
    if client >= 0.9:
        return f"the generator was saturated ({client:.0%} of a core): this is its ceiling."
    if server >= 0.9:
        return (f"the server was saturated ({server:.2f} cores) with the generator at "
                f"{client:.0%} of a core: the generator has headroom.")
    return (f"neither the generator ({client:.0%}) nor the server ({server:.2f} cores) filled a "
            f"core; the host was {host:.0%} busy, so other work took the CPU and this rate "
            "is a floor.")


def markdown(rows: list[tuple[str, dict]], duration: str, concurrency: int,
             notes: list[str]) -> str:
    load1 = os.getloadavg()[0]
    busy = ", ".join(format(r["host"]["busy"], ".0%") for _, r in rows)
    lines = [
        "### stealguard-load: maximum rate against the bare echo server (and the sidecar)",
        "",
        f"Closed loop, `Perturb` of 1x10 float32, concurrency {concurrency} in all, "
        f"{duration} per run after a 1 s warm-up; {os.cpu_count()} cores shared by client "
        f"and server (host CPU busy {busy} during the runs; load average {load1:.1f} at the "
        "end).",
        "",
        "| server | --procs | calls/s | p50 ms | p99 ms | client CPU per proc "
        "| client CPU per call | calls/s per client core | server CPU | server CPU per call |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        lat = r["latency_ms"]
        cpu = ", ".join(f"{u:.0%}" for u in r["client"]["cpu_per_proc"])
        per_call = r["client"]["cpu_us_per_call"]
        server = r["server"]
        lines.append(
            f"| {name} | {r['procs']} | {r['rps']:.0f} | {lat['p50']:.2f} | {lat['p99']:.2f} "
            f"| {cpu} | {per_call:.0f} us | {1e6 / per_call:.0f} "
            f"| {server['cpu_cores']:.2f} cores | {server['cpu_us_per_call']:.0f} us |"
        )
    lines += ["", "Calls/s per client core (1 / client CPU per call) is what one generator "
              "process sustains with a core to itself; a server whose CPU per call is higher "
              "saturates its core before the generator does."]
    lines += ["", "Command: `python bench/load_generator.py --duration "
              f"{duration} --concurrency {concurrency}`", ""]
    lines += [f"- {name}, --procs {r['procs']}: {verdict(r)}" for name, r in rows]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", default="5s", help="measured time per run (default 5s)")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight in all")
    parser.add_argument("--quick", action="store_true", help="2 s runs")
    parser.add_argument("--no-sidecar", action="store_true",
                        help="only the echo server, not also stealguard-sidecar")
    args = parser.parse_args(argv)
    duration = "2s" if args.quick or os.environ.get("STEALGUARD_BENCH_QUICK") else args.duration

    echo_address = f"127.0.0.1:{free_port()}"
    echo = Process([sys.executable, str(HERE / "echo_server.py"), "--listen", echo_address])
    servers = [("echo", echo, echo_address)]
    notes = []
    try:
        echo.wait_healthy(echo_address, timeout=60)
        if not args.no_sidecar:
            try:
                sidecar, sidecar_address = start_sidecar()  # default policy: Reverse Sigmoid
                servers.append(("sidecar", sidecar, sidecar_address))
            except RuntimeError as exc:  # not installed
                notes.append(f"sidecar rows skipped: {exc}")
        rows = [(name, measure(address, proc.pid, procs, args.concurrency, duration))
                for name, proc, address in servers for procs in (1, 2)]
    finally:
        for _, proc, _ in servers:
            proc.stop()
    print(markdown(rows, duration, args.concurrency, notes), end="")
    out = os.environ.get("STEALGUARD_BENCH_JSON")
    if out:
        headline = {f"stealguard-load max calls/s vs {name}, --procs {r['procs']}": round(r["rps"])
                    for name, r in rows}
        headline["stealguard-load client CPU per call (us), --procs 1"] = round(
            rows[0][1]["client"]["cpu_us_per_call"])
        runs = [{"server": name, **r} for name, r in rows]
        Path(out).write_text(json.dumps({"headline": headline, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
