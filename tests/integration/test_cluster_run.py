"""`make cluster`'s launcher (llmproxy_cli/cluster.py) with 2 servers and 2 bridges, for real.

- a WebSocket client streams through the shared port and gets the whole answer (the same text a
  direct gRPC read of the shared gRPC port gets);
- over many connections, both bridges accept WebSockets and both servers accept gRPC
  connections on the shared ports (SO_REUSEPORT: the kernel spreads them), and every bridge's
  streams reach both servers (its relay pool);
- a child that dies is reported; SIGINT stops every process within a bound and leaves none.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.procs import ROOT
from tests.support.redis import redis_binary
from tests.support.sockets import accepted, alive, children_of, free_port_run
from tests.support.ws import collect, open_ws, send, start_frame, text_of

pytestmark = pytest.mark.timeout(240)

PACE = ("--demo-ttft-ms", "20", "--demo-tokens-per-s", "200", "--demo-jitter", "0")
PROMPT = "What is a black hole?"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Launcher:
    def __init__(self, tmp_path: Path) -> None:
        rng = random.Random()
        taken: set[int] = set()
        self.ports: dict[str, int] = {}
        for name, n in (("grpc", 1), ("relay", 2), ("metrics", 2), ("ws", 1), ("http", 1), ("redis", 1)):
            base = free_port_run(n, rng, taken)
            taken.update(range(base, base + n))
            self.ports[name] = base
        args = [
            sys.executable, "-m", "llmproxy_cli.cluster", "--procs", "2",
            "--grpc-port", str(self.ports["grpc"]), "--relay-port-base", str(self.ports["relay"]),
            "--metrics-port-base", str(self.ports["metrics"]), "--ws-port", str(self.ports["ws"]),
            "--http-port", str(self.ports["http"]), "--redis-port", str(self.ports["redis"]),
            "--run-dir", str(tmp_path / "run"),
            *(f"--server-arg={p}" for p in PACE),
        ]
        self.popen = subprocess.Popen(
            args, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self.seen: set[int] = set()  # every child pid seen, for the cleanup
        self.ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            if "llmproxy cluster: Ctrl-C stops all" in line:
                self.ready.set()
        self.ready.set()

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        assert self.ready.wait(timeout_s), "the cluster did not start in time:\n" + self.text()
        assert self.popen.poll() is None, "the launcher exited:\n" + self.text()

    def text(self) -> str:
        return "\n".join(self.lines[-80:])

    def children(self) -> dict[str, int]:
        """role-index -> pid, in start order per role."""
        found: dict[str, int] = {}
        for pid, cmd in sorted(children_of(self.popen.pid).items()):
            role = "server" if "server.main" in cmd else "bridge" if "bridge.main" in cmd else "redis" if "redis-server" in cmd else ""
            if role:
                found[f"{role}-{sum(k.startswith(role) for k in found)}"] = pid
        self.seen.update(found.values())
        return found

    def kill_all(self) -> None:  # the test's own cleanup, should it fail half-way
        if self.popen.poll() is None:
            self.children()
        for pid in self.seen:
            if not alive(pid) or not any(m in cmdline(pid) for m in ("server.main", "bridge.main", "redis-server")):
                continue  # gone (its pid may be another process's by now)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


async def read_direct(target: str) -> str:
    from llmproxy_client import LLMProxyClient

    async with LLMProxyClient(target) as client:
        handle = client.stream(model="demo", messages=[{"role": "user", "content": PROMPT}], seed=3, max_tokens=30)
        return "".join([t async for t in handle])


def streams_ended(metrics_url: str) -> float:
    body = httpx.get(metrics_url, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith("llmproxy_streams_total{"))


async def test_cluster_of_two_streams_spreads_and_stops_cleanly(tmp_path):
    redis_binary()  # fails with what to install when redis-server is missing
    launcher = Launcher(tmp_path)
    try:
        launcher.wait_ready()
        pids = launcher.children()
        assert sorted(pids) == ["bridge-0", "bridge-1", "redis-0", "server-0", "server-1"], pids
        ports = launcher.ports
        shared_grpc = f"127.0.0.1:{ports['grpc']}"
        ws_url = f"ws://127.0.0.1:{ports['ws']}/stream"
        for line in (ws_url, f"http://127.0.0.1:{ports['http']}/v1", f"redis://127.0.0.1:{ports['redis']}/0",
                     f"http://127.0.0.1:{ports['metrics']}/metrics", f"http://127.0.0.1:{ports['metrics'] + 1}/metrics"):
            assert line in launcher.text(), line

        # The whole answer through the shared WebSocket port, as a direct read gets it.
        expected = await read_direct(shared_grpc)
        assert len(expected) > 20
        async with open_ws(ws_url) as ws:
            await send(ws, start_frame("a", PROMPT, seed=3, max_tokens=30))
            frames = (await collect(ws, {"a"}))["a"]
        assert frames[-1]["type"] == "done", frames[-1]
        assert text_of(frames) == expected

        # 24 WebSockets held open at once: both bridges accepted some (SO_REUSEPORT spreads them
        # by the hash of each connection's addresses; all 24 on one has odds of 2^-23).
        metrics = [f"http://127.0.0.1:{ports['metrics'] + i}/metrics" for i in range(2)]
        before = [streams_ended(url) for url in metrics]
        async with contextlib.AsyncExitStack() as stack:
            sockets = [await stack.enter_async_context(open_ws(ws_url)) for _ in range(24)]
            per_bridge = {name: accepted(pid, ports["ws"]) for name, pid in pids.items() if name.startswith("bridge")}
            assert sum(per_bridge.values()) == 24 and min(per_bridge.values()) > 0, per_bridge
            # Each streams once: each bridge's relay pool spreads its streams over both servers.
            for i, ws in enumerate(sockets):
                await send(ws, start_frame(f"s{i}", PROMPT, seed=3, max_tokens=5))
            for i, ws in enumerate(sockets):
                got = await collect(ws, {f"s{i}"})
                assert got[f"s{i}"][-1]["type"] == "done"
        # ... and each bridge's relay pool sent its new connections to the least loaded server.
        deadline = time.monotonic() + 10  # a stream is counted as its done frame goes out
        while sum(per_server_streams := [streams_ended(url) - b for url, b in zip(metrics, before)]) < 24 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert sum(per_server_streams) == 24 and min(per_server_streams) >= 6, per_server_streams

        # 24 gRPC connections to the shared gRPC port: both servers accepted some.
        servers = {name: pid for name, pid in pids.items() if name.startswith("server")}
        held = {name: accepted(pid, ports["grpc"]) for name, pid in servers.items()}  # read_direct's may linger
        channels = [grpc.aio.insecure_channel(shared_grpc, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(24)]
        try:
            for channel in channels:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            per_server = {name: accepted(pid, ports["grpc"]) - held[name] for name, pid in servers.items()}
            assert sum(per_server.values()) == 24 and min(per_server.values()) > 0, per_server
        finally:
            for channel in channels:
                await channel.close()

        # A child that dies is reported, and the rest go on (the bridges still answer).
        os.kill(pids["server-1"], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not any("server-1" in line and "exited with code -9" in line for line in launcher.lines):
            assert time.monotonic() < deadline, launcher.text()
            await asyncio.sleep(0.1)
        r = httpx.get(f"http://127.0.0.1:{ports['ws']}/readyz", timeout=10)
        assert r.status_code == 200  # one server's relay is enough

        # SIGINT: everything stops within the bound, and nothing is left behind.
        t0 = time.monotonic()
        launcher.popen.send_signal(signal.SIGINT)
        assert launcher.popen.wait(45) == 0, launcher.text()
        stopped_in = time.monotonic() - t0
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not [name for name, pid in pids.items() if alive(pid)], launcher.text()
        assert stopped_in < 40
        assert "did not stop; killing it" not in launcher.text()
        assert "stopped; while it ran, server-1" in launcher.text()
    finally:
        launcher.kill_all()


async def test_a_killed_launcher_leaves_no_process_behind(tmp_path):
    redis_binary()
    launcher = Launcher(tmp_path)
    try:
        launcher.wait_ready()
        pids = launcher.children()
        assert len(pids) == 5, pids
        launcher.popen.kill()  # SIGKILL: no chance to stop anything; the kernel tells the children
        launcher.popen.wait()
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not [name for name, pid in pids.items() if alive(pid)]
    finally:
        launcher.kill_all()
