"""`make bench`: `python -m bench.run --out bench/results [--smoke] [--profile DIR]`.

Starts the fake OpenAI upstream, then the real server (with a generated config that serves the
fake as an OpenAI-compatible deployment) and bridge, runs every streaming workload over all its
paths side by side, then the idle-session workload on a fresh server and bridge, and writes
`latest.md` and `latest.json` (`smoke.*` for `--smoke`) to `--out`, the table also on stdout.

The proxy's path to the fake needs the OpenAI adapter (server/providers/openai.py) and config
file support; when they are missing or do not work, the upstream workloads run direct only and
say "openai adapter not available".

`--procs N` runs the streaming workloads over what `make cluster` starts (llmproxy_cli/cluster.py):
a Redis, N servers sharing one gRPC port and N bridges sharing the WebSocket and HTTP ports
(SO_REUSEPORT), every bridge relaying to every server, every server on `--store redis://`;
`--redis` does the same with N = 1 (the store's cost alone). CPU per token is then the sum over
all the proxy's processes (Redis's own CPU is not in it). With more than one process per role
the proxy is not pinned to one CPU (that would defeat the point); for a fair 1-vs-2 comparison
on one machine run both unpinned, e.g. issue 14's figures on two cores:

    python -m bench.run --only iii_50,iii_100,iii_150,iii_200,iii_300,iv --no-pin --redis --out bench/results/procs1
    python -m bench.run --only iii_50,iii_100,iii_150,iii_200,iii_300,iv --procs 2 --out bench/results/procs2

The idle workload (v) always runs on one server and one bridge.

`--profile DIR` also runs py-spy on the server and on the bridge while a workload (A with 50
streams, or `--profile-workload KEY`) loops over the chain, and writes the raw stacks and a
summary to DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import os
import platform
import sys
import time
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import grpc
import orjson

from bench import profile
from bench.clients import ChatCompletionsPath, DirectPath, GrpcPath, Path as ClientPath, StreamSpec, WebSocketPath, run_round
from bench.fake_upstream import Knobs
from bench.idle import IdleResult, run_idle
from bench.measure import WorkloadResult, measure
from bench.report import to_json, to_markdown
from bench.system import ClusterProxy, Pinning, Rig, config_file, proxy_config, raise_fd_limit, running_cluster, running_proxy, start_fake
from bench.workloads import Plan, StreamWorkload, plan
from tests.support.procs import ROOT, Proc, Proxy

PROBE_MODEL = "bench-probe"
# The workloads that also run over the bridge's chat-completions API, next to the WebSocket.
CHAT_WORKLOADS = frozenset({"i", "iii_50", "iv"})
BRIDGE_ARGS = ("--http-port", "0")  # the HTTP APIs, on a free port
NO_ADAPTER = "openai adapter not available"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="directory for the .md and .json")
    parser.add_argument("--smoke", action="store_true", help="every workload tiny: seconds, for `make test`")
    parser.add_argument("--idle-sessions", type=int, default=None, help="sessions of workload (v) (full: 10000)")
    parser.add_argument("--rounds", type=int, default=None, help="override every streaming workload's rounds")
    parser.add_argument("--only", default="", help="comma-separated workload keys (A1,A50,i,ii,iii_50,iii_100,iii_150,iii_200,iii_300,iii_400,vi,iv,v)")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy the server and bridge during one workload; output dir")
    parser.add_argument("--profile-workload", default="A50", help="the workload key to profile (default A50)")
    parser.add_argument("--profile-s", type=float, default=8.0)
    parser.add_argument("--profile-native", action="store_true", help="py-spy --native: C frames too (pauses the processes)")
    parser.add_argument("--profile-tokens", type=int, default=None, help="tokens per stream while profiling (default: A50's)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra server argument (repeatable), e.g. --server-arg=--no-analytics")
    parser.add_argument(
        "--transports",
        default="",
        help="comma-separated upstream transports (native,aiohttp,httpx): one chain (server + bridge) per transport, "
        "all alive at once, the upstream workloads over direct and each chain's WebSocket path (ws-<transport>), rounds interleaved",
    )
    parser.add_argument("--no-pin", action="store_true", help="let every process use every CPU (default: proxy on one, harness on the rest)")
    parser.add_argument("--procs", type=int, default=1, help="servers and bridges (each N) on Redis, as make cluster runs them; implies --no-pin when > 1")
    parser.add_argument("--redis", action="store_true", help="the servers on --store redis:// (a Redis of the bench's own); implied by --procs > 1")
    return parser.parse_args(argv)


def adapter_missing() -> str:
    """Why the proxy cannot reach an OpenAI-compatible upstream, or "" when it should."""
    for module in ("server.providers.openai", "server.providers.http", "server.config"):
        if importlib.util.find_spec(module) is None:
            return f"{NO_ADAPTER}: no module {module}"
    if not (ROOT / "config.example.yaml").exists():
        return f"{NO_ADAPTER}: no config.example.yaml"
    return ""


async def probe(channel: grpc.aio.Channel) -> str:
    """One short stream from the fake through the server: "" when it works, else why not."""
    [record] = await run_round(GrpcPath(channel), StreamSpec(PROBE_MODEL, 3, stamped=True, timeout_s=15.0), 1, lambda: None)
    if record.ok and record.tokens == 3 and len(record.relay_ns) == 3:
        return ""
    return f"{NO_ADAPTER}: probe stream failed ({record.error or f'{record.tokens} tokens'})"


def start_chain(
    stack: ExitStack,
    fake: Proc,
    workloads: tuple[StreamWorkload, ...],
    pinning: Pinning | None,
    server_args: tuple[str, ...] = (),
    transport: str = "",
    procs: int = 1,
    redis: bool = False,
) -> tuple[Proxy | ClusterProxy, str]:
    """The server (with the fake's config when the adapter exists) and the bridge; with
    `procs` > 1 or `redis`, a cluster of each on Redis."""

    def running(server_args: tuple[str, ...]) -> AbstractContextManager[Proxy | ClusterProxy]:
        if procs > 1 or redis:
            return running_cluster(procs, pinning, server_args, BRIDGE_ARGS)
        return running_proxy(pinning, server_args, BRIDGE_ARGS)

    missing = adapter_missing()
    if not missing:
        models = {w.public_model: w.knobs for w in workloads if w.source == "upstream"}
        models[PROBE_MODEL] = Knobs(tokens=3)
        cfg = stack.enter_context(config_file(proxy_config(fake.port, models, transport)))
        try:
            return stack.enter_context(running(("--config", str(cfg), *server_args))), ""
        except RuntimeError as exc:  # the server refused the config: say why, go on without
            missing = f"{NO_ADAPTER}: server did not start with the config: {str(exc).splitlines()[-1][:200]}"
    return stack.enter_context(running(server_args)), missing


def paths_for(workload: StreamWorkload, fake: Proc, proxy: Proxy | ClusterProxy, channel: grpc.aio.Channel, missing: str) -> tuple[list[ClientPath], str]:
    ws, rpc = WebSocketPath(proxy.ws_url), GrpcPath(channel)
    if workload.source == "demo":
        return [rpc, ws], ""  # reference first: issue 2 compares the chain with gRPC read directly
    direct = DirectPath("127.0.0.1", fake.port)
    if missing:
        return [direct], missing
    if workload.key in CHAT_WORKLOADS:
        return [direct, ws, rpc, ChatCompletionsPath("127.0.0.1", int(proxy.api_url.rsplit(":", 1)[1]))], ""
    return [direct, ws, rpc], ""


async def run_profile(workload: StreamWorkload, paths: list[ClientPath], proxy: Proxy | ClusterProxy, args: argparse.Namespace) -> str:
    """Loops `workload` over the chain while py-spy samples the server and the bridge."""
    out, seconds, native = args.profile, args.profile_s, args.profile_native
    tokens = args.profile_tokens or workload.tokens
    out.mkdir(parents=True, exist_ok=True)
    ws = next(p for p in paths if p.name == "ws")
    targets = {"server": proxy.server.popen.pid, "bridge": proxy.bridge.popen.pid}
    recorders = {
        name: asyncio.create_task(profile.record(pid, seconds, out / f"{name}.raw.txt", native)) for name, pid in targets.items()
    }
    deadline = time.monotonic() + seconds + 1.0
    spec = StreamSpec(workload.public_model, tokens, stamped=False, timeout_s=60.0)
    rounds = 0
    while time.monotonic() < deadline:
        await run_round(ws, spec, workload.streams, lambda: None)
        rounds += 1
    summaries = [profile.summarize(name, await task) for name, task in recorders.items()]
    how = f"{workload.streams} streams x {tokens} tokens over the chain, {rounds} rounds in {seconds:.0f} s" + (", native" if native else "")
    text = profile.to_markdown(summaries, f"{workload.title}: {how}")
    (out / "profile.md").write_text(text, encoding="utf-8")
    return text


async def run_transports(
    args: argparse.Namespace, chosen: Plan, streams: tuple[StreamWorkload, ...], pinning: Pinning | None, transports: list[str]
) -> tuple[dict[str, WorkloadResult], str]:
    """`--transports`: one chain per upstream transport, all started before the first round, so
    every round runs direct and each chain side by side (same machine load, rotated order)."""
    results: dict[str, WorkloadResult] = {}
    with ExitStack() as stack:
        fake = start_fake()
        stack.callback(fake.stop)
        chains: dict[str, Proxy | ClusterProxy] = {}
        for transport in transports:
            proxy, missing = start_chain(stack, fake, chosen.streams, pinning, tuple(args.server_arg), transport)
            if missing:
                return results, f"{missing} (transport {transport})"
            chains[transport] = proxy
        channels = {t: grpc.aio.insecure_channel(p.grpc_target) for t, p in chains.items()}
        try:
            for transport, channel in channels.items():
                if missing := await probe(channel):
                    return results, f"{missing} (transport {transport})"
            rigs = {f"ws-{t}": Rig.of(p, fake.popen.pid) for t, p in chains.items()}
            first = next(iter(chains.values()))
            for workload in streams:
                if workload.source == "demo":  # no upstream: the transport plays no part
                    paths: list[ClientPath] = [GrpcPath(channels[transports[0]]), WebSocketPath(first.ws_url)]
                else:
                    paths = [DirectPath("127.0.0.1", fake.port), *(WebSocketPath(p.ws_url, f"ws-{t}") for t, p in chains.items())]
                print(f"bench: {workload.key} {workload.title} over {', '.join(p.name for p in paths)}", file=sys.stderr)
                results[workload.key] = await measure(workload, paths, rigs[f"ws-{transports[0]}"], rigs=rigs)
        finally:
            for channel in channels.values():
                await channel.close()
    return results, ""


async def run_all(args: argparse.Namespace, chosen: Plan, pinning: Pinning | None) -> tuple[dict[str, WorkloadResult], IdleResult | None, str]:
    only = {k for k in args.only.split(",") if k}
    results: dict[str, WorkloadResult] = {}
    missing = ""
    streams = tuple(w for w in chosen.streams if not only or w.key in only)
    transports = [t for t in args.transports.split(",") if t]
    if streams and transports:
        results, missing = await run_transports(args, chosen, streams, pinning, transports)
        if missing:
            print(missing, file=sys.stderr)
    elif streams:
        with ExitStack() as stack:
            fake = start_fake()
            stack.callback(fake.stop)
            proxy, missing = start_chain(stack, fake, chosen.streams, pinning, tuple(args.server_arg), procs=args.procs, redis=args.redis)
            rig = Rig.of(proxy, fake.popen.pid)
            channel = grpc.aio.insecure_channel(proxy.grpc_target)
            try:
                if not missing:
                    missing = await probe(channel)
                if missing:
                    print(missing, file=sys.stderr)
                for workload in streams:
                    paths, skipped = paths_for(workload, fake, proxy, channel, missing)
                    print(f"bench: {workload.key} {workload.title} over {', '.join(p.name for p in paths)}", file=sys.stderr)
                    results[workload.key] = await measure(workload, paths, rig, skipped)
                    if args.profile is not None and workload.key == args.profile_workload:
                        print(await run_profile(workload, paths, proxy, args))
            finally:
                await channel.close()
    idle = None
    if not only or chosen.idle.key in only:
        print(f"bench: v {chosen.idle.sessions} idle WebSocket sessions", file=sys.stderr)
        idle = await run_idle(chosen.idle, pinning)
    return results, idle, missing


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fd_limit = raise_fd_limit()
    chosen = plan(args.smoke, args.idle_sessions, args.rounds)
    if args.procs < 1:
        raise SystemExit("bench.run: --procs must be at least 1")
    if args.procs > 1 and args.transports:
        raise SystemExit("bench.run: --procs and --transports do not go together")
    pinning = Pinning.choose(not args.no_pin and args.procs == 1)
    if pinning is not None:
        pinning.enter()
    meta: dict[str, Any] = {
        "smoke": args.smoke,
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}, Python {platform.python_version()}",
        "open_files_limit": fd_limit,
        "pinning": (
            f"server + bridge on CPU {sorted(pinning.proxy)}, fake upstream + load client on CPU {sorted(pinning.harness)}"
            if pinning is not None
            else "none: every process on every CPU"
        ),
    }
    if args.procs > 1 or args.redis:
        meta["processes"] = (
            f"{args.procs} servers sharing one gRPC port and {args.procs} bridges sharing the WebSocket and HTTP ports "
            "(SO_REUSEPORT), every bridge relaying to every server, --store redis:// (make cluster); proxy CPU = all of them"
            if args.procs > 1
            else "1 server and 1 bridge, --store redis:// (bench --redis)"
        )
    t0 = time.monotonic()
    try:
        import uvloop  # the processes under test run on uvloop; so does the load client
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        results, idle, missing = asyncio.run(run_all(args, chosen, pinning))
    else:
        results, idle, missing = uvloop.run(run_all(args, chosen, pinning))
    meta["duration_s"] = round(time.monotonic() - t0, 1)
    meta["openai_adapter"] = missing or "available"
    if args.transports:
        meta["transports"] = args.transports
    markdown = to_markdown(meta, results, idle)
    if missing:
        markdown += f"\n{missing}: the upstream workloads ran direct only.\n"
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "smoke" if args.smoke else "latest"
    (args.out / f"{stem}.md").write_text(markdown, encoding="utf-8")
    (args.out / f"{stem}.json").write_bytes(orjson.dumps(to_json(meta, results, idle), option=orjson.OPT_INDENT_2) + b"\n")
    print(f"bench: wrote {args.out / (stem + '.md')} and {stem}.json in {meta['duration_s']} s", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
