"""Per-key limits and revocations shared by every server on one Redis (`--store redis://...`).

With the memory store each server counts its keys' requests, tokens, streams and connections
in its own `KeyLimiter` (server/auth/limits.py): three servers let three times the limit
through. With Redis the counters live there, and each check is one atomic Lua script, so two
servers admitting at the same moment cannot both take the last slot.

Keys. All of one API key's counters share one Redis Cluster slot (`api_key_key`, hash tag
`{k:<id>}`), because a script may only touch keys of one slot:

    llmproxy:{k:<id>}:revoked     a string; present once the key is revoked ("1": cancel streams)
    llmproxy:{k:<id>}:requests    sorted set: one member per admitted request, score = its ms
    llmproxy:{k:<id>}:tokens      sorted set: one member per charge "<server>:<n>:<tokens>", score = ms
    llmproxy:{k:<id>}:budget      hash: budget period number -> tokens charged in that period
    llmproxy:{k:<id>}:live        hash: server id -> live streams of the key on that server
    llmproxy:{k:<id>}:conns       hash: server id -> open connections of the key on that server
    llmproxy:{k:<id>}:servers     sorted set: server id -> lease expiry (ms) of its two counts above
    llmproxy:revoked              hash: key id -> "0"/"1" (cancel streams), polled by every server

Time. Every timestamp is Redis's own `TIME`, read inside the scripts, so servers whose clocks
disagree still share one window. The windows are those of `KeyLimiter`: a sliding 60 s window
for requests and tokens per minute (an entry of time t counts while t > now - 60 s), budget
periods aligned to the epoch.

Concurrency without leaks. A server does not add and remove stream references one by one: it
publishes how many live streams (and open connections) each key has on it, in the key's `live`
(`conns`) hash, under a lease in the key's `servers` set that it renews every `SYNC_INTERVAL_S`
(`sync`). An admission counts its own server's live streams exactly (passed by the caller) and
adds the other servers' published counts, skipping (and deleting) those whose lease lapsed. So
a server that dies stops counting within `LEASE_S`; a stream that ends on another server frees
its slot at that server's next sync (the error is on the side of refusing, for at most one sync
interval); a stream admitted anywhere counts everywhere at once (the admission publishes it).

Revocations. Each server mirrors the revocations it reads from its own SQLite key store into
Redis (`mirror_revocations`: the per-key `revoked` string, read by every admission script, and
the `llmproxy:revoked` hash), and reads the hash back every poll (server/auth/policy.py merges
it with its own). Servers on different machines with different key files thus refuse a key
revoked on any of them within two polls.

Failures. Every call raises `StoreUnavailable` when Redis does not answer (the client's
timeouts bound it), never admits silently.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.auth.limits import KeyLimits
from server.errors import KeyRateLimited, ProxyError, QuotaExceeded, StoreUnavailable, TooManyStreams, Unauthenticated
from server.store.base import api_key_key, cluster_key

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger("llmproxy.server")

LEASE_S = 6.0  # a server's published live streams and connections count this long unrenewed
SYNC_INTERVAL_S = 0.5  # how often a server publishes them and sends the tokens it charged
ADMIT_TIMEOUT_S = 2.0  # an admission that Redis has not answered by then is refused (unavailable)
WINDOW_MS = 60_000
REVOKED_MESSAGE = "this API key was revoked"
UNAVAILABLE_MESSAGE = "the shared store (Redis) is unreachable; try again shortly"

# The scripts read the time once: `now` in whole milliseconds of Redis's clock.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Drops servers whose lease lapsed from the `live` and `conns` hashes; `others(hash)` sums the
# counts of every other server.
_LEASES = """
local function drop_lapsed(servers, live, conns, now)
  local lapsed = redis.call('ZRANGEBYSCORE', servers, '-inf', now)
  for _, s in ipairs(lapsed) do
    redis.call('HDEL', live, s)
    redis.call('HDEL', conns, s)
  end
  if #lapsed > 0 then redis.call('ZREMRANGEBYSCORE', servers, '-inf', now) end
end
local function others(hash, me)
  local counts = redis.call('HGETALL', hash)
  local n = 0
  for i = 1, #counts, 2 do
    if counts[i] ~= me then n = n + tonumber(counts[i + 1]) end
  end
  return n
