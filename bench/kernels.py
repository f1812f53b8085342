#!/usr/bin/env python3
"""Reverse Sigmoid kernel and the default policy against vectorised NumPy and a copy.

    python bench/kernels.py                 # throughput, per-call overhead, accuracy
    python bench/kernels.py --quick         # fewer repeats
    python bench/kernels.py --warm-up       # also cold vs cached warm_up() (minutes when cold)
    python bench/kernels.py --threshold     # also serial vs parallel by batch size

Throughput: Reverse Sigmoid (beta 1.5, gamma 0.3) on 1,000,000 x 10 and 10,000 x 1,000
float32, against (a) `numpy_reverse_sigmoid` below, the formula written as whole-array
NumPy operations, and (b) `np.copyto` of the same bytes into a preallocated array. Each
figure is the best of several runs (the machine is shared; the best run is the one least
disturbed); process CPU time is given too, since other processes share the cores.
"kernel" writes into a preallocated output like the copy does; "defense()" is
the public call, which also validates and allocates its output. The default policy
(coarse_confidence, keyed rest) is timed through its public call on the same batches.

Prints Markdown; writes {"headline": {...}} to $STEALGUARD_BENCH_JSON when set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from stealguard.server.defenses import make_defense, warm_up
from stealguard.server.defenses._base import PARALLEL_MIN_VALUES
from stealguard.server.defenses._fastmath import exp_f32, log_f32
from stealguard.server.defenses.reverse_sigmoid import LOGIT_LIMIT

BETA, GAMMA = 1.5, 0.3


def numpy_reverse_sigmoid(y: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """DESIGN.md's Reverse Sigmoid as straightforward whole-array NumPy (no guard)."""
    with np.errstate(divide="ignore"):
        z = np.clip(np.log(y / (1 - y)), -LOGIT_LIMIT, LOGIT_LIMIT)
    r = beta * (1 / (1 + np.exp(-gamma * z)) - 0.5)
    q = np.maximum(y - r, 0)
    total = q.sum(axis=1, keepdims=True)
    return q / total


