"""Client authentication and per-key limits, enforced by the server for gRPC and WebSocket alike."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from server.auth.limits import KeyLimits
from server.auth.store import KeyStore
from tests.integration.conftest import FAST_DEMO
from tests.support.procs import ROOT, start_proxy
from tests.support.ws import collect, open_ws, recv, send, start_frame, text_of


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    db = tmp_path_factory.mktemp("auth") / "keys.sqlite3"
    store = KeyStore(str(db))
    out = {"db": str(db)}
    for name, limits in {
        "a": KeyLimits(),
        "b": KeyLimits(),
        "models": KeyLimits(models=frozenset({"demo"})),
        "rpm": KeyLimits(rpm=2),
        "conc": KeyLimits(concurrency=1, connections=1),
        "budget": KeyLimits(budget_tokens=5),
        "revoked": KeyLimits(),
    }.items():
        out[name], record = store.create(name, limits)
        if name == "revoked":
            store.revoke(record.key_id)
    store.close()
    return out


@pytest.fixture(scope="module")
def authed(keys):
    p = start_proxy((*FAST_DEMO, "--auth-db", keys["db"], "--demo", "all-keys"))
    yield p
    p.stop()


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def grpc_stream(target: str, key: str | None, model: str = "demo") -> list[pb.ServerFrame]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.LLMProxyStub(channel).Stream(metadata=bearer(key) if key else None)
        msg = pb.ChatMessage(role="user", content="hi")
        await call.write(pb.ClientFrame(start=pb.StartStream(stream_id="g", model=model, messages=[msg], params=pb.GenerationParams(max_tokens=3))))
        await call.done_writing()
        return [f async for f in call]


# -- gRPC ------------------------------------------------------------------------------------------


async def test_a_refused_stream_reports_its_code_every_time(authed):
    # A grpc.aio client whose write is in flight when the status lands sees INTERNAL instead
    # (grpc/grpc#36066); before the server took the opening frame first, 1 call in 5 did.
    codes = []
    for _ in range(100):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await grpc_stream(authed.grpc_target, None)
        codes.append(info.value.code())
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}


@pytest.mark.parametrize("which", [None, "garbage", "revoked"])
async def test_grpc_without_a_valid_key_is_unauthenticated(authed, keys, which):
    key = None if which is None else keys.get(which, "llmp_000000000000_" + "x" * 43)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await grpc_stream(authed.grpc_target, key)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with grpc.aio.insecure_channel(authed.grpc_target) as channel:
        stub = pb_grpc.LLMProxyStub(channel)
        for rpc in (stub.ListModels(pb.ListModelsRequest(), metadata=bearer(key) if key else None),
                    stub.GetSession(pb.GetSessionRequest(session_id="x", resume_token="y"), metadata=bearer(key) if key else None)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await rpc
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_grpc_with_a_key_streams_and_list_models_honours_the_allowlist(authed, keys):
    frames = await grpc_stream(authed.grpc_target, keys["a"])
    assert frames[-1].WhichOneof("kind") == "done"
    async with grpc.aio.insecure_channel(authed.grpc_target) as channel:
        reply = await pb_grpc.LLMProxyStub(channel).ListModels(pb.ListModelsRequest(), metadata=bearer(keys["models"]))
    assert [m.name for m in reply.models] == ["demo"]


async def test_grpc_forbidden_model_is_refused_before_any_upstream_call(authed, keys):
    frames = await grpc_stream(authed.grpc_target, keys["models"], model="demo-fast")
    errors = [f.error for f in frames if f.WhichOneof("kind") == "error"]
    assert len(errors) == 1 and errors[0].code == pb.ERROR_CODE_FORBIDDEN_MODEL and errors[0].seq == 0
    assert not any(f.WhichOneof("kind") == "started" for f in frames)


# -- WebSocket -------------------------------------------------------------------------------------


async def test_ws_authorization_header_streams(authed, keys):
    async with open_ws(authed.ws_url, additional_headers={"Authorization": f"Bearer {keys['a']}"}) as ws:
        await send(ws, start_frame("s", max_tokens=4))
        frames = (await collect(ws, {"s"}))["s"]
        assert frames[-1]["type"] == "done" and text_of(frames)


async def test_ws_subprotocol_token_streams_and_llmproxy_is_selected(authed, keys):
    async with open_ws(authed.ws_url, subprotocols=["llmproxy", f"llmproxy.bearer.{keys['a']}"]) as ws:
        assert ws.subprotocol == "llmproxy"
        await send(ws, start_frame("s", max_tokens=4))
        assert (await collect(ws, {"s"}))["s"][-1]["type"] == "done"


@pytest.mark.parametrize(
    "headers, subprotocols",
    [
        ({}, None),
        ({"Authorization": "Bearer llmp_000000000000_" + "x" * 43}, None),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"Authorization": "Bearer " + "k" * 5000}, None),  # oversized: never reaches gRPC metadata
        ({}, ["llmproxy", "llmproxy.bearer.nope"]),
        ({"Authorization": "Bearer a"}, ["llmproxy", "llmproxy.bearer.b"]),  # two credentials
    ],
    ids=["missing", "unknown", "basic", "oversized", "bad-subprotocol", "ambiguous"],
)
async def test_ws_without_a_valid_key_gets_unauthenticated_and_1008(authed, headers, subprotocols):
    async with connect(authed.ws_url, additional_headers=headers, subprotocols=subprotocols) as ws:
        err = await recv(ws)
        assert err["type"] == "error" and err["code"] == "unauthenticated" and err["seq"] == 0
        with pytest.raises(ConnectionClosed):
            await recv(ws)
        assert ws.close_code == 1008


async def test_ws_revoked_key_is_unauthenticated(authed, keys):
    async with connect(authed.ws_url, additional_headers={"Authorization": f"Bearer {keys['revoked']}"}) as ws:
        assert (await recv(ws))["code"] == "unauthenticated"


async def test_identity_fields_in_json_frames_are_refused(authed, keys):
    async with open_ws(authed.ws_url, additional_headers={"Authorization": f"Bearer {keys['models']}"}) as ws:
        await ws.send('{"type": "start", "id": "x", "model": "demo-fast", "api_key": "' + keys["a"] + '", "messages": [{"role": "user", "content": "hi"}]}')
        err = await recv(ws)
        assert err["code"] == "invalid_request" and keys["a"] not in err["message"]


async def test_forbidden_model_frame(authed, keys):
    async with open_ws(authed.ws_url, additional_headers={"Authorization": f"Bearer {keys['models']}"}) as ws:
        await send(ws, start_frame("x", model="demo-fast"))
        err = await recv(ws)
        assert (err["type"], err["code"], err["id"], err["seq"]) == ("error", "forbidden_model", "x", 0)
        await send(ws, start_frame("ok", max_tokens=3))
        assert (await collect(ws, {"ok"}))["ok"][-1]["type"] == "done"


async def test_requests_per_minute_give_rate_limited_with_retry_after(authed, keys):
    async with open_ws(authed.ws_url, additional_headers={"Authorization": f"Bearer {keys['rpm']}"}) as ws:
        for sid in ("r1", "r2"):
            await send(ws, start_frame(sid, max_tokens=2))
        await collect(ws, {"r1", "r2"})
        await send(ws, start_frame("r3", max_tokens=2))
        err = await recv(ws)
        assert err["code"] == "rate_limited" and err["seq"] == 0 and err["retryable"]
        assert 0 < err["retry_after_ms"] <= 60_000


async def test_concurrency_and_connections_per_key(authed, keys):
    headers = {"Authorization": f"Bearer {keys['conc']}"}
    async with open_ws(authed.ws_url, additional_headers=headers) as ws:
        await send(ws, start_frame("c1", max_tokens=30))
        await send(ws, start_frame("c2", max_tokens=30))
        frames = await collect(ws, {"c1", "c2"})
        assert frames["c2"][0]["code"] == "too_many_streams" and frames["c2"][0]["seq"] == 0
        assert frames["c1"][-1]["type"] == "done"
        async with connect(authed.ws_url, additional_headers=headers) as second:
            err = await recv(second)
            assert err["code"] == "rate_limited"
            with pytest.raises(ConnectionClosed):
                await recv(second)
            assert second.close_code == 1013


async def test_token_budget_gives_quota_exceeded(authed, keys):
    async with open_ws(authed.ws_url, additional_headers={"Authorization": f"Bearer {keys['budget']}"}) as ws:
        await send(ws, start_frame("b1", max_tokens=8))
        assert (await collect(ws, {"b1"}))["b1"][-1]["type"] == "done"
        for _ in range(40):  # tokens are counted once the ended stream's record is taken (~1 s)
            await asyncio.sleep(0.25)
            await send(ws, start_frame(None, max_tokens=1))
            frame = await recv(ws)
            if frame["type"] == "error" and frame["code"] == "quota_exceeded":
                assert frame["seq"] == 0 and frame["retry_after_ms"] > 0
                return
            while frame["type"] != "done":
                frame = await recv(ws)
        pytest.fail("the budget was never enforced")


async def test_resuming_another_keys_session_is_expired(authed, keys):
    async with open_ws(authed.ws_url, additional_headers={"Authorization": f"Bearer {keys['a']}"}) as ws:
        session = ws.session
        await send(ws, start_frame("s", max_tokens=3))
        await collect(ws, {"s"})
        resume = {"type": "resume", "session_id": session["session_id"], "resume_token": session["resume_token"], "streams": {"s": 0}}
        async with open_ws(authed.ws_url, additional_headers={"Authorization": f"Bearer {keys['b']}"}) as thief:
            await send(thief, resume)
            err = await recv(thief)
            assert err["code"] == "expired" and err["message"] == "no such session, or it has expired"
        async with grpc.aio.insecure_channel(authed.grpc_target) as channel:
            stub = pb_grpc.LLMProxyStub(channel)
            request = pb.GetSessionRequest(session_id=session["session_id"], resume_token=session["resume_token"])
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetSession(request, metadata=bearer(keys["b"]))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert (await stub.GetSession(request, metadata=bearer(keys["a"]))).session_id == session["session_id"]


# -- exposure ----------------------------------------------------------------------------------------


def test_without_keys_the_server_refuses_a_non_loopback_address():
    out = subprocess.run(
        [sys.executable, "-m", "server.main", "--listen", "0.0.0.0:0", "--request-log", ""],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert out.returncode != 0 and "without API keys" in out.stderr and "--insecure-no-auth" in out.stderr


def test_insecure_no_auth_starts_with_a_loud_warning():
    from tests.support.procs import start

    proc = start("server", ["server.main", "--listen", "0.0.0.0:0", "--request-log", "", "--insecure-no-auth"], "llmproxy-server listening on ")
    try:
        assert any("INSECURE" in line and "NO AUTHENTICATION" in line for line in proc.lines)
    finally:
        proc.stop()


async def test_live_stats_and_aggregates_need_a_key_when_keys_are_configured(authed, keys):
    stats_url = authed.ws_url.replace("/stream", "/stats")
    async with connect(stats_url) as ws:  # no key: closed as a policy violation
        with pytest.raises(ConnectionClosed):
            await recv(ws)
        assert ws.close_code == 1008
    async with connect(stats_url, subprotocols=["llmproxy", f"llmproxy.bearer.{keys['a']}"]) as ws:
        assert (await recv(ws))["type"] == "stats"
    async with grpc.aio.insecure_channel(authed.grpc_target) as channel:
        stub = pb_grpc.LLMProxyStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Stats(pb.StatsRequest())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as off:  # authenticated; this server keeps no log
            await stub.Stats(pb.StatsRequest(), metadata=bearer(keys["a"]))
        assert off.value.code() == grpc.StatusCode.FAILED_PRECONDITION
