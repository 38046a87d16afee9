"""Which pages may open a WebSocket: the developer's own app on loopback works against a plain
`make run`; nothing else does, and nothing loopback once keys exist."""

from __future__ import annotations

import asyncio
import ssl
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server.auth.limits import KeyLimits
from server.auth.store import KeyStore
from tests.support.certs import self_signed
from tests.support.procs import start_proxy


async def handshake(url: str, origin: str) -> int:
    try:
        async with connect(url, origin=origin) as ws:  # type: ignore[arg-type]
            await ws.recv()
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def eventually(url: str, origin: str, status: int) -> int:
    """The bridge learns whether the server has keys once its relay is up: poll briefly."""
    deadline = time.monotonic() + 5
    while True:
        got = await handshake(url, origin)
        if got == status or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.1)


async def test_pages_on_loopback_may_connect_to_an_open_loopback_proxy():
    proxy = start_proxy(bridge_args=("--allowed-origin", "https://app.example.com"))
    try:
        for origin in ("http://localhost:3000", "http://127.0.0.1:5173", "https://[::1]:8443"):
            assert await eventually(proxy.ws_url, origin, 101) == 101, origin
        assert await handshake(proxy.ws_url, "https://app.example.com") == 101
        for origin in ("null", "http://evil.example", "http://localhost.evil.example:3000"):
            assert await handshake(proxy.ws_url, origin) == 403, origin
        assert any("refused a WebSocket handshake from Origin 'http://evil.example'" in line and "--allowed-origin http://evil.example" in line for line in proxy.bridge.lines)
    finally:
        proxy.stop()


async def test_once_keys_exist_only_the_exact_allowlist(tmp_path):
    db = tmp_path / "keys.sqlite3"
    store = KeyStore(str(db))
    store.create("k", KeyLimits())
    store.close()
    proxy = start_proxy(server_args=("--auth-db", str(db)), bridge_args=("--allowed-origin", "http://localhost:3000"))
    try:
        await asyncio.sleep(1.5)  # let the bridge's probe run: the check is that it stays strict
        assert await handshake(proxy.ws_url, "http://127.0.0.1:5173") == 403
        status = await handshake(proxy.ws_url, "http://localhost:3000")
        assert status == 101
    finally:
        proxy.stop()


async def test_with_tls_the_bridges_own_https_origin_is_allowed(tmp_path):
    # With keys, so that only the bridge's own origins (not the loopback rule) can let it in.
    db = tmp_path / "keys.sqlite3"
    store = KeyStore(str(db))
    api_key, _ = store.create("k", KeyLimits())
    store.close()
    cert, key = self_signed(tmp_path, "localhost")
    proxy = start_proxy(server_args=("--auth-db", str(db)), bridge_args=("--tls-cert", str(cert), "--tls-key", str(key)))
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        port = proxy.bridge.port
        headers = {"Authorization": f"Bearer {api_key}"}
        try:
            async with connect(f"wss://localhost:{port}/stream", ssl=ctx, origin=f"https://localhost:{port}", additional_headers=headers) as ws:  # type: ignore[arg-type]
                first = await ws.recv()
        except InvalidStatus as exc:
            pytest.fail(f"own https origin refused: {exc.response.status_code}")
        assert "session" in str(first)
    finally:
        proxy.stop()
