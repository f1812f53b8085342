"""One process's share of a load run: a closed or an open loop on one asyncio event loop.

Open loop, measured like wrk2: call i has a scheduled send time t_i (constant spacing or
Poisson arrivals). At most ``concurrency`` calls are in flight; a sender that is free sleeps
until the next t_i, a sender that is late starts at once. The corrected latency is
``done - t_i`` (what a caller arriving at t_i experienced); the uncorrected one is
``done - actual send`` (what ghz reports). When the server stalls, the senders are all
busy, the sends slip, and only the corrected figure keeps the calls that waited.
"""

from __future__ import annotations

import asyncio
import collections
import selectors
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from hdrh.histogram import HdrHistogram

from . import cpu as cpu_meter
from .calls import OK, make_caller, open_channel, wait_reachable
from .config import LoadConfig
from .responses import ResponseLog

HIGHEST_US = 3_600_000_000  # one hour, in microseconds
SIGNIFICANT_FIGURES = 3
# A free sender wakes this much before its slot: the loop's wake-up lag (~0.1-0.2 ms with
# select(); whole milliseconds with epoll) would otherwise count as server latency.
WAKE_EARLY_S = 100e-6
PROGRESS_EVERY_S = 0.2

now = time.perf_counter


def new_histogram() -> HdrHistogram:
    """An empty latency histogram: 1 us .. 1 h, three significant figures."""
    return HdrHistogram(1, HIGHEST_US, SIGNIFICANT_FIGURES)


def _us(seconds: float) -> int:
    return min(HIGHEST_US, max(1, round(seconds * 1e6)))


class Recorder:
    """Counts outcomes by status code and records latencies of the calls that succeeded."""

    def __init__(self, open_loop: bool) -> None:
        self.open_loop = open_loop
        self.corrected = new_histogram()
        self.uncorrected = new_histogram()
        self.send_lag = new_histogram()
        self.codes: collections.Counter[str] = collections.Counter()
        self.count = 0
        self.last_done = 0.0
        self.unsent = 0  # open loop: scheduled calls the run ended before starting
        self.log = None  # a ResponseLog with --responses

    def record(self, code: str, scheduled: float, sent: float, done: float) -> None:
        self.count += 1
        self.last_done = done
        self.codes[code] += 1
        if self.open_loop:
            self.send_lag.record_value(_us(sent - scheduled) if sent > scheduled else 1)
        if code != OK:
            return
        self.uncorrected.record_value(_us(done - sent))
        if self.open_loop:
            # A sender that woke a little early sent before its slot: never report less
            # than the time the call really took.
            self.corrected.record_value(_us(done - min(scheduled, sent)))


class Schedule:
    """Scheduled send times of an open loop, handed out in order to whichever sender is free."""

    def __init__(self, cfg: LoadConfig, start: float, end: float | None, total: int | None):
        self.first = start + cfg.phase
        self.rps = cfg.rps
        self.poisson = cfg.arrival == "poisson"
        self.rng = np.random.default_rng(cfg.seed)
        self.end = end
        self.total = total
        self.issued = 0
        self.next_t = self.first
        self._gaps: list[float] = []

    def next(self) -> float | None:
        """The next send time, or None when the run has no more calls to make.

        A timed run ends at its end time even when calls scheduled before it are still
        waiting for a sender (as wrk2 does); ``unsent()`` counts them afterwards.
        """
        if self.total is not None and self.issued >= self.total:
            return None
        t = self.next_t
        if self.end is not None and (t >= self.end or now() >= self.end):
            return None
        self._advance()
        return t

    def _advance(self) -> None:
        self.issued += 1
        if self.poisson:
            if not self._gaps:
                self._gaps = self.rng.exponential(1.0 / self.rps, 4096).tolist()
            self.next_t += self._gaps.pop()
        else:  # from the index, so rounding never drifts the rate
            self.next_t = self.first + self.issued / self.rps

    def unsent(self) -> int:
        """Calls scheduled before the end that no sender started (call once, at the end)."""
        if self.end is None:
            return 0
        missed = 0
        while self.next_t < self.end:
            self._advance()
            missed += 1
        return missed


class Budget:
    """Closed-loop stopping rule: ``total`` calls, or no new call after ``end``."""

    def __init__(self, end: float | None, total: int | None) -> None:
        self.end = end
        self.total = total
        self.taken = 0

    def take(self) -> bool:
        if self.total is not None:
            if self.taken >= self.total:
                return False
        elif now() >= self.end:
            return False
        self.taken += 1
        return True


