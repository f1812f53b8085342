"""Run a load plan in this process or in ``--procs`` worker processes, and merge the results."""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from hdrh.histogram import HdrHistogram

from .calls import TargetUnreachable, call_metadata
from .config import LoadConfig
from .engine import PROGRESS_EVERY_S, WorkerResult, new_event_loop, new_histogram, run_share
from .payload import requests_for

Progress = Callable[[int], None]  # called with the number of calls completed so far


@dataclass
class RunResult:
    """A whole run, every process merged."""

    cfg: LoadConfig
    codes: dict[str, int]
    corrected: HdrHistogram | None  # open loop only
    uncorrected: HdrHistogram
    send_lag: HdrHistogram | None  # open loop only
    elapsed_s: float
    cpu_s: list[float]  # per process
    unsent: int = 0  # open loop: calls scheduled within the duration that never started
    host_busy: float | None = None
    server_cpu_s: float | None = None
    server_pids: list[int] | None = None

    @property
    def requests(self) -> int:
        return sum(self.codes.values())

    @property
    def ok(self) -> int:
        return self.codes.get("OK", 0)

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def cpu_util(self) -> list[float]:
        """Each process's CPU time over the measured wall time (1.0 = one core)."""
        return [c / self.elapsed_s if self.elapsed_s > 0 else 0.0 for c in self.cpu_s]


def merge(cfg: LoadConfig, parts: list[WorkerResult]) -> RunResult:
    """One RunResult from the per-process results (HDR histograms added exactly)."""
    codes: Counter[str] = Counter()
    hists = {"corrected": new_histogram(), "uncorrected": new_histogram(),
             "send_lag": new_histogram()}
    for part in parts:
        codes.update(part.codes)
        for name, hist in hists.items():
            encoded = getattr(part, name)
            if encoded:
                hist.decode_and_add(encoded)
    return RunResult(
        cfg=cfg,
        codes=dict(codes),
        corrected=hists["corrected"] if cfg.open_loop else None,
        uncorrected=hists["uncorrected"],
        send_lag=hists["send_lag"] if cfg.open_loop else None,
        elapsed_s=max(p.elapsed_s for p in parts),
        cpu_s=[p.cpu_s for p in parts],
        unsent=sum(p.unsent for p in parts),
        host_busy=parts[0].host_busy,  # worker 0 measures the host and the server
        server_cpu_s=parts[0].server_cpu_s,
        server_pids=parts[0].server_pids,
    )


def run(cfg: LoadConfig, progress: Progress | None = None) -> RunResult:
    """Run ``cfg``; raises TargetUnreachable, or ValueError for a bad payload/token file."""
    if cfg.procs == 1:
        return merge(cfg, [_run_here(cfg, progress)])
    return merge(cfg, _run_procs(cfg, progress))


def _run_here(cfg: LoadConfig, progress: Progress | None) -> WorkerResult:
    requests = requests_for(cfg)
    metadata = call_metadata(cfg.security)
    loop = new_event_loop()
    try:
        return loop.run_until_complete(
            run_share(cfg.share(0), requests, metadata, progress=progress)
        )
    finally:
        loop.close()


def _worker_main(cfg: LoadConfig, index: int, results, go, counters) -> None:
    """Entry point of worker process ``index``: its share of the plan, then its result."""
    try:
        share = cfg.share(index)
        requests = requests_for(share)
        metadata = call_metadata(share.security)
        loop = new_event_loop()

        def on_ready() -> None:
            results.put(("ready", index, None))
            go.wait()

        def publish(count: int) -> None:
            counters[index] = count

        try:
            result = loop.run_until_complete(
                run_share(share, requests, metadata, on_ready=on_ready, progress=publish)
            )
        finally:
            loop.close()
        results.put(("done", index, result))
    except TargetUnreachable as exc:
        results.put(("unreachable", index, str(exc)))
    except ValueError as exc:
        results.put(("invalid", index, str(exc)))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent, then re-raised
        results.put(("crashed", index, f"{type(exc).__name__}: {exc}"))
        raise


def _run_procs(cfg: LoadConfig, progress: Progress | None) -> list[WorkerResult]:
    ctx = multiprocessing.get_context("spawn")  # gRPC is not fork-safe
    results = ctx.Queue()
    go = ctx.Event()
    counters = ctx.Array("q", cfg.procs, lock=False)
    procs = [
        ctx.Process(target=_worker_main, args=(cfg, i, results, go, counters), daemon=True)
        for i in range(cfg.procs)
    ]
    for p in procs:
        p.start()
    try:
        ready: set[int] = set()
        done: dict[int, WorkerResult] = {}
        # Setup (imports, connect, warm-up) must finish before anyone measures.
        setup_limit = time.monotonic() + 60 + cfg.connect_timeout + cfg.warmup
        while len(done) < cfg.procs:
            if len(ready) == cfg.procs and not go.is_set():
                go.set()
            try:
                kind, index, payload = results.get(timeout=PROGRESS_EVERY_S)
            except queue.Empty:
                if progress is not None and go.is_set():
                    progress(sum(counters))
                if not go.is_set() and time.monotonic() > setup_limit:
                    raise RuntimeError("worker processes did not start in time") from None
                _check_alive(procs, done)
                continue
            if kind == "ready":
                ready.add(index)
            elif kind == "done":
                done[index] = payload
            elif kind == "unreachable":
                raise TargetUnreachable(payload)
            elif kind == "invalid":
                raise ValueError(payload)
            else:
                raise RuntimeError(f"worker process {index} failed: {payload}")
        for p in procs:
            p.join(timeout=5)
        return [done[i] for i in range(cfg.procs)]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # only on failure: a worker that is done has exited
                p.join(timeout=5)


def _check_alive(procs, done: dict) -> None:
    for i, p in enumerate(procs):
        if i not in done and not p.is_alive() and p.exitcode not in (None, 0):
            raise RuntimeError(f"worker process {i} exited with code {p.exitcode}")
