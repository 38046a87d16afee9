"""`make cluster` / `llmproxy cluster`: Redis, N servers and N bridges on one machine.

Theory of operation. The launcher starts, in order and each only once the one before is ready:
a redis-server of its own (data under `.run/redis`, append-only file, `noeviction`), N servers
sharing one gRPC port with SO_REUSEPORT (the kernel spreads backends' connections over them),
each also listening on a port of its own for the bridges' relays and serving its own `/metrics`,
then N bridges sharing the WebSocket port and the HTTP API port, each relaying to every server
(`--grpc-target p1,p2,...`). Every server has `--store redis://...`, so any server can serve any
session. Then it prints the URLs and waits.

Each child's output is passed through with its name in front. A child that exits while the
cluster runs is reported (name, pid, exit code) and the others go on (a dead server's streams are
taken over by another; docs/deploy.md). SIGINT or SIGTERM stops the bridges, then the servers,
then Redis, each with SIGTERM and, after `--stop-timeout-s`, SIGKILL; the launcher exits once
every child is gone. Children run in sessions of their own (a terminal's Ctrl-C reaches the
launcher only, so the order holds) and are asked by the kernel (PR_SET_PDEATHSIG) to stop if
the launcher itself is killed, so none is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True, slots=True)
class Plan:
    """Where everything listens; ports are fixed so that processes can share them."""

    procs: int
    host: str = "127.0.0.1"
    grpc_port: int = 50051  # shared by every server (SO_REUSEPORT)
    relay_port_base: int = 50061  # server i also listens on relay_port_base + i (the bridges' relays)
    metrics_port_base: int = 9464  # server i's /metrics on metrics_port_base + i
    ws_port: int = 8765  # shared by every bridge
    http_port: int = 8766  # shared by every bridge
    redis_port: int = 6399  # not 6379: Debian's redis-server package runs its own there
    run_dir: Path = Path(".run")
    relay_token_file: Path = Path(".run/relay-token")
    allowed_origins: tuple[str, ...] = ()
    server_args: tuple[str, ...] = ()
    bridge_args: tuple[str, ...] = ()

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis_port}/0"

    def relay_targets(self) -> list[str]:
        return [f"{self.host}:{self.relay_port_base + i}" for i in range(self.procs)]

    def metrics_urls(self) -> list[str]:
        return [f"http://{self.host}:{self.metrics_port_base + i}/metrics" for i in range(self.procs)]

    def redis_command(self, redis_server: str) -> list[str]:
        data = self.run_dir / "redis"
        return [
            redis_server,
            "--port", str(self.redis_port),
            "--bind", self.host,
            "--dir", str(data.resolve()),
            "--appendonly", "yes",  # persistence: sessions survive a Redis restart
            "--save", "",  # the append-only file is the persistence; no RDB fork on top
            "--maxmemory-policy", "noeviction",  # never evict a stream's frames: refuse writes instead
            "--daemonize", "no",
            "--logfile", "",  # to stdout, which the launcher prefixes
        ]

    def server_command(self, i: int) -> list[str]:
        return [
            sys.executable, "-m", "server.main",
            "--listen", f"{self.host}:{self.grpc_port}",
            "--reuse-port",
            "--also-listen", self.relay_targets()[i],
            "--metrics-listen", f"{self.host}:{self.metrics_port_base + i}",
            "--relay-token-file", str(self.relay_token_file),
            "--store", self.redis_url,
            "--server-id", f"server-{i}",
            "--request-log", str(self.run_dir / f"requests-server-{i}.sqlite3"),  # one SQLite file per writer
            *self.server_args,
        ]

    def bridge_command(self, i: int) -> list[str]:
        origins = [a for o in self.allowed_origins for a in ("--allowed-origin", o)]
        return [
            sys.executable, "-m", "bridge.main",
            "--host", self.host,
            "--port", str(self.ws_port),
            "--http-port", str(self.http_port),
            "--reuse-port",
            "--grpc-target", ",".join(self.relay_targets()),
            "--relay-token-file", str(self.relay_token_file),
            *origins,
            *self.bridge_args,
        ]

    def urls(self) -> str:
        h = self.host
        metrics = "\n".join(f"llmproxy cluster: metrics   {u}  (server-{i})" for i, u in enumerate(self.metrics_urls()))
        return (
            f"llmproxy cluster: {self.procs} servers and {self.procs} bridges on Redis\n"
            f"llmproxy cluster: stream    ws://{h}:{self.ws_port}/stream  (every bridge, SO_REUSEPORT)\n"
            f"llmproxy cluster: chat      http://{h}:{self.ws_port}/   dashboard http://{h}:{self.ws_port}/dashboard.html\n"
            f"llmproxy cluster: HTTP APIs http://{h}:{self.http_port}/v1  (OpenAI, Anthropic base URL: docs/http-apis.md)\n"
            f"llmproxy cluster: gRPC      {h}:{self.grpc_port}  (every server, SO_REUSEPORT; grpcurl -plaintext {h}:{self.grpc_port} list)\n"
            f"llmproxy cluster: relays    {', '.join(self.relay_targets())}  (each server's own port; every bridge relays to all)\n"
            f"{metrics}\n"
            f"llmproxy cluster: Redis     {self.redis_url}  (data in {self.run_dir / 'redis'}, appendonly, noeviction)\n"
            f"llmproxy cluster: Ctrl-C stops all"
        )


class StartError(Exception):
    """A child did not become ready."""


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    pump: asyncio.Task[None] | None = None


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec hook asking the kernel to SIGTERM the child when the launcher dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the hook only calls it

    def hook() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return hook


class Cluster:
    def __init__(self, plan: Plan, out: Callable[[str], None] = print, start_timeout_s: float = 60.0, stop_timeout_s: float = 15.0) -> None:
        self.plan = plan
        self._out = out
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self.children: list[Child] = []  # in start order
        self.stopping = False
        self.died: list[str] = []  # "name (pid N) exited with code C", as reported

    async def _spawn(self, name: str, argv: list[str], ready: Callable[[str], bool]) -> Child:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        child = Child(name, process)
        child.pump = asyncio.create_task(self._pump(child, ready), name=f"pump-{name}")
        self.children.append(child)
        return child

    async def _pump(self, child: Child, ready: Callable[[str], bool]) -> None:
        assert child.process.stdout is not None
        width = max(len(f"server-{self.plan.procs - 1}"), len("redis"))
        async for raw in child.process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self._out(f"{child.name.ljust(width)} | {line}")
            if not child.ready.is_set() and ready(line):
                child.ready.set()
        code = await child.process.wait()
        if not self.stopping:
            why = f"{child.name} (pid {child.process.pid}) exited with code {code}"
            self.died.append(why)
            self._out(f"llmproxy cluster: {why}; the others go on (Ctrl-C stops all)")

    async def _wait_ready(self, children: Sequence[Child]) -> None:
        async def one(child: Child) -> None:
            assert child.pump is not None
            done, _ = await asyncio.wait(
                {asyncio.create_task(child.ready.wait()), child.pump}, timeout=self._start_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if not child.ready.is_set():
                state = "exited" if child.process.returncode is not None else f"was not ready in {self._start_timeout_s:.0f}s"
                raise StartError(f"{child.name} {state}")

        await asyncio.gather(*(one(c) for c in children))

    async def start(self) -> None:
        """Starts everything; raises StartError (after stopping what started) when a child fails."""
        plan = self.plan
        redis_server = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(redis_server):
            raise StartError("redis-server is not installed (make cluster installs it: apt-get install redis-server)")
        (plan.run_dir / "redis").mkdir(parents=True, exist_ok=True)
        ensure_relay_token(plan.relay_token_file)
        try:
            redis = await self._spawn("redis", plan.redis_command(redis_server), lambda line: "Ready to accept connections" in line)
            await self._wait_ready([redis])
            servers = [
                await self._spawn(f"server-{i}", plan.server_command(i), lambda line: line.startswith("llmproxy-server listening on "))
                for i in range(plan.procs)
            ]
            await self._wait_ready(servers)
            bridges = [
                await self._spawn(f"bridge-{i}", plan.bridge_command(i), lambda line: line.startswith("llmproxy-bridge listening on "))
                for i in range(plan.procs)
            ]
            await self._wait_ready(bridges)
        except BaseException:
            await self.stop()
            raise
        self._out(plan.urls())

    async def stop(self) -> None:
        """Bridges, then servers, then Redis: SIGTERM, then SIGKILL after the stop timeout.
        Returns once every child has exited."""
        self.stopping = True
        for prefix in ("bridge-", "server-", "redis"):
            group = [c for c in self.children if c.name.startswith(prefix) and c.process.returncode is None]
            for child in group:
                _signal(child, signal.SIGTERM)
            deadline = time.monotonic() + self._stop_timeout_s
            for child in group:
                try:
                    await asyncio.wait_for(child.process.wait(), max(0.1, deadline - time.monotonic()))
                except TimeoutError:
                    self._out(f"llmproxy cluster: {child.name} (pid {child.process.pid}) did not stop; killing it")
                    _signal(child, signal.SIGKILL)
                    await child.process.wait()
        pumps = [c.pump for c in self.children if c.pump is not None]
        await asyncio.gather(*pumps, return_exceptions=True)

    async def run(self, stop: asyncio.Event) -> None:
        """Starts everything, waits for `stop`, stops everything. A stop during the start-up
        stops what has started so far. Raises StartError."""
        starting = asyncio.create_task(self.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # start() stops what it started when cancelled
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            self._out("llmproxy cluster: stopped during start-up")
            return
        stopping.cancel()
        starting.result()  # StartError
        await stop.wait()
        self._out("llmproxy cluster: stopping")
        await self.stop()
        if self.died:
            self._out(f"llmproxy cluster: stopped; while it ran, {'; '.join(self.died)}")
        else:
            self._out("llmproxy cluster: stopped")


def _signal(child: Child, sig: signal.Signals) -> None:
    try:
        child.process.send_signal(sig)
    except ProcessLookupError:
        pass


def ensure_relay_token(path: Path) -> None:
    """The secret of the Relay RPC, as `make run` makes it: once, readable by this user only."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")


