"""Streams that survive the network: resume after a bridge kill or a dropped connection,
through the same or another bridge, with nothing lost and nothing repeated."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from llmproxy_client import Backoff, LLMProxyError, WSClient
from tests.support.procs import ROOT, start_bridge, start_server
from tests.support.drops import FAST_BACKOFF, PROMPTS, consume, expected_texts, messages, until, wait_tokens
from tests.support.ws import open_ws, recv, send, start_frame

@pytest.fixture
def server():
    s = start_server("--demo-ttft-ms", "30", "--demo-tokens-per-s", "150", "--demo-jitter", "0.2", "--resume-grace-s", "5")
    yield s
    s.stop()


async def test_python_client_resumes_after_the_bridge_is_killed(server):
    bridge = start_bridge(server.address)
    port = bridge.port
    url = f"ws://127.0.0.1:{port}/stream"
    expected = await expected_texts(url, 150)
    try:
        async with WSClient(url, backoff=FAST_BACKOFF) as client:
            handles = [client.stream(model="demo", messages=messages(p), seed=11, max_tokens=150) for p in PROMPTS]
            counts, out = {h.id: 0 for h in handles}, {}
            readers = [asyncio.create_task(consume(h, counts, out)) for h in handles]
            await asyncio.wait_for(wait_tokens(counts, 30), 10)
            bridge.kill()  # SIGKILL: no close frames, no cleanup
            # The bridge comes back once the client has seen it gone and tried again (and failed).
            await asyncio.wait_for(until(lambda: client.reconnects >= 1), 10)
            bridge = start_bridge(server.address, port=port)
            await asyncio.wait_for(asyncio.gather(*readers), 30)
            assert client.reconnects >= 1
            assert [out[h.id] for h in handles] == expected
            assert sum(h.duplicates for h in handles) == 0
    finally:
        bridge.stop()


async def test_one_hundred_drops_through_two_bridges_lose_and_repeat_nothing(server):
    b1, b2 = start_bridge(server.address), start_bridge(server.address)
    try:
        expected = await expected_texts(b1.address, 40)
        lost = duplicated = resumed_elsewhere = 0
        for run in range(100):
            urls = [b1.address, b2.address] if run % 2 == 0 else [b2.address, b1.address]
            async with WSClient(urls, backoff=FAST_BACKOFF, seed=run) as client:
                handles = [client.stream(model="demo", messages=messages(p), seed=11, max_tokens=40) for p in PROMPTS]
                counts, out = {h.id: 0 for h in handles}, {}
                readers = [asyncio.create_task(consume(h, counts, out)) for h in handles]
                await asyncio.wait_for(wait_tokens(counts, 1 + run % 20), 10)
                client.drop_connection()
                await asyncio.wait_for(asyncio.gather(*readers), 20)
                resumed_elsewhere += client.reconnects >= 1
                for h, want in zip(handles, expected):
                    got = out[h.id]
                    duplicated += h.duplicates + (len(got) > len(want))
                    lost += got != want and len(got) <= len(want)
        print(f"\n100 drops: lost={lost} duplicated={duplicated} resumed through the other bridge={resumed_elsewhere}")
        assert (lost, duplicated) == (0, 0)
        assert resumed_elsewhere == 100
    finally:
        b1.stop()
        b2.stop()


async def test_resume_with_a_wrong_token_or_unknown_session_reveals_nothing(server):
    bridge = start_bridge(server.address)
    try:
        async with open_ws(bridge.address) as first:
            sid = first.session["session_id"]
            await send(first, start_frame("a", max_tokens=400))
            await recv(first)
        replies = []
        for session_id, token in ((sid, "not-the-token"), ("no-such-session", "whatever")):
            async with open_ws(bridge.address) as ws:
                await send(ws, {"type": "resume", "session_id": session_id, "resume_token": token, "streams": {"a": 0}})
                reply = await recv(ws)
                replies.append({k: reply[k] for k in ("type", "code", "message", "id", "seq")})
        assert replies[0] == replies[1] and replies[0]["code"] == "expired"
    finally:
        bridge.stop()


async def test_after_the_grace_period_the_session_is_gone():
    s = start_server("--demo-ttft-ms", "30", "--demo-tokens-per-s", "50", "--resume-grace-s", "0.5")
    bridge = start_bridge(s.address)
    try:
        async with open_ws(bridge.address) as ws:
            session = ws.session
            await send(ws, start_frame("a"))
            await recv(ws)
            # A drop, not the app's own close: 1000 would end the session at once (bridge/server.py).
            closing = time.monotonic()  # the session is detached no earlier than this
            await ws.close(code=4000, reason="dropped")
        # Poll until the session is gone: it is there during the grace period, then not.
        request = pb.GetSessionRequest(session_id=session["session_id"], resume_token=session["resume_token"])
        found = []
        async with grpc.aio.insecure_channel(s.address) as channel:
            while True:
                try:
                    await pb_grpc.LLMProxyStub(channel).GetSession(request)
                    found.append(time.monotonic() - closing)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                    break
                assert time.monotonic() - closing < 5, "the session outlived its grace period"
                await asyncio.sleep(0.02)
        gone_after = time.monotonic() - closing
        assert found and found[0] < 0.5, "resumable right after the connection closed"
        assert gone_after >= 0.5, f"gone after {gone_after:.2f} s, inside the 0.5 s grace period"
        async with open_ws(bridge.address) as ws:
            await send(ws, {"type": "resume", "session_id": session["session_id"], "resume_token": session["resume_token"], "streams": {"a": 2}})
            assert (await recv(ws))["code"] == "expired"
    finally:
        bridge.stop()
        s.stop()


async def test_a_client_that_vanishes_without_a_close_is_detected_within_the_bound(server):
    bridge = start_bridge(server.address, "--ping-interval-s", "0.5", "--ping-timeout-s", "0.5")
    client = subprocess.Popen([sys.executable, "-m", "tests.support.vanishing_client", bridge.address], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        session_id, token = client.stdout.readline().split()
        os.kill(client.pid, signal.SIGSTOP)  # frozen: no close frame, no TCP FIN, no pong
        stopped = time.monotonic()
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.LLMProxyStub(channel)
            while True:
                state = await stub.GetSession(pb.GetSessionRequest(session_id=session_id, resume_token=token))
                if not state.attached:
                    break
                assert time.monotonic() - stopped < 5, "not detected"
                await asyncio.sleep(0.02)
        detected_s = time.monotonic() - stopped
        print(f"\nvanished client detected after {detected_s * 1000:.0f} ms (bound: interval 0.5 s + 2 x timeout 0.5 s)")
        # The documented bound: ping interval + ping timeout + close timeout (= ping timeout),
        # plus scheduling slack on a shared machine.
        assert detected_s < 0.5 + 2 * 0.5 + 0.5
        assert [s.phase for s in state.streams] == ["streaming"]  # still generating, resumable
    finally:
        os.kill(client.pid, signal.SIGKILL)
        client.wait()
        bridge.stop()


async def test_modify_restarts_generation_within_one_token_interval(proxy_factory):
    p = proxy_factory(server_args=("--demo-ttft-ms", "30", "--demo-tokens-per-s", "20", "--demo-jitter", "0"))  # 50 ms per token
    async with open_ws(p.ws_url) as ws:
        await send(ws, start_frame("m", "Explain quantum computing", seed=1))
        tokens = 0
        while tokens < 5:
            tokens += (await recv(ws))["type"] == "token"
        sent = time.monotonic()
        await send(ws, {"type": "modify", "id": "m", "messages": [{"role": "user", "content": "What is a black hole?"}]})
        frames = []
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frame = await recv(ws)
            frame["_t"] = time.monotonic()
            frames.append(frame)
    restarted = next(f for f in frames if f["type"] == "restarted")
    assert restarted["_t"] - sent < 0.050
    before, after = frames[: frames.index(restarted)], frames[frames.index(restarted) + 1 :]
    # The old generation stops within one token interval: at most the one token already on its
    # way when `modify` was sent arrives before `restarted`, and none of the old answer after it.
    stale = [f for f in before if f["type"] == "token"]
    assert len(stale) <= 1, [f["token"] for f in stale]
    assert all(f["_t"] - sent < 0.050 for f in stale)
    assert all(f["seq"] < restarted["seq"] for f in stale)
    assert "".join(f["token"] for f in after).startswith("A black hole is a region")
    seqs = [f["seq"] for f in frames if f.get("seq")]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    assert frames[-1]["type"] == "done"


async def test_heartbeats_while_the_first_token_is_slow(proxy_factory):
    p = proxy_factory(server_args=("--demo-ttft-ms", "1200", "--demo-tokens-per-s", "50", "--heartbeat-interval-s", "0.3"))
    async with open_ws(p.ws_url) as ws:
        await send(ws, start_frame("h", max_tokens=3))
        kinds = []
        while not kinds or kinds[-1] not in ("done", "error"):
            kinds.append((await recv(ws))["type"])
    first_token = kinds.index("token")
    assert kinds[:first_token].count("heartbeat") >= 2, kinds


async def test_the_python_client_reports_an_expired_resume_as_an_error():
    s = start_server("--demo-ttft-ms", "30", "--demo-tokens-per-s", "20", "--resume-grace-s", "0.3")
    bridge = start_bridge(s.address)
    port = bridge.port
    try:
        async with WSClient(bridge.address, backoff=Backoff(base_s=1.0, factor=1, jitter=0, cap_s=1.0)) as client:
            h = client.stream(model="demo", messages=messages("hi"))
            await asyncio.wait_for(until(lambda: h.last_seq >= 2), 10)  # started, and a token: generating
            bridge.kill()
            bridge = start_bridge(s.address, port=port)
            with pytest.raises(LLMProxyError) as err:
                await asyncio.wait_for(h.result(), 10)
            assert err.value.code == "expired"
    finally:
        bridge.stop()
        s.stop()
