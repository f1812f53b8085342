"""Metering (server/metering/): limits in rows, the one algorithm in Python and in Lua on a
real Valkey, leases, failing closed and open, and the statuses a caller gets."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import textwrap

import grpc
import pytest
from _procs import script
from _status_details import details_of
from _valkey import Valkey
from stealguard.server.metering import (
    Limits,
    MemoryStore,
    Meter,
    OverLimit,
    Slots,
    SlotsExhausted,
    StoreUnavailable,
    open_store,
    parse_quota,
)
from stealguard.server.metering import metrics as metering_metrics
from stealguard.server.metering.inflight import IdleTimeout, StreamIdle
from stealguard.server.metering.limits import SLOTS
from stealguard.server.metering.redis_store import KEY_PREFIX, redacted
from stealguard.server.platform.status import grpc_status


def run(coroutine):
    return asyncio.run(coroutine)


class Clock:
    """A hand-moved clock for the memory store and the meter."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Counting:
    """A store wrapper that counts round trips."""

    def __init__(self, store):
        self.store, self.name, self.calls = store, store.name, 0

    async def acquire(self, *args, **kwargs):
        self.calls += 1
        return await self.store.acquire(*args, **kwargs)

    async def usage(self, principal=None):
        return await self.store.usage(principal)

    async def close(self):
        await self.store.close()


@pytest.fixture()
def valkey(tmp_path):
    server = Valkey(tmp_path / "valkey").start()
    yield server
    server.stop()


# --- limits -------------------------------------------------------------------------------

def test_quota_spec_gives_rows_and_period_in_seconds():
    assert parse_quota("20000/1d").period == 86400
    assert parse_quota("2000/1h").rows == 2000
    assert parse_quota("500/30m").name == "500/30m"
    assert parse_quota("7/h").name == "7/1h"


@pytest.mark.parametrize("spec", ["20000", "20000/1y", "0/1d", "5/10s", "a/1d"])
def test_bad_quota_spec_is_refused_with_the_spec_named(spec):
    with pytest.raises(ValueError, match="quota"):
        parse_quota(spec)


def test_burst_defaults_to_the_rate():
    assert Limits.of(rate=5).burst == 5
    assert Limits.of(rate=0.5).burst == 1


# --- the algorithm (memory store, moved clock) --------------------------------------------

def test_rate_admits_the_burst_then_rows_at_the_rate():
    clock = Clock()
    store = MemoryStore(clock=clock)
    limits = Limits.of(rate=10, burst=20)
    assert store.acquire_now("a", 20, 20, limits).rows == 20
    refused = store.acquire_now("a", 5, 5, limits)
    assert (refused.rows, refused.violated, refused.retry_us) == (0, ("rate",), 500_000)
    clock.now += 0.5
    assert store.acquire_now("a", 5, 5, limits).rows == 5


def test_a_call_larger_than_the_burst_can_never_pass():
    limits = Limits.of(rate=100, burst=50)
    refused = MemoryStore().acquire_now("a", 51, 51, limits)
    assert (refused.rows, refused.retry_us) == (0, -1)


def test_quota_is_rolling_and_forgets_a_row_one_period_and_at_most_one_slot_later():
    clock = Clock(1_700_000_000.0)
    store = MemoryStore(clock=clock)
    limits = Limits.of(quotas=["100/1h"])
    assert store.acquire_now("a", 100, 100, limits).rows == 100
    refused = store.acquire_now("a", 1, 1, limits)
    slot = 3600 / SLOTS
    assert refused.rows == 0 and 3600e6 <= refused.retry_us <= (3600 + slot) * 1e6
    clock.now += 3599
    assert store.acquire_now("a", 1, 1, limits).rows == 0  # still inside the hour
    clock.now += 1 + slot
    assert store.acquire_now("a", 100, 100, limits).rows == 100


def test_a_grant_is_as_large_as_every_limit_allows_between_min_and_max():
    store = MemoryStore(clock=Clock())
    limits = Limits.of(rate=1000, burst=1000, quotas=["150/1d"])
    assert store.acquire_now("a", 100, 164, limits).rows == 150
    assert store.acquire_now("a", 1, 64, limits).rows == 0


def test_refund_gives_unspent_rows_back():
    clock = Clock()
    store = MemoryStore(clock=clock)
    limits = Limits.of(rate=10, burst=100, quotas=["100/1d"])
    first = store.acquire_now("a", 100, 100, limits)
    assert store.acquire_now("a", 40, 40, limits, refund=40,
                             refund_at_us=first.now_us).rows == 40


