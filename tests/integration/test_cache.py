"""The response cache through the whole chain: WebSocket -> bridge -> server -> fake OpenAI.

The fake counts upstream requests by the `tag` knob of each deployment's model string, so every
test states how many requests reached the provider. Every test uses prompts of its own, so the
tests stand alone under -k and in any order.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections import Counter

import grpc
import pytest
from websockets.asyncio.client import connect

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc

from tests.support.procs import start, start_proxy
from tests.support.ws import collect, recv, send

MODELS = {
    "c": "m@tokens=8,ttft=0.05,pace=0.04,tag=c",
    "cut": "m@tokens=20,cut=10,tag=ccut",
    "err": "m@status=400,tag=cerr",
    "slow": "m@tokens=40,pace=0.05,tag=cslow",
    "sem": "m@tokens=6,ttft=0.05,pace=0.02,tag=csem",
}


@pytest.fixture(scope="module")
def fake():
    proc = start("fake-openai", ["tests.fakes.openai", "--port", "0"], "fake-openai listening on ")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def chain(fake, tmp_path_factory):
    config: dict = {
        "routing": {"retry": {"max_attempts": 1}},
        "models": {
            public: {"name": public, "provider": "openai", "model": model, "base_url": f"http://{fake.address}/v1", "key": "env:CACHE_KEY"}
            for public, model in MODELS.items()
        },
        "cache": {
            "pace": "recorded",
            "ttl_s": 600,
            "models": {"sem": {"semantic": True}},
            # the fake's embeddings are bags of words: the same words in another case hit
            "embeddings": {"provider": "openai", "base_url": f"http://{fake.address}/v1", "model": "embed-x", "key": "env:CACHE_KEY"},
        },
    }
    path = tmp_path_factory.mktemp("cache") / "llmproxy.yaml"
    path.write_text(json.dumps(config))
    log = tmp_path_factory.mktemp("cache-log") / "requests.sqlite3"
    proxy = start_proxy(("--config", str(path), "--metrics-listen", "127.0.0.1:0", "--request-log", str(log)), (), {"CACHE_KEY": "sk-cache-test"})
    yield proxy
    proxy.stop()


def counts(fake) -> Counter:
    with urllib.request.urlopen(f"http://{fake.address}/_fake/state", timeout=5) as r:
        state = json.loads(r.read())
    out: Counter = Counter()
    for req in state["requests"]:
        model = json.loads(req["body"] or "{}").get("model", "")
        for knob in model.partition("@")[2].split(","):
            if knob.startswith("tag="):
                out[knob[4:]] += 1
    return out


def unique(prompt: str) -> str:
    return f"{prompt} [{uuid.uuid4().hex[:8]}]"


async def ask(chain, model: str, prompt: str, **extra) -> list[dict]:
    async with connect(chain.ws_url) as ws:
        await send(ws, {"type": "start", "id": "s", "model": model, "messages": [{"role": "user", "content": prompt}], **extra})
        return (await collect(ws, {"s"}, timeout_s=30))["s"]


def pieces(frames: list[dict]) -> list[str]:
    return [f["token"] for f in frames if f["type"] == "token"]


def token_gaps_ms(frames: list[dict]) -> list[float]:
    """The server-measured gap of each token after the first (the frames' `latency`)."""
    return [float(f["latency"].removesuffix("ms")) for f in frames if f["type"] == "token"][1:]


async def test_exact_hit_replays_as_a_stream_without_an_upstream_request(chain, fake):
    prompt = unique("Tell me a story")
    live = await ask(chain, "c", prompt)
    before = counts(fake)["c"]
    cached = await ask(chain, "c", prompt)
    assert counts(fake)["c"] == before  # no upstream request
    assert live[-1]["type"] == cached[-1]["type"] == "done"
    assert "cache" not in live[0] and "cache" not in live[-1]
    assert cached[0]["type"] == "started" and cached[0]["cache"] == {"kind": "exact", "score": 1.0}
    assert cached[-1]["cache"]["kind"] == "exact" and cached[-1]["usage"]["cached"] is True
    assert pieces(cached) == pieces(live) and len(pieces(live)) == 8
    assert cached[-1]["usage"]["completion_tokens"] == live[-1]["usage"]["completion_tokens"]
    # paced: the gaps follow the recorded ones (0.04 s each); the first token comes at once
    gaps = token_gaps_ms(cached)
    assert sum(gaps) >= 0.6 * sum(token_gaps_ms(live)), (gaps, token_gaps_ms(live))
    assert cached[-1]["timing"]["ttft_ms"] < live[-1]["timing"]["ttft_ms"]
    # the same frames, but for the cache flags and the timing
    strip = lambda fs: [{k: v for k, v in f.items() if k not in ("cache", "latency", "timing", "usage", "_t")} for f in fs]
    assert strip(cached) == strip(live)


async def test_differing_parameters_miss(chain, fake):
    prompt = unique("Name a colour")
    await ask(chain, "c", prompt)
    before = counts(fake)["c"]
    variants = [
        {"temperature": 0.5},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
    ]
    for extra in variants:
        frames = await ask(chain, "c", prompt, **extra)
        assert "cache" not in frames[0], extra
    async with connect(chain.ws_url) as ws:  # another system prompt
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
        await send(ws, {"type": "start", "id": "s", "model": "c", "messages": msgs})
        frames = (await collect(ws, {"s"}, timeout_s=30))["s"]
    assert "cache" not in frames[0]
    assert counts(fake)["c"] == before + 3


async def test_per_request_controls(chain, fake):
    prompt = unique("Controls")
    await ask(chain, "c", prompt, cache={"skip_write": True})
    second = await ask(chain, "c", prompt)  # nothing was stored: live, and stored now
    assert "cache" not in second[0]
    third = await ask(chain, "c", prompt, cache={"skip_read": True})
    assert "cache" not in third[0]
    fourth = await ask(chain, "c", prompt)
    assert fourth[0]["cache"]["kind"] == "exact"


@pytest.mark.parametrize("model", ["cut", "err"])
async def test_cut_or_errored_streams_are_never_cached(chain, fake, model):
    prompt = unique("Fail")
    tag = MODELS[model].rpartition("tag=")[2]
    before = counts(fake)[tag]
    for _ in range(2):
        frames = await ask(chain, model, prompt)
        assert frames[-1]["type"] == "error"
        assert all("cache" not in f for f in frames)
    assert counts(fake)[tag] == before + 2


async def _first_token_then(ws, frame: dict) -> list[dict]:
    seen = []
    while True:
        seen.append(await recv(ws))
        if seen[-1]["type"] == "token":
            break
    await send(ws, frame)
    return seen


async def test_cancelled_and_modified_streams_are_never_cached(chain, fake):
    prompt = unique("Cancel me")
    async with connect(chain.ws_url) as ws:
        await send(ws, {"type": "start", "id": "a", "model": "slow", "messages": [{"role": "user", "content": prompt}]})
        await _first_token_then(ws, {"type": "cancel", "id": "a"})
        frames = (await collect(ws, {"a"}, timeout_s=30))["a"]
    assert frames[-1]["finish_reason"] == "cancelled"
    async with connect(chain.ws_url) as ws:
        await send(ws, {"type": "start", "id": "b", "model": "slow", "messages": [{"role": "user", "content": prompt + "?"}]})
        await _first_token_then(ws, {"type": "modify", "id": "b", "messages": [{"role": "user", "content": prompt}]})
        frames = (await collect(ws, {"b"}, timeout_s=30))["b"]
    assert frames[-1]["type"] == "done"  # the modified generation ran to its end
    again = await ask(chain, "slow", prompt)
    assert "cache" not in again[0]  # neither the cancelled nor the modified answer was stored
    assert again[-1]["type"] == "done"


async def grpc_frames(chain, model: str, prompt: str) -> list[pb.ServerFrame]:
    async with grpc.aio.insecure_channel(chain.server.address) as channel:
        call = pb_grpc.LLMProxyStub(channel).Stream()
        await call.write(pb.ClientFrame(start=pb.StartStream(stream_id="g", model=model, messages=[pb.ChatMessage(role="user", content=prompt)])))
        await call.done_writing()
        return [f async for f in call if f.WhichOneof("kind") != "session"]


def _without_cache_and_times(frame: pb.ServerFrame) -> pb.ServerFrame:
    out = pb.ServerFrame()
    out.CopyFrom(frame)
    body = getattr(out, out.WhichOneof("kind"))
    for name in ("cache", "latency_us", "timing", "usage"):
        if name in body.DESCRIPTOR.fields_by_name:
            body.ClearField(name)
    return out


async def test_grpc_clients_see_the_same_frames_for_live_and_cached_answers(chain, fake):
    prompt = unique("Over gRPC")
    live = await grpc_frames(chain, "c", prompt)
    cached = await grpc_frames(chain, "c", prompt)
    assert not live[0].started.HasField("cache") and cached[0].started.cache.kind == "exact"
    assert cached[-1].done.cache.kind == "exact" and cached[-1].done.usage.cached
    assert [_without_cache_and_times(f) for f in cached] == [_without_cache_and_times(f) for f in live]


async def test_delete_cache_rpc_removes_the_tenants_entries(chain, fake):
    prompt = unique("Delete me")
    await ask(chain, "c", prompt)
    assert (await ask(chain, "c", prompt))[0]["cache"]["kind"] == "exact"
    async with grpc.aio.insecure_channel(chain.server.address) as channel:
        reply = await pb_grpc.LLMProxyStub(channel).DeleteCache(pb.DeleteCacheRequest(model="c"))
    assert reply.deleted >= 1
    assert "cache" not in (await ask(chain, "c", prompt))[0]


def metrics_text(chain) -> str:
    line = next(line for line in chain.server.lines if line.startswith("llmproxy-server metrics on "))
    with urllib.request.urlopen(line.rsplit(" ", 1)[1], timeout=5) as r:
        return r.read().decode()


def metric(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


async def wait_for(predicate, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_hits_misses_entries_and_bytes_in_metrics_and_the_request_log(chain, fake):
    prompt = unique("Visible")
    await ask(chain, "c", prompt)
    await ask(chain, "c", prompt)
    text = metrics_text(chain)
    assert metric(text, 'llmproxy_cache_lookups_total{result="exact"}') >= 1
    assert metric(text, 'llmproxy_cache_lookups_total{result="miss"}') >= 1
    assert metric(text, "llmproxy_cache_entries ") >= 1 and metric(text, "llmproxy_cache_bytes ") > 0
    assert metric(text, "llmproxy_cache_lookup_seconds_total") > 0
    # per stream (fed by the analytics tick): hits and the provider time they saved
    await wait_for(lambda: metric(metrics_text(chain), 'llmproxy_cache_hits_total{gen_ai_request_model="c",kind="exact"}') >= 1)
    assert metric(metrics_text(chain), 'llmproxy_cache_saved_provider_seconds_total{gen_ai_request_model="c"}') > 0.1

    async def cache_hits_logged() -> int:
        async with grpc.aio.insecure_channel(chain.server.address) as channel:
            reply = await pb_grpc.LLMProxyStub(channel).Stats(pb.StatsRequest(window_s=3600, group_by="model"))
        return sum(r.cache_hits for r in reply.rows if r.name == "c")

    deadline = time.monotonic() + 15
    while await cache_hits_logged() < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


async def test_semantic_hit_through_the_chain_with_an_embeddings_api(chain, fake):
    tag = unique("x").split("[")[1].rstrip("]")
    live = await ask(chain, "sem", f"What is the capital of France, {tag}?")
    before = counts(fake)["csem"]
    hit = await ask(chain, "sem", f"what is the capital of France {tag}")
    assert counts(fake)["csem"] == before
    assert hit[0]["cache"]["kind"] == "semantic" and hit[0]["cache"]["score"] > 0.99
    assert hit[-1]["cache"]["kind"] == "semantic" and pieces(hit) == pieces(live)
    near = await ask(chain, "sem", f"What is the capital of Germany, {tag}?")  # the guard: another name
    assert "cache" not in near[0] and counts(fake)["csem"] == before + 1
    other_params = await ask(chain, "sem", f"what is the capital of France {tag}", max_tokens=50)  # another scope
    assert "cache" not in other_params[0]


async def test_python_client_cache_controls_and_flags(chain, fake):
    from llmproxy_client import LLMProxyClient

    prompt = unique("Python client")
    async with LLMProxyClient(chain.server.address) as client:
        async def ask_py(**kw):
            handle = client.stream(model="c", messages=[{"role": "user", "content": prompt}], **kw)
            text = "".join([t async for t in handle])
            return handle, text, await handle.result()

        _, live_text, _ = await ask_py()
        handle, text, done = await ask_py()
        assert handle.started.cache.kind == "exact" and done.cache.kind == "exact" and text == live_text
        handle, _, done = await ask_py(cache={"skip_read": True})
        assert not handle.started.HasField("cache") and not done.HasField("cache")
