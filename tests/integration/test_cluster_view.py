"""One view of the cluster: two real servers on one real Redis (`--store redis://...`).

`WatchStats` on either server shows both servers' streams, `Stats` on either answers over both
servers' requests, a key sees only its own in both, a server that dies drops out of the live
view within a bound, and each process keeps its own `/metrics`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from server.auth.limits import KeyLimits
from server.auth.store import KeyStore
from tests.support.procs import Proc, start_bridge, start_server
from tests.support.polling import eventually as poll

# this file's waits: 15 s, polled every 0.1 s
eventually = functools.partial(poll, timeout_s=15.0, every_s=0.1)

PACE = ("--demo-ttft-ms", "5", "--demo-tokens-per-s", "200", "--demo-jitter", "0.1")
LIVE_TTL_S = 3.0  # server/analytics/cluster.py ClusterSettings.live_ttl_s
# A killed server leaves the view when its summary expires (the TTL after its last publish),
# seen by the other at its next sync (a tick, 1 s) and by a WatchStats subscriber at its next
# snapshot (its interval, 0.2 s here); the rest is slack for a loaded 2-core machine.
DROP_OUT_BOUND_S = LIVE_TTL_S + 1.0 + 0.2 + 3.0


def metadata(key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {key}"),) if key else None


async def run_streams(target: str, n: int, max_tokens: int, key: str | None = None, prefix: str = "s") -> int:
    """n streams on one `Stream` call, each to its done frame; returns the tokens received."""
    tokens = 0
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.LLMProxyStub(channel).Stream(metadata=metadata(key))
        for i in range(n):
            start = pb.StartStream(
                stream_id=f"{prefix}{i}", model="demo", messages=[pb.ChatMessage(role="user", content=f"Explain tides {i}")],
                params=pb.GenerationParams(max_tokens=max_tokens),
            )
            await call.write(pb.ClientFrame(start=start))
        done = 0
        while done < n:  # then half-close (a half-close before the streams end is another test's subject)
            frame = await asyncio.wait_for(call.read(), 30)
            assert frame is not grpc.aio.EOF, f"the call ended after {done} of {n} streams"
            kind = frame.WhichOneof("kind")
            assert kind != "error", frame
            if kind == "done":
                done += 1
                tokens += frame.done.usage.completion_tokens
        await call.done_writing()
    return tokens


async def snapshot(target: str, key: str | None = None) -> pb.StatsSnapshot:
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.LLMProxyStub(channel).WatchStats(pb.WatchStatsRequest(interval_ms=200), metadata=metadata(key))
        snap = await asyncio.wait_for(call.read(), 10)
        call.cancel()
        return snap


async def stats(target: str, key: str | None = None, group_by: str = "model") -> pb.StatsResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        return await asyncio.wait_for(pb_grpc.LLMProxyStub(channel).Stats(pb.StatsRequest(window_s=600, group_by=group_by), metadata=metadata(key)), 10)


def metrics_url(proc: Proc) -> str:
    line = next(l for l in proc.lines if l.startswith("llmproxy-server metrics on "))
    return line.rsplit(" ", 1)[1]


def streams_in_metrics(proc: Proc) -> float:
    text = httpx.get(metrics_url(proc), timeout=5).text
    prefix = 'llmproxy_streams_total{deployment="demo",gen_ai_provider_name="demo",gen_ai_request_model="demo",status="length"} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


@pytest.fixture
def cluster(redis_server, tmp_path) -> Iterator[Callable[..., Proc]]:
    """Starts servers on the test's Redis, each with its own request log and metrics port."""
    started: list[Proc] = []

    def start(*extra: str) -> Proc:
        n = len(started)
        proc = start_server(
            *PACE, "--store", redis_server.url, "--server-id", f"server-{n}", "--metrics-listen", "127.0.0.1:0",
            "--request-log", str(tmp_path / f"requests-{n}.sqlite3"), *extra,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


async def test_watch_stats_and_stats_on_either_server_cover_both_and_metrics_stay_per_process(cluster):
    a, b = cluster(), cluster()
    tokens_a, tokens_b = await asyncio.gather(run_streams(a.address, 3, 20, prefix="a"), run_streams(b.address, 5, 12, prefix="b"))
    assert (tokens_a, tokens_b) == (60, 60)

    # WatchStats on A: both servers' ended streams, once B's summary has arrived (a tick or two)
    snap = await eventually(lambda: snapshot(a.address), lambda s: s.ended_1m >= 8, "8 ended streams in A's live view")
    assert snap.ended_1m == 8 and snap.errors_1m == 0
    assert sum(snap.ttft_counts) == 8 and sum(d.streams for d in snap.deployments) == 8
    assert sorted(s.stream_id for s in snap.slowest) == ["a0", "a1", "a2", "b0", "b1", "b2", "b3", "b4"]
    assert sum(s.tokens for s in snap.slowest) == tokens_a + tokens_b
    # and the same on B
    snap_b = await eventually(lambda: snapshot(b.address), lambda s: s.ended_1m >= 8, "8 ended streams in B's live view")
    assert snap_b.ended_1m == 8

    # the dashboard's feed (a bridge relaying A's WatchStats) shows both servers too
    bridge = start_bridge(a.address)
    try:
        async with connect(bridge.address.replace("/stream", "/stats")) as ws:
            fed = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        assert fed["type"] == "stats" and fed["ended_1m"] == 8
    finally:
        bridge.stop()

    # Stats on B counts A's requests (and A counts B's): every server's rows, one answer
    for target in (b.address, a.address):
        answer = await eventually(lambda: stats(target), lambda r: sum(row.streams for row in r.rows) >= 8, "8 streams in Stats")
        (row,) = answer.rows
        assert (row.name, row.streams, row.errors, row.completion_tokens) == ("demo", 8, 0, tokens_a + tokens_b)
        assert 0 < row.ttft_p50_ms < 1000 and row.ux_score == 1.0

    # /metrics: each process its own port and its own streams, nothing shared
    assert metrics_url(a) != metrics_url(b)
    await eventually(lambda: (streams_in_metrics(a), streams_in_metrics(b)), lambda v: v == (3.0, 5.0), "3 and 5 streams in the two /metrics")


async def test_a_key_sees_only_its_own_streams_across_the_cluster(cluster, tmp_path):
    store = KeyStore(str(tmp_path / "keys.sqlite3"))
    (k1, r1), (k2, r2) = store.create("one", KeyLimits()), store.create("two", KeyLimits())
    admin, _ = store.create("admin", KeyLimits(), admin=True)
    store.close()
    auth = ("--auth-db", str(tmp_path / "keys.sqlite3"), "--demo", "all-keys")
    a, b = cluster(*auth), cluster(*auth)
    await asyncio.gather(run_streams(a.address, 2, 10, k1, "one-a"), run_streams(b.address, 1, 10, k1, "one-b"), run_streams(b.address, 4, 10, k2, "two-b"))

    everyone = await eventually(lambda: snapshot(a.address, admin), lambda s: s.ended_1m >= 7, "7 streams in the admin's view")
    assert everyone.ended_1m == 7
    # on B: B's summary of key one's stream there, and A's of its two, once B has read A's
    mine = await eventually(lambda: snapshot(b.address, k1), lambda s: s.ended_1m >= 3 and s.active_streams == 0, "key one's view on B")
    assert mine.ended_1m == 3 and mine.sessions <= 3 and sorted(s.stream_id for s in mine.slowest) == ["one-a0", "one-a1", "one-b0"]
    assert mine.tokens_per_s == 0.0

    rows = (await eventually(lambda: stats(a.address, admin, "client"), lambda r: sum(x.streams for x in r.rows) >= 7, "7 rows")).rows
    assert sorted((x.name, x.streams) for x in rows) == sorted([(r1.key_id, 3), (r2.key_id, 4)])
    (own,) = (await stats(a.address, k1, "client")).rows
    assert (own.name, own.streams, own.completion_tokens) == (r1.key_id, 3, 30)
    (own,) = (await stats(b.address, k2)).rows
    assert own.streams == 4


async def test_a_server_that_dies_drops_out_of_the_live_view_within_the_bound(cluster):
    a, b = cluster(), cluster()
    await run_streams(a.address, 1, 10, prefix="a")
    # B holds live streams (2000 tokens at 200/s: 10 s) when it is killed
    async with grpc.aio.insecure_channel(b.address) as channel:
        call = pb_grpc.LLMProxyStub(channel).Stream()
        for i in range(2):
            start = pb.StartStream(stream_id=f"long{i}", model="demo", messages=[pb.ChatMessage(role="user", content="Explain tides")],
                                   params=pb.GenerationParams(max_tokens=2000))
            await call.write(pb.ClientFrame(start=start))

        async def drain() -> None:
            while await call.read() is not grpc.aio.EOF:
                pass

        reader = asyncio.create_task(drain())
        await run_streams(b.address, 3, 10, prefix="b")
        # B's live streams, sessions and throughput (from its second tick on) show on A
        snap = await eventually(
            lambda: snapshot(a.address), lambda s: s.active_streams == 2 and s.ended_1m == 4 and s.tokens_per_s > 100, "B's live streams on A"
        )
        assert snap.sessions >= 1 and {s.stream_id for s in snap.slowest} == {"a0", "b0", "b1", "b2"}
        b.kill()
        killed = time.monotonic()

        # B's own figures leave A's view: the streams that ended on it. (Its live streams may
        # come back as A's own when A takes them over: they are no longer B's.)
        def without_b(s: pb.StatsSnapshot) -> bool:
            return not any(x.stream_id.startswith("b") for x in s.slowest)

        snap = await eventually(lambda: snapshot(a.address), without_b, "B gone from A's view", timeout_s=20)
        gone_s = time.monotonic() - killed
        call.cancel()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    print(f"\na killed server left the live view after {gone_s:.2f} s (bound {DROP_OUT_BOUND_S:.1f} s)")
    assert gone_s < DROP_OUT_BOUND_S
    assert "a0" in {s.stream_id for s in snap.slowest} and len(snap.slowest) == snap.ended_1m  # every ended stream listed


async def test_a_server_that_stops_cleanly_leaves_at_once(cluster):
    a, b = cluster(), cluster()
    await run_streams(b.address, 1, 5, prefix="b")
    await eventually(lambda: snapshot(a.address), lambda s: s.ended_1m == 1, "B's stream on A")
    b.stop()
    stopped = time.monotonic()
    await eventually(lambda: snapshot(a.address), lambda s: s.ended_1m == 0, "B gone from A's view")
    # without waiting for the TTL: its next tick reads that B left (1 s) and the snapshot follows
    assert time.monotonic() - stopped < LIVE_TTL_S


async def test_while_redis_is_unreachable_watch_stats_shows_this_server_and_stats_is_unavailable(cluster, redis_server):
    a, b = cluster(), cluster()
    await asyncio.gather(run_streams(a.address, 1, 5, prefix="a"), run_streams(b.address, 2, 5, prefix="b"))
    await eventually(lambda: snapshot(a.address), lambda s: s.ended_1m == 3, "both servers' streams on A")
    redis_server.pause()
    try:
        # the others' summaries age out; this server's own stays
        snap = await eventually(lambda: snapshot(a.address), lambda s: s.ended_1m == 1, "A's own view while Redis is down", timeout_s=20)
        assert [s.stream_id for s in snap.slowest] == ["a0"]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stats(a.address)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        redis_server.resume()
    # (rows that wait for Redis are sent after it: test_rows_of_a_pipeline_that_timed_out_...)
    await eventually(lambda: snapshot(a.address), lambda s: s.ended_1m == 3, "the whole view again")
    rows = (await eventually(lambda: stats(b.address), lambda r: len(r.rows) > 0, "Stats again")).rows
    assert sum(x.streams for x in rows) == 3


async def test_rows_of_a_pipeline_that_timed_out_are_sent_again_and_counted_once(redis_server):
    """In process, against a real Redis frozen (SIGSTOP) mid-pipeline: it runs what waited in
    its socket when it thaws, so the retried rows land twice; Stats counts them once."""
    import redis as sync_redis

    from server.analytics.cluster import ClusterAnalytics, ClusterSettings
    from server.analytics.live import LiveWindow
    from server.analytics.summary import summarize_window
    from server.store.base import RedisStore
    from tests.unit.analytics.test_analytics import record

    store = RedisStore(redis_server.url, "solo")
    await store.connect()
    cluster = ClusterAnalytics(store, ClusterSettings(timeout_s=0.5))
    own = summarize_window(LiveWindow(), "solo", 0, active_streams=0, sessions=0, tenants={})
    direct = sync_redis.Redis.from_url(redis_server.url)
    try:
        cluster.share([record("a"), record("b"), record("c")])
        await cluster.sync(own)
        assert direct.xlen("llmproxy:requests") == 3
        cluster.share([record("d"), record("e")])
        redis_server.pause()
        try:
            await asyncio.wait_for(cluster.sync(own), 5)  # times out inside; never raises
        finally:
            redis_server.resume()
        await eventually(lambda: direct.xlen("llmproxy:requests"), lambda n: n == 5, "the frozen pipeline's rows")
        await cluster.sync(own)  # the same two rows again
        assert direct.xlen("llmproxy:requests") == 7
        (row,) = await cluster.stats(600, "model", None)
        assert row["streams"] == 5
    finally:
        direct.close()
        await store.aclose()
