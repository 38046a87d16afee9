"""`python -m bench.cluster_view`: what the cluster's view costs per report tick (not part of
`make bench`; run it alone, it starts its own redis-server and server).

1. In process: one tick's work (summarize the live window, encode it, one sync with a real
   Redis: SET + ZADD + ZREMRANGEBYSCORE + one XADD per ended stream + ZRANGE, then the other
   servers' GETs) and one WatchStats merge of 4 servers, for a window as 50 live streams of
   about 2 s leave it (25 ended a second, 1 500 in the minute).
2. End to end: a real server on `--store redis://`, 50 live streams over gRPC restarted as they
   end, at two token rates; Redis's own command counts (INFO commandstats) per second show
   what the server sends, and that it does not grow with the tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import replace

import grpc

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from server.analytics.cluster import ClusterAnalytics
from server.analytics.live import LiveWindow
from server.analytics.summary import decode, encode, merge, summarize_window
from server.core.session import StreamRecord
from server.core.stream import TimingSummary
from server.store.base import RedisStore
from tests.support.procs import start_server
from tests.support.redis import RedisServer


def record(rng: random.Random, i: int) -> StreamRecord:
    ttft = rng.randint(5_000, 400_000)
    t = TimingSummary(ttft, ttft + 2_000_000, 400, 200.0, 5_000, 9_000, 12_000, 20_000, 0, 60, 300, 1)
    return StreamRecord("sess", f"s{i}", rng.choice(["k1", "k2", "k3"]), "demo", "demo", rng.choice(["demo", "backup"]), "length", False, t, 1.0, 9, 400, 0)


async def in_process(redis_url: str, ended_per_s: int, ticks: int) -> None:
    rng = random.Random(1)
    live = LiveWindow()
    live.add([record(rng, i) for i in range(ended_per_s * 60)], 0)
    store = RedisStore(redis_url, "bench-a")
    await store.connect()
    cluster = ClusterAnalytics(store)
    summarize_s, encode_bytes, sync_s = [], 0, []
    for tick in range(ticks):
        started = time.perf_counter()
        own = summarize_window(live, "bench-a", int(time.time() * 1000), active_streams=50, sessions=10, tenants={"k1": (20, 4), "k2": (30, 6)})
        summarize_s.append(time.perf_counter() - started)
        encode_bytes = len(encode(own))
        cluster.share(record(rng, 10_000 + tick * ended_per_s + j) for j in range(ended_per_s))
        started = time.perf_counter()
        await cluster.sync(own)
        sync_s.append(time.perf_counter() - started)
    others = [decode(encode(replace(own, server_id=f"s{i}"))) for i in range(4)]
    started = time.perf_counter()
    for _ in range(20):
        merge(others, 0)
    merge_s = (time.perf_counter() - started) / 20
    await store.aclose()
    print(f"window {ended_per_s * 60} ended streams, {ended_per_s} rows a tick:")
    print(f"  summarize the window  p50 {statistics.median(summarize_s) * 1000:.2f} ms; summary {encode_bytes} bytes")
    print(f"  sync (2 round trips)  p50 {statistics.median(sync_s) * 1000:.2f} ms (encode + pipeline + decode of 0 others)")
    print(f"  merge of 4 servers    {merge_s * 1000:.2f} ms per WatchStats snapshot")


def commandstats(r) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in r.info("commandstats").items()}


async def end_to_end(redis: RedisServer, tokens_per_s: float, seconds: float, live_streams: int = 50) -> None:
    import redis as sync_redis

    server = start_server("--store", redis.url, "--demo-ttft-ms", "5", "--demo-tokens-per-s", str(tokens_per_s), "--demo-jitter", "0.1",
                          "--request-log", "/tmp/llmproxy-bench-cluster.sqlite3", "--max-streams", str(live_streams))
    r = sync_redis.Redis.from_url(redis.url)
    tokens = ended = 0
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = pb_grpc.LLMProxyStub(channel).Stream()
            n = 0

            async def start() -> None:
                nonlocal n
                n += 1
                msg = pb.ChatMessage(role="user", content=f"Explain tides {n}")
                await call.write(pb.ClientFrame(start=pb.StartStream(stream_id=f"s{n}", model="demo", messages=[msg],
                                                                     params=pb.GenerationParams(max_tokens=int(tokens_per_s * 2)))))

            for _ in range(live_streams):
                await start()
            await asyncio.sleep(3)  # steady state
            before, t0 = commandstats(r), time.monotonic()
            while time.monotonic() - t0 < seconds:
                frame = await call.read()
                kind = frame.WhichOneof("kind")
                if kind == "token":
                    tokens += 1
                elif kind == "done":
                    ended += 1
                    await start()
            elapsed = time.monotonic() - t0
            after = commandstats(r)
            call.cancel()
    finally:
        server.stop()
    per_s = {k: (after.get(k, 0) - before.get(k, 0)) / elapsed for k in after if after.get(k, 0) != before.get(k, 0)}
    per_s.pop("info", None)
    print(f"{live_streams} live streams at {tokens_per_s:.0f} tokens/s each: {tokens / elapsed:.0f} token frames/s, {ended / elapsed:.1f} streams ended/s")
    print("  Redis commands/s: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(per_s.items())))
    print(f"  commands per 1000 tokens: {sum(per_s.values()) / (tokens / elapsed) * 1000:.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    redis = RedisServer(persist=False).start()
    try:
        await in_process(redis.url, 25, 30)
        for rate in (50.0, 200.0):
            await end_to_end(redis, rate, args.seconds)
    finally:
        redis.close()


if __name__ == "__main__":
    asyncio.run(main())
