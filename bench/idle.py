"""Workload (v): many idle WebSocket sessions held open with heartbeats; memory per session.

On a fresh server and bridge (so earlier workloads' garbage is not counted), with the bridge's
WebSocket ping interval short enough that every session sees several heartbeats (RFC 6455
ping/pong, answered by the client library) while it is held: open N sessions (each reads its
`session` frame, so a gRPC call and a server session exist), hold them, then ping every one
end to end (an application `ping` answered by the server's `pong`). A session is dropped when
its connection closed or its pong did not come. Memory per session is the growth of the
bridge's and the server's resident memory divided by N.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import orjson
from websockets.asyncio.client import ClientConnection, connect

from bench.clients import CONNECTS_AT_ONCE, FAILURES
from bench.system import Pinning, rss_kb, running_proxy
from bench.workloads import IdleWorkload

PONG_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class IdleResult:
    sessions: int
    opened: int
    held: int  # answered the final ping with a pong
    dropped: int  # opened but not held
    connect_s: float
    hold_s: float
    ping_interval_s: float
    bridge_rss_before_kb: int
    bridge_rss_after_kb: int
    server_rss_before_kb: int
    server_rss_after_kb: int
    bridge_kb_per_session: float
    server_kb_per_session: float
    kb_per_session: float


async def _open(url: str, slots: asyncio.Semaphore) -> ClientConnection | None:
    try:
        async with slots:
            ws = await asyncio.wait_for(connect(url, compression=None, ping_interval=None), 60.0)
            await asyncio.wait_for(ws.recv(), 30.0)  # the `session` frame
            return ws
    except FAILURES:
        return None


async def _ping(ws: ClientConnection, nonce: int, slots: asyncio.Semaphore) -> bool:
    try:
        async with slots:
            await ws.send(orjson.dumps({"type": "ping", "nonce": nonce}).decode())
            async with asyncio.timeout(PONG_TIMEOUT_S):
                while True:
                    frame = orjson.loads(await ws.recv())
                    if frame["type"] == "pong":
                        return frame["nonce"] == nonce  # type: ignore[no-any-return]
    except FAILURES:
        return False


async def _close(ws: ClientConnection, slots: asyncio.Semaphore) -> None:
    async with slots:
        try:
            await asyncio.wait_for(ws.close(), 5.0)
        except FAILURES:
            ws.transport.abort()


async def run_idle(workload: IdleWorkload, pinning: Pinning | None) -> IdleResult:
    with running_proxy(pinning, bridge_args=("--ping-interval-s", str(workload.ping_interval_s), "--ping-timeout-s", "20")) as proxy:
        spid, bpid = proxy.server.popen.pid, proxy.bridge.popen.pid
        await asyncio.sleep(0.5)  # let both settle after start-up
        server_before, bridge_before = rss_kb(spid), rss_kb(bpid)
        slots = asyncio.Semaphore(CONNECTS_AT_ONCE)
        t0 = time.monotonic()
        opened = [ws for ws in await asyncio.gather(*(_open(proxy.ws_url, slots) for _ in range(workload.sessions))) if ws]
        connect_s = time.monotonic() - t0
        try:
            await asyncio.sleep(workload.hold_s)
            server_after, bridge_after = rss_kb(spid), rss_kb(bpid)
            alive = [ws for ws in opened if ws.state.name == "OPEN"]
            wide = asyncio.Semaphore(500)
            pongs = await asyncio.gather(*(_ping(ws, i + 1, wide) for i, ws in enumerate(alive)))
            held = sum(pongs)
        finally:
            wide = asyncio.Semaphore(500)
            await asyncio.gather(*(_close(ws, wide) for ws in opened))
    n = max(1, workload.sessions)
    bridge_per = (bridge_after - bridge_before) / n
    server_per = (server_after - server_before) / n
    return IdleResult(
        sessions=workload.sessions,
        opened=len(opened),
        held=held,
        dropped=workload.sessions - held,
        connect_s=round(connect_s, 2),
        hold_s=workload.hold_s,
        ping_interval_s=workload.ping_interval_s,
        bridge_rss_before_kb=bridge_before,
        bridge_rss_after_kb=bridge_after,
        server_rss_before_kb=server_before,
        server_rss_after_kb=server_after,
        bridge_kb_per_session=round(bridge_per, 2),
        server_kb_per_session=round(server_per, 2),
        kb_per_session=round(bridge_per + server_per, 2),
    )
