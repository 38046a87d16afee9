"""The libraries' own cost: memory per idle connection (the floor under workload (v)) and CPU
per gRPC message (the floor under every paced workload).

    python -m bench.floor [--connections 3000] [--streams 50] [--messages 200] [--pace 0.01]

An idle llmproxy session is one WebSocket (websockets server in the bridge), one gRPC `Stream`
call from the bridge (grpc.aio client) and that call in the server (grpc.aio server). This opens
N idle connections of each kind with nothing of llmproxy in them: a bare websockets server that
sends one frame, and a bare grpc.aio bidi method that sends one message, each in its own process
(under uvloop, as ours run), and prints the growth of resident memory per connection on each
side. The sum for the three llmproxy sides, set against workload (v)'s total, is what our own
code adds.

CPU: `--streams` bare bidi calls, each sent `--messages` small messages `--pace` seconds apart
by the server (as the server relays paced tokens, one message each), read by the client; the
CPU time of each process (all threads) per message.

Latency: a round trip (a small message out, echoed back) on one bidi call and on one WebSocket,
one every `--gap` seconds so both processes are idle in between, as they are between the tokens
of one paced stream; median and p99 of `--pings`.

Burst: `--streams` open bidi calls (and as many WebSockets) each send one message at once, and
each is answered with two (as a start is answered with `started` and the first token): the time
until the last call has both, median over rounds. That is the start of workload (iii) on one
hop with nothing else in it; the chain has two such hops and an upstream request per stream.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import grpc
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from bench.system import cpu_s, rss_kb

METHOD = "/bench.Floor/Stream"
PACED = "/bench.Floor/Paced"
ECHO = "/bench.Floor/Echo"
BURST = "/bench.Floor/Burst"
BURST_ROUNDS = 7


async def grpc_server() -> None:
    async def stream(requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.write(b"hello")
        async for _ in requests:
            pass

    async def paced(requests: Any, context: grpc.aio.ServicerContext) -> None:
        ask = await context.read()
        count, pace = ask.decode().split()
        message = b"x" * 40  # about a token frame
        for _ in range(int(count)):
            await asyncio.sleep(float(pace))
            await context.write(message)

    async def echo(requests: Any, context: grpc.aio.ServicerContext) -> None:
        async for message in requests:
            await context.write(message)

    async def burst(requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.read()
        await context.write(b"started")
        await context.write(b"x" * 40)  # about a token frame
        async for _ in requests:
            pass

    handler = grpc.method_handlers_generic_handler(
        "bench.Floor",
        {
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
            "Paced": grpc.stream_stream_rpc_method_handler(paced),
            "Echo": grpc.stream_stream_rpc_method_handler(echo),
            "Burst": grpc.stream_stream_rpc_method_handler(burst),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def ws_server() -> None:
    async def handle(ws: ServerConnection) -> None:
        await ws.send("hello")
        try:
            async for message in ws:
                if message == "start":  # answered as a start is: two frames
                    await ws.send("started")
                    await ws.send("x" * 40)
                else:
                    await ws.send(message)
        except ConnectionClosed:
            pass

    async with serve(handle, "127.0.0.1", 0, compression=None, ping_interval=5.0) as server:
        print(next(iter(server.sockets)).getsockname()[1], flush=True)
        await asyncio.get_running_loop().create_future()


async def measure(kind: str, port: int, server_pid: int, n: int) -> tuple[float, float]:
    server_before, client_before = rss_kb(server_pid), rss_kb(os.getpid())
    held: list[Any] = []
    if kind == "grpc":
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        method = channel.stream_stream(METHOD)
        for _ in range(n):
            call = method()
            await call.read()
            held.append(call)
    else:
        for _ in range(n):
            ws: ClientConnection = await connect(f"ws://127.0.0.1:{port}", compression=None, ping_interval=None)
            await ws.recv()
            held.append(ws)
    await asyncio.sleep(2.0)
    result = ((rss_kb(server_pid) - server_before) / n, (rss_kb(os.getpid()) - client_before) / n)
    if kind == "grpc":
        for call in held:
            call.cancel()
        await channel.close()
    else:
        await asyncio.gather(*(ws.close() for ws in held))
    return result


async def measure_cpu(port: int, server_pid: int, streams: int, messages: int, pace: float) -> tuple[float, float]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    method = channel.stream_stream(PACED)

    async def one() -> int:
        call = method()
        await call.write(f"{messages} {pace}".encode())
        got = 0
        while await call.read() is not grpc.aio.EOF:
            got += 1
            if got == messages:
                break
        call.cancel()
        return got

    await one()  # warm up
    server0, client0 = cpu_s(server_pid), cpu_s(os.getpid())
    total = sum(await asyncio.gather(*(one() for _ in range(streams))))
    result = ((cpu_s(server_pid) - server0) / total * 1e6, (cpu_s(os.getpid()) - client0) / total * 1e6)
    await channel.close()
    return result


async def measure_rtt(kind: str, port: int, pings: int, gap: float) -> tuple[float, float]:
    """Median and p99 round trip in microseconds."""
    rtts: list[float] = []
    clock = time.perf_counter_ns
    if kind == "grpc":
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        call = channel.stream_stream(ECHO)()
        for _ in range(pings + 5):
            await asyncio.sleep(gap)
            t0 = clock()
            await call.write(b"x" * 40)
            await call.read()
            rtts.append((clock() - t0) / 1000)
        call.cancel()
        await channel.close()
    else:
        ws = await connect(f"ws://127.0.0.1:{port}", compression=None, ping_interval=None)
        await ws.recv()
        for _ in range(pings + 5):
            await asyncio.sleep(gap)
            t0 = clock()
            await ws.send("x" * 40)
            await ws.recv()
            rtts.append((clock() - t0) / 1000)
        await ws.close()
    kept = sorted(rtts[5:])
    return kept[len(kept) // 2], kept[min(len(kept) - 1, int(len(kept) * 0.99))]


async def measure_burst(kind: str, port: int, streams: int) -> float:
    """Median over rounds of the time (us) until the last of `streams` simultaneous starts has
    its two answers."""
    lasts: list[float] = []
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}") if kind == "grpc" else None
    for _ in range(BURST_ROUNDS):
        if channel is not None:
            calls = [channel.stream_stream(BURST)() for _ in range(streams)]
            await asyncio.sleep(0.2)  # every call set up before the clock starts
            t0 = time.perf_counter_ns()

            async def one_call(call: Any) -> None:
                await call.write(b"s" * 100)  # about a start frame
                await call.read()
                await call.read()

            await asyncio.gather(*(one_call(call) for call in calls))
            lasts.append((time.perf_counter_ns() - t0) / 1000)
            for call in calls:
                call.cancel()
        else:
            sockets = [await connect(f"ws://127.0.0.1:{port}", compression=None, ping_interval=None) for _ in range(streams)]
            await asyncio.gather(*(ws.recv() for ws in sockets))
            await asyncio.sleep(0.2)
            t0 = time.perf_counter_ns()

            async def one_ws(ws: ClientConnection) -> None:
                await ws.send("start")
                await ws.recv()
                await ws.recv()

            await asyncio.gather(*(one_ws(ws) for ws in sockets))
            lasts.append((time.perf_counter_ns() - t0) / 1000)
            await asyncio.gather(*(ws.close() for ws in sockets))
        await asyncio.sleep(0.1)
    if channel is not None:
        await channel.close()
    return sorted(lasts)[len(lasts) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--pace", type=float, default=0.01)
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.02)
    parser.add_argument("--serve", choices=("grpc", "ws"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(grpc_server() if args.serve == "grpc" else ws_server())
        return
    sides: dict[str, tuple[float, float]] = {}
    rtt: dict[str, tuple[float, float]] = {}
    burst: dict[str, float] = {}
    for kind in ("ws", "grpc"):
        server = subprocess.Popen([sys.executable, "-m", "bench.floor", "--serve", kind], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            time.sleep(0.5)
            sides[kind] = uvloop.run(measure(kind, port, server.pid, args.connections))
            rtt[kind] = uvloop.run(measure_rtt(kind, port, args.pings, args.gap))
            burst[kind] = uvloop.run(measure_burst(kind, port, args.streams))
            if kind == "grpc":
                cpu = uvloop.run(measure_cpu(port, server.pid, args.streams, args.messages, args.pace))
        finally:
            server.terminate()
            server.wait()
    ws_server_kb, _ = sides["ws"]
    grpc_server_kb, grpc_client_kb = sides["grpc"]
    rows = (
        ("websockets server (the bridge's WebSocket side)", ws_server_kb),
        ("grpc.aio bidi call, client (the bridge's gRPC side)", grpc_client_kb),
        ("grpc.aio bidi call, server (the server's side)", grpc_server_kb),
        ("floor of one llmproxy session", ws_server_kb + grpc_client_kb + grpc_server_kb),
    )
    print(f"{args.connections} idle connections of each kind, KB of resident memory per connection:")
    for label, kb in rows:
        print(f"  {label:<54}{kb:6.1f}")
    print(f"{args.streams} bidi calls x {args.messages} messages {args.pace * 1000:g} ms apart, CPU us per message:")
    print(f"  {'grpc.aio server, writing':<54}{cpu[0]:6.1f}")
    print(f"  {'grpc.aio client, reading':<54}{cpu[1]:6.1f}")
    print(f"round trip of one small message, one every {args.gap * 1000:g} ms, us p50 / p99:")
    for kind, label in (("grpc", "grpc.aio bidi call"), ("ws", "websockets")):
        p50, p99 = rtt[kind]
        print(f"  {label:<54}{p50:6.0f} / {p99:.0f}")
    print(f"{args.streams} starts at once, one message in and two out each: us until the last is answered (median of {BURST_ROUNDS}):")
    for kind, label in (("grpc", "grpc.aio bidi calls"), ("ws", "websockets")):
        print(f"  {label:<54}{burst[kind]:6.0f}")

if __name__ == "__main__":
    main()
