"""The shared store: Redis or Valkey through redis-py's asyncio client.

`--store redis://HOST:PORT/DB` (or `rediss://` for TLS); the password comes from the URL
(`redis://:PASSWORD@HOST:PORT/DB`) or, when the URL has none, from the environment
variable STEALGUARD_STORE_PASSWORD. Each principal is one hash, `stealguard:v1:<name>`,
changed only by the Lua script below (the Python `store.algorithm`, step for step), so
every acquire is one atomic round trip on the store's own clock (no skew between
replicas). The hash expires once nothing in it counts any more: idle principals leave
no keys behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from urllib.parse import urlsplit, urlunsplit

from stealguard.server.metering.limits import SLOTS, Limits
from stealguard.server.metering.store import Detection, Grant, StoreError, Usage, usage_of

KEY_PREFIX = "stealguard:v1:"
#: Keys of the class-mix detector's shared windows (a list and a hash per principal and
#: policy, one hash tag so that a cluster keeps them on one node).
CLASSES_PREFIX = "stealguard:classmix:v1:"
#: Each principal's latest escalation step change: a hash (`record_detection`).
DETECT_PREFIX = "stealguard:detect:v1:"

# KEYS[1]: the window (a list of class indices, oldest first); KEYS[2]: count per class.
# ARGV: window length, expiry in seconds, then the new classes in order.
RECORD_CLASSES = """
local window = tonumber(ARGV[1])
for i = 3, #ARGV do
  redis.call('RPUSH', KEYS[1], ARGV[i])
  redis.call('HINCRBY', KEYS[2], ARGV[i], 1)
