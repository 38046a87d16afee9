"""The processes under test: starting them (through tests/support/procs.py) and reading their
CPU time and memory from /proc.

CPU is utime + stime of /proc/<pid>/stat (proc(5)): every thread of the process, including
gRPC's C threads, in clock ticks (usually 10 ms), so a workload needs a few hundred ms of proxy
CPU before its per-token figure means much; the smoke run's CPU figures are coarse.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import astuple, dataclass
from pathlib import Path

from bench.fake_upstream import READY as FAKE_READY
from bench.fake_upstream import Knobs, model_name
from llmproxy_cli.cluster import Plan as ClusterPlan
from tests.support.procs import Proc, Proxy, relay_token_file, start, start_proxy
from tests.support.redis import RedisServer
from tests.support.sockets import free_port_run

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14, 15


def rss_kb(pid: int) -> int:
    """Resident memory of a process, in KiB (VmRSS of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass(frozen=True, slots=True)
class Rig:
    """The pids whose CPU a workload reads: the proxy's (one server and one bridge, or every
    process of a cluster: `--procs`), and the harness's fake upstream (this process, the load
    client, is read with `time.process_time`)."""

    server_pids: tuple[int, ...]
    bridge_pids: tuple[int, ...]
    fake_pid: int

    @staticmethod
    def of(proxy: Proxy | ClusterProxy, fake_pid: int) -> Rig:
        if isinstance(proxy, ClusterProxy):
            return Rig(tuple(s.popen.pid for s in proxy.servers), tuple(b.popen.pid for b in proxy.bridges), fake_pid)
        return Rig((proxy.server.popen.pid,), (proxy.bridge.popen.pid,), fake_pid)


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    server_s: float = 0.0
    bridge_s: float = 0.0
    fake_s: float = 0.0
    client_s: float = 0.0  # the load client (this process)

    @staticmethod
    def of(rig: Rig) -> CpuSnapshot:
        return CpuSnapshot(
            sum(map(cpu_s, rig.server_pids)), sum(map(cpu_s, rig.bridge_pids)), cpu_s(rig.fake_pid), time.process_time()
        )

    def __sub__(self, other: CpuSnapshot) -> CpuSnapshot:
        return CpuSnapshot(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def __add__(self, other: CpuSnapshot) -> CpuSnapshot:
        return CpuSnapshot(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


@dataclass(frozen=True, slots=True)
class Pinning:
    """Which CPUs run the proxy and which the harness (fake upstream and load client).

    Issue 7's peer figures were taken with the proxy on one core; pinning the proxy to one CPU
    and the harness to the other also keeps the harness from competing with the proxy, so a
    proxy path and the direct path get the same CPU for the harness side by side. Children
    inherit the CPU mask at fork, and their threads inherit it from the thread that creates
    them, so we switch our own mask around each start (sched_setaffinity(2))."""

    proxy: frozenset[int]
    harness: frozenset[int]

    @staticmethod
    def choose(enabled: bool) -> Pinning | None:
        cpus = sorted(os.sched_getaffinity(0))
        if not enabled or len(cpus) < 2:
            return None
        return Pinning(frozenset(cpus[-1:]), frozenset(cpus[:-1]))

    def enter(self) -> None:
        """Moves this process (the load client, and the fake it starts) to the harness CPUs."""
        os.sched_setaffinity(0, self.harness)

    @contextmanager
    def proxy_side(self) -> Iterator[None]:
        """Processes started inside run on the proxy's CPUs; this process stays on the harness's."""
        os.sched_setaffinity(0, self.proxy)
        try:
            yield
        finally:
            os.sched_setaffinity(0, self.harness)


def raise_fd_limit() -> int:
    """Soft open-files limit up to the hard one (children inherit it): idle sessions need one
    descriptor each in this process and in the bridge. Returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def start_fake() -> Proc:
    return start("fake-upstream", ["bench.fake_upstream", "--port", "0"], FAKE_READY)


def proxy_config(fake_port: int, models: dict[str, Knobs], transport: str = "") -> str:
    """A deployment config (config.example.yaml's format) serving each public model from the
    fake upstream as an OpenAI-compatible provider, with the knobs in the upstream model name.
    `transport` sets `http: transport:` ("" keeps the server's default)."""
    lines = ["well_known: false"]
    if transport:
        lines += ["http:", f"  transport: {transport}"]
    lines.append("models:")
    for public, knobs in models.items():
        lines += [
            f"  {public}:",
            "    provider: openai-compatible",
            f"    base_url: http://127.0.0.1:{fake_port}/v1",
            f'    model: "{model_name(knobs)}"',
        ]
    return "\n".join(lines) + "\n"


@contextmanager
def running_proxy(pinning: Pinning | None, server_args: Sequence[str] = (), bridge_args: Sequence[str] = ()) -> Iterator[Proxy]:
    # WARNING: the bench reads no log lines, and the tests' pump thread would otherwise take
    # this process's GIL for each one while the load client runs.
    args = (("--log-level", "WARNING", *server_args), ("--log-level", "WARNING", *bridge_args))
    if pinning is None:
        proxy = start_proxy(*args)
    else:
        with pinning.proxy_side():
            proxy = start_proxy(*args)
    try:
        yield proxy
    finally:
        proxy.stop()


@contextmanager
def config_file(text: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="llmproxy-bench-") as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(text, encoding="utf-8")
        yield path


@dataclass
class ClusterProxy:
    """`--procs N` (N servers and N bridges) or `--redis`: what `make cluster` runs
    (llmproxy_cli/cluster.py's commands), on free ports. The servers share one gRPC port and
    the bridges one WebSocket and one HTTP port (SO_REUSEPORT: the load client's connections are
    spread by the kernel); every bridge relays to every server on its own port; every server has
    `--store` on a Redis of its own. The same duck type as `Proxy` for the bench's paths."""

    servers: list[Proc]
    bridges: list[Proc]
    redis: RedisServer
    plan: ClusterPlan

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.plan.grpc_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.plan.ws_port}/stream"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.plan.http_port}"

    @property
    def server(self) -> Proc:  # the first one (py-spy profiles it)
        return self.servers[0]

    @property
    def bridge(self) -> Proc:
        return self.bridges[0]

    def stop(self) -> None:
        for proc in (*self.bridges, *self.servers):
            proc.stop()
        self.redis.close()


def _without_option(args: Sequence[str], name: str) -> tuple[str, ...]:
    """`args` without `name VALUE` (and `name=VALUE`)."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return tuple(out)


@contextmanager
def running_cluster(
    procs: int, pinning: Pinning | None, server_args: Sequence[str] = (), bridge_args: Sequence[str] = ()
) -> Iterator[ClusterProxy]:
    """Redis, `procs` servers and `procs` bridges as `make cluster` starts them; stopped after."""
    ports = {}
    taken: set[int] = set()
    for name, n in (("grpc", 1), ("relay", procs), ("metrics", procs), ("ws", 1), ("http", 1)):
        ports[name] = free_port_run(n, avoid=taken)
        taken.update(range(ports[name], ports[name] + n))
    redis = RedisServer().start()
    run_dir = Path(redis.directory)
    plan = ClusterPlan(
        procs=procs, grpc_port=ports["grpc"], relay_port_base=ports["relay"], metrics_port_base=ports["metrics"],
        ws_port=ports["ws"], http_port=ports["http"], redis_port=redis.port, run_dir=run_dir,
        relay_token_file=Path(relay_token_file()),
        # as start_proxy runs them: no request log, and WARNING (the bench reads no log lines)
        server_args=("--log-level", "WARNING", "--request-log", "", *server_args),
        bridge_args=("--log-level", "WARNING", *_without_option(bridge_args, "--http-port")),  # the shared one
    )
    cluster = ClusterProxy([], [], redis, plan)
    try:
        with pinning.proxy_side() if pinning is not None else nullcontext():
            for i in range(procs):
                cluster.servers.append(start(f"server-{i}", plan.server_command(i)[2:], "llmproxy-server listening on "))
            for i in range(procs):
                cluster.bridges.append(start(f"bridge-{i}", plan.bridge_command(i)[2:], "llmproxy-bridge listening on "))
        yield cluster
    finally:
        cluster.stop()
