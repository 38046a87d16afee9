"""Fixtures that start the real server and bridge processes on ephemeral ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.procs import Proxy, start_proxy
from tests.support.redis import RedisServer

# A demo pace fast enough for tests, slow enough that "within one token interval" means
# something: 20 ms between tokens, 50 ms to the first.
FAST_DEMO = ("--demo-ttft-ms", "50", "--demo-tokens-per-s", "50", "--demo-jitter", "0.1")


@pytest.fixture(scope="module")
def proxy() -> Iterator[Proxy]:
    """A server (demo at 50 tokens/s) and a bridge, shared by a test module."""
    p = start_proxy(FAST_DEMO)
    yield p
    p.stop()


@pytest.fixture
def proxy_factory() -> Iterator[Callable[..., Proxy]]:
    """Starts proxies with custom arguments; stops them all after the test."""
    started: list[Proxy] = []

    def make(server_args: tuple[str, ...] = FAST_DEMO, bridge_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Proxy:
        p = start_proxy(server_args, bridge_args, env)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on an ephemeral port (persisted to a temporary directory)."""
    server = RedisServer().start()
    yield server
    server.close()
