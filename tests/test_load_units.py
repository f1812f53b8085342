"""stealguard-load's pieces in isolation: durations, splitting a plan over processes, the
open-loop schedule, and merging HDR histograms across processes."""

from __future__ import annotations

import numpy as np
import pytest
from stealguard.client.load.config import LoadConfig, check, parse_duration
from stealguard.client.load.engine import Recorder, Schedule, WorkerResult, new_histogram, now
from stealguard.client.load.runner import merge


@pytest.mark.parametrize("text, seconds", [("30s", 30.0), ("2m", 120.0), ("250ms", 0.25),
                                           ("1.5", 1.5), ("1h", 3600.0), ("500us", 5e-4)])
def test_durations_parse_to_seconds(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "-1s", "10 parsecs", "1e3s"])
def test_bad_duration_names_the_accepted_units(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_plan_split_over_processes_adds_up_and_interleaves():
    cfg = LoadConfig(target="x:1", procs=3, concurrency=10, connections=4, total=101, rps=300.0)
    shares = [cfg.share(i) for i in range(3)]
    assert [s.concurrency for s in shares] == [4, 3, 3]
    assert [s.connections for s in shares] == [2, 1, 1]
    assert sum(s.total for s in shares) == 101
    assert [s.rps for s in shares] == [100.0] * 3
    # Constant arrivals: process i starts i/300 s late, so the merged stream is evenly spaced.
    assert [s.phase for s in shares] == pytest.approx([0, 1 / 300, 2 / 300])
    assert len({s.seed for s in shares}) == 3 and all(s.procs == 1 for s in shares)


def test_check_names_contradictions():
    problems = dict(check(LoadConfig(target="x:1", procs=2, concurrency=1, connections=2)))
    assert "--concurrency" in problems
    assert dict(check(LoadConfig(target="x:1", method="predictions")))["--model"]


def test_constant_schedule_is_evenly_spaced_and_stops_at_the_end():
    start = now() + 60  # far enough ahead that the wall clock never ends the run
    sched = Schedule(LoadConfig(target="x:1", rps=100.0), start, start + 1.0, total=None)
    times = []
    while (t := sched.next()) is not None:
        times.append(t)
    assert len(times) == 100
    assert np.diff(times) == pytest.approx(np.full(99, 0.01))


def test_poisson_schedule_has_the_requested_mean_rate():
    sched = Schedule(LoadConfig(target="x:1", rps=1000.0, arrival="poisson"), 0.0, None, 20000)
    times = np.array([sched.next() for _ in range(20000)])
    assert sched.next() is None  # --total reached
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1e-3, rel=0.03)
    assert gaps.std() == pytest.approx(1e-3, rel=0.05)  # exponential: std == mean


def test_corrected_latency_counts_the_wait_for_a_late_send():
    rec = Recorder(open_loop=True)
    rec.record("OK", scheduled=1.000, sent=1.200, done=1.201)  # waited 200 ms to start
    rec.record("NOT_FOUND", scheduled=1.0, sent=1.0, done=1.001)
    assert rec.corrected.get_max_value() == pytest.approx(201_000, rel=1e-3)
    assert rec.uncorrected.get_max_value() == pytest.approx(1_000, rel=1e-3)
    assert rec.uncorrected.get_total_count() == 1 and dict(rec.codes) == {"OK": 1,
                                                                          "NOT_FOUND": 1}


def test_histograms_from_processes_merge_to_the_histogram_of_all_calls():
    rng = np.random.default_rng(0)
    values = rng.lognormal(6, 1, size=(2, 5000)).astype(int) + 1
    parts, whole = [], new_histogram()
    for part_values in values:
        h = new_histogram()
        for v in part_values:
            h.record_value(int(v))
            whole.record_value(int(v))
        parts.append(WorkerResult(codes={"OK": 5000}, corrected=b"", uncorrected=h.encode(),
                                  send_lag=b"", elapsed_s=1.0, cpu_s=0.5))
    merged = merge(LoadConfig(target="x:1", procs=2, concurrency=2, connections=2), parts)
    assert merged.requests == 10000 and merged.rps == 10000
    for p in (50, 90, 99, 99.9):
        assert merged.uncorrected.get_value_at_percentile(p) == whole.get_value_at_percentile(p)