end
"""

# KEYS: revoked, requests, tokens, budget, live, conns, servers
# ARGV: rpm, tpm, budget_tokens, budget_period_s, concurrency, own_live, server, lease_ms, request member
# Returns {verdict, retry_after_ms}; verdict: ok, revoked, streams, rpm, tpm, budget.
ADMIT_LUA = (
    _NOW
    + _LEASES
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'revoked', 0} end
local rpm, tpm, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local period_s, conc, own = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local me, lease = ARGV[7], tonumber(ARGV[8])
local horizon = now - 60000
if conc > 0 then
  drop_lapsed(KEYS[7], KEYS[5], KEYS[6], now)
  if own + others(KEYS[5], me) >= conc then return {'streams', 0} end
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', horizon)
  local n = redis.call('ZCARD', KEYS[2])
  if n >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[2], n - rpm, n - rpm, 'WITHSCORES')
    return {'rpm', tonumber(oldest[2]) + 60000 - now}
  end
end
if tpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', horizon)
  local entries = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
  local total = 0
  for i = 1, #entries, 2 do total = total + tonumber(string.match(entries[i], ':(%d+)$')) end
  if total >= tpm then
    for i = 1, #entries, 2 do
      total = total - tonumber(string.match(entries[i], ':(%d+)$'))
      if total < tpm then return {'tpm', tonumber(entries[i + 1]) + 60000 - now} end
    end
  end
end
if budget > 0 then
  local period = math.floor(now / 1000 / period_s)
  local spent = tonumber(redis.call('HGET', KEYS[4], tostring(period)) or '0')
  if spent >= budget then return {'budget', (period + 1) * period_s * 1000 - now} end
end
if rpm > 0 then
  redis.call('ZADD', KEYS[2], now, ARGV[9])
  redis.call('PEXPIRE', KEYS[2], 61000)
end
if conc > 0 then
  redis.call('HSET', KEYS[5], me, own + 1)
  redis.call('ZADD', KEYS[7], now + lease, me)
  redis.call('PEXPIRE', KEYS[5], lease * 2)
  redis.call('PEXPIRE', KEYS[7], lease * 2)
end
return {'ok', 0}
"""
)

# KEYS: tokens, budget
# ARGV: tokens, member prefix (unique per charge), tpm on (0/1), budget period_s (0: no budget)
CHARGE_LUA = (
    _NOW
    + """
local n, period_s = tonumber(ARGV[1]), tonumber(ARGV[4])
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], now, ARGV[2] .. ':' .. n)
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
  redis.call('PEXPIRE', KEYS[1], 61000)
end
if period_s > 0 then
  local period = tostring(math.floor(now / 1000 / period_s))
  redis.call('HINCRBY', KEYS[2], period, n)
  for _, field in ipairs(redis.call('HKEYS', KEYS[2])) do
    if field ~= period then redis.call('HDEL', KEYS[2], field) end
  end
  redis.call('EXPIRE', KEYS[2], period_s + 60)
end
return now
"""
)

# KEYS: live, conns, servers
# ARGV: server, live streams here, connections here, lease_ms
# Publishes this server's counts under a renewed lease (or withdraws them when both are 0);
# returns the other servers' open connections of the key.
SYNC_LUA = (
    _NOW
    + _LEASES
    + """
local me, live, conns, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
drop_lapsed(KEYS[3], KEYS[1], KEYS[2], now)
if live == 0 and conns == 0 then
  redis.call('HDEL', KEYS[1], me)
  redis.call('HDEL', KEYS[2], me)
  redis.call('ZREM', KEYS[3], me)
else
  redis.call('HSET', KEYS[1], me, live)
  redis.call('HSET', KEYS[2], me, conns)
  redis.call('ZADD', KEYS[3], now + lease, me)
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], lease * 2) end
end
return others(KEYS[2], me)
"""
)


def unavailable(exc: Exception) -> StoreUnavailable:
    """Every failure of a command is "no answer" to the client (retryable `unavailable`), so a
    Redis that refuses writes (OOM, a read-only replica) fails closed like one that is down. Those
    refusals, and any error of our scripts, are logged: they need an operator or a fix."""
    if not isinstance(exc, (RedisConnectionError, RedisTimeoutError, asyncio.TimeoutError, OSError)):
        log.error("the store refused a key counter command: %s", exc, exc_info=exc)
    return StoreUnavailable(UNAVAILABLE_MESSAGE)


