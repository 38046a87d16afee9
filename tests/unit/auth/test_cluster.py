"""The Redis side of the key limits (server/auth/cluster.py): the Lua scripts run on a real
redis-server, several `ClusterKeys` standing for several servers; and the per-runtime queue
that keeps a connection's frames in order while a check is pending (server/auth/admission.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from llmproxy.v1 import llmproxy_pb2 as pb
from server.auth.admission import AdmissionQueue
from server.auth.cluster import ClusterKeys, KeyActivity
from server.auth.limits import KeyLimits
from server.errors import Code, KeyRateLimited, StoreUnavailable
from tests.support.redis import RedisServer


@pytest.fixture(scope="module")
def redis_url():
    server = RedisServer(persist=False).start()
    yield server.url
    server.close()


@pytest.fixture
async def clients(redis_url):
    made: list[aioredis.Redis] = []

    def make(server_id: str, lease_s: float = 6.0) -> ClusterKeys:
        r = aioredis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        made.append(r)
        return ClusterKeys(r, server_id, lease_s=lease_s)

    yield make
    for r in made:
        await r.aclose()


_n = iter(range(10**6))


def fresh_key() -> str:
    """A key id no other test used (the Redis server is shared by the module)."""
    return f"{next(_n):04d}{time.monotonic_ns() % 10**8:08d}"


async def test_requests_per_minute_are_counted_once_over_every_server_even_when_they_race(clients):
    servers = [clients(f"s{i}") for i in range(3)]
    key, limits = fresh_key(), KeyLimits(rpm=60)
    answers = await asyncio.gather(*(servers[i % 3].admit(key, limits, 0) for i in range(200)))
    refused = [a for a in answers if a is not None]
    assert len(refused) == 140  # exactly: one atomic script per admission
    assert all(isinstance(a, KeyRateLimited) for a in refused)
    retry = refused[0].retry_after_s
    assert retry is not None and 55 < retry <= 60  # the oldest request leaves the window in about a minute


async def test_live_streams_count_over_servers_and_a_dead_servers_lapse(clients):
    a, b = clients("a", lease_s=0.3), clients("b", lease_s=0.3)
    key, limits = fresh_key(), KeyLimits(concurrency=2)
    assert await a.admit(key, limits, 0) is None  # a now has 1
    assert await b.admit(key, limits, 0) is None  # 1 on a + 0 on b: b now has 1
    refused = await a.admit(key, limits, 1)
    assert refused is not None and refused.code is Code.TOO_MANY_STREAMS
    # a's stream ends: its next sync publishes 0 and the slot is free for b
    await a.sync({key: KeyActivity(0, 0)})
    assert await b.admit(key, limits, 1) is None
    # b dies without a word (no sync renews its lease): its two streams stop counting
    deadline = time.monotonic() + 5
    while (await a.admit(key, limits, 0)) is not None:
        assert time.monotonic() < deadline, "a dead server's streams never lapsed"
        await asyncio.sleep(0.05)


async def test_a_renewed_lease_keeps_counting(clients):
    a, b = clients("a", lease_s=0.3), clients("b", lease_s=0.3)
    key, limits = fresh_key(), KeyLimits(concurrency=1)
    assert await a.admit(key, limits, 0) is None
    until = time.monotonic() + 1.0  # three lease lengths, renewed every 0.1 s
    while time.monotonic() < until:
        await a.sync({key: KeyActivity(1, 0)})
        refused = await b.admit(key, limits, 0)
        assert refused is not None and refused.code is Code.TOO_MANY_STREAMS
        await asyncio.sleep(0.1)


async def test_tokens_per_minute_and_the_budget_count_charges_from_every_server(clients):
    a, b = clients("a"), clients("b")
    key = fresh_key()
    tpm = KeyLimits(tpm=100)
    a.charge(key, 60, tpm)
    await a.sync({})
    assert await b.admit(key, tpm, 0) is None  # 60 < 100
    b.charge(key, 40, tpm)
    await b.sync({})
    refused = await a.admit(key, tpm, 0)
    assert isinstance(refused, KeyRateLimited) and "tokens per minute" in refused.message

    budget_key, budget = fresh_key(), KeyLimits(budget_tokens=10, budget_period_s=3600)
    a.charge(budget_key, 6, budget)
    b.charge(budget_key, 4, budget)
    await asyncio.gather(a.sync({}), b.sync({}))
    refused = await a.admit(budget_key, budget, 0)
    assert refused is not None and refused.code is Code.QUOTA_EXCEEDED
    assert refused.retry_after_s is not None and 0 < refused.retry_after_s <= 3600


async def test_connections_of_other_servers_are_reported_by_sync(clients):
    a, b = clients("a"), clients("b")
    key = fresh_key()
    await a.sync({key: KeyActivity(0, 2)})
    await b.sync({key: KeyActivity(0, 1)})
    assert b.other_connections(key) == 2
    await a.sync({key: KeyActivity(0, 0)})  # a's connections closed: withdrawn
    await b.sync({key: KeyActivity(0, 1)})
    assert b.other_connections(key) == 0


async def test_a_mirrored_revocation_is_refused_by_the_script_and_listed(clients):
    a, b = clients("a"), clients("b")
    key = fresh_key()
    assert await b.admit(key, KeyLimits(), 0) is None
    await a.mirror_revocations({key: True})
    refused = await b.admit(key, KeyLimits(), 0)
    assert refused is not None and refused.code is Code.UNAUTHENTICATED
    assert (await b.revocations())[key] is True


async def test_an_unreachable_redis_is_an_error_within_a_bound_never_an_admission():
    server = RedisServer(persist=False).start()
    r = aioredis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    keys = ClusterKeys(r, "a")
    try:
        assert await keys.admit("k", KeyLimits(rpm=5), 0) is None
        server.pause()  # the port stays open, nothing answers
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await keys.admit("k", KeyLimits(rpm=5), 0)
        assert time.monotonic() - began < 3.0
        keys.charge("k", 5, KeyLimits(tpm=10))
        with pytest.raises(StoreUnavailable):
            await keys.sync({})
        server.resume()
        await keys.sync({})  # the charge kept for the next sync went out
        assert await keys.admit("k", KeyLimits(tpm=5), 0) is not None
    finally:
        server.resume()
        await r.aclose()
        server.close()


# -- the per-runtime queue ------------------------------------------------------------------------


def frame(kind: str, sid: str) -> pb.ClientFrame:
    if kind == "start":
        return pb.ClientFrame(start=pb.StartStream(stream_id=sid, model="demo"))
    return pb.ClientFrame(cancel=pb.CancelStream(stream_id=sid))


async def test_frames_wait_in_order_behind_a_pending_check_and_a_refusal_is_delivered():
    gates: dict[str, asyncio.Future[object]] = {}
    delivered: list[tuple[str, str, object]] = []

    async def check(f: pb.ClientFrame):
        gates[f.start.stream_id] = asyncio.get_running_loop().create_future()
        return await gates[f.start.stream_id]

    queue = AdmissionQueue(check, lambda f, refused: delivered.append((f.WhichOneof("kind"), f.start.stream_id or f.cancel.stream_id, refused)))
    queue.feed(frame("cancel", "x"))  # nothing pending: delivered in the same call
    assert delivered == [("cancel", "x", None)]
    queue.feed(frame("start", "a"))
    queue.feed(frame("cancel", "a"))
    queue.feed(frame("start", "b"))
    await asyncio.sleep(0)
    assert delivered == [("cancel", "x", None)] and list(gates) == ["a"]  # b waits behind a
    no = KeyRateLimited("no", retry_after_s=1)
    gates["a"].set_result(no)
    for _ in range(10):
        await asyncio.sleep(0)
    assert delivered[1:] == [("start", "a", no), ("cancel", "a", None)] and list(gates) == ["a", "b"]
    gates["b"].set_result(None)
    for _ in range(10):
        await asyncio.sleep(0)
    assert delivered[-1] == ("start", "b", None)
    queue.feed(frame("cancel", "b"))  # the queue is empty again: straight through
    assert delivered[-1] == ("cancel", "b", None)


async def test_a_failing_check_refuses_as_internal_and_the_queue_goes_on():
    delivered = []

    async def check(f):
        if f.start.stream_id == "bad":
            raise RuntimeError("bug")
        return None

    queue = AdmissionQueue(check, lambda f, refused: delivered.append((f.start.stream_id, refused)))
    queue.feed(frame("start", "bad"))
    queue.feed(frame("start", "good"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert [sid for sid, _ in delivered] == ["bad", "good"]
    assert delivered[0][1].code is Code.INTERNAL and delivered[1][1] is None


async def test_scripts_lost_by_redis_are_loaded_again(clients, redis_url):
    a = clients("a")
    key, limits = fresh_key(), KeyLimits(tpm=10, concurrency=5)
    assert await a.admit(key, limits, 0) is None
    await a.sync({key: KeyActivity(1, 0)})
    r = aioredis.Redis.from_url(redis_url)
    try:
        await r.script_flush()  # as after a restart without persistence
        a.charge(key, 10, limits)
        await a.sync({key: KeyActivity(1, 0)})  # not raised; the charge went out once
        assert await r.hget(f"llmproxy:{{k:{key}}}:live", "a") == b"1"
        refused = await a.admit(key, limits, 1)
        assert isinstance(refused, KeyRateLimited)
        assert await r.zcard(f"llmproxy:{{k:{key}}}:tokens") == 1
    finally:
        await r.aclose()


def test_streams_of_a_key_that_never_connected_here_are_published(tmp_path):
    # A server that took over a dead server's session counts its key's streams, although the
    # key never authenticated on it (its limits are read from the key store).
    from server.auth.policy import AuthPolicy
    from server.auth.store import KeyStore

    store = KeyStore(str(tmp_path / "keys.sqlite3"))
    try:
        _, record = store.create("k", KeyLimits(concurrency=2, tpm=100))
        policy = AuthPolicy(store, cluster=ClusterKeys(aioredis.Redis(), "s"))  # no I/O until used
        assert policy.activity({record.key_id: 2, "unknown": 1}) == {record.key_id: KeyActivity(2, 0)}
        policy.charge(record.key_id, 7)
        assert policy.cluster._charges == {record.key_id: (7, record.limits)}
    finally:
        store.close()
