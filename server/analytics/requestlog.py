"""The request log: one SQLite row per ended stream, with retention. Blocking; the server calls
it from a worker thread (asyncio.to_thread), in batches.

No prompt or answer text is stored: the row holds times, model, deployment, token counts,
status, timings and the UX score.
"""

from __future__ import annotations

import math
import sqlite3
import statistics
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from server.core.session import StreamRecord

_COLUMNS = (
    "ended_ms INTEGER NOT NULL, stream_id TEXT NOT NULL, model TEXT NOT NULL, provider TEXT NOT NULL, "
    "deployment TEXT NOT NULL, status TEXT NOT NULL, failed INTEGER NOT NULL, ttft_us INTEGER, total_us INTEGER, "
    "tokens INTEGER, tokens_per_s REAL, itl_p50_us INTEGER, itl_p95_us INTEGER, itl_p99_us INTEGER, "
    "itl_max_us INTEGER, stalls INTEGER, relay_p50_us INTEGER, relay_max_us INTEGER, attempts INTEGER, "
    "ux_score REAL, prompt_tokens INTEGER, completion_tokens INTEGER, reasoning_tokens INTEGER, client TEXT NOT NULL DEFAULT '', "
    "api TEXT NOT NULL DEFAULT '', "
    "cache TEXT NOT NULL DEFAULT '', cache_score REAL NOT NULL DEFAULT 0, "
    "cached_input_tokens INTEGER NOT NULL DEFAULT 0, cache_write_input_tokens INTEGER NOT NULL DEFAULT 0"
)
# Columns added after the first release, with their definitions (an older log gains them).
_ADDED = {
    "client": "TEXT NOT NULL DEFAULT ''",  # per-client rows
    "api": "TEXT NOT NULL DEFAULT ''",  # per-API rows
    "cache": "TEXT NOT NULL DEFAULT ''",  # "exact" / "semantic": answered from the response cache
    "cache_score": "REAL NOT NULL DEFAULT 0",
    "cached_input_tokens": "INTEGER NOT NULL DEFAULT 0",  # read from the provider's prompt cache
    "cache_write_input_tokens": "INTEGER NOT NULL DEFAULT 0",
}
_INSERT = (
    "INSERT INTO streams (ended_ms, stream_id, model, provider, deployment, status, failed, ttft_us, total_us, tokens, "
    "tokens_per_s, itl_p50_us, itl_p95_us, itl_p99_us, itl_max_us, stalls, relay_p50_us, relay_max_us, attempts, ux_score, "
    "prompt_tokens, completion_tokens, reasoning_tokens, client, api, cache, cache_score, cached_input_tokens, "
    f"cache_write_input_tokens) VALUES ({', '.join('?' * 29)})"
)
GROUPS = {"model": "model", "deployment": "deployment", "provider": "provider", "client": "client", "api": "api"}


class RequestLog:
    def __init__(self, path: str | Path, retention_s: float = 7 * 86400) -> None:
        self._path = str(path)
        self._retention_ms = int(retention_s * 1000)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"CREATE TABLE IF NOT EXISTS streams ({_COLUMNS})")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(streams)")}
        for name, definition in _ADDED.items():  # a log written before these columns
            if name not in columns:
                self._db.execute(f"ALTER TABLE streams ADD COLUMN {name} {definition}")
        self._db.execute("CREATE INDEX IF NOT EXISTS streams_ended ON streams (ended_ms)")
        self._last_prune_ms = 0

    def write(self, records: Iterable[StreamRecord], now_ms: int | None = None) -> None:
        now_ms = now_ms or int(time.time() * 1000)
        rows = [
            (
                now_ms, r.stream_id, r.model, r.provider, r.deployment, r.status, int(r.failed),
                r.timing.ttft_us, r.timing.total_us, r.timing.tokens, r.timing.tokens_per_s,
                r.timing.itl_p50_us, r.timing.itl_p95_us, r.timing.itl_p99_us, r.timing.itl_max_us,
                r.timing.stalls, r.timing.relay_p50_us, r.timing.relay_max_us, r.timing.attempts,
                r.ux_score, r.prompt_tokens, r.completion_tokens, r.reasoning_tokens, r.client or "anonymous",
                r.api, r.cache, r.cache_score, r.cached_input_tokens, r.cache_write_input_tokens,
            )
            for r in records
        ]
        with self._lock:
            if rows:
                self._db.executemany(_INSERT, rows)
            if now_ms - self._last_prune_ms > 60_000:
                self._db.execute("DELETE FROM streams WHERE ended_ms < ?", (now_ms - self._retention_ms,))
                self._last_prune_ms = now_ms

    def stats(
        self, window_s: int, group_by: str = "model", now_ms: int | None = None, client: str | None = None
    ) -> list[dict[str, float | int | str]]:
        """Aggregates per group over the window, of one client's streams when `client` is given
        (a tenant sees only its own). Raises KeyError for an unknown group."""
        column = GROUPS[group_by]
        since = (now_ms or int(time.time() * 1000)) - window_s * 1000
        only = "" if client is None else " AND client = ?"
        with self._lock:
            rows = self._db.execute(
                f"SELECT {column}, {', '.join(STATS_COLUMNS)} "
                f"FROM streams WHERE ended_ms >= ?{only} ORDER BY 1",
                (since,) if client is None else (since, client),
            ).fetchall()
        return aggregate(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()


# One row as `aggregate` reads it: the group's name, then the columns of STATS_COLUMNS.
STATS_COLUMNS = ("failed", "status", "completion_tokens", "ttft_us", "itl_p95_us", "ux_score", "tokens", "cache", "cached_input_tokens")
StatsRow = tuple[str, int, str, int, int, int, float, int, str, int]


def aggregate(rows: Iterable[StatsRow]) -> list[dict[str, float | int | str]]:
    """The `Stats` aggregates per group (sorted by name) of rows (name, *STATS_COLUMNS): the one
    computation behind the SQLite log and the cluster's shared log (server/analytics/cluster.py)."""
    groups: dict[str, list[tuple[int, str, int, int, int, float, int, str, int]]] = {}
    for name, *rest in rows:
        groups.setdefault(name, []).append(tuple(rest))  # type: ignore[arg-type]
    out: list[dict[str, float | int | str]] = []
    for name, items in sorted(groups.items()):
        ttfts = sorted(i[3] for i in items if i[6])
        itls = [i[4] for i in items if i[6] > 1]
        out.append(
            {
                "name": name,
                "streams": len(items),
                "errors": sum(i[0] for i in items),
                "cancelled": sum(1 for i in items if i[1] == "cancelled"),
                "completion_tokens": sum(i[2] for i in items),
                "ttft_p50_ms": _pct(ttfts, 0.5) / 1000,
                "ttft_p95_ms": _pct(ttfts, 0.95) / 1000,
                "itl_p95_ms": (statistics.median(itls) / 1000) if itls else 0.0,
                "ux_score": statistics.fmean(i[5] for i in items),
                "cache_hits": sum(1 for i in items if i[7]),
                "cached_input_tokens": sum(i[8] for i in items),
            }
        )
    return out


def _pct(values: list[int], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not values:
        return 0.0
    return float(values[min(len(values), max(1, math.ceil(q * len(values)))) - 1])
