#!/usr/bin/env python3
"""Soak: one million Perturb calls against one sidecar; errors and resident memory growth.

    python bench/soak.py                        # 1,000,000 calls (10-20 min on 2 busy cores)
    python bench/soak.py --total 100000         # a shorter run
    python bench/soak.py --method perturb-stream  # messages on long-lived PerturbStreams
    python bench/soak.py --target HOST:PORT --pid PID   # a sidecar that is already running

Starts `stealguard-sidecar` (default policy: Reverse Sigmoid), warms it with a short
unmeasured run, then drives `--total` calls with stealguard-load (closed loop,
`--concurrency` callers over `--procs` processes) while sampling the sidecar's VmRSS from
/proc/PID/status every `--every` seconds. Prints Markdown: calls, errors by status code
(goal 0), throughput and latency, and RSS after warm-up, at its peak and at the end; the
growth is end minus after-warm-up (goal under 20 MB).
Exit status: 0 when both goals are met, 1 when one is missed, 2 for a usage error.
"""
# run_all: skip   (a 10-20 minute run; its figures go in the README, run it on its own)

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _procs import script, start_sidecar  # noqa: E402

MAX_ERRORS = 0
CALLS = {"perturb": "Perturb calls", "perturb-stream": "PerturbStream messages"}
MAX_GROWTH_MB = 20.0
STARTUP_TIMEOUT = 600.0  # the sidecar compiles its kernels at start on a cold cache


def rss_mb(pid: int) -> float:
    """The process's resident set size (VmRSS) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class RssSampler(threading.Thread):
    """Samples (seconds since start, phase, VmRSS MB) every `every` seconds."""

    def __init__(self, pid: int, every: float):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.phase = "warm-up"
        self.samples: list[tuple[float, str, float]] = []
        self._done = threading.Event()
        self._t0 = time.monotonic()

    def sample(self) -> float:
        value = rss_mb(self.pid)
        self.samples.append((time.monotonic() - self._t0, self.phase, value))
        return value

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join()


def load(target: str, pid: int, total: int, args: argparse.Namespace) -> dict:
    """One stealguard-load run of exactly `total` calls; its JSON report."""
    command = [script("stealguard-load"), "--target", target, "--method", args.method,
               "--total", str(total), "--concurrency", str(args.concurrency),
               "--procs", str(args.procs), "--batch", str(args.batch),
               "--classes", str(args.classes), "--timeout", "10s", "--server-pid", str(pid),
               "--format", "json", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"stealguard-load exited {result.returncode}: {result.stderr}")
    return json.loads(result.stdout)


def report(args: argparse.Namespace, warm: dict, run: dict, sampler: RssSampler,
           after_warmup: float, end: float) -> tuple[str, bool]:
    """The Markdown report and whether both goals were met."""
    peak = max(v for _, phase, v in sampler.samples if phase == "run")
    growth = end - after_warmup
    errors = run["error_count"] + warm["error_count"]
    ok = errors <= MAX_ERRORS and growth < MAX_GROWTH_MB
    codes = {**warm["errors"]}
    for code, n in run["errors"].items():
        codes[code] = codes.get(code, 0) + n
    lat = run["latency_ms"]
    lines = [
        f"Soak: {run['requests']:,} {CALLS[args.method]} ({args.batch}x{args.classes} float32, "
        f"Reverse Sigmoid default policy) after a {warm['requests']:,}-call warm-up; closed "
        f"loop, {args.concurrency} callers over {args.procs} load processes; "
        f"{os.cpu_count()} cores shared by client and server.",
        "",
        "| figure | value | goal |",
        "|---|---|---|",
        f"| calls (measured run) | {run['requests']:,} | |",
        f"| errors (warm-up + run) | {errors}"
        f"{' ' + json.dumps(codes) if codes else ''} | {MAX_ERRORS} |",
        f"| duration | {run['duration_s']:.1f} s | |",
        f"| throughput | {run['rps']:.0f} calls/s | |",
        f"| latency p50 / p99 / max | {lat['p50']:.2f} / {lat['p99']:.2f} / "
        f"{lat['max']:.2f} ms | |",
        f"| sidecar CPU per call | {run.get('server', {}).get('cpu_us_per_call', 'n/a')} µs | |",
        f"| sidecar RSS after warm-up | {after_warmup:.1f} MB | |",
        f"| sidecar RSS peak during the run | {peak:.1f} MB | |",
        f"| sidecar RSS at the end | {end:.1f} MB | |",
        f"| **RSS growth** (end − after warm-up) | **{growth:+.1f} MB** | < {MAX_GROWTH_MB:g} MB |",
        "",
        f"Goals {'met' if ok else 'MISSED'}.",
        "",
        f"RSS over time ({len(sampler.samples)} samples, one every {args.every:g} s; one in "
        f"{max(1, len(sampler.samples) // 12)} shown, and the last):",
        "",
        "| s | phase | RSS MB |",
        "|---|---|---|",
    ]
    step = max(1, len(sampler.samples) // 12)
    picked = sampler.samples[::step]
    if picked[-1] is not sampler.samples[-1]:
        picked.append(sampler.samples[-1])
    lines += [f"| {t:.0f} | {phase} | {value:.1f} |" for t, phase, value in picked]
    return "\n".join(lines), ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total", type=int, default=1_000_000, help="measured calls")
    parser.add_argument("--warmup-total", type=int, default=None,
                        help="unmeasured calls first (default: 5%% of --total, at most 50,000)")
    parser.add_argument("--method", choices=["perturb", "perturb-stream"], default="perturb",
                        help="unary calls, or messages on one long-lived PerturbStream per "
                        "caller (as the model server sends them)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--batch", type=int, default=1, help="rows per call")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--target", help="HOST:PORT of a running sidecar (needs --pid)")
    parser.add_argument("--pid", type=int, help="PID of that sidecar (for its RSS)")
    args = parser.parse_args()
    for flag, value in (("--total", args.total), ("--concurrency", args.concurrency),
                        ("--procs", args.procs), ("--batch", args.batch),
                        ("--classes", args.classes)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.every <= 0:
        parser.error(f"--every must be > 0 seconds, got {args.every}")
    if bool(args.target) != bool(args.pid):
        parser.error("--target and --pid go together: the sidecar's address and its PID")
    if args.pid and not Path(f"/proc/{args.pid}/status").exists():
        parser.error(f"--pid {args.pid}: no such process on this host")
    warmup = args.warmup_total if args.warmup_total is not None else \
        max(1000, min(50_000, args.total // 20))

    process = None
    if args.target:
        target, pid = args.target, args.pid
    else:
        process, target = start_sidecar(wait=False)
        try:
            process.wait_healthy(target, timeout=STARTUP_TIMEOUT)
        except Exception:
            process.stop()
            raise
        pid = process.pid
    sampler = RssSampler(pid, args.every)
    try:
        sampler.start()
        warm = load(target, pid, warmup, args)
        time.sleep(1.0)
        sampler.phase = "run"
        after_warmup = sampler.sample()
        run = load(target, pid, args.total, args)
        time.sleep(1.0)
        end = sampler.sample()
    finally:
        try:
            sampler.stop()
        finally:
            if process is not None:
                process.stop()
    text, ok = report(args, warm, run, sampler, after_warmup, end)
    print(text)
    out = os.environ.get("STEALGUARD_BENCH_JSON")
    if out:
        Path(out).write_text(json.dumps({"headline": {
            "soak errors": run["error_count"] + warm["error_count"],
            "soak RSS growth MB": round(end - after_warmup, 1)}}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
