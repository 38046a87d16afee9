"""The cluster's analytics in Redis (`--store redis://...`): every server shows every server's.

Theory of operation. Once per report tick (about a second) each server sends one pipeline:

- `SET llmproxy:live:<server id>` its live summary (server/analytics/summary.py), with a TTL of
  `live_ttl_s` (3 ticks): a server that stops refreshing it (SIGKILL, lost machine, Redis
  partition) drops out of every view within that TTL plus one tick of the reader;
- `ZADD llmproxy:live-index <now> <server id>`: how readers find the servers (no SCAN over the
  keyspace); entries not refreshed for `INDEX_KEEP_MS` are pruned in the same pipeline;
- one `XADD llmproxy:requests MAXLEN ~ <request_log_rows>` per stream that ended since the
  last tick: the request log's row (no prompt or answer text, as in SQLite), so `Stats` on any
  server answers over every server's requests;

then reads the other servers' summaries (one pipeline of GETs) and keeps them. `WatchStats`
merges its own latest summary with those (no Redis round trip per subscriber); `Stats` reads
the window's rows back (XRANGE from the window's start by Redis's own clock, in chunks) and
aggregates them with the same function as the SQLite log.

The request log in Redis is a capped stream: memory is bounded by `request_log_rows` (about
100 bytes a row: 100 000 rows ~ 10 MB; `Stats` over all of them about 1 s), and a `Stats` window longer than what the stream holds
answers over the rows it holds (the local SQLite log of each server keeps its own full
retention, for the CLI). We chose a stream of rows over per-minute aggregates because `Stats`
then computes exactly what one server computes (nearest-rank percentiles of the rows), and over
fanning `Stats` out to the servers because servers sharing one port (SO_REUSEPORT) cannot be
addressed one by one, and a dead server's log would vanish with it.

Failures. The memory store never gets here. While the store is unhealthy (its health watch)
or a pipeline fails, a tick publishes nothing; the live view shrinks to this server once the
others' summaries are older than the TTL; rows wait in a bounded backlog (`backlog_rows`, the
oldest dropped with a log line beyond it) and go out with the next pipeline that succeeds. A
pipeline that timed out may still have been applied (a Redis that was frozen runs what waited
in its socket when it thaws), so a row may be in the stream twice: each row carries an id
unique in the cluster, and `Stats` counts each id once. `Stats` raises
`SharedLogUnavailable` (the RPC answers UNAVAILABLE) rather than answer from one server's rows.
Nothing here is per token.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import orjson
from redis.exceptions import RedisError

from llmproxy.v1 import llmproxy_pb2 as pb
from server.analytics.requestlog import GROUPS, StatsRow, aggregate
from server.analytics.summary import BadSummary, LiveSummary, decode, encode, merge
from server.core.session import StreamRecord
from server.store.base import RedisStore, cluster_key

log = logging.getLogger("llmproxy.analytics")

INDEX_KEEP_MS = 60_000  # index entries older than this are pruned (generous: clocks may differ)
READ_CHUNK = 5_000  # XRANGE entries per round trip when Stats reads the shared log
# The shared row: the group columns, then requestlog.STATS_COLUMNS, then the row's id.
ROW_GROUPS = ("model", "deployment", "provider", "client", "api")


class SharedLogUnavailable(Exception):
    """The shared request log cannot be read now (Redis unreachable or too slow)."""


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    live_ttl_s: float = 3.0  # a server that stops publishing drops out after this
    request_log_rows: int = 100_000  # the shared request log's cap (XADD MAXLEN ~)
    backlog_rows: int = 10_000  # rows kept for the next pipeline while Redis fails
    timeout_s: float = 1.0  # one sync or one Stats chunk


def shared_row(r: StreamRecord, row_id: str) -> tuple[object, ...]:
    """One ended stream as the shared log keeps it: the columns `Stats` reads (no text), and an
    id unique in the cluster (server id / random / sequence number) by which a reader drops a row that a
    retried pipeline wrote twice."""
    t = r.timing
    return (
        r.model, r.deployment, r.provider, r.client or "anonymous", r.api,
        int(r.failed), r.status, r.completion_tokens, t.ttft_us, t.itl_p95_us, r.ux_score, t.tokens, r.cache, r.cached_input_tokens,
        row_id,
    )


def aggregate_shared(chunks: Iterable[bytes], group_by: str, client: str | None) -> list[dict[str, float | int | str]]:
    """`Stats` over shared rows: `chunks` are JSON arrays of rows (as `shared_row` wrote them,
    joined by READ_SCRIPT), each row counted once. Blocking (run it in a thread). Raises
    KeyError for an unknown group."""
    index = ROW_GROUPS.index(GROUPS[group_by])
    client_index = ROW_GROUPS.index("client")
    seen: set[str] = set()
    rows: list[StatsRow] = []
    for chunk in chunks:
        for row in orjson.loads(chunk):
            if row[-1] in seen:
                continue
            seen.add(row[-1])
            if client is None or row[client_index] == client:
                rows.append((row[index], *row[len(ROW_GROUPS) : -1]))
    return aggregate(rows)


# One chunk of the shared log, from `ARGV[1]` on, at most `ARGV[2]` entries, as ONE reply:
# {the last entry id, how many, "[row,row,...]"}. The client's RESP parser (pure Python without
# hiredis) takes about 60 us per stream entry, 6 s for 100 000 rows on the event loop; one
# bulk string per chunk costs a JSON decode in a worker thread instead. A chunk of 5 000 entries
# keeps Redis busy a few milliseconds.
READ_SCRIPT = """
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', tonumber(ARGV[2]))
local rows = {}
for i, entry in ipairs(entries) do rows[i] = entry[2][2] end
local last = ''
if #entries > 0 then last = entries[#entries][1] end
return {last, #entries, '[' .. table.concat(rows, ',') .. ']'}
"""


class ClusterAnalytics:
    """One server's part of the cluster's analytics, through its `RedisStore`."""

    def __init__(self, store: RedisStore, settings: ClusterSettings = ClusterSettings(), wall_ms: Callable[[], int] | None = None) -> None:
        self._store = store
        self._redis = store.redis
        self.server_id = store.server_id
        self._settings = settings
        self._wall_ms = wall_ms or (lambda: int(time.time() * 1000))
        self._live_key = cluster_key("live", store.server_id)
        self._index_key = cluster_key("live-index")
        self._log_key = cluster_key("requests")
        self._own: LiveSummary | None = None
        self._others: dict[str, tuple[float, LiveSummary]] = {}  # server id -> (monotonic s when read, summary)
        self._rows: list[bytes] = []  # shared rows not yet written
        self._row_seq = 0  # numbers this server's shared rows
        # A restarted server may keep its --server-id: the random part keeps its rows' ids new.
        self._row_prefix = f"{store.server_id}/{secrets.token_hex(4)}/"
        self._gone: list[str] = []  # servers whose summary had expired at the last read
        self._read_chunk = self._redis.register_script(READ_SCRIPT)  # EVALSHA, loaded on first use
        self._failing = False

    @property
    def ready(self) -> bool:
        """Whether this server has summarized its window once (before that: its own view)."""
        return self._own is not None

    def share(self, records: Iterable[StreamRecord]) -> None:
        """Queues ended streams' rows for the next sync (bounded)."""
        for r in records:
            self._row_seq += 1
            self._rows.append(orjson.dumps(shared_row(r, f"{self._row_prefix}{self._row_seq}")))
        excess = len(self._rows) - self._settings.backlog_rows
        if excess > 0:
            del self._rows[:excess]
            log.error("the shared request log is behind: %d rows dropped from it (each server's own log keeps them)", excess)

    async def sync(self, own: LiveSummary) -> None:
        """Publishes `own` and the queued rows, and reads the other servers' summaries: two
        round trips. Never raises for Redis failures (they are logged once per outage).
        Cancelling it is safe (rows not acknowledged by Redis stay queued)."""
        self._own = own
        if not self._store.healthy:
            return
        rows, self._rows = self._rows, []
        try:
            await asyncio.wait_for(self._sync(own, rows), self._settings.timeout_s)
        except asyncio.CancelledError:
            self._requeue(rows)
            raise
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._requeue(rows)
            if not self._failing:
                log.warning("publishing this server's analytics to the store failed: %r (retried every tick)", exc)
            self._failing = True
            return
        if self._failing:
            log.warning("publishing this server's analytics to the store works again")
        self._failing = False

    def _requeue(self, rows: list[bytes]) -> None:
        """Rows of a failed pipeline go out with the next one (see the module docstring)."""
        self._rows[:0] = rows
        self.share(())  # re-applies the bound

    async def _sync(self, own: LiveSummary, rows: list[bytes]) -> None:
        now_ms = self._wall_ms()
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(self._live_key, encode(own), px=int(self._settings.live_ttl_s * 1000))
        pipe.zadd(self._index_key, {self.server_id: now_ms})
        pipe.zremrangebyscore(self._index_key, "-inf", now_ms - INDEX_KEEP_MS)
        if self._gone:  # their summaries had expired at the last read: out of the index too
            pipe.zrem(self._index_key, *self._gone)
        for row in rows:
            pipe.xadd(self._log_key, {b"r": row}, maxlen=self._settings.request_log_rows, approximate=True)
        pipe.zrange(self._index_key, 0, -1)
        results = await pipe.execute()
        rows.clear()  # written: a failure reading the others below must not queue them again
        ids = [m.decode() for m in results[-1]]
        ids = [i for i in ids if i != self.server_id]
        values: list[bytes | None] = []
        if ids:
            pipe = self._redis.pipeline(transaction=False)
            for i in ids:
                pipe.get(cluster_key("live", i))
            values = await pipe.execute()
        now = time.monotonic()
        others: dict[str, tuple[float, LiveSummary]] = {}
        self._gone = [i for i, value in zip(ids, values) if value is None]  # it stopped (or stalled: it adds itself again)
        for server_id, value in zip(ids, values):
            if value is None:
                continue
            try:
                others[server_id] = (now, decode(value))
            except BadSummary as exc:  # another version of the server, during an upgrade
                log.warning("server %s publishes a summary this server cannot read: %s", server_id, exc)
        self._others = others

    def snapshot(self, client: str | None = None) -> pb.StatsSnapshot:
        """The merged view of this server (its last summary) and every other live one read at
        the last sync and younger than the TTL; with `client`, that client's own."""
        assert self._own is not None
        horizon = time.monotonic() - self._settings.live_ttl_s
        summaries = [self._own, *(s for read, s in self._others.values() if read >= horizon)]
        return merge(summaries, self._wall_ms(), client)

    def servers(self) -> list[str]:
        """The servers in the current view (this one first)."""
        horizon = time.monotonic() - self._settings.live_ttl_s
        return [self.server_id, *sorted(i for i, (read, _) in self._others.items() if read >= horizon)]

    async def stats(self, window_s: int, group_by: str, client: str | None) -> list[dict[str, float | int | str]]:
        """`Stats` over every server's requests of the last `window_s` seconds (by Redis's
        clock). Raises KeyError for an unknown group, `SharedLogUnavailable`. Cancelling it is
        safe."""
        GROUPS[group_by]  # KeyError before any round trip
        chunks: list[bytes] = []
        try:
            seconds, micros = await asyncio.wait_for(self._redis.time(), self._settings.timeout_s)
            start = f"{int(seconds) * 1000 + int(micros) // 1000 - window_s * 1000}"
            while True:
                reply = await asyncio.wait_for(self._read_chunk(keys=[self._log_key], args=[start, READ_CHUNK]), self._settings.timeout_s)
                last, count, chunk = cast(list[bytes | int], reply)
                assert isinstance(last, bytes) and isinstance(count, int) and isinstance(chunk, bytes)
                chunks.append(chunk)
                if count < READ_CHUNK:
                    break
                start = "(" + last.decode()
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            log.warning("reading the shared request log failed: %r", exc)
            raise SharedLogUnavailable("the shared request log (the store) is unreachable; try again") from exc
        return await asyncio.to_thread(aggregate_shared, chunks, group_by, client)

    async def leave(self) -> None:
        """Removes this server from the live view at once (a clean shutdown); best effort."""
        if not self._store.healthy:
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.delete(self._live_key)
            pipe.zrem(self._index_key, self.server_id)
            await asyncio.wait_for(pipe.execute(), self._settings.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:  # its key expires after the TTL anyway
            log.warning("could not leave the cluster's live view: %r", exc)
