"""Hostile input. Each attack gets its documented answer (docs/security.md), the processes stay
up, and a well-behaved client streaming beside the attack finishes its answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from server.auth.limits import KeyLimits
from server.auth.store import KeyStore
from tests.integration.conftest import FAST_DEMO
from tests.support.procs import start_proxy
from tests.support.ws import collect, open_ws, recv, send, start_frame, text_of

ALLOWED_ORIGIN = "http://example.com"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    db = tmp_path_factory.mktemp("hostile") / "keys.sqlite3"
    store = KeyStore(str(db))
    out = {"db": str(db)}
    for name in ("good", "attacker", "revoked"):
        out[name], record = store.create(name, KeyLimits())
    store.revoke(record.key_id)
    store.close()
    return out


@pytest.fixture(scope="module")
def hostile(keys):
    p = start_proxy((*FAST_DEMO, "--auth-db", keys["db"], "--demo", "all-keys"), ("--allowed-origin", ALLOWED_ORIGIN, "--max-frame-bytes", "65536"))
    yield p
    assert p.server.popen.poll() is None and p.bridge.popen.poll() is None, "an attack took a process down"
    p.stop()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def beside(proxy, keys, attack: Callable[[], Awaitable[None]]) -> None:
    """Runs the attack while a good client streams; both must succeed."""

    async def good_client() -> None:
        async with open_ws(proxy.ws_url, additional_headers=auth(keys["good"])) as ws:
            await send(ws, start_frame("good", max_tokens=25))
            frames = (await collect(ws, {"good"}))["good"]
            assert frames[-1]["type"] == "done" and len(text_of(frames)) > 20

    await asyncio.gather(good_client(), attack())
    assert proxy.server.popen.poll() is None and proxy.bridge.popen.poll() is None


FRAMES = [
    ("{not json", "malformed_frame"),
    ('{"type": "start", "id": "w", "model": ["demo"], "messages": [{"role": "user", "content": "hi"}]}', "invalid_request"),
    ('{"type": "start", "id": "w", "model": "demo", "messages": [{"role": "user", "content": {"$ne": 1}}]}', "invalid_request"),
    ('{"type": "exec", "cmd": "rm -rf /"}', "unknown_frame_type"),
    ('{"type": null}', "unknown_frame_type"),
    ("[" * 100_00 + "]" * 100_00, "malformed_frame"),  # deeply nested
    ('{"type": "start", "id": "n", "model": "demo", "messages": [' + ",".join(['{"role": "user", "content": "x"}'] * 1500) + "]}", "invalid_request"),
    ('{"type": "start", "id": "m", "model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000000000000000000000000000}', "invalid_request"),
    ('{"type": "start", "id": "m", "model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 99999999}', "invalid_request"),
    ('{"type": "start", "id": "m", "model": "demo", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}', "malformed_frame"),
    ('{"type": "start", "id": "u", "model": "../../etc/passwd", "messages": [{"role": "user", "content": "hi"}]}', "unknown_model"),
    ('{"type": "start", "id": "k", "model": "demo", "api_key": "sk-x", "base_url": "http://evil", "messages": [{"role": "user", "content": "hi"}]}', "invalid_request"),
    ('{"type": "start", "id": "' + "i" * 500 + '", "model": "demo", "messages": [{"role": "user", "content": "hi"}]}', "invalid_request"),
    ('{"type": "resume", "session_id": "nope", "resume_token": "nope"}', "expired"),
    ("x" * 70_000, "frame_too_large"),
]


@pytest.mark.parametrize("raw, code", FRAMES, ids=[f"{c}-{i}" for i, (_, c) in enumerate(FRAMES)])
async def test_bad_frames_get_their_error_and_the_connection_goes_on(hostile, keys, raw, code):
    async def attack() -> None:
        async with open_ws(hostile.ws_url, additional_headers=auth(keys["attacker"])) as ws:
            await ws.send(raw)
            err = await recv(ws)
            assert err["type"] == "error" and err["code"] == code and err["seq"] == 0, err
            await send(ws, start_frame("after", max_tokens=3))
            assert (await collect(ws, {"after"}))["after"][-1]["type"] == "done"

    await beside(hostile, keys, attack)


async def test_binary_frames_are_refused(hostile, keys):
    async def attack() -> None:
        async with open_ws(hostile.ws_url, additional_headers=auth(keys["attacker"])) as ws:
            await ws.send(orjson.dumps(start_frame("b")))
            assert (await recv(ws))["code"] == "malformed_frame"

    await beside(hostile, keys, attack)


async def test_invalid_utf8_closes_1007(hostile, keys):
    async def attack() -> None:
        async with open_ws(hostile.ws_url, additional_headers=auth(keys["attacker"])) as ws:
            await ws.send(b'{"type": "ping", "x": "\xff\xfe"}', text=True)
            with pytest.raises(ConnectionClosed):
                await recv(ws)
            assert ws.close_code == 1007  # RFC 6455 8.1: invalid UTF-8 fails the connection

    await beside(hostile, keys, attack)


async def test_a_huge_frame_closes_1009(hostile, keys):
    async def attack() -> None:
        async with open_ws(hostile.ws_url, additional_headers=auth(keys["attacker"]), max_size=None) as ws:
            await ws.send("y" * (5 * 65536))
            with pytest.raises(ConnectionClosed):
                while True:
                    await recv(ws)
            assert ws.close_code == 1009

    await beside(hostile, keys, attack)


@pytest.mark.parametrize("key", [None, "nonsense", "llmp_000000000000_" + "A" * 43, "revoked"])
async def test_missing_invalid_and_revoked_keys(hostile, keys, key):
    async def attack() -> None:
        headers = {} if key is None else auth(keys.get(key, key))
        async with connect(hostile.ws_url, additional_headers=headers) as ws:
            assert (await recv(ws))["code"] == "unauthenticated"
            with pytest.raises(ConnectionClosed):
                await recv(ws)
            assert ws.close_code == 1008

    await beside(hostile, keys, attack)


async def test_resuming_with_another_keys_token_is_expired(hostile, keys):
    async def attack() -> None:
        async with open_ws(hostile.ws_url, additional_headers=auth(keys["good"])) as victim:
            s = victim.session
            async with open_ws(hostile.ws_url, additional_headers=auth(keys["attacker"])) as ws:
                await send(ws, {"type": "resume", "session_id": s["session_id"], "resume_token": s["resume_token"]})
                assert (await recv(ws))["code"] == "expired"

    await beside(hostile, keys, attack)


async def test_an_oversized_message_over_grpc_is_invalid_request(hostile, keys):
    async def attack() -> None:
        async with grpc.aio.insecure_channel(hostile.grpc_target) as channel:
            call = pb_grpc.LLMProxyStub(channel).Stream(metadata=(("authorization", f"Bearer {keys['attacker']}"),))
            msg = pb.ChatMessage(role="user", content="z" * 1_000_001)
            await call.write(pb.ClientFrame(start=pb.StartStream(stream_id="big", model="demo", messages=[msg])))
            await call.done_writing()
            errors = [f.error for f in [f async for f in call] if f.WhichOneof("kind") == "error"]
            assert errors[0].code == pb.ERROR_CODE_INVALID_REQUEST and "longer than" in errors[0].message

    await beside(hostile, keys, attack)


async def test_oversized_grpc_metadata_is_refused(hostile, keys):
    async def attack() -> None:
        async with grpc.aio.insecure_channel(hostile.grpc_target) as channel:
            stub = pb_grpc.LLMProxyStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", "Bearer " + "k" * 20_000),), timeout=5)
            assert info.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)

    await beside(hostile, keys, attack)


@pytest.mark.parametrize(
    "origin", ["http://evil-example.com", "http://example.com.evil.com", "https://example.com", "http://EXAMPLE.COM", "null", "http://example.com/"]
    + ["http://127.0.0.1:{port}.evil.com", "http://127.0.0.1:{port}@evil.com"],
)
async def test_look_alike_origins_get_403(hostile, keys, origin):
    async def attack() -> None:
        with pytest.raises(InvalidStatus) as info:
            async with connect(hostile.ws_url, origin=origin.format(port=hostile.bridge.port), additional_headers=auth(keys["attacker"])):
                pass
        assert info.value.response.status_code == 403

    await beside(hostile, keys, attack)
    async with open_ws(hostile.ws_url, origin=ALLOWED_ORIGIN, additional_headers=auth(keys["good"])):
        pass  # the exact origin is accepted


async def raw_http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


TRAVERSALS = [
    "/../server/main.py", "/%2e%2e/server/main.py", "/..%2fserver%2fmain.py", "/%252e%252e%252fpyproject.toml",
    "/%5c..%5cpyproject.toml", "/..\\pyproject.toml", "/js/../../pyproject.toml", "/js/%2e%2e/%2e%2e/README.md",
    "/.%2e/.%2e/etc/passwd", "//etc/passwd", "/index.html%00.js", "/js/package.json", "/.git/config",
]


@pytest.mark.parametrize("path", TRAVERSALS)
async def test_traversal_variants_get_the_same_404(hostile, keys, path):
    async def attack() -> None:
        reply = await raw_http(hostile.bridge.port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404") and body == b"not found\n", reply[:200]

    await beside(hostile, keys, attack)


HANDSHAKE = "GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"


@pytest.mark.parametrize(
    "extra",
    [
        b"Authorization: Bearer a\rX-Injected: 1\r\n",  # a bare CR inside a header value
        b"Authorization: Bearer a\nX-Injected: 1\r\n",  # a bare LF
        b"X-Big: " + b"h" * 20_000 + b"\r\n",  # one oversized header line
        b"".join(b"X-H%d: v\r\n" % i for i in range(300)),  # too many headers
    ],
    ids=["cr", "lf", "long-line", "many-headers"],
)
async def test_crlf_and_oversized_handshake_headers_are_refused(hostile, keys, extra):
    async def attack() -> None:
        reply = await raw_http(hostile.bridge.port, HANDSHAKE.encode() + extra + b"\r\n")
        assert not reply.startswith(b"HTTP/1.1 101"), reply[:200]

    await beside(hostile, keys, attack)


async def test_a_stalled_handshake_is_dropped(hostile, keys):
    """A client that opens a TCP connection and sends half a request is dropped at open_timeout."""
    # The bridge of this module uses the 10 s default; a separate bridge with 1 s proves it.
    p = start_proxy(FAST_DEMO, ("--open-timeout-s", "1"))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.bridge.port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) is not None  # EOF (or an error) within 5 s
        writer.close()
    finally:
        p.stop()


# -- redaction ---------------------------------------------------------------------------------------

PROVIDER_KEY = "sk-REDACTION-openai-KEY-8e7d6c5b4a3f2e1d"


async def test_client_and_provider_keys_never_appear_in_logs_or_frames(tmp_path):
    """Traffic with recognizable client keys (valid, revoked, bogus) and a provider key, at DEBUG
    level: every log line of both processes and every frame is scanned for them."""
    from tests.support.procs import start

    fake = start("fake-openai", ["tests.fakes.openai", "--port", "0"], "fake-openai listening on ")
    store = KeyStore(str(tmp_path / "keys.sqlite3"))
    good, _ = store.create("good", KeyLimits())
    revoked, record = store.create("revoked", KeyLimits())
    store.revoke(record.key_id)
    store.close()
    bogus = "llmp_0123456789ab_REDACTIONbogusKEYxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
    config = tmp_path / "llmproxy.yaml"
    config.write_text(
        "models:\n"
        + "".join(
            f"  {name}:\n    provider: openai\n    model: \"{model}\"\n    base_url: http://{fake.address}/v1\n    key: env:REDACT_OPENAI_KEY\n"
            for name, model in (("ok", "m"), ("r401", "m@status=401"), ("cut", "m@tokens=10,cut=5"))
        )
    )
    p = start_proxy(("--config", str(config), "--log-level", "DEBUG", "--auth-db", str(tmp_path / "keys.sqlite3")), ("--log-level", "DEBUG"),
                    {"REDACT_OPENAI_KEY": PROVIDER_KEY})
    frames: list[str] = []
    try:
        for model in ("ok", "r401", "cut"):
            async with connect(p.ws_url, additional_headers=auth(good)) as ws:
                frames.append(await ws.recv())
                await send(ws, start_frame("r", model=model))
                while True:
                    raw = await asyncio.wait_for(ws.recv(), 10)
                    frames.append(raw)
                    frame = orjson.loads(raw)
                    if frame["type"] in ("done", "error"):
                        break
        async with connect(p.ws_url, subprotocols=["llmproxy", f"llmproxy.bearer.{good}"]) as ws:
            frames.append(await ws.recv())
            await ws.send('{"type": "start", "id": "x", "model": "ok", "api_key": "' + good + '", "messages": []}')
            frames.append(await ws.recv())
        for key in (revoked, bogus, "Bearer " + bogus):
            async with connect(p.ws_url, additional_headers=auth(key)) as ws:
                frames.append(await ws.recv())
        async with grpc.aio.insecure_channel(p.grpc_target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.LLMProxyStub(channel).ListModels(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {bogus}"),))
            frames.append(str(info.value.details()))
    finally:
        p.stop()
        fake.stop()
    text = "\n".join([*frames, *p.log_lines()])
    assert "upstream_unauthenticated" in text and "unauthenticated" in text  # the traffic happened
    for secret in (PROVIDER_KEY, good, revoked, bogus):
        assert secret not in text
        assert secret[-16:] not in text
