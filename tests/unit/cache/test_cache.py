"""The response cache fed by a fake upstream that counts its calls (no sockets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.cache.cache import DEFAULT_THRESHOLD, CacheSettings, ModelPolicy, Pace, ResponseCache
from server.cache.embeddings import LocalEmbedder
from server.cache.guard import same_specifics
from server.cache.key import exact_key
from server.cache.store import SqliteStore, StoredEntry
from server.catalog import Catalog
from server.core.events import Finished, FinishReason, Routed, TextDelta, ToolCallDelta, UsageReport
from server.core.request import CacheControl, ChatMessage, ChatRequest
from server.core.session import StartUpstream
from server.providers.base import DeploymentInfo

DATA = Path(__file__).parents[2] / "data"
# the shipped set, one held out while the guard was tuned, and one written after the last change
PAIR_FILES = ("semantic_pairs.jsonl", "semantic_pairs_heldout.jsonl", "semantic_pairs_fresh.jsonl")


class FakeBackend:
    def __init__(self, name: str) -> None:
        self.info = DeploymentInfo(name, "fake", f"{name}-upstream")


class Upstream:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: ChatRequest):
        self.calls += 1
        yield Routed("fake", "m-upstream", "m")
        for word in ("Paris ", "is ", "the ", "capital."):
            yield TextDelta(word)
        yield UsageReport(5, 4)
        yield Finished(FinishReason.STOP)


def request(text: str, **kw) -> ChatRequest:
    return ChatRequest("m", (ChatMessage("user", text),), **kw)


async def noop_sleep(_: float) -> None:
    return None


@pytest.fixture(scope="module")
def embedder():
    return LocalEmbedder()


def make_cache(embedder=None, **policy) -> ResponseCache:
    settings = CacheSettings(pace=Pace.INSTANT, default=ModelPolicy(**policy))
    return ResponseCache(settings, SqliteStore(), Catalog({"m": [FakeBackend("m")]}), embedder, sleep=noop_sleep)


async def run(cache: ResponseCache, upstream: Upstream, req: ChatRequest, tenant: str = "", control=CacheControl()) -> list:
    return [e async for e in cache.stream(upstream, StartUpstream("s", req, control), tenant)]


async def test_two_tenants_never_share_an_entry():
    cache, upstream = make_cache(), Upstream()
    await run(cache, upstream, request("capital of France?"), tenant="key-a")
    second = await run(cache, upstream, request("capital of France?"), tenant="key-b")
    assert upstream.calls == 2 and not second[0].cache
    third = await run(cache, upstream, request("capital of France?"), tenant="key-a")
    assert upstream.calls == 2 and third[0].cache == "exact"
    assert cache.delete("key-a") == 1
    await run(cache, upstream, request("capital of France?"), tenant="key-a")
    assert upstream.calls == 3


def test_the_key_covers_every_parameter():
    base = request("q")
    keys = {
        exact_key(base, ["u"], ""),
        exact_key(request("q", temperature=0.2), ["u"], ""),
        exact_key(request("q", max_tokens=5), ["u"], ""),
        exact_key(ChatRequest("m", (ChatMessage("system", "s"), ChatMessage("user", "q"))), ["u"], ""),
        exact_key(base, ["v"], ""),
        exact_key(base, ["u"], "k"),
    }
    assert len(keys) == 6


async def test_hot_sampling_is_not_stored_unless_configured():
    cache, upstream = make_cache(max_temperature=0.5), Upstream()
    for _ in range(2):
        await run(cache, upstream, request("hot", temperature=1.2))
    assert upstream.calls == 2


async def test_ttl_expiry_and_eviction_bounds():
    store = SqliteStore(max_entries=2)
    for i in range(3):
        store.put(StoredEntry(f"k{i}", "", "m", "", b"x" * 10, (), 100.0), now_s=float(i))
    assert store.stats().entries == 2 and store.get("k0", 1.0) is None  # least recently used went
    assert store.get("k2", 99.0) == b"x" * 10
    assert store.get("k2", 100.0) is None  # expired


async def test_a_paraphrase_hits_semantically_and_a_near_miss_does_not(embedder):
    cache, upstream = make_cache(embedder, semantic=True), Upstream()
    await run(cache, upstream, request("What is the capital of France?"))
    hit = await run(cache, upstream, request("What's the capital of France?"))
    assert upstream.calls == 1 and hit[0].cache == "semantic" and hit[0].cache_score >= DEFAULT_THRESHOLD
    assert [e.text for e in hit if isinstance(e, TextDelta)] == ["Paris ", "is ", "the ", "capital."]
    miss = await run(cache, upstream, request("What is the capital of Germany?"))
    assert upstream.calls == 2 and not miss[0].cache


def test_near_misses_of_the_labelled_set_do_not_hit_at_the_default_threshold(embedder):
    pairs = [json.loads(line) for name in PAIR_FILES for line in (DATA / name).read_text().splitlines()]
    assert len(pairs) >= 500
    negatives = [p for p in pairs if p["label"] == 0]
    positives = [p for p in pairs if p["label"] == 1]

    def hits(p) -> bool:
        a, b = embedder.embed_now(p["a"]), embedder.embed_now(p["b"])
        return sum(x * y for x, y in zip(a, b)) >= DEFAULT_THRESHOLD and same_specifics(p["a"], p["b"])

    false_hits = sum(hits(p) for p in negatives)
    assert false_hits / len(negatives) <= 0.01, false_hits
    assert sum(hits(p) for p in positives) >= 0.4 * len(positives)  # and it still hits paraphrases


class ToolUpstream(Upstream):
    async def __call__(self, request: ChatRequest):
        self.calls += 1
        yield Routed("fake", "m-upstream", "m")
        yield ToolCallDelta(0, "call_1", "lookup", "{}")
        yield Finished(FinishReason.TOOL_CALLS)


async def test_tool_call_answers_are_stored_only_when_configured():
    for allowed, calls in ((False, 2), (True, 1)):
        cache, upstream = make_cache(tool_calls=allowed), ToolUpstream()
        for _ in range(2):
            await run(cache, upstream, request("call a tool"))
        assert upstream.calls == calls


async def test_a_request_ttl_shortens_the_entry_and_never_lengthens_it():
    now = [1000.0]
    settings = CacheSettings(pace=Pace.INSTANT, ttl_s=100)
    cache = ResponseCache(settings, SqliteStore(), Catalog({"m": [FakeBackend("m")]}), clock=lambda: now[0], sleep=noop_sleep)
    upstream = Upstream()
    await run(cache, upstream, request("short"), control=CacheControl(ttl_s=10))
    await run(cache, upstream, request("long"), control=CacheControl(ttl_s=10_000))
    now[0] += 50
    await run(cache, upstream, request("short"))
    assert upstream.calls == 3  # expired after 10 s
    await run(cache, upstream, request("long"))
    assert upstream.calls == 3  # still there after 50 s
    now[0] += 60
    await run(cache, upstream, request("long"))
    assert upstream.calls == 4  # capped at the configured 100 s


async def test_recorded_pace_sleeps_the_recorded_gaps_and_instant_does_not():
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    for pace, expected in ((Pace.RECORDED, [0, 0.01, 0.02, 0.03]), (Pace.INSTANT, [0, 0, 0, 0])):
        slept.clear()
        cache = ResponseCache(CacheSettings(pace=pace), SqliteStore(), Catalog({"m": [FakeBackend("m")]}), sleep=sleep)
        from server.cache.recording import CachedAnswer

        answer = CachedAnswer("fake", "u", "m", ((500_000, TextDelta("a")), (10_000, TextDelta("b")), (20_000, TextDelta("c")), (30_000, Finished(FinishReason.STOP))))
        events = [e async for e in cache.replay(answer, "exact", 1.0)]
        assert [type(e).__name__ for e in events] == ["Routed", "TextDelta", "TextDelta", "TextDelta", "Finished"]
        assert slept == expected  # the first event at once, not after the recorded 0.5 s


def test_a_file_store_reloads_its_vector_index(tmp_path):
    path = str(tmp_path / "cache.sqlite3")
    store = SqliteStore(path)
    store.put(StoredEntry("k", "", "m", "scope", b"payload", (0.6, 0.8), 1e12), 0.0)
    store.close()
    again = SqliteStore(path)
    key, score = again.nearest("scope", (0.6, 0.8), 1.0)
    assert key == "k" and abs(score - 1.0) < 1e-6
    assert again.nearest("other", (0.6, 0.8), 1.0) is None
    assert again.stats().entries == 1 and again.get("k", 1.0) == b"payload"


def test_a_prompt_cache_breakpoint_does_not_change_the_key():
    marked = ChatRequest("m", (ChatMessage("system", "s", cache_breakpoint=True), ChatMessage("user", "q")))
    plain = ChatRequest("m", (ChatMessage("system", "s"), ChatMessage("user", "q")))
    assert exact_key(marked, ["u"], "") == exact_key(plain, ["u"], "")
