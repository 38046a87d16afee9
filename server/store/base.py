"""The store's common part: which store, its connection, its health, its key names.

`open_store("memory")` is the embedded default: nothing shared, always healthy.
`open_store("redis://host:port/db")` connects the `redis` package's asyncio client (one
connection pool per process; every command has a timeout, so an unreachable Redis is an error
within a second, never a hang). `watch_health` pings Redis every `HEALTH_INTERVAL_S` and tells
its listeners when it stops or starts answering: the gRPC health service reports NOT_SERVING
while Redis is unreachable, and starts refuse new streams with a retryable `unavailable`.

Key names. Every key starts with `llmproxy:` and carries a hash tag (the part in braces) so all
keys of one session live on one Redis Cluster slot, and all of one API key's counters on one:
`llmproxy:{s:<session id>}:...` and `llmproxy:{k:<key id>}:...`. Keys about the cluster itself
(`llmproxy:servers`, `llmproxy:live:<server>`, ...) have no session in them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable

log = logging.getLogger("llmproxy.store")

HEALTH_INTERVAL_S = 0.5
COMMAND_TIMEOUT_S = 1.0
PREFIX = "llmproxy:"


def session_key(session_id: str, *parts: str) -> str:
    """A key of one session (one Cluster slot per session)."""
    return ":".join((f"{PREFIX}{{s:{session_id}}}", *parts))


def api_key_key(key_id: str, *parts: str) -> str:
    """A counter of one API key (one Cluster slot per key)."""
    return ":".join((f"{PREFIX}{{k:{key_id}}}", *parts))


def cluster_key(*parts: str) -> str:
    return PREFIX + ":".join(parts)


def new_server_id() -> str:
    """This process's name in the cluster: host, pid and a random part (a restarted process
    with the same pid is a different server)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Store:
    """The memory store: nothing is shared; every check answers from this process."""

    shared = False

    def __init__(self, server_id: str = "") -> None:
        self.server_id = server_id or new_server_id()
        self.healthy = True
        self._listeners: list[Callable[[bool], None]] = []

    def on_health(self, listener: Callable[[bool], None]) -> None:
        """`listener(healthy)` is called whenever the store's reachability changes."""
        self._listeners.append(listener)

    def _set_healthy(self, healthy: bool) -> None:
        if healthy == self.healthy:
            return
        self.healthy = healthy
        if healthy:
            log.warning("the store answers again")
        else:
            log.error("the store is unreachable: new streams are refused (unavailable) until it answers")
        for listener in list(self._listeners):
            try:
                listener(healthy)
            except Exception:
                log.error("a store health listener failed", exc_info=True)

    async def watch_health(self) -> None:
        """Runs forever (a supervised job); the memory store is always healthy."""
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        pass

    def describe(self) -> str:
        return "memory"


class RedisStore(Store):
    """Redis, through the `redis` package's asyncio client."""

    shared = True

    def __init__(self, url: str, server_id: str = "") -> None:
        super().__init__(server_id)
        # hiredis: redis-py parses replies with it when it is importable (several times less CPU
        # per reply than its Python parser); imported here so a broken install fails at start.
        import hiredis  # noqa: F401
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        # Timeouts on connect and on every reply: an unreachable Redis fails a command within
        # COMMAND_TIMEOUT_S. One quick retry covers a connection the server closed while idle.
        self.redis = aioredis.Redis.from_url(
            url,
            socket_timeout=COMMAND_TIMEOUT_S,
            socket_connect_timeout=COMMAND_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1),
            max_connections=64,
            decode_responses=False,
        )
        self.healthy = False  # until the first PING answers

    async def connect(self, timeout_s: float = 10.0) -> None:
        """Waits until Redis answers (the server does not start serving before)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                await self.redis.ping()
                self.healthy = True
                return
            except Exception as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise SystemExit(f"llmproxy-server: the store {self.describe()} does not answer: {exc}") from None
                await asyncio.sleep(0.2)

    async def watch_health(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                await asyncio.wait_for(self.redis.ping(), COMMAND_TIMEOUT_S)
                ok = True
            except Exception:
                ok = False
            self._set_healthy(ok)

    async def aclose(self) -> None:
        await self.redis.aclose()

    def describe(self) -> str:
        # Never the password: redis://user:secret@host -> redis://host
        rest = self.url.split("://", 1)[-1].rsplit("@", 1)[-1]
        return f"redis://{rest}"


def open_store(spec: str, server_id: str = "") -> Store:
    """`memory` or a `redis://` / `rediss://` / `unix://` URL."""
    if spec in ("", "memory"):
        return Store(server_id)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(spec, server_id)
    raise SystemExit(f"llmproxy-server: --store must be 'memory' or a redis:// URL, not {spec!r}")
