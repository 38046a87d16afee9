"""Where cached answers live: a store interface, and the embedded default.

`CacheStore` is what the response cache needs from a store; `SqliteStore` is the embedded one:
entries in SQLite (a file, or memory), prompt vectors also in an in-process index per semantic
scope, bounded in entries and bytes (payload plus vector), least recently used evicted first,
expired entries dropped when met and on every write. A Redis store can implement the same
interface later (entries as hashes with TTLs, vectors in a search index).

Calls are synchronous and short (one indexed SQLite statement, a dot product over one scope's
vectors); the cache calls them on the event loop. Not thread-safe: one loop owns a store.
"""

from __future__ import annotations

import sqlite3
import struct
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class StoredEntry:
    key: str
    tenant: str
    model: str
    scope: str  # the semantic scope ("" when not semantic)
    payload: bytes
    vector: tuple[float, ...]  # unit-length prompt embedding, () when none
    expires_s: float


@dataclass(frozen=True, slots=True)
class StoreStats:
    entries: int
    bytes: int
    evicted: int
    expired: int


class CacheStore(Protocol):
    def get(self, key: str, now_s: float) -> bytes | None:
        """The payload of a live entry (and marks it used), or None."""

    def put(self, entry: StoredEntry, now_s: float) -> None:
        """Stores (or replaces) an entry, then evicts down to the bounds."""

    def nearest(self, scope: str, vector: tuple[float, ...], now_s: float) -> tuple[str, float] | None:
        """The live entry of `scope` whose vector is most similar (cosine), with the score."""

    def delete(self, tenant: str, model: str = "") -> int:
        """Deletes a tenant's entries (of one model, or all); returns how many."""

    def stats(self) -> StoreStats: ...

    def close(self) -> None: ...


def _pack(vector: tuple[float, ...]) -> bytes:
    return struct.pack(f"<{len(vector)}f", *vector)


def _unpack(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


class SqliteStore:
    """The embedded store (see the module doc)."""

    def __init__(self, path: str = ":memory:", max_entries: int = 10_000, max_bytes: int = 64 << 20) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
            # A cache may lose its last writes in a power cut; no fsync per stored answer.
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, tenant TEXT, model TEXT, scope TEXT,"
            " payload BLOB, vector BLOB, size INTEGER, expires REAL, used REAL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS entries_used ON entries (used)")
        self._db.execute("CREATE INDEX IF NOT EXISTS entries_tenant ON entries (tenant, model)")
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._evicted = 0
        self._expired = 0
        # scope -> key -> (vector, expires_s): the in-process vector index, and per scope its
        # vectors as one matrix (rebuilt after a change) for one matrix-vector product per lookup
        # (vectors as float32 arrays: 1 KiB for 256 dimensions, what max_bytes counts)
        self._index: dict[str, dict[str, tuple[np.ndarray, float]]] = {}
        self._matrices: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}
        for key, scope, vector, expires in self._db.execute("SELECT key, scope, vector, expires FROM entries WHERE scope != ''"):
            self._index.setdefault(scope, {})[key] = (_unpack(vector), expires)
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries").fetchone()
        self._entries, self._bytes = int(row[0]), int(row[1])

    def get(self, key: str, now_s: float) -> bytes | None:
        row = self._db.execute("SELECT payload, expires FROM entries WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        if row[1] <= now_s:
            self._remove([key])
            self._expired += 1
            return None
        self._db.execute("UPDATE entries SET used = ? WHERE key = ?", (now_s, key))
        return bytes(row[0])

    def put(self, entry: StoredEntry, now_s: float) -> None:
        size = len(entry.payload) + 4 * len(entry.vector)
        if size > self._max_bytes:
            return
        self._remove([entry.key])
        self._db.execute(
            "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (entry.key, entry.tenant, entry.model, entry.scope, entry.payload, _pack(entry.vector), size, entry.expires_s, now_s),
        )
        self._entries += 1
        self._bytes += size
        if entry.scope and entry.vector:
            self._index.setdefault(entry.scope, {})[entry.key] = (np.asarray(entry.vector, dtype=np.float32), entry.expires_s)
            self._matrices.pop(entry.scope, None)
        self._evict(now_s)

    def nearest(self, scope: str, vector: tuple[float, ...], now_s: float) -> tuple[str, float] | None:
        entries = self._index.get(scope)
        if not entries or not vector:
            return None
        built = self._matrices.get(scope)
        if built is None:
            keys = [k for k, (v, _) in entries.items() if len(v) == len(vector)]
            if not keys:
                return None
            matrix = np.stack([entries[k][0] for k in keys])
            expires = np.array([entries[k][1] for k in keys], dtype=np.float64)
            built = self._matrices[scope] = (keys, matrix, expires)
        keys, matrix, expires = built
        if matrix.shape[1] != len(vector):
            return None
        scores = matrix @ np.asarray(vector, dtype=np.float32)
        scores[expires <= now_s] = -2.0
        i = int(np.argmax(scores))
        if scores[i] < -1.5:
            return None
        return keys[i], float(scores[i])

    def delete(self, tenant: str, model: str = "") -> int:
        if model:
            keys = [r[0] for r in self._db.execute("SELECT key FROM entries WHERE tenant = ? AND model = ?", (tenant, model))]
        else:
            keys = [r[0] for r in self._db.execute("SELECT key FROM entries WHERE tenant = ?", (tenant,))]
        return self._remove(keys)

    def stats(self) -> StoreStats:
        return StoreStats(self._entries, self._bytes, self._evicted, self._expired)

    def close(self) -> None:
        self._db.close()

    def _remove(self, keys: list[str]) -> int:
        removed = 0
        for key in keys:
            row = self._db.execute("DELETE FROM entries WHERE key = ? RETURNING scope, size", (key,)).fetchone()
            if row is None:
                continue
            removed += 1
            self._entries -= 1
            self._bytes -= int(row[1])
            scoped = self._index.get(row[0])
            self._matrices.pop(row[0], None)
            if scoped is not None:
                scoped.pop(key, None)
                if not scoped:
                    del self._index[row[0]]
        return removed

    def _evict(self, now_s: float) -> None:
        # Recount first: another process (python -m server.cache.cli delete) may have deleted rows
        # of a file store. A miss already cost a provider call; a count is a fraction of a ms.
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries").fetchone()
        self._entries, self._bytes = int(row[0]), int(row[1])
        expired = [r[0] for r in self._db.execute("SELECT key FROM entries WHERE expires <= ?", (now_s,))]
        self._expired += self._remove(expired)
        while self._entries > self._max_entries or self._bytes > self._max_bytes:
            batch = [r[0] for r in self._db.execute("SELECT key FROM entries ORDER BY used LIMIT 16")]
            if not batch:
                break
            for key in batch:
                if self._entries <= self._max_entries and self._bytes <= self._max_bytes:
                    break
                self._evicted += self._remove([key])