# --- the Lua script on a real Valkey ------------------------------------------------------

def test_valkey_store_charges_a_65536_row_call_65536(valkey):
    async def go():
        store = open_store(valkey.url)
        limits = Limits.of(quotas=["100000/1d"])
        grant = await store.acquire("bulk", 65536, 65536, limits)
        usage = await store.usage("bulk")
        await store.close()
        return grant, usage

    grant, usage = run(go())
    assert (grant.rows, grant.remaining) == (65536, {"86400": 100000 - 65536})
    assert [(u.window, u.rows) for u in usage] == [("1d", 65536)]


def test_valkey_script_matches_the_python_algorithm_step_for_step(valkey):
    limits = Limits.of(rate=50, burst=100, quotas=["300/1h", "1000/1d"])
    steps = [(60, 124), (30, 94), (20, 20), (1, 64), (200, 200), (0, 0)]

    async def go():
        store = open_store(valkey.url)
        out = [await store.acquire("p", lo, hi, limits) for lo, hi in steps]
        await store.close()
        return out

    memory = MemoryStore()
    for (lo, hi), lua in zip(steps, run(go()), strict=True):
        py = memory.acquire_now("p", lo, hi, limits)
        assert (lua.rows, lua.violated) == (py.rows, py.violated)
        assert lua.remaining.keys() == py.remaining.keys()
        # the two clocks differ by the milliseconds between the calls: rate refills a little
        assert all(abs(lua.remaining[k] - py.remaining[k]) <= 1 for k in py.remaining)


