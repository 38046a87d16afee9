"""SO_REUSEPORT on only when asked (docs/deploy.md).

- Without `--reuse-port`, a second server or bridge on a taken port exits with a message that
  names the flag, instead of binding (gRPC would set SO_REUSEPORT by itself) and silently taking
  half the connections.
- With it, two bridges share the WebSocket port and the HTTP API port, and both accept some of
  many connections (the server side is tested by tests/integration/test_cluster_run.py).
"""

from __future__ import annotations

import contextlib
import random

import httpx
import pytest

from tests.support.procs import start, start_bridge, start_server
from tests.support.sockets import accepted, free_port_run
from tests.support.ws import open_ws

pytestmark = pytest.mark.timeout(120)


def test_a_second_server_on_a_taken_port_is_refused_without_the_flag():
    first = start_server()
    try:
        with pytest.raises(RuntimeError) as info:
            second = start_server("--listen", first.address)  # the later --listen wins
            second.stop()  # it bound: the test fails, and leaves nothing running
        assert "servers share a port only with --reuse-port" in str(info.value)
        assert "Traceback" not in str(info.value)
    finally:
        first.stop()


def test_a_second_bridge_on_a_taken_port_is_refused_without_the_flag():
    server = start_server()
    bridges = []
    try:
        bridges.append(start_bridge(server.address))
        with pytest.raises(RuntimeError) as info:
            bridges.append(start_bridge(server.address, port=bridges[0].port))  # stopped below if it bound
        assert "bridges share a port only with --reuse-port" in str(info.value)
        assert "Traceback" not in str(info.value)
    finally:
        for b in bridges:
            b.stop()
        server.stop()


async def test_two_bridges_share_the_websocket_and_http_ports_with_the_flag():
    server = start_server()
    rng = random.Random()
    ws_port = free_port_run(1, rng)
    http_port = free_port_run(1, rng, {ws_port})
    bridges = []
    try:
        for _ in range(2):
            bridges.append(start_bridge(server.address, "--reuse-port", "--http-port", str(http_port), port=ws_port))
        pids = [b.popen.pid for b in bridges]
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(24):
                await stack.enter_async_context(open_ws(f"ws://127.0.0.1:{ws_port}/stream"))
            per_bridge = [accepted(pid, ws_port) for pid in pids]
            assert sum(per_bridge) == 24 and min(per_bridge) > 0, per_bridge  # all on one: odds 2^-23
        clients = [httpx.Client(base_url=f"http://127.0.0.1:{http_port}") for _ in range(24)]
        try:
            for client in clients:  # a kept-alive connection each
                assert client.get("/v1/models").status_code == 200
            per_bridge = [accepted(pid, http_port) for pid in pids]
            assert sum(per_bridge) == 24 and min(per_bridge) > 0, per_bridge
        finally:
            for client in clients:
                client.close()
    finally:
        for b in bridges:
            b.stop()
        server.stop()
