"""The one authentication and limit policy, shared by gRPC and WebSocket clients.

The server checks it at the start of every `Stream`, `GetSession` and `ListModels` call: the
key arrives as gRPC metadata `authorization: Bearer <key>` (the bridge copies it from the
WebSocket handshake; it never reads identity from JSON frames). Every failure is the same
`Unauthenticated` error with the same message, whether the key was missing, malformed, unknown
or revoked. Then, per stream start, `admit` applies the key's models and limits
(server/auth/limits.py) before anything goes upstream.

The clock is injected; the store is the only I/O (one SQLite read per call).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from server.auth.limits import KeyLimiter, KeyLimits
from server.auth.store import MAX_KEY_CHARS, KeyStore
from server.errors import ProxyError, Unauthenticated

UNAUTHENTICATED_MESSAGE = "a valid API key is required (authorization: Bearer <key>)"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a call acts for: the public id of its key (never the key) and the key's limits."""

    key_id: str
    limits: KeyLimits


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
    def __init__(self, store: KeyStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._limiter = KeyLimiter()
        self._limits: dict[str, KeyLimits] = {}  # key id -> limits seen at its last authentication

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        """Raises `Unauthenticated` for a missing, malformed, unknown or revoked key."""
        token = bearer_token(metadata)
        record = self._store.verify(token) if token is not None else None
        if record is None:
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        self._limits[record.key_id] = record.limits
        return Principal(record.key_id, record.limits)

    def open_connection(self, principal: Principal) -> None:
        """Raises `TooManyConnections`; call `close_connection` when the call ends."""
        self._limiter.open_connection(principal.key_id, principal.limits)

    def close_connection(self, principal: Principal) -> None:
        self._limiter.close_connection(principal.key_id)

    def admit(self, principal: Principal, model: str, live_streams: int) -> ProxyError | None:
        """None if the stream may start, else the typed error to answer it with."""
        try:
            self._limiter.admit(principal.key_id, principal.limits, model, live_streams, self._clock())
        except ProxyError as exc:
            return exc
        return None

    def charge(self, key_id: str, tokens: int) -> None:
        """Counts completion tokens of an ended stream against the key's minute and budget."""
        limits = self._limits.get(key_id)
        if limits is not None:
            self._limiter.charge(key_id, tokens, limits, self._clock())