end
local over = redis.call('LLEN', KEYS[1]) - window
for _ = 1, over do
  local old = redis.call('LPOP', KEYS[1])
  if redis.call('HINCRBY', KEYS[2], old, -1) == 0 then redis.call('HDEL', KEYS[2], old) end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return {redis.call('LLEN', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""
PASSWORD_ENV = "STEALGUARD_STORE_PASSWORD"

# KEYS[1] the principal's hash. ARGV: want_min, want_max, emission_us, burst, refund,
# refund_at_us, slots, n_quotas, then per quota: rows, period_s, slot_us.
# Returns {granted, now_us, retry_us, "violated,limits", name1, remaining1, ...}.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local want_min, want_max = tonumber(ARGV[1]), tonumber(ARGV[2])
local em, burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local refund, refund_at = tonumber(ARGV[5]), tonumber(ARGV[6])
local slots, nq = tonumber(ARGV[7]), tonumber(ARGV[8])
local key = KEYS[1]
local flat = redis.call('HGETALL', key)
local h = {}
for i = 1, #flat, 2 do h[flat[i]] = tonumber(flat[i + 1]) end
local function int(x) return string.format('%.0f', x) end
local grant, retry, expire = want_max, 0, 0
local violated, remaining = {}, {}
local function wait(us)
  if us < 0 or retry < 0 then retry = -1 elseif us > retry then retry = us end
end
local tat = now
if em > 0 then
  tat = math.max(h['tat'] or now, now)
  if refund > 0 then
    tat = math.max(now, tat - refund * em)
    redis.call('HSET', key, 'tat', int(tat))
  end
  local room = math.floor((now + burst * em - tat) / em)
  if room < grant then grant = room end
  if room < want_min then
    violated[#violated + 1] = 'rate'
    if want_min > burst then wait(-1) else wait(tat + (want_min - burst) * em - now) end
  end
end
local used_of, slot_of = {}, {}
for q = 1, nq do
  local base = 8 + (q - 1) * 3
  local rows, period, slot_us = tonumber(ARGV[base + 1]), ARGV[base + 2], tonumber(ARGV[base + 3])
  local prefix = 'w' .. period .. ':'
  local k = math.floor(now / slot_us)
  local live = {}
  for name, value in pairs(h) do
    if string.sub(name, 1, #prefix) == prefix then
      local slot = tonumber(string.sub(name, #prefix + 1))
      if slot < k - slots then
        redis.call('HDEL', key, name)
      else
        live[#live + 1] = {slot, value}
      end
    end
  end
  if refund > 0 then
    local charged = math.floor(refund_at / slot_us)
    for _, entry in ipairs(live) do
      if entry[1] == charged then
        local back = math.min(entry[2], refund)
        entry[2] = entry[2] - back
        redis.call('HINCRBY', key, prefix .. int(charged), -back)
      end
    end
  end
  local used = 0
  for _, entry in ipairs(live) do used = used + entry[2] end
  used_of[q], slot_of[q] = used, k
  local room = rows - used
  if room < grant then grant = room end
  if room < want_min then
    violated[#violated + 1] = period
    if want_min > rows then
      wait(-1)
    else
      table.sort(live, function(a, b) return a[1] < b[1] end)
      local freed = room
      for _, entry in ipairs(live) do
        freed = freed + entry[2]
        if freed >= want_min then
          wait((entry[1] + slots + 1) * slot_us - now)
          break
        end
      end
    end
  end
end
if grant < want_min or grant <= 0 then
  grant = 0
else
  violated, retry = {}, 0
  if em > 0 then
    tat = tat + grant * em
    redis.call('HSET', key, 'tat', int(tat), 'em', int(em))
  end
  for q = 1, nq do
    local period = ARGV[8 + (q - 1) * 3 + 2]
    redis.call('HINCRBY', key, 'w' .. period .. ':' .. int(slot_of[q]), grant)
  end
end
local out = {grant, int(now), int(retry), table.concat(violated, ',')}
if em > 0 then
  out[#out + 1] = 'rate'
  out[#out + 1] = math.floor((now + burst * em - tat) / em)
  expire = math.max(expire, tat - now)
end
for q = 1, nq do
  local base = 8 + (q - 1) * 3
  out[#out + 1] = ARGV[base + 2]
  out[#out + 1] = tonumber(ARGV[base + 1]) - used_of[q] - grant
  expire = math.max(expire, (slot_of[q] + slots + 1) * tonumber(ARGV[base + 3]) - now)
end
if expire > 0 then redis.call('PEXPIRE', key, math.ceil(expire / 1000) + 1000) end
return out
"""


def redacted(url: str) -> str:
    """The URL without its password, for messages and metrics."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisStore:
    """Counts in Redis or Valkey, shared by every worker and replica that names it.

    Each call gets at most `timeout` seconds, connecting included; any failure is a
    `StoreError` (the meter decides between failing closed and open). The client
    reconnects by itself on the next call, so recovery needs no restart.
    """

    def __init__(self, url: str, *, timeout: float = 0.25, env=os.environ):
        import redis.asyncio as aioredis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.name = redacted(url)
        self.timeout = timeout
        password = None if urlsplit(url).password else (env.get(PASSWORD_ENV) or None)
        self._redis = aioredis.Redis.from_url(
            url, password=password, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._acquire = self._redis.register_script(ACQUIRE)
        self._classes = self._redis.register_script(RECORD_CLASSES)
        import redis.exceptions

        self._errors = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)

    async def _call(self, awaitable):
        try:
            return await asyncio.wait_for(awaitable, self.timeout)
        except self._errors as error:
            raise StoreError(f"{type(error).__name__}: {error}" if str(error)
                             else type(error).__name__) from error

    async def acquire(self, principal: str, want_min: int, want_max: int, limits: Limits,
                      refund: int = 0, refund_at_us: int = 0) -> Grant:
        args = [want_min, want_max, limits.emission_us, limits.burst, refund, refund_at_us,
                SLOTS, len(limits.quotas)]
        for quota in limits.quotas:
            args += [quota.rows, quota.period, quota.slot_us]
        reply = await self._call(self._acquire(keys=[KEY_PREFIX + principal], args=args))
        granted, now, retry, violated, *pairs = reply
        remaining = {_text(pairs[i]): int(pairs[i + 1]) for i in range(0, len(pairs), 2)}
        violated = _text(violated)
        return Grant(int(granted), int(now), int(retry),
                     tuple(violated.split(",")) if violated else (), remaining)

    async def usage(self, principal: str | None = None) -> list[Usage]:
        async def read():
            seconds, micros = await self._redis.time()
            now = int(seconds) * 1_000_000 + int(micros)
            out = []
            for key in await self._keys(KEY_PREFIX, principal):
                fields = await self._redis.hgetall(key)
                name = _text(key)[len(KEY_PREFIX):]
                out += usage_of(name, {_text(f): int(v) for f, v in fields.items()}, now)
            return out

        try:
            return await read()
        except self._errors as error:
            raise StoreError(f"{type(error).__name__}: {error}") from error

    async def _keys(self, prefix: str, principal: str | None) -> list[str]:
        """The keys of `principal` under `prefix`, or every principal's, sorted."""
        if principal is not None:
            return [prefix + principal]
        return sorted({_text(k) async for k in self._redis.scan_iter(match=prefix + "*",
                                                                      count=1000)})

    async def record_classes(self, key: str, labels: list[int], window: int,
                             ttl_s: int) -> tuple[int, dict[int, int]]:
        """Append `labels` to the class window `key` (the last `window` kept) and return
        (answers in the window, count per class); one atomic script, so replicas and
        workers recording for one principal share one window (`detection.outputs`)."""
        reply = await self._call(self._classes(
            keys=[f"{CLASSES_PREFIX}{{{key}}}:ring", f"{CLASSES_PREFIX}{{{key}}}:counts"],
            args=[window, ttl_s, *labels]))
        n, pairs = reply
        return int(n), {int(pairs[i]): int(pairs[i + 1]) for i in range(0, len(pairs), 2)}

    async def record_detection(self, event: dict, ttl_s: int) -> None:
        """Keep escalation `event` (a ladder step change: principal, signal, evidence, from,
        step, dry_run) as its principal's detection record, which expires `ttl_s` seconds
        after its last change; `stealguard-sidecar usage --detections` reads it back."""
        key = DETECT_PREFIX + event["principal"]
        fields = {"step": event["step"], "from": event["from"], "signal": event["signal"],
                  "evidence": json.dumps(event["evidence"], default=str),
                  "at": f"{event.get('at', time.time()):.3f}",
                  "dry_run": int(bool(event["dry_run"]))}
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(key, mapping=fields)
        pipe.hincrby(key, "changes", 1)
        pipe.expire(key, ttl_s)
        await self._call(pipe.execute())

    async def detections(self, principal: str | None = None) -> list[Detection]:
        """The detection records (`record_detection`), by principal."""
        async def read():
            out = []
            for key in await self._keys(DETECT_PREFIX, principal):
                fields = {_text(f): _text(v) for f, v in (await self._redis.hgetall(key)).items()}
                if fields:
                    out.append(_detection(key[len(DETECT_PREFIX):], fields))
            return out

        try:
            return await read()
        except self._errors as error:
            raise StoreError(f"{type(error).__name__}: {error}") from error

    async def ping(self) -> None:
        """Raise StoreError unless the store answers."""
        await self._call(self._redis.ping())

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except self._errors:
            pass


def _detection(principal: str, fields: dict[str, str]) -> Detection:
    try:
        evidence = json.loads(fields.get("evidence", "{}"))
    except ValueError:
        evidence = {"unreadable": fields.get("evidence", "")}
    at = float(fields.get("at", "0") or 0)
    return Detection(principal=principal, step=fields.get("step", "?"),
                     previous=fields.get("from", "?"), signal=fields.get("signal", "?"),
                     evidence=evidence,
                     since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)),
                     dry_run=fields.get("dry_run") == "1",
                     changes=int(fields.get("changes", "0") or 0))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_store(url: str, *, timeout: float = 0.25):
    """The store `url` names: `memory` (this process) or `redis://` / `rediss://`."""
    from stealguard.server.metering.store import MemoryStore

    if url in ("", "memory"):
        return MemoryStore()
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "valkey", "valkeys"):
        if scheme.startswith("valkey"):
            url = "redis" + url[len("valkey"):]
        return RedisStore(url, timeout=timeout)
    raise ValueError(f"--store {url!r}: use memory, redis://HOST:PORT/DB or rediss://HOST:PORT/DB")