def parse_args(argv: list[str] | None) -> Plan:
    parser = argparse.ArgumentParser(prog="llmproxy cluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="servers, and bridges (default: one per core)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=50051)
    parser.add_argument("--relay-port-base", type=int, default=50061, help="server i's own port: this + i")
    parser.add_argument("--metrics-port-base", type=int, default=9464, help="server i's /metrics: this + i")
    parser.add_argument("--ws-port", type=int, default=8765)
    parser.add_argument("--http-port", type=int, default=8766)
    parser.add_argument("--redis-port", type=int, default=6399)
    parser.add_argument("--run-dir", default=".run", help="Redis data, request logs and the relay token live here")
    parser.add_argument("--relay-token-file", default="", help="default: RUN_DIR/relay-token (made if missing)")
    parser.add_argument("--allowed-origin", action="append", default=[], help="passed to every bridge (repeatable)")
    parser.add_argument("--server-arg", action="append", default=[], help="one more argument for every server (repeatable; --server-arg=--flag)")
    parser.add_argument("--bridge-arg", action="append", default=[], help="one more argument for every bridge (repeatable; --bridge-arg=--flag)")
    args = parser.parse_args(argv)
    if args.procs < 1:
        parser.error("--procs must be at least 1")
    run_dir = Path(args.run_dir)
    return Plan(
        procs=args.procs,
        host=args.host,
        grpc_port=args.grpc_port,
        relay_port_base=args.relay_port_base,
        metrics_port_base=args.metrics_port_base,
        ws_port=args.ws_port,
        http_port=args.http_port,
        redis_port=args.redis_port,
        run_dir=run_dir,
        relay_token_file=Path(args.relay_token_file) if args.relay_token_file else run_dir / "relay-token",
        allowed_origins=tuple(args.allowed_origin),
        server_args=tuple(args.server_arg),
        bridge_args=tuple(args.bridge_arg),
    )


async def _main(plan: Plan) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    cluster = Cluster(plan, out=lambda line: print(line, flush=True))
    try:
        await cluster.run(stop)
    except StartError as exc:
        print(f"llmproxy cluster: {exc}; stopped everything", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_main(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
