"""The SQLite key store: API keys stored hashed, with their limits.

A key reads `llmp_<id>_<secret>`: `id` (12 hex digits) is public (it names the key in
`list`, logs and metrics), `secret` (43 URL-safe characters, 256 bits) is shown once, at
creation. Only HMAC-SHA256(salt, secret) with a random 16-byte salt per key is stored; a lookup
goes by id, then compares the digests in constant time. Every character of a key is a valid
HTTP token character, so browsers can carry it in `Sec-WebSocket-Protocol` (docs/security.md).

Each `verify` reads the row again, so a revocation takes effect for the next connection without
a restart (one indexed SQLite read per connection, not per token). Connections already open
learn of it through `revocations()`, which every server polls (server/auth/policy.py): a
revocation made with `cancel_streams` also asks every server to end the key's running streams.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass

from server.auth.limits import KeyLimits

KEY_PREFIX = "llmp"
KEY_RE = re.compile(r"llmp_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
MAX_KEY_CHARS = 256  # longer presented values are refused before any parsing

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    salt BLOB NOT NULL,
    digest BLOB NOT NULL,
    models TEXT NOT NULL DEFAULT '',
    rpm INTEGER NOT NULL DEFAULT 0,
    tpm INTEGER NOT NULL DEFAULT 0,
    concurrency INTEGER NOT NULL DEFAULT 0,
    connections INTEGER NOT NULL DEFAULT 0,
    budget_tokens INTEGER NOT NULL DEFAULT 0,
    budget_period_s INTEGER NOT NULL DEFAULT 86400,
    created_at REAL NOT NULL,
    revoked_at REAL,
    cancel_streams INTEGER NOT NULL DEFAULT 0,
    admin INTEGER NOT NULL DEFAULT 0
)
"""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    name: str
    limits: KeyLimits
    created_at: float
    revoked: bool
    admin: bool = False  # reads every tenant's statistics (others see only their own)


def _digest(salt: bytes, secret: str) -> bytes:
    return hmac.new(salt, secret.encode(), hashlib.sha256).digest()


class KeyStore:
    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, timeout=2.0, isolation_level=None, check_same_thread=False)
        self._db.execute(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(api_keys)")}
        if "cancel_streams" not in columns:  # a store made before revocations could cancel
            self._db.execute("ALTER TABLE api_keys ADD COLUMN cancel_streams INTEGER NOT NULL DEFAULT 0")
        if "admin" not in columns:  # a store made before the admin role
            self._db.execute("ALTER TABLE api_keys ADD COLUMN admin INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        self._db.close()

    def create(self, name: str, limits: KeyLimits, admin: bool = False) -> tuple[str, KeyRecord]:
        """Makes a key; returns its plaintext (shown once, never stored) and its record."""
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        now = time.time()
        self._db.execute(
            "INSERT INTO api_keys (id, name, salt, digest, models, rpm, tpm, concurrency, connections,"
            " budget_tokens, budget_period_s, created_at, admin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key_id,
                name,
                salt,
                _digest(salt, secret),
                ",".join(sorted(limits.models)),
                limits.rpm,
                limits.tpm,
                limits.concurrency,
                limits.connections,
                limits.budget_tokens,
                limits.budget_period_s,
                now,
                int(admin),
            ),
        )
        return f"{KEY_PREFIX}_{key_id}_{secret}", KeyRecord(key_id, name, limits, now, False, admin)

    def list(self) -> list[KeyRecord]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at").fetchall()
        return [_record(row) for row in rows]

    def get(self, key_id: str) -> KeyRecord | None:
        """The record of a key by its public id, revoked or not (never for authentication)."""
        row = self._db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return _record(row) if row is not None else None

    def revoke(self, key_id: str, cancel_streams: bool = False) -> bool:
        """Revokes a key by id; with `cancel_streams` the servers also end its running streams
        (allowed on a key revoked before). Returns whether anything changed."""
        cur = self._db.execute(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?), cancel_streams = MAX(cancel_streams, ?)"
            " WHERE id = ? AND (revoked_at IS NULL OR cancel_streams < ?)",
            (time.time(), int(cancel_streams), key_id, int(cancel_streams)),
        )
        return cur.rowcount > 0

    def revocations(self) -> dict[str, bool]:
        """Every revoked key id -> whether its running streams are to be cancelled."""
        rows = self._db.execute("SELECT id, cancel_streams FROM api_keys WHERE revoked_at IS NOT NULL").fetchall()
        return {str(key_id): bool(cancel) for key_id, cancel in rows}

    def verify(self, presented: str) -> KeyRecord | None:
        """The record of a valid, unrevoked key; None for anything else."""
        match = KEY_RE.fullmatch(presented) if len(presented) <= MAX_KEY_CHARS else None
        if match is None:
            return None
        key_id, secret = match.groups()
        row = self._db.execute(f"SELECT {_COLUMNS}, salt, digest FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            _digest(b"\0" * 16, secret)  # the same work as a known id
            return None
        if not hmac.compare_digest(_digest(row[-2], secret), row[-1]):
            return None
        record = _record(row[:-2])
        return None if record.revoked else record


_COLUMNS = "id, name, models, rpm, tpm, concurrency, connections, budget_tokens, budget_period_s, created_at, revoked_at, admin"


def _record(row: tuple[object, ...]) -> KeyRecord:
    key_id, name, models, rpm, tpm, concurrency, connections, budget, period, created, revoked, admin = row
    limits = KeyLimits(
        models=frozenset(m for m in str(models).split(",") if m),
        rpm=int(rpm),  # type: ignore[call-overload]
        tpm=int(tpm),  # type: ignore[call-overload]
        concurrency=int(concurrency),  # type: ignore[call-overload]
        connections=int(connections),  # type: ignore[call-overload]
        budget_tokens=int(budget),  # type: ignore[call-overload]
        budget_period_s=int(period),  # type: ignore[call-overload]
    )
    return KeyRecord(str(key_id), str(name), limits, float(created), revoked is not None, bool(admin))  # type: ignore[arg-type]
