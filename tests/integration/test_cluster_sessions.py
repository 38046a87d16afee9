"""Many servers on one Redis (issue 14): a session resumed through another bridge and another
server, a server SIGKILLed under live streams, Redis stopped under live streams.

Real processes throughout: redis-server, two or three servers with `--store redis://...`,
bridges, and the Python client over WebSockets."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmproxy_client import WSClient
from tests.support.drops import FAST_BACKOFF, PROMPTS, consume, expected_texts, messages, until, wait_tokens
from tests.support.procs import Proc, start_bridge, start_server
from tests.support.redis import RedisServer

PACE = ("--demo-ttft-ms", "20", "--demo-tokens-per-s", "200", "--demo-jitter", "0.2", "--resume-grace-s", "10")


def stop_all(*procs: Proc) -> None:
    for p in procs:
        p.stop()


async def test_streams_resumed_through_another_bridge_and_another_server(redis_server: RedisServer) -> None:
    """3 streams through bridge A on server 1, a drop, resumed through bridge B on server 2,
    50 times: every text equals the uninterrupted one, nothing lost, nothing repeated."""
    s1 = start_server("--store", redis_server.url, *PACE)
    s2 = start_server("--store", redis_server.url, *PACE)
    a, b = start_bridge(s1.address), start_bridge(s2.address)
    try:
        expected = await expected_texts(a.address, 60)
        assert expected == await expected_texts(b.address, 60)
        lost = duplicated = moved = 0
        for run in range(50):
            async with WSClient([a.address, b.address], backoff=FAST_BACKOFF, seed=run) as client:
                handles = [client.stream(model="demo", messages=messages(p), seed=11, max_tokens=60) for p in PROMPTS]
                counts, out = {h.id: 0 for h in handles}, {}
                readers = [asyncio.create_task(consume(h, counts, out)) for h in handles]
                await asyncio.wait_for(wait_tokens(counts, 1 + run % 25), 10)
                client.drop_connection()
                await asyncio.wait_for(asyncio.gather(*readers), 30)
                moved += client.reconnects >= 1
                for h, want in zip(handles, expected):
                    got = out[h.id]
                    duplicated += h.duplicates + (len(got) > len(want))
                    lost += got != want and len(got) <= len(want)
        print(f"\n50 resumes through the other bridge and server: lost={lost} duplicated={duplicated} moved={moved}")
        assert (lost, duplicated) == (0, 0)
        assert moved == 50
        assert any("taking over" in line for line in s1.lines + s2.lines) is False
    finally:
        stop_all(a, b, s1, s2)


def continuation_config(tmp_path) -> str:
    """`demo-cont`: the demo model with `after_first_token: continue` (a stream taken over
    after a server died is continued from its partial answer)."""
    path = tmp_path / "cluster.yaml"
    path.write_text("models:\n  demo-cont:\n    after_first_token: continue\n    deployments:\n      - {provider: demo, model: demo}\n")
    return str(path)


async def consume_frames(handle, counts: dict, out: dict) -> None:
    frames = []
    try:
        async for frame in handle.frames():
            frames.append(frame)
            if frame["type"] == "token":
                counts[handle.id] += 1
    except Exception as exc:  # the error frame is in `frames` too
        frames.append({"type": "raised", "error": exc})
    out[handle.id] = frames


@pytest.mark.parametrize("model", ["demo-cont", "demo"])
async def test_a_server_killed_under_live_streams_is_taken_over(redis_server: RedisServer, tmp_path, model: str) -> None:
    """SIGKILL the server (and its bridge: a lost machine) generating 3 live streams: the
    client resumes through the other bridge and server, which takes the streams over within
    the lease bound: continued to the same text (demo-cont) or ended with a typed error that
    carries the partial usage (demo); never a token twice, never a cut stream reported done."""
    config = continuation_config(tmp_path)
    pace = ("--demo-ttft-ms", "20", "--demo-tokens-per-s", "60", "--demo-jitter", "0.2", "--resume-grace-s", "30", "--config", config)
    s1 = start_server("--store", redis_server.url, *pace)
    s2 = start_server("--store", redis_server.url, *pace)
    a, b = start_bridge(s1.address), start_bridge(s2.address)
    try:
        async with WSClient(b.address, reconnect=False) as plain:
            hs = [plain.stream(model=model, messages=messages(p), seed=11, max_tokens=120) for p in PROMPTS]
            expected = ["".join([t async for t in h]) for h in hs]
        async with WSClient([a.address, b.address], backoff=FAST_BACKOFF, seed=1) as client:
            handles = [client.stream(model=model, messages=messages(p), seed=11, max_tokens=120) for p in PROMPTS]
            counts, out = {h.id: 0 for h in handles}, {}
            readers = [asyncio.create_task(consume_frames(h, counts, out)) for h in handles]
            await asyncio.wait_for(wait_tokens(counts, 20), 20)
            before = dict(counts)
            killed_at = time.monotonic()
            s1.kill()
            a.kill()
            await asyncio.wait_for(until(lambda: all(counts[h.id] > before[h.id] for h in handles) or all(h.finished for h in handles)), 20)
            takeover_s = time.monotonic() - killed_at
            await asyncio.wait_for(asyncio.gather(*readers), 60)
        taking = [line for line in s2.lines if "taking over stream" in line]
        print(f"\n{model}: resumed on the other server; frames again {takeover_s:.2f} s after SIGKILL; {len(taking)} streams taken over")
        assert len(taking) == 3, s2.lines[-30:]
        assert takeover_s < 3.0 + 2.0  # the lease bound, plus a resume and scheduling on a busy machine
        for h, want in zip(handles, expected):
            frames = out[h.id]
            seqs = [f["seq"] for f in frames if f.get("seq")]
            assert seqs == sorted(set(seqs)), "a frame twice or out of order"
            assert h.duplicates == 0
            text = "".join(f["token"] for f in frames if f["type"] == "token")
            if model == "demo-cont":
                assert frames[-1]["type"] == "done", frames[-3:]
                assert text == want
            else:
                end = frames[-2] if frames[-1]["type"] == "raised" else frames[-1]
                assert end["type"] == "error" and end["seq"] > 0, frames[-3:]
                assert end["retryable"] and end["code"] == "upstream_error", end
                assert end["usage"]["completion_tokens"] == counts[h.id] > 0  # the partial usage
                assert want.startswith(text) and text != want
                assert not any(f["type"] == "done" for f in frames)
    finally:
        stop_all(a, b, s1, s2)


def health_status(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
        except grpc.RpcError:
            return -1


@pytest.mark.parametrize("fault", ["stopped", "frozen"])
async def test_redis_stopped_for_five_seconds_under_fifty_live_streams(redis_server: RedisServer, fault: str) -> None:
    """Redis stops (the process ends; or freezes: SIGSTOP, nothing answers) for 5 s in the middle of 50 live streams: no process crashes, every stream
    keeps getting tokens and ends complete (or with a retryable typed error: none here), health
    is NOT_SERVING while Redis is away, a new stream meanwhile is refused `unavailable`
    (retryable), and new streams work again within 2 s of Redis coming back."""
    pace = ("--demo-ttft-ms", "20", "--demo-tokens-per-s", "40", "--demo-jitter", "0.1", "--resume-grace-s", "30", "--max-streams", "64")
    s1 = start_server("--store", redis_server.url, *pace)
    bridge = start_bridge(s1.address)
    loop = asyncio.get_running_loop()
    try:
        async with WSClient(bridge.address, reconnect=False) as plain:
            want = "".join([t async for t in plain.stream(model="demo", messages=messages(PROMPTS[0]), seed=3, max_tokens=400)])
        clients = [WSClient(bridge.address, backoff=FAST_BACKOFF, seed=i) for i in range(5)]
        for c in clients:
            await c.__aenter__()
        handles = [c.stream(model="demo", messages=messages(PROMPTS[0]), seed=3, max_tokens=400) for c in clients for _ in range(10)]
        counts, out = {h.id + str(id(h)): 0 for h in handles}, {}

        async def read(h) -> None:
            key = h.id + str(id(h))
            parts = []
            try:
                async for t in h:
                    parts.append(t)
                    counts[key] += 1
                out[key] = "".join(parts)
            except Exception as exc:
                out[key] = exc

        readers = [asyncio.create_task(read(h)) for h in handles]
        await asyncio.wait_for(wait_tokens(counts, 10), 20)
        (redis_server.stop if fault == "stopped" else redis_server.pause)()
        stopped_at = time.monotonic()
        await asyncio.sleep(1.5)  # the health watch pings every 0.5 s
        assert await loop.run_in_executor(None, health_status, s1.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        during = dict(counts)
        async with WSClient(bridge.address, reconnect=False) as probe:
            with pytest.raises(Exception) as refused:
                await probe.stream(model="demo", messages=messages("hi"), max_tokens=3).result()
        assert getattr(refused.value, "code", "") == "unavailable" and refused.value.retryable
        await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - stopped_at)))
        assert all(counts[k] > during[k] or isinstance(out.get(k), str) for k in counts), "a live stream stopped getting tokens"
        (redis_server.start if fault == "stopped" else redis_server.resume)()
        back_at = time.monotonic()
        recovered_s = None
        while time.monotonic() - back_at < 10:
            try:
                async with WSClient(bridge.address, reconnect=False) as probe:
                    await probe.stream(model="demo", messages=messages("hi"), max_tokens=3).result()
                recovered_s = time.monotonic() - back_at
                break
            except Exception:
                await asyncio.sleep(0.05)
        await asyncio.wait_for(asyncio.gather(*readers), 60)
        for c in clients:
            await c.__aexit__(None, None, None)
        print(f"\nRedis {fault} 5 s under 50 streams: new streams again {recovered_s:.2f} s after it came back")
        assert recovered_s is not None and recovered_s <= 2.0
        assert await loop.run_in_executor(None, health_status, s1.address) == health_pb2.HealthCheckResponse.SERVING
        complete = sum(1 for v in out.values() if v == want)
        retryable = sum(1 for v in out.values() if isinstance(v, Exception) and getattr(v, "retryable", False))
        assert complete + retryable == 50, {k: v for k, v in out.items() if v != want}
        assert complete == 50
        assert s1.popen.poll() is None and bridge.popen.poll() is None  # nothing crashed
    finally:
        stop_all(bridge, s1)


async def test_a_frozen_server_whose_streams_were_taken_over_yields_to_the_new_owner(redis_server: RedisServer, tmp_path) -> None:
    """Split brain: server 1 freezes (SIGSTOP) past its lease, server 2 takes its streams over
    and goes on; when server 1 thaws, Redis refuses its next frames (their seqs are taken), so
    it never sends them, stops generating and follows server 2: its own client, still attached
    to it, gets one stream with nothing repeated and the same text."""
    config = continuation_config(tmp_path)
    pace = ("--demo-ttft-ms", "20", "--demo-tokens-per-s", "40", "--demo-jitter", "0.1", "--resume-grace-s", "30", "--config", config)
    s1 = start_server("--store", redis_server.url, *pace)
    s2 = start_server("--store", redis_server.url, *pace)
    a = start_bridge(s1.address, "--reattach-timeout-s", "30")
    try:
        async with WSClient(a.address, reconnect=False) as plain:
            hs = [plain.stream(model="demo-cont", messages=messages(p), seed=5, max_tokens=200) for p in PROMPTS]
            expected = ["".join([t async for t in h]) for h in hs]
        async with WSClient(a.address, backoff=FAST_BACKOFF) as client:
            handles = [client.stream(model="demo-cont", messages=messages(p), seed=5, max_tokens=200) for p in PROMPTS]
            counts, out = {h.id: 0 for h in handles}, {}
            readers = [asyncio.create_task(consume_frames(h, counts, out)) for h in handles]
            await asyncio.wait_for(wait_tokens(counts, 10), 20)
            s1.popen.send_signal(__import__("signal").SIGSTOP)
            try:
                await asyncio.wait_for(until(lambda: sum("taking over stream" in line for line in s2.lines) >= 3), 10)
                await asyncio.sleep(1.0)  # server 2 writes on past where server 1 stopped
            finally:
                s1.popen.send_signal(__import__("signal").SIGCONT)
            await asyncio.wait_for(asyncio.gather(*readers), 60)
        assert sum("following it here" in line for line in s1.lines) == 3, s1.lines[-20:]
        for h, want in zip(handles, expected):
            frames = out[h.id]
            seqs = [f["seq"] for f in frames if f.get("seq")]
            assert seqs == sorted(set(seqs)) and h.duplicates == 0
            assert frames[-1]["type"] == "done", frames[-3:]
            assert "".join(f["token"] for f in frames if f["type"] == "token") == want
    finally:
        stop_all(a, s1, s2)


async def test_resumed_on_another_server_the_old_connection_is_told_and_a_cancel_reaches_the_generating_server(redis_server: RedisServer) -> None:
    """A session live on server 1 is resumed through server 2: the connection on server 1 is
    closed saying `resumed_elsewhere` (4001); the stream server 1 generates goes on through
    server 2, and a cancel sent there ends it on server 1 (a `done` cancelled, seq after the
    last token); a wrong token is refused `expired` like on one server."""
    from websockets.exceptions import ConnectionClosed

    from tests.support.ws import open_ws, recv, send, start_frame

    pace = ("--demo-ttft-ms", "20", "--demo-tokens-per-s", "50", "--resume-grace-s", "10")
    s1, s2 = start_server("--store", redis_server.url, *pace), start_server("--store", redis_server.url, *pace)
    a, b = start_bridge(s1.address), start_bridge(s2.address)
    try:
        async with open_ws(a.address) as old, open_ws(b.address) as new, open_ws(b.address) as wrong:
            await send(old, start_frame("a", max_tokens=2000))
            seen = 0
            while seen < 3:
                frame = await recv(old)
                seen = frame.get("seq", seen)
            s = old.session
            await send(wrong, {"type": "resume", "session_id": s["session_id"], "resume_token": "x" + s["resume_token"][1:], "streams": {"a": 0}})
            refused = await recv(wrong)
            assert refused["type"] == "error" and refused["code"] == "expired", refused
            await send(new, {"type": "resume", "session_id": s["session_id"], "resume_token": s["resume_token"], "streams": {"a": 0}})
            resumed = await recv(new)
            assert resumed["type"] == "resumed" and resumed["streams"]["a"]["known"] and resumed["streams"]["a"]["live"], resumed
            last = None
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    last = await recv(old)
            assert last is not None and last["code"] == "resumed_elsewhere" and info.value.rcvd.code == 4001
            seqs = []
            while len(seqs) < 10:
                frame = await recv(new)
                seqs.append(frame["seq"])
            assert seqs == list(range(1, 11))  # the replay from the start, then live, in order
            await send(new, {"type": "cancel", "id": "a"})
            while True:
                frame = await recv(new)
                if frame["type"] in ("done", "error"):
                    break
                seqs.append(frame["seq"])
            assert frame["type"] == "done" and frame["finish_reason"] == "cancelled" and frame["seq"] == seqs[-1] + 1, frame
    finally:
        stop_all(a, b, s1, s2)


async def test_a_grpc_call_that_half_closes_gets_every_frame_with_redis(redis_server: RedisServer) -> None:
    """A backend's `Stream` call sends a start and half-closes: with the Redis store its frames
    wait for Redis, and the call still ends only after the `done` (never cut short as OK)."""
    from llmproxy.v1 import llmproxy_pb2 as pb
    from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc

    s1 = start_server("--store", redis_server.url, "--demo-ttft-ms", "5", "--demo-tokens-per-s", "200")
    try:
        for _ in range(5):
            async with grpc.aio.insecure_channel(s1.address) as channel:
                call = pb_grpc.LLMProxyStub(channel).Stream()
                await call.write(pb.ClientFrame(start=pb.StartStream(stream_id="a", model="demo", messages=[pb.ChatMessage(role="user", content="hi")], params=pb.GenerationParams(max_tokens=5))))
                await call.done_writing()
                kinds = [frame.WhichOneof("kind") async for frame in call]
                assert kinds[:2] == ["session", "started"] and kinds[-1] == "done" and set(kinds[2:-1]) == {"token"}, kinds
                assert await call.code() == grpc.StatusCode.OK
    finally:
        s1.stop()
