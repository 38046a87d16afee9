"""Every bad input gets its typed error frame, and the same connection then streams normally."""

from __future__ import annotations

import pytest
from websockets.exceptions import ConnectionClosed

from tests.integration.conftest import FAST_DEMO
from tests.support.ws import open_ws, collect, recv, send, start_frame, text_of

BAD_FRAMES = [
    ("{not json", "malformed_frame", ""),
    ("[1, 2, 3]", "malformed_frame", ""),
    ('{"type": "launch", "id": "x"}', "unknown_frame_type", "x"),
    ('{"type": "start", "id": "m", "messages": [{"role": "user", "content": "hi"}]}', "invalid_request", "m"),
    ('{"type": "start", "id": "u", "model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}', "unknown_model", "u"),
    ('{"type": "start", "id": "t", "model": "demo", "messages": "hi"}', "invalid_request", "t"),
    ('{"type": "start", "id": "t2", "model": "demo", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "invalid_request", "t2"),
    ('{"type": "start", "id": "t3", "model": 5, "messages": [{"role": "user", "content": "hi"}]}', "invalid_request", "t3"),
    ('{"type": "start", "id": "t4", "model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', "invalid_request", "t4"),
    ('{"type": "start", "id": "f", "model": "demo", "messages": [{"role": "user", "content": "hi"}], "api_base": "http://evil"}', "invalid_request", "f"),
    ('{"type": "start", "id": "r", "model": "demo", "messages": [{"role": "wizard", "content": "hi"}]}', "invalid_request", "r"),
    ('{"type": "start", "id": "e", "model": "demo", "messages": []}', "invalid_request", "e"),
    ('{"type": "cancel", "id": "nobody"}', "unknown_stream", "nobody"),
    ('{"type": "ping", "nonce": "x"}', "invalid_request", ""),
    ('{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": false}', "invalid_request", ""),
]


async def assert_still_streams(ws) -> None:
    await send(ws, start_frame("ok", max_tokens=5))
    frames = (await collect(ws, {"ok"}))["ok"]
    assert frames[-1]["type"] == "done" and len(text_of(frames)) > 0


@pytest.mark.parametrize("raw, code, sid", BAD_FRAMES, ids=[b[1] + ":" + b[0][:30] for b in BAD_FRAMES])
async def test_bad_frame_gets_typed_error_and_connection_goes_on(proxy, raw, code, sid):
    async with open_ws(proxy.ws_url) as ws:
        await ws.send(raw)
        err = await recv(ws)
        assert err["type"] == "error" and err["code"] == code and err["id"] == sid and err["seq"] == 0
        assert err["message"] and "Traceback" not in err["message"]
        assert err["token"] == "" and err["latency"].endswith("ms")
        await assert_still_streams(ws)


async def test_binary_frame_is_refused_with_a_typed_error(proxy):
    async with open_ws(proxy.ws_url) as ws:
        await ws.send(b'{"type": "ping"}')
        err = await recv(ws)
        assert err["code"] == "malformed_frame" and "binary" in err["message"]
        await assert_still_streams(ws)


async def test_oversized_frame_gets_frame_too_large_and_a_huge_one_closes_1009(proxy_factory):
    p = proxy_factory(bridge_args=("--max-frame-bytes", "4096"))
    async with open_ws(p.ws_url, max_size=None) as ws:
        await send(ws, start_frame("big", prompt="x" * 5000))
        err = await recv(ws)
        assert err["code"] == "frame_too_large"
        await assert_still_streams(ws)
    async with open_ws(p.ws_url, max_size=None) as ws:
        await ws.send("x" * 20000)
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.rcvd.code == 1009


async def test_duplicate_stream_id_is_refused_and_the_first_stream_is_untouched(proxy):
    async with open_ws(proxy.ws_url) as ws:
        await send(ws, start_frame("dup", max_tokens=20))
        first = await recv(ws)
        assert first["type"] == "started"  # the refusal below cannot be mistaken for the start's
        await send(ws, start_frame("dup", max_tokens=20))
        frames = [first]
        while not (frames[-1]["type"] in ("done", "error") and frames[-1]["seq"] > 0):
            frames.append(await recv(ws))
        rejected = [f for f in frames if f["type"] == "error"]
        assert [r["code"] for r in rejected] == ["duplicate_stream_id"] and rejected[0]["seq"] == 0
        assert frames[-1]["type"] == "done" and frames[-1]["usage"]["completion_tokens"] == 20


async def test_too_many_streams_is_refused_and_the_others_run(proxy_factory):
    p = proxy_factory(server_args=(*FAST_DEMO, "--max-streams", "2"))
    async with open_ws(p.ws_url) as ws:
        for sid in ("a", "b", "c"):
            await send(ws, start_frame(sid, max_tokens=10))
        frames = await collect(ws, {"a", "b", "c"})
        assert frames["c"][0]["code"] == "too_many_streams" and frames["c"][0]["retryable"] is True
        assert frames["a"][-1]["type"] == "done" and frames["b"][-1]["type"] == "done"
        await assert_still_streams(ws)


async def test_deeply_nested_json_is_malformed_not_a_crash(proxy):
    async with open_ws(proxy.ws_url) as ws:
        await ws.send("[" * 5000 + "]" * 5000)
        err = await recv(ws)
        assert err["code"] == "malformed_frame"
        await assert_still_streams(ws)