def admit_keys(key_id: str) -> list[str]:
    return [api_key_key(key_id, part) for part in ("revoked", "requests", "tokens", "budget", "live", "conns", "servers")]


@dataclass(frozen=True, slots=True)
class KeyActivity:
    """What this server holds of one key at a sync: live streams and open connections."""

    live_streams: int
    connections: int


def refusal(verdict: str, retry_after_ms: int, limits: KeyLimits) -> ProxyError | None:
    """The typed error for an admission script's verdict (the same errors as `KeyLimiter`)."""
    retry_s = max(0.001, retry_after_ms / 1000)
    if verdict == "ok":
        return None
    if verdict == "revoked":
        return Unauthenticated(REVOKED_MESSAGE)
    if verdict == "streams":
        return TooManyStreams(f"this API key may run at most {limits.concurrency} streams at once")
    if verdict == "rpm":
        return KeyRateLimited(f"this API key may start {limits.rpm} streams per minute", retry_after_s=retry_s)
    if verdict == "tpm":
        return KeyRateLimited(f"this API key may use {limits.tpm} tokens per minute", retry_after_s=retry_s)
    if verdict == "budget":
        return QuotaExceeded(
            f"this API key's budget of {limits.budget_tokens} tokens per {limits.budget_period_s} s is spent", retry_after_s=retry_s
        )
    raise ValueError(f"unknown admission verdict {verdict!r}")


