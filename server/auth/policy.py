"""The one authentication and limit policy, shared by gRPC and WebSocket clients.

The server checks it at the start of every `Stream`, `GetSession` and `ListModels` call: the
key arrives as gRPC metadata `authorization: Bearer <key>` (the bridge copies it from the
WebSocket handshake; it never reads identity from JSON frames). Every failure is the same
`Unauthenticated` error with the same message, whether the key was missing, malformed, unknown
or revoked. Then, per stream start, `admit` applies the key's models and limits
(server/auth/limits.py) before anything goes upstream.

Revocation. A connection is authenticated once, when it opens; afterwards every admission
(start, modify, continuation) also checks the key against the store's revocations, read at
most every `REVOCATION_MAX_AGE_S` (a cached set, so a burst of starts costs one read), so an
open connection's new streams are refused (`unauthenticated`) within that time of `revoke`, on
every server process. `watch` polls the same list every `REVOCATION_POLL_S` and reports keys
revoked with `--cancel-streams`, whose running streams the servicer then ends.

Across servers (`--store redis://`, server/auth/cluster.py). `watch` also mirrors the
revocations of this server's key file into Redis and reads back every server's, so a key
revoked on any server is refused by every other one (new connections and new starts) within
two polls (`CLUSTER_REVOCATION_POLL_S` apart), and `--cancel-streams` ends its streams
everywhere. The counters live in Redis: admissions are `ClusterAdmission` coroutines
(server/auth/admission.py), charges and this server's live streams and connections go out with
`sync_cluster`.

The clock is injected; the store is the only I/O (one SQLite read per call, and the polls).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from server.auth.cluster import SYNC_INTERVAL_S, ClusterKeys, KeyActivity
from server.auth.limits import KeyLimiter, KeyLimits
from server.auth.store import MAX_KEY_CHARS, KeyStore
from server.errors import ForbiddenModel, ProxyError, StoreUnavailable, TooManyConnections, Unauthenticated

UNAUTHENTICATED_MESSAGE = "a valid API key is required (authorization: Bearer <key>)"
REVOKED_MESSAGE = "this API key was revoked"
REVOCATION_MAX_AGE_S = 0.5  # an admission reads the revocations again when they are older
REVOCATION_POLL_S = 0.25  # how often `watch` reads them
CLUSTER_REVOCATION_POLL_S = 0.1  # with Redis: two polls (this file's, then another server's) lie between a revoke and its refusal

log = logging.getLogger("llmproxy.server")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a call acts for: the public id of its key (never the key) and the key's limits."""

    key_id: str
    limits: KeyLimits
    admin: bool = False  # sees every tenant's statistics

    def tenant(self) -> str | None:
        """The key id whose statistics this caller may read; None: every tenant's (admin)."""
        return None if self.admin else self.key_id


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of the one `authorization: Bearer` entry; None when absent, repeated or
    malformed (RFC 6750 2.1: the scheme is case-insensitive, one space, then the token)."""
    values = [v for k, v in metadata if k.lower() == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str) or len(values[0]) > MAX_KEY_CHARS + 7:
        return None
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class AuthPolicy:
    def __init__(
        self,
        store: KeyStore,
        clock: Callable[[], float] = time.time,
        keys_must_name: frozenset[str] = frozenset(),
        cluster: ClusterKeys | None = None,
    ) -> None:
        self._store = store
        self.cluster = cluster  # the counters and revocations shared in Redis; None: this process only
        self._cluster_revoked: dict[str, bool] = {}  # every server's revocations, as last read from Redis
        self._clock = clock
        self._keys_must_name = keys_must_name  # models a key's list must name (the built-in demo)
        self._limiter = KeyLimiter()
        self._limits: dict[str, KeyLimits] = {}  # key id -> limits seen at its last authentication
        self._revoked: dict[str, bool] = {}  # key id -> cancel its streams, as last read
        self._revoked_read_s = float("-inf")
        self._cancelled: set[str] = set()  # keys whose streams `watch` has reported

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        """Raises `Unauthenticated` for a missing, malformed, unknown or revoked key."""
        token = bearer_token(metadata)
        record = self._store.verify(token) if token is not None else None
        if record is None or record.key_id in self._cluster_revoked:
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        self._limits[record.key_id] = record.limits
        return Principal(record.key_id, record.limits, record.admin)

    def open_connection(self, principal: Principal) -> None:
        """Raises `TooManyConnections`; call `close_connection` when the call ends. Across
        servers, the others' connections count as of their last sync."""
        limits = principal.limits
        if self.cluster is not None and limits.connections:
            others = self.cluster.other_connections(principal.key_id)
            if others + self._limiter.connections(principal.key_id) >= limits.connections:
                raise TooManyConnections(f"this API key may hold at most {limits.connections} connections", retry_after_s=1.0)
        self._limiter.open_connection(principal.key_id, principal.limits)

    def close_connection(self, principal: Principal) -> None:
        self._limiter.close_connection(principal.key_id)

    def is_revoked(self, key_id: str) -> bool:
        """Whether the key was revoked, as read at most `REVOCATION_MAX_AGE_S` ago."""
        if self._clock() - self._revoked_read_s >= REVOCATION_MAX_AGE_S:
            self._read()
        return key_id in self._revoked or key_id in self._cluster_revoked

    def _read(self) -> None:
        """Reads the store's revocations. A store that cannot be read keeps the last answer
        (and is logged)."""
        try:
            self._revoked = self._store.revocations()
        except sqlite3.Error as exc:
            log.warning("cannot read key revocations: %s", exc)
            return
        self._revoked_read_s = self._clock()

    def read_revocations(self) -> list[str]:
        """Reads the store's revocations; returns the keys newly marked to have their streams
        cancelled (by this store or, across servers, by any server's)."""
        self._read()
        return self._newly_cancelled()

    def _newly_cancelled(self) -> list[str]:
        # Reported from the merged answer, not from what `is_revoked` read in between: a cancel
        # read by an admission must still reach `watch`.
        merged = {**self._revoked, **{k: c or self._revoked.get(k, False) for k, c in self._cluster_revoked.items()}}
        new = [key_id for key_id, cancel in merged.items() if cancel and key_id not in self._cancelled]
        self._cancelled.update(new)
        return new

    async def poll_revocations(self) -> list[str]:
        """`read_revocations`, and across servers: mirrors this store's revocations that Redis
        lacks into it, then reads every server's back. Redis unreachable: this store's only."""
        self._read()
        cluster = self.cluster
        if cluster is not None:
            seen = self._cluster_revoked
            missing = {k: c for k, c in self._revoked.items() if k not in seen or (c and not seen[k])}
            try:
                await cluster.mirror_revocations(missing)
                self._cluster_revoked = await cluster.revocations()
            except StoreUnavailable as exc:
                log.debug("cannot share key revocations: %s", exc.__cause__)
        return self._newly_cancelled()

    async def watch(self, cancel_streams: Callable[[str], None], interval_s: float | None = None) -> None:
        """Polls the revocations forever; calls `cancel_streams(key_id)` once for each key
        revoked with `--cancel-streams`. Cancelling it is safe."""
        if interval_s is None:
            interval_s = REVOCATION_POLL_S if self.cluster is None else CLUSTER_REVOCATION_POLL_S
        await self.poll_revocations()  # keys cancelled before this server started have no streams here
        while True:
            await asyncio.sleep(interval_s)
            for key_id in await self.poll_revocations():
                try:
                    cancel_streams(key_id)
                except Exception:  # a bug of ours must not end the watch for every later key
                    log.error("cancelling the streams of revoked key %s failed", key_id, exc_info=True)

    def may_use(self, principal: Principal, model: str) -> bool:
        """Whether the key's model list allows `model` (an empty list allows every model but
        those that must be named)."""
        models = principal.limits.models
        return model in models if (models or model in self._keys_must_name) else True

    def admit(self, principal: Principal, model: str, live_streams: int) -> ProxyError | None:
        """None if the stream may start, else the typed error to answer it with."""
        if self.is_revoked(principal.key_id):
            return Unauthenticated(REVOKED_MESSAGE)
        if not self.may_use(principal, model):
            return ForbiddenModel(f"this API key may not use model {model!r}")
        try:
            self._limiter.admit(principal.key_id, principal.limits, model, live_streams, self._clock())
        except ProxyError as exc:
            return exc
        return None

    def charge(self, key_id: str, tokens: int) -> None:
        """Counts completion tokens of an ended stream against the key's minute and budget."""
        limits = self._limits_of(key_id)
        if limits is None:
            return
        if self.cluster is not None:
            self.cluster.charge(key_id, tokens, limits)  # sent with the next sync
        else:
            self._limiter.charge(key_id, tokens, limits, self._clock())

    def _limits_of(self, key_id: str) -> KeyLimits | None:
        """The key's limits: as seen at its last authentication here, else read from the key
        store once (a session taken over from another server whose key never connected here)."""
        limits = self._limits.get(key_id)
        if limits is None and key_id and self.cluster is not None:
            try:
                record = self._store.get(key_id)
            except sqlite3.Error as exc:
                log.warning("cannot read key %s: %s", key_id, exc)
                return None
            if record is not None:
                limits = self._limits[key_id] = record.limits
        return limits

    def activity(self, live_streams: Mapping[str, int]) -> dict[str, KeyActivity]:
        """This server's live streams (`live_streams`: key id -> count) and connections of
        every key with a stream or connection limit, for `ClusterKeys.sync`."""
        for key_id in live_streams.keys() - self._limits.keys():  # streams taken over from a dead server
            self._limits_of(key_id)
        out: dict[str, KeyActivity] = {}
        for key_id, limits in self._limits.items():
            if limits.concurrency or limits.connections:
                out[key_id] = KeyActivity(live_streams.get(key_id, 0) if limits.concurrency else 0, self._limiter.connections(key_id))
        return out

    async def sync_cluster(self, live_streams: Callable[[], Mapping[str, int]], interval_s: float = SYNC_INTERVAL_S) -> None:
        """Forever: sends the tokens charged since the last sync to Redis and publishes this
        server's live streams and connections per key (one pipeline). Cancelling it is safe."""
        cluster = self.cluster
        assert cluster is not None
        while True:
            await asyncio.sleep(interval_s)
            try:
                await cluster.sync(self.activity(live_streams()))
            except StoreUnavailable as exc:  # the store's health watch reports the outage
                log.debug("cannot sync the key counters: %s", exc.__cause__)