async def _closed_sender(call, budget: Budget, rec: Recorder) -> None:
    while budget.take():
        sent = now()
        code = await call()
        rec.record(code, sent, sent, now())
        if rec.log is not None:
            rec.log(call, code, sent)


async def _open_sender(call, schedule: Schedule, rec: Recorder) -> None:
    while (scheduled := schedule.next()) is not None:
        delay = scheduled - now() - WAKE_EARLY_S
        if delay > 0:
            await asyncio.sleep(delay)
        sent = now()
        code = await call()
        rec.record(code, scheduled, sent, now())
        if rec.log is not None:
            rec.log(call, code, sent)


async def drive(cfg: LoadConfig, callers: list, duration: float | None, total: int | None,
                rec: Recorder) -> tuple[float, float]:
    """Run the loop over ``callers`` until the budget is spent; (start, end) times."""
    start = now()
    end = None if duration is None else start + duration
    if cfg.open_loop:
        schedule = Schedule(cfg, start, end, total)
        await asyncio.gather(*(_open_sender(c, schedule, rec) for c in callers))
        rec.unsent = schedule.unsent()
    else:
        budget = Budget(end, total)
        await asyncio.gather(*(_closed_sender(c, budget, rec) for c in callers))
    return start, max(rec.last_done, start)


@dataclass
class WorkerResult:
    """What one process measured; histograms HDR-encoded so processes can merge them."""

    codes: dict[str, int]
    corrected: bytes
    uncorrected: bytes
    send_lag: bytes
    elapsed_s: float
    cpu_s: float
    unsent: int = 0
    host_busy: float | None = None  # share of all host cores busy during the run
    server_cpu_s: float | None = None  # CPU of --server-pid processes during the run
    server_pids: list[int] | None = None


async def run_share(cfg: LoadConfig, requests: list[bytes], metadata,
                    on_ready: Callable[[], None] | None = None,
                    progress: Callable[[int], None] | None = None) -> WorkerResult:
    """Connect, warm up, call ``on_ready`` (a barrier between processes), then measure.

    ``progress`` is called with the number of calls completed, every PROGRESS_EVERY_S.
    """
    channels = [open_channel(cfg) for _ in range(cfg.connections)]
    callers = []
    rec = None
    try:
        for ch in channels:
            await wait_reachable(ch, cfg)
        for i in range(cfg.concurrency):
            start = (i * len(requests)) // cfg.concurrency  # spread senders over the pool
            callers.append(make_caller(channels[i % len(channels)], cfg, requests, start,
                                       metadata))
        if cfg.warmup > 0:
            await drive(cfg, callers, cfg.warmup, None, Recorder(cfg.open_loop))
        if on_ready is not None:
            on_ready()
        rec = Recorder(cfg.open_loop)
        if cfg.responses:
            rec.log = ResponseLog(cfg.responses, cfg.method, now())
        ticker = asyncio.create_task(_tick(rec, progress)) if progress is not None else None
        server_pids = cpu_meter.process_tree(list(cfg.server_pids))
        host0, server0 = cpu_meter.host_ticks(), cpu_meter.cpu_seconds(server_pids)
        cpu0 = time.process_time()
        duration = None if cfg.total is not None else cfg.duration
        start, end = await drive(cfg, callers, duration, cfg.total, rec)
        cpu = time.process_time() - cpu0
        host_busy = cpu_meter.host_busy(host0, cpu_meter.host_ticks())
        server1 = cpu_meter.cpu_seconds(server_pids)
        server_cpu = None if server0 is None or server1 is None else server1 - server0
        if ticker is not None:
            ticker.cancel()
            progress(rec.count)
    finally:
        if rec is not None and rec.log is not None:
            rec.log.close()
        for c in callers:
            await c.aclose()
        for ch in channels:
            await ch.close()
    return WorkerResult(
        codes=dict(rec.codes),
        corrected=rec.corrected.encode() if cfg.open_loop else b"",
        uncorrected=rec.uncorrected.encode(),
        send_lag=rec.send_lag.encode() if cfg.open_loop else b"",
        elapsed_s=end - start,
        cpu_s=cpu,
        unsent=rec.unsent,
        host_busy=host_busy,
        server_cpu_s=server_cpu,
        server_pids=server_pids,
    )


async def _tick(rec: Recorder, progress: Callable[[int], None]) -> None:
    while True:
        progress(rec.count)
        await asyncio.sleep(PROGRESS_EVERY_S)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers wake within ~0.1 ms: select() takes microseconds where
    epoll_wait() rounds every sleep up to a whole millisecond. The loop watches only a few
    descriptors (gRPC polls its sockets on its own threads), so select() costs nothing."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())