def test_valkey_keys_expire_when_nothing_in_them_counts(valkey):
    async def go():
        import redis.asyncio as aioredis

        store = open_store(valkey.url)
        await store.acquire("short", 5, 5, Limits.of(rate=10, burst=10))
        await store.acquire("daily", 5, 5, Limits.of(quotas=["10/1d"]))
        client = aioredis.Redis.from_url(valkey.url)
        ttls = (await client.pttl(KEY_PREFIX + "short"), await client.pttl(KEY_PREFIX + "daily"))
        await client.aclose()
        await store.close()
        return ttls

    short, daily = run(go())
    assert 0 < short <= 500 + 1000  # 5 rows at 10/s paid back in 0.5 s, plus a second
    assert 86400_000 < daily <= (86400 + 86400 // SLOTS) * 1000 + 1000


def test_valkey_password_comes_from_the_environment(tmp_path, monkeypatch):
    server = Valkey(tmp_path / "valkey", password="s3cret").start()
    try:
        monkeypatch.setenv("STEALGUARD_STORE_PASSWORD", "s3cret")

        async def go():
            store = open_store(server.url)
            grant = await store.acquire("p", 1, 1, Limits.of(rate=1))
            await store.close()
            return grant

        assert run(go()).rows == 1
        assert redacted("redis://:s3cret@10.0.0.1:6379/0") == "redis://10.0.0.1:6379/0"
    finally:
        server.stop()


# --- the meter: leases, restarts, many processes ------------------------------------------

def test_lease_spends_locally_between_store_round_trips(valkey):
    async def go():
        store = Counting(open_store(valkey.url))
        meter = Meter(Limits.of(rate=1e6, burst=10**6), store, lease_rows=64)
        for _ in range(650):
            await meter.admit("alice", 1)
        await meter.close()
        return store.calls

    assert run(go()) == 10  # 65 rows per round trip: the call's one plus a lease of 64


def test_a_new_meter_on_the_same_store_remembers_the_quota(valkey):
    limits = Limits.of(quotas=["100/1d"])

    async def spend(rows):
        meter = Meter(limits, open_store(valkey.url), lease_rows=0)
        try:
            await meter.admit("alice", rows)
            return "admitted"
        except OverLimit as error:
            return error
        finally:
            await meter.close()

    assert run(spend(80)) == "admitted"
    refused = run(spend(30))  # a "restarted" process: same store, new memory
    assert isinstance(refused, OverLimit) and refused.violations[0].limit == "1d"


def test_processes_sharing_a_store_admit_at_most_the_quota(valkey):
    # four processes, one principal, 1-row calls: the store has charged every admitted row,
    # so admitted <= quota; leases held when the quota ran out are what may go unspent
    worker = textwrap.dedent(f"""
        import asyncio
        from stealguard.server.metering import Limits, Meter, OverLimit, open_store
        async def main():
            meter = Meter(Limits.of(quotas=["500/1d"]), open_store({valkey.url!r}),
                          lease_rows=8)
            admitted = 0
            for _ in range(300):
                try:
                    await meter.admit("mallory", 1)
                    admitted += 1
                except OverLimit:
                    pass
            print(admitted)
        asyncio.run(main())
    """)
    procs = [subprocess.Popen([sys.executable, "-c", worker], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    admitted = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert 500 - 4 * 8 <= sum(admitted) <= 500


def test_store_killed_fails_closed_then_recovers_without_restart(valkey, caplog):
    async def go():
        meter = Meter(Limits.of(rate=1000, burst=1000), open_store(valkey.url),
                      lease_rows=0, retry_interval=0.05)
        await meter.admit("alice", 1)
        valkey.stop()
        with pytest.raises(StoreUnavailable) as refused:
            await meter.admit("alice", 1)
        up_while_down = metering_metrics.STORE_UP.labels(meter.store.name)._value.get()
        valkey.start()
        await asyncio.sleep(0.1)
        admission = await meter.admit("alice", 1)
        up_after = metering_metrics.STORE_UP.labels(meter.store.name)._value.get()
        await meter.close()
        return refused.value, up_while_down, admission, up_after

    with caplog.at_level(logging.WARNING, logger="stealguard.metering"):
        refused, up_while_down, admission, up_after = run(go())
    assert valkey.url in str(refused) and "unavailable" in str(refused)
    assert grpc_status(refused).code is grpc.StatusCode.UNAVAILABLE
    assert (up_while_down, admission.rows, up_after) == (0, 1, 1)
    messages = [r.getMessage() for r in caplog.records]
    assert any("is unavailable" in m for m in messages)
    assert any("is back after" in m for m in messages)


def test_store_failure_open_admits_and_counts_locally(valkey):
    async def go():
        meter = Meter(Limits.of(rate=0.001, burst=3), open_store(valkey.url),
                      failure="open", lease_rows=0)
        valkey.stop()
        outcomes = []
        for _ in range(5):
            try:
                await meter.admit("alice", 1)
                outcomes.append("ok")
            except OverLimit:
                outcomes.append("over")
        await meter.close()
        return outcomes

    assert run(go()) == ["ok", "ok", "ok", "over", "over"]


def test_a_refused_principal_is_refused_locally_until_its_retry_time():
    async def go():
        store = Counting(MemoryStore())
        meter = Meter(Limits.of(rate=1, burst=2), store, lease_rows=0)
        await meter.admit("a", 2)
        errors = []
        for _ in range(20):
            try:
                await meter.admit("a", 1)
            except OverLimit as error:
                errors.append(error)
        return store.calls, errors

    calls, errors = run(go())
    assert calls == 2 and len(errors) == 20
    assert all(0 < e.retry_after <= 1.0 for e in errors)


# --- statuses over real gRPC --------------------------------------------------------------

def test_over_limit_status_carries_quota_failure_and_retry_info_over_grpc():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def go():
        meter = Meter(Limits.of(rate=1, burst=1, quotas=["1000/1d"]), MemoryStore(),
                      lease_rows=0)

        class Servicer(health_pb2_grpc.HealthServicer):
            async def Check(self, request, context):
                try:
                    admission = await meter.admit("alice", 1)
                except OverLimit as error:
                    code, message, trailing = grpc_status(error)
                    await context.abort(code, message, trailing)
                await context.send_initial_metadata(admission.metadata())
                return health_pb2.HealthCheckResponse(status=1)

        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            call = stub.Check(health_pb2.HealthCheckRequest())
            await call
            first = dict(await call.initial_metadata())
            try:
                await stub.Check(health_pb2.HealthCheckRequest())
            except grpc.aio.AioRpcError as error:
                second = error
        await server.stop(0)
        return first, second

    first, refused = run(go())
    assert first["x-stealguard-principal"] == "alice"
    assert first["x-stealguard-remaining"] == "rate=0,1d=999"
    assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'alice'" in refused.details() and "rate 1 rows/s" in refused.details()
    quota, retry = details_of(refused)
    assert quota.violations[0].subject == "principal:alice"
    assert quota.violations[0].description == "rate 1 rows/s (burst 1)"
    assert 0 < retry.retry_delay.ToTimedelta().total_seconds() <= 1.0


# --- slots and idle streams ---------------------------------------------------------------

def test_one_principal_cannot_take_more_than_its_stream_slots():
    slots = Slots(max_calls=0, max_streams=2)
    slots.enter("hog", True)
    slots.enter("hog", True)
    with pytest.raises(SlotsExhausted, match="2 streams"):
        slots.enter("hog", True)
    slots.enter("honest", True)
    slots.leave("hog", True)
    slots.enter("hog", True)
    for _ in range(3):
        slots.leave("hog", True)
    assert slots.held("hog", True) == 0 and slots._held == {("honest", True): 1}


async def _spaced(count: int, gap: float):
    for i in range(count):
        await asyncio.sleep(gap)
        yield i


def test_idle_timeout_times_each_wait_not_the_stream():
    """Messages 0.1 s apart for 2.5 s pass a 1 s idle timeout (its one timer, due first at
    1 s, finds a message came since and is set again); silence then ends the stream."""
    async def consume():
        got = [m async for m in IdleTimeout(_spaced(25, 0.1), 1.0)]
        assert got == list(range(25))
        # answered, then abandoned: when its timer comes due during the wait below, it
        # must not cancel this task, which is no longer waiting on it
        stream = IdleTimeout(_spaced(2, 0.0), 0.05)
        assert await stream.__anext__() == 0

        async def silent():
            await asyncio.sleep(3600)
            yield None

        with pytest.raises(StreamIdle, match="0.05 s"):
            await IdleTimeout(silent(), 0.05).__anext__()
        assert not asyncio.current_task().cancelling()  # the idle cancel was taken back

    run(consume())


def test_idle_timeout_lets_a_drain_cancel_through_and_does_not_keep_an_ended_stream():
    import gc
    import weakref

    async def consume():
        async def silent():
            await asyncio.sleep(3600)
            yield None

        waiting = asyncio.ensure_future(IdleTimeout(silent(), 30.0).__anext__())
        await asyncio.sleep(0.01)
        waiting.cancel()  # a drain's cancel is not an idle stream
        with pytest.raises(asyncio.CancelledError):
            await waiting
        stream = IdleTimeout(_spaced(5, 0.0), 30.0)
        await stream.__anext__()  # answered, then abandoned: its timer is still due
        ref = weakref.ref(stream)
        del stream
        gc.collect()
        assert ref() is None

    run(consume())


# --- the operator's view ------------------------------------------------------------------

def test_usage_command_prints_rows_per_principal_and_window(valkey):
    async def spend():
        store = open_store(valkey.url)
        await store.acquire("alice", 120, 120, Limits.of(quotas=["1000/1d", "500/1h"]))
        await store.acquire("bob", 7, 7, Limits.of(quotas=["1000/1d"]))
        await store.close()

    run(spend())
    out = subprocess.run([script("stealguard-sidecar"), "usage", "--store", valkey.url,
                          "--format", "json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [
        {"principal": "alice", "window": "1h", "rows": 120},
        {"principal": "alice", "window": "1d", "rows": 120},
        {"principal": "bob", "window": "1d", "rows": 7},
    ]
    table = subprocess.run([script("stealguard-sidecar"), "usage", "--store", valkey.url,
                            "--client", "bob"], capture_output=True, text=True, timeout=60)
    assert table.stdout.split() == ["principal", "window", "rows", "bob", "1d", "7"]


# --- settings -----------------------------------------------------------------------------

def test_workers_with_a_limit_and_the_memory_store_are_refused_naming_store():
    from stealguard.server.config import Config
    from stealguard.server.metering.settings import check_metering

    with pytest.raises(ValueError, match="--store"):
        check_metering(Config(rate_limit=5), workers=2)
    check_metering(Config(rate_limit=5, store="redis://127.0.0.1:1/0"), workers=2)
    check_metering(Config(), workers=4)  # nothing limited: nothing to share


def test_settings_refuse_a_bad_store_url_and_quota():
    from stealguard.server.config import Config
    from stealguard.server.metering.settings import check_metering

    with pytest.raises(ValueError, match="--store 'http://x'"):
        check_metering(Config(rate_limit=1, store="http://x"))
    with pytest.raises(ValueError, match="quota"):
        check_metering(Config(quota=["lots"]))


def test_quotas_come_from_repeated_flags_yaml_lists_and_comma_separated_environment(
        tmp_path):
    from stealguard.server.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("quota: [20000/1d, 2000/1h]\n")
    assert load_config(str(path), env={}).quota == ["20000/1d", "2000/1h"]
    assert load_config(None, env={"STEALGUARD_QUOTA": "5/1h, 9/1d"}).quota == ["5/1h", "9/1d"]
    assert load_config(None, env={}, overrides={"quota": ["1/1m"]}).quota == ["1/1m"]