class ClusterKeys:
    """The Redis side of the key limits and revocations of one server."""

    def __init__(self, redis: aioredis.Redis, server_id: str, lease_s: float = LEASE_S) -> None:
        self._redis = redis
        self.server_id = server_id
        self._lease_ms = int(lease_s * 1000)
        self._admit = redis.register_script(ADMIT_LUA)
        self._charge = redis.register_script(CHARGE_LUA)
        self._sync = redis.register_script(SYNC_LUA)
        self._serial = itertools.count()
        self._charges: dict[str, tuple[int, KeyLimits]] = {}  # key id -> tokens not yet sent
        self._published: set[str] = set()  # keys whose counts this server has published
        self._other_connections: dict[str, int] = {}  # key id -> other servers' connections, last sync
        self._in_flight: dict[str, int] = {}  # key id -> admissions awaiting Redis's answer here

    def checks_in_flight(self, key_id: str) -> int:
        return self._in_flight.get(key_id, 0)

    @contextmanager
    def in_flight(self, key_id: str) -> Iterator[None]:
        """Counts an admission of the key while its round trip is pending."""
        self._in_flight[key_id] = self._in_flight.get(key_id, 0) + 1
        try:
            yield
        finally:
            left = self._in_flight[key_id] - 1
            if left:
                self._in_flight[key_id] = left
            else:
                del self._in_flight[key_id]

    async def admit(self, key_id: str, limits: KeyLimits, own_live: int) -> ProxyError | None:
        """One round trip (EVALSHA): None, or the typed refusal. Raises `StoreUnavailable`.
        Cancelling it is safe (the client drops the connection of a cancelled command)."""
        args = (
            limits.rpm,
            limits.tpm,
            limits.budget_tokens,
            limits.budget_period_s,
            limits.concurrency,
            own_live,
            self.server_id,
            self._lease_ms,
            f"{self.server_id}:{next(self._serial)}",
        )
        try:
            async with asyncio.timeout(ADMIT_TIMEOUT_S):  # no extra task, unlike wait_for: this is the hot path
                verdict, retry_ms = await self._admit(keys=admit_keys(key_id), args=args)
        except Exception as exc:
            raise unavailable(exc) from exc
        if limits.concurrency and verdict == b"ok":
            self._published.add(key_id)
        return refusal(verdict.decode(), int(retry_ms), limits)

    def charge(self, key_id: str, tokens: int, limits: KeyLimits) -> None:
        """Counts tokens against the key's minute and budget at the next `sync` (one pipeline)."""
        if tokens <= 0 or not (limits.tpm or limits.budget_tokens):
            return
        pending, _ = self._charges.get(key_id, (0, limits))
        self._charges[key_id] = (pending + tokens, limits)

    def other_connections(self, key_id: str) -> int:
        """The key's open connections on the other servers, as of the last sync."""
        return self._other_connections.get(key_id, 0)

    async def sync(self, activity: Mapping[str, KeyActivity]) -> None:
        """Sends the pending charges and publishes this server's live streams and connections
        of every key in `activity` (keys with a stream or connection limit), in one pipeline
        (one round trip: EVALSHA of scripts loaded before, loaded again if Redis lost them).
        Raises `StoreUnavailable`; the charges are then kept for the next sync.

        Admissions still waiting for Redis count as live: the sync must not publish fewer
        streams than one of them is about to."""
        charges, self._charges = self._charges, {}
        keys = [k for k, a in activity.items() if a.live_streams or a.connections or k in self._published]
        if not charges and not keys:
            return
        try:
            try:
                results = await self._send(charges, keys, activity)
            except NoScriptError:  # Redis restarted empty or was flushed; nothing ran
                for script in (self._charge, self._sync):
                    await self._redis.script_load(script.script)
                results = await self._send(charges, keys, activity)
        except Exception as exc:
            for key_id, (tokens, limits) in charges.items():  # not lost: sent with the next sync
                self.charge(key_id, tokens, limits)
            raise unavailable(exc) from exc
        for key_id, others in zip(keys, results[len(charges) :]):
            self._other_connections[key_id] = int(others)
            a = activity.get(key_id, KeyActivity(0, 0))
            if a.live_streams or a.connections:
                self._published.add(key_id)
            else:
                self._published.discard(key_id)
                self._other_connections.pop(key_id, None)

    async def _send(self, charges: Mapping[str, tuple[int, KeyLimits]], keys: list[str], activity: Mapping[str, KeyActivity]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key_id, (tokens, limits) in charges.items():
                args = (tokens, f"{self.server_id}:{next(self._serial)}", int(bool(limits.tpm)), limits.budget_period_s if limits.budget_tokens else 0)
                pipe.evalsha(self._charge.sha, 2, api_key_key(key_id, "tokens"), api_key_key(key_id, "budget"), *args)
            for key_id in keys:
                a = activity.get(key_id, KeyActivity(0, 0))
                live = a.live_streams + self.checks_in_flight(key_id)
                sync_keys = [api_key_key(key_id, part) for part in ("live", "conns", "servers")]
                pipe.evalsha(self._sync.sha, 3, *sync_keys, self.server_id, live, a.connections, self._lease_ms)
            results: list[Any] = await asyncio.wait_for(pipe.execute(), ADMIT_TIMEOUT_S)
            return results

    async def mirror_revocations(self, revoked: Mapping[str, bool]) -> None:
        """Writes revocations read from this server's key store to Redis (those it lacks, or
        whose cancel flag it lacks). Raises `StoreUnavailable`."""
        if not revoked:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key_id, cancel in revoked.items():
                    flag = b"1" if cancel else b"0"
                    pipe.set(api_key_key(key_id, "revoked"), flag)
                    pipe.hset(cluster_key("revoked"), key_id, flag)
                await asyncio.wait_for(pipe.execute(), ADMIT_TIMEOUT_S)
        except Exception as exc:
            raise unavailable(exc) from exc

    async def revocations(self) -> dict[str, bool]:
        """Every key revoked on any server -> whether its streams are to be cancelled.
        Raises `StoreUnavailable`."""
        try:
            raw: dict[Any, Any] = await asyncio.wait_for(self._redis.hgetall(cluster_key("revoked")), ADMIT_TIMEOUT_S)
        except Exception as exc:
            raise unavailable(exc) from exc
        return {_text(k): v == b"1" for k, v in raw.items()}


def revoke_in_redis(url: str, key_id: str, cancel_streams: bool) -> None:
    """Writes one revocation straight to Redis, as `mirror_revocations` would (the key CLI's
    `revoke --store redis://...`: every server refuses the key within one poll, whatever key
    file it reads). Raises `redis.RedisError` when Redis does not answer."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        flag = b"1" if cancel_streams else b"0"
        with client.pipeline(transaction=False) as pipe:
            if not cancel_streams:  # never lowers a cancel another server wrote
                pipe.set(api_key_key(key_id, "revoked"), flag, nx=True)
                pipe.hsetnx(cluster_key("revoked"), key_id, flag)
            else:
                pipe.set(api_key_key(key_id, "revoked"), flag)
                pipe.hset(cluster_key("revoked"), key_id, flag)
            pipe.execute()
    finally:
        client.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