def softmax_rows(n: int, k: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """Softmax of N(0, 3^2) logits: rows shaped like a classifier's output."""
    logits = np.random.default_rng(seed).normal(0.0, 3.0, (n, k))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(dtype)


def best_of(fn, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best process CPU seconds) over `repeats` calls after one warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def _kernel_call(defense, y: np.ndarray, out: np.ndarray):
    n, k = y.shape
    flat = y.reshape(-1)
    flat.flags.writeable = False  # the type Defense.__call__ passes
    flat_out = out.reshape(-1)
    kernel = defense._parallel if n * k >= PARALLEL_MIN_VALUES else defense._serial
    args = defense._args[y.dtype]
    return lambda: kernel(flat, flat_out, n, k, True, *args)


def throughput(repeats: int) -> tuple[list[str], dict]:
    lines = ["| batch | NumPy | copy | kernel, guard off | kernel, guard on | defense() |"
             " NumPy / kernel | kernel / copy |", "|---|---|---|---|---|---|---|---|"]
    headline = {}
    off = make_defense("reverse_sigmoid", beta=BETA, gamma=GAMMA, preserve_top1=False)
    on = make_defense("reverse_sigmoid", beta=BETA, gamma=GAMMA, preserve_top1=True)
    for n, k in ((1_000_000, 10), (10_000, 1_000)):
        y = softmax_rows(n, k)
        out = np.empty_like(y)
        flipped = float((off(y).argmax(axis=1) != y.argmax(axis=1)).mean())
        t_numpy = best_of(lambda y=y: numpy_reverse_sigmoid(y, BETA, GAMMA), max(2, repeats // 3))
        t_copy = best_of(lambda y=y, out=out: np.copyto(out, y), repeats)
        t_off = best_of(_kernel_call(off, y, out), repeats)
        t_on = best_of(_kernel_call(on, y, out), repeats)
        t_call = best_of(lambda y=y: on(y), repeats)

        def ms(t):
            return f"{t[0] * 1e3:.1f} ms ({t[1] * 1e3:.0f} cpu)"

        lines.append(f"| {n:,} x {k:,} float32 ({flipped:.0%} rows flipped) | {ms(t_numpy)} | "
                     f"{ms(t_copy)} | {ms(t_off)} | {ms(t_on)} | {ms(t_call)} | "
                     f"{t_numpy[0] / t_off[0]:.1f}x (cpu {t_numpy[1] / t_off[1]:.1f}x) | "
                     f"{t_off[0] / t_copy[0]:.1f}x (cpu {t_off[1] / t_copy[1]:.1f}x) |")
        key = f"{n}x{k}"
        headline[f"RS {key} vs NumPy (x faster)"] = round(t_numpy[0] / t_off[0], 1)
        headline[f"RS {key} / copy (x slower)"] = round(t_off[0] / t_copy[0], 1)
    return lines, headline


def default_policy(repeats: int) -> tuple[list[str], dict]:
    """The shipped default (coarse_confidence, keyed rest) through the public call, against
    the same NumPy formula and copy: what a default policy costs per batch."""
    lines = ["| batch | NumPy RS (no guard) | copy | default `defense()` | NumPy / defense() |"
             " defense() / copy |", "|---|---|---|---|---|---|"]
    headline = {}
    default = make_defense("coarse_confidence", secret=b"bench")
    for n, k in ((1_000_000, 10), (10_000, 1_000)):
        y = softmax_rows(n, k)
        out = np.empty_like(y)
        t_numpy = best_of(lambda y=y: numpy_reverse_sigmoid(y, BETA, GAMMA), max(2, repeats // 3))
        t_copy = best_of(lambda y=y, out=out: np.copyto(out, y), repeats)
        t_call = best_of(lambda y=y: default(y), repeats)
        lines.append(f"| {n:,} x {k:,} float32 | {t_numpy[0] * 1e3:.1f} ms | "
                     f"{t_copy[0] * 1e3:.1f} ms | {t_call[0] * 1e3:.1f} ms | "
                     f"{t_numpy[0] / t_call[0]:.1f}x | {t_call[0] / t_copy[0]:.1f}x |")
        key = f"{n}x{k}"
        headline[f"default defense() {key} vs NumPy RS (x faster)"] = round(
            t_numpy[0] / t_call[0], 1)
        headline[f"default defense() {key} / copy (x slower)"] = round(t_call[0] / t_copy[0], 1)
    return lines, headline


def overhead(repeats: int) -> list[str]:
    """Per-call cost of one 1 x 10 row through the public call and the bare kernel."""
    defense = make_defense("reverse_sigmoid")
    row = softmax_rows(1, 10)[0]
    frozen = np.frombuffer(row.tobytes(), np.float32)
    flat_out = np.empty(10, np.float32)
    kernel_row = row.copy()
    kernel_row.flags.writeable = False
    args = defense._args[row.dtype]
    calls = 20_000 if repeats > 3 else 5_000

    def per_call(fn):
        fn()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - start) / calls)
        return f"{best * 1e6:.2f} us"

    return [
        "| one 1 x 10 float32 row | per call |", "|---|---|",
        f"| `defense(row)` | {per_call(lambda: defense(row))} |",
        f"| `defense(np.frombuffer(...))` (read-only) | {per_call(lambda: defense(frozen))} |",
        f"| bare serial kernel | "
        f"{per_call(lambda: defense._serial(kernel_row, flat_out, 1, 10, True, *args))} |",
        f"| `np.empty(10)` for scale | {per_call(lambda: np.empty(10, np.float32))} |",
    ]


def accuracy() -> list[str]:
    """Max error of the float32 polynomials and of Reverse Sigmoid against float64."""
    from numba import njit

    @njit(error_model="numpy")
    def apply_log(x, out):
        for i in range(x.size):
            out[i] = log_f32(x[i])

    @njit(error_model="numpy")
    def apply_exp(x, out):
        for i in range(x.size):
            out[i] = exp_f32(x[i])

    # every float32 in the ranges the kernel uses: ratios in [1e-9, 1e9], exponents +-88
    x = np.exp(np.linspace(np.log(1e-9), np.log(1e9), 4_000_001)).astype(np.float32)
    out = np.empty_like(x)
    apply_log(x, out)
    ref = np.log(x.astype(np.float64))
    log_abs = np.abs(out - ref).max()
    e = np.linspace(-87.0, 88.0, 4_000_001).astype(np.float32)
    apply_exp(e, out)
    ref = np.exp(e.astype(np.float64))
    exp_rel = (np.abs(out - ref) / ref).max()
    lines = ["| quantity | max error vs float64 |", "|---|---|",
             f"| `log_f32` on [1e-9, 1e9] | {log_abs:.2e} absolute |",
             f"| `exp_f32` on [-87, 88] | {exp_rel:.2e} relative ({exp_rel / 2**-24:.2f} ulp) |"]
    for dtype in (np.float32, np.float64):
        worst = 0.0
        for k in (2, 10, 100, 1000):
            y = softmax_rows(20_000 // k * 10, k, seed=k, dtype=dtype)
            for beta, gamma in ((1.0, 0.1), (1.5, 0.3), (2.0, 0.2), (0.7, 0.4), (3.0, 1.0)):
                got = make_defense("reverse_sigmoid", beta=beta, gamma=gamma,
                                   preserve_top1=False)(y)
                want = numpy_reverse_sigmoid(y.astype(np.float64), beta, gamma)
                worst = max(worst, float(np.abs(got - want).max()))
        lines.append(f"| Reverse Sigmoid output, {np.dtype(dtype).name} in (K 2..1000, "
                     f"5 beta/gamma pairs) | {worst:.2e} absolute |")
    return lines


def warm_up_times() -> list[str]:
    """warm_up() in a fresh process: empty numba cache, then the cache it filled."""
    code = "from stealguard.server.defenses import warm_up; print(warm_up())"
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        times = [float(subprocess.check_output([sys.executable, "-c", code], env=env))
                 for _ in range(2)]
    return ["| warm_up() | seconds |", "|---|---|",
            f"| cold (empty NUMBA_CACHE_DIR) | {times[0]:.1f} |",
            f"| cached (second process) | {times[1]:.2f} |"]


def threshold(repeats: int) -> list[str]:
    """Serial against parallel kernel by batch size (10 classes)."""
    defense = make_defense("reverse_sigmoid")
    lines = ["| rows x 10 | serial | parallel |", "|---|---|---|"]
    args = defense._args[np.dtype(np.float32)]
    for n in (100, 1_000, 3_000, 6_554, 10_000, 30_000, 100_000):
        y = softmax_rows(n, 10).reshape(-1)
        y.flags.writeable = False
        out = np.empty_like(y)
        t_s = best_of(lambda y=y, out=out, n=n: defense._serial(y, out, n, 10, True, *args),
                      repeats * 3)[0]
        t_p = best_of(lambda y=y, out=out, n=n: defense._parallel(y, out, n, 10, True, *args),
                      repeats * 3)[0]
        lines.append(f"| {n:,} | {t_s * 1e6:.0f} us | {t_p * 1e6:.0f} us |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--warm-up", action="store_true", help="measure cold/cached warm_up")
    parser.add_argument("--threshold", action="store_true", help="serial vs parallel sizes")
    args = parser.parse_args()
    repeats = 3 if args.quick or os.environ.get("STEALGUARD_BENCH_QUICK") else 10
    warm_up()
    import numba

    print(f"numba {numba.__version__}, {numba.config.NUMBA_NUM_THREADS} threads, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    lines, headline = throughput(repeats)
    print("\n".join(lines) + "\n")
    lines, more = default_policy(repeats)
    headline.update(more)
    print("\n".join(lines) + "\n")
    print("\n".join(overhead(repeats)) + "\n")
    print("\n".join(accuracy()) + "\n")
    if args.threshold:
        print("\n".join(threshold(repeats)) + "\n")
    if args.warm_up:
        print("\n".join(warm_up_times()) + "\n")
    path = os.environ.get("STEALGUARD_BENCH_JSON")
    if path:
        with open(path, "w") as f:
            json.dump({"headline": headline}, f)


if __name__ == "__main__":
    main()
