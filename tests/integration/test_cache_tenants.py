"""The response cache with client keys: two keys asking the same question never share an
entry, and a key's DeleteCache removes its own entries only."""

from __future__ import annotations

import json
import uuid

import grpc
import pytest

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from server.auth.limits import KeyLimits
from server.auth.store import KeyStore
from tests.integration.test_cache import counts
from tests.support.procs import start, start_proxy


@pytest.fixture(scope="module")
def fake():
    proc = start("fake-openai", ["tests.fakes.openai", "--port", "0"], "fake-openai listening on ")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    db = tmp_path_factory.mktemp("cache-auth") / "keys.sqlite3"
    store = KeyStore(str(db))
    out = {"db": str(db)}
    for name in ("a", "b"):
        out[name], _ = store.create(name, KeyLimits())
    store.close()
    return out


@pytest.fixture(scope="module")
def proxy(fake, keys, tmp_path_factory):
    config = {
        "models": {"t": {"provider": "openai", "model": "m@tokens=5,tag=tenant", "base_url": f"http://{fake.address}/v1", "key": "env:T_KEY"}},
        "cache": {"pace": "instant"},
    }
    path = tmp_path_factory.mktemp("cache-tenants") / "llmproxy.yaml"
    path.write_text(json.dumps(config))
    p = start_proxy(("--config", str(path), "--auth-db", keys["db"]), (), {"T_KEY": "sk-t"})
    yield p
    p.stop()


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def ask(proxy, key: str, prompt: str) -> list[pb.ServerFrame]:
    async with grpc.aio.insecure_channel(proxy.grpc_target) as channel:
        call = pb_grpc.LLMProxyStub(channel).Stream(metadata=bearer(key))
        await call.write(pb.ClientFrame(start=pb.StartStream(stream_id="s", model="t", messages=[pb.ChatMessage(role="user", content=prompt)])))
        await call.done_writing()
        return [f async for f in call if f.WhichOneof("kind") in ("started", "done", "error")]


async def test_two_keys_never_share_an_entry_and_delete_only_their_own(proxy, keys, fake):
    prompt = f"Shared question {uuid.uuid4().hex[:8]}"
    before = counts(fake)["tenant"]
    a1 = await ask(proxy, keys["a"], prompt)
    b1 = await ask(proxy, keys["b"], prompt)
    assert a1[-1].HasField("done") and b1[-1].HasField("done")
    assert not b1[0].started.HasField("cache")  # b never gets a's answer
    assert counts(fake)["tenant"] == before + 2
    a2 = await ask(proxy, keys["a"], prompt)
    b2 = await ask(proxy, keys["b"], prompt)
    assert a2[0].started.cache.kind == "exact" and b2[0].started.cache.kind == "exact"
    assert counts(fake)["tenant"] == before + 2
    async with grpc.aio.insecure_channel(proxy.grpc_target) as channel:
        reply = await pb_grpc.LLMProxyStub(channel).DeleteCache(pb.DeleteCacheRequest(), metadata=bearer(keys["b"]))
    assert reply.deleted == 1
    assert (await ask(proxy, keys["a"], prompt))[0].started.cache.kind == "exact"  # a's entry stays
    assert not (await ask(proxy, keys["b"], prompt))[0].started.HasField("cache")
