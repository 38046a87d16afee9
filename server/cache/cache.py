"""The response cache: another source of the same stream events as the router.

Theory of operation. The session runtime asks `ResponseCache.stream(upstream, action, tenant)`
for a stream's events instead of iterating the router itself. For a model the cache covers:

1. Lookup (unless the start frame's `cache.skip_read`): the exact key (key.py); then, for a
   model with semantic caching on, the prompt's embedding against the entries of the same
   semantic scope; a score at or above the model's threshold that also passes the near-miss
   guard (guard.py) is a hit.
2. A hit is replayed (`replay`): a `Routed` event flagged with the hit's kind and score (the
   `started` frame says so), then the recorded provider events in their original pieces, at once
   or with their recorded gaps (`pace`), the first one at once. The client sees the same frames
   as for a live answer; `done` is flagged too. No provider request is made.
3. A miss runs the upstream source and records its events (recording.py). The answer is stored
   when the finish event arrives, before it is passed on, and only when the policy allows it:
   not skipped by the request, a normal finish (stop, length, or tool calls when configured),
   temperature at or under the configured maximum. An error, a cut, a cancel or a modify closes
   this generator before any finish event, so those are never stored.

Counters for /metrics live in `CacheCounters`. Keys, prompts and answers never reach a log.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field

from server.cache.embeddings import Embedder
from server.cache.guard import same_specifics
from server.cache.key import exact_key, prompt_text, semantic_scope
from server.cache.recording import CachedAnswer, Recorder
from server.cache.store import CacheStore, StoredEntry
from server.catalog import Catalog
from server.core.events import Finished, FinishReason, Routed, StreamEvent, UsageReport
from server.core.request import ChatRequest
from server.core.session import StartUpstream
from server.errors import ProxyError

log = logging.getLogger("llmproxy.cache")

# The default similarity threshold of the semantic cache: with the near-miss guard, it keeps
# false hits under 1 % on tests/data/semantic_pairs.jsonl for the local model (python -m
# server.cache.quality prints the table).
DEFAULT_THRESHOLD = 0.80


class Pace(enum.Enum):
    RECORDED = "recorded"  # the recorded gaps between events (the first event at once)
    INSTANT = "instant"  # every event at once (yielding to the loop between them)


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    exact: bool = True
    semantic: bool = False
    threshold: float = DEFAULT_THRESHOLD
    tool_calls: bool = False  # store answers that call tools
    max_temperature: float = 1.0  # store answers sampled at most this hot (unset counts as cold)


@dataclass(frozen=True, slots=True)
class CacheSettings:
    path: str = ":memory:"
    ttl_s: float = 3600.0
    max_entries: int = 10_000
    max_bytes: int = 64 << 20
    pace: Pace = Pace.RECORDED
    default: ModelPolicy = field(default_factory=ModelPolicy)
    models: Mapping[str, ModelPolicy] = field(default_factory=dict)

    def policy(self, model: str) -> ModelPolicy:
        return self.models.get(model, self.default)


_STORED_FINISHES = frozenset({FinishReason.STOP, FinishReason.LENGTH, FinishReason.TOOL_CALLS})


@dataclass(slots=True)
class CacheCounters:
    """Running totals for /metrics (read by the metrics thread: plain ints and floats)."""

    hits_exact: int = 0
    hits_semantic: int = 0
    misses: int = 0
    stored: int = 0
    not_stored: int = 0
    lookup_us_total: int = 0
    lookups: int = 0
    saved_provider_us: int = 0  # the recorded duration of every replayed answer
    saved_tokens: int = 0  # prompt + completion tokens of every replayed answer


class ResponseCache:
    def __init__(
        self,
        settings: CacheSettings,
        store: CacheStore,
        catalog: Catalog,
        embedder: Embedder | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.store = store
        self.counters = CacheCounters()
        self._catalog = catalog
        self._embedder = embedder
        self._clock = clock
        self._sleep = sleep
        self.score_observers: list[Callable[[float], None]] = []  # the best score of each semantic lookup

    def metric_values(self) -> dict[str, float]:
        """Counters and store figures for /metrics (plain numbers: safe to read from another thread)."""
        c, s = self.counters, self.store.stats()
        return {
            "lookups_exact": c.hits_exact,
            "lookups_semantic": c.hits_semantic,
            "lookups_miss": c.misses,
            "entries": s.entries,
            "bytes": s.bytes,
            "evicted": s.evicted,
            "expired": s.expired,
            "lookup_s": c.lookup_us_total / 1e6,
        }

    def delete(self, tenant: str, model: str = "") -> int:
        return self.store.delete(tenant, model)

    async def stream(
        self,
        upstream: Callable[[ChatRequest], AsyncIterator[StreamEvent]],
        action: StartUpstream,
        tenant: str,
    ) -> AsyncGenerator[StreamEvent, None]:
        """The events of one stream: replayed from the cache or from `upstream` (recorded).
        Raises what `upstream` raises; cancelling it closes the upstream request."""
        request, control = action.request, action.cache
        policy = self.settings.policy(request.model)
        if not (policy.exact or policy.semantic) or (control.skip_read and control.skip_write):
            async with aclosing(upstream(request)) as events:  # type: ignore[type-var]
                async for event in events:
                    yield event
            return
        upstreams = [b.info.upstream_model for b in self._catalog.backends(request.model)]
        key = exact_key(request, upstreams, tenant)
        text = prompt_text(request) if policy.semantic else ""
        scope = semantic_scope(request, upstreams, tenant) if text else ""
        vector: tuple[float, ...] = ()
        if not control.skip_read:
            t0 = time.perf_counter_ns()
            hit: tuple[CachedAnswer, str, float] | None = None
            now = self._clock()
            if policy.exact:
                hit = self._load(key, now, "exact", 1.0)
            if hit is None and scope and self._embedder is not None:
                vector = await self._embed(text)
                near = self.store.nearest(scope, vector, now) if vector else None
                if near is not None:
                    for observe in self.score_observers:
                        observe(near[1])
                    if near[1] >= policy.threshold:
                        candidate = self._load(near[0], now, "semantic", near[1])
                        if candidate is not None and same_specifics(text, candidate[0].prompt):
                            hit = candidate
            self.counters.lookups += 1
            self.counters.lookup_us_total += (time.perf_counter_ns() - t0) // 1000
            if hit is not None:
                answer, kind, score = hit
                if kind == "exact":
                    self.counters.hits_exact += 1
                else:
                    self.counters.hits_semantic += 1
                self._count_saved(answer)
                async for event in self.replay(answer, kind, score):
                    yield event
                return
            self.counters.misses += 1
        store = not control.skip_write and self._storable(request, policy)
        recorder = Recorder(time.monotonic_ns())
        async with aclosing(upstream(request)) as events:  # type: ignore[type-var]
            async for event in events:
                recorder.receive(event, time.monotonic_ns())
                if store and isinstance(event, Finished):
                    recorded = recorder.answer(text)
                    if recorded is not None and event.reason in _STORED_FINISHES and (policy.tool_calls or not recorded.has_tool_calls):
                        if scope and not vector and self._embedder is not None:
                            vector = await self._embed(text)
                        self._put(key, tenant, request.model, scope if vector else "", recorded, vector, control.ttl_s)
                    else:
                        self.counters.not_stored += 1
                yield event

    async def replay(self, answer: CachedAnswer, kind: str, score: float) -> AsyncGenerator[StreamEvent, None]:
        """A recorded answer as stream events (see the module doc)."""
        saved_us = sum(gap for gap, _ in answer.events)
        yield Routed(answer.provider, answer.upstream_model, answer.deployment, cache=kind, cache_score=score, cache_saved_us=saved_us)
        paced = self.settings.pace is Pace.RECORDED
        first = True
        for gap_us, event in answer.events:
            if paced and not first and gap_us > 0:
                await self._sleep(gap_us / 1e6)
            else:
                await self._sleep(0)
            first = False
            yield event

    # -- internals -------------------------------------------------------------------------------

    def _storable(self, request: ChatRequest, policy: ModelPolicy) -> bool:
        return request.temperature is None or request.temperature <= policy.max_temperature

    def _load(self, key: str, now: float, kind: str, score: float) -> tuple[CachedAnswer, str, float] | None:
        payload = self.store.get(key, now)
        if payload is None:
            return None
        try:
            return CachedAnswer.from_bytes(payload), kind, score
        except (ValueError, KeyError, IndexError, TypeError):
            log.warning("event=cache_entry_unreadable")  # written by another version: a miss, replaced on store
            return None

    async def _embed(self, text: str) -> tuple[float, ...]:
        assert self._embedder is not None
        try:
            return await self._embedder.embed(text)
        except ProxyError as exc:  # the embeddings API failed: no semantic lookup, the stream goes on
            log.warning("event=embedding_failed code=%s", exc.code.value)
            return ()

    def _put(
        self, key: str, tenant: str, model: str, scope: str, answer: CachedAnswer, vector: tuple[float, ...], ttl_s: int
    ) -> None:
        ttl = self.settings.ttl_s if not ttl_s else min(float(ttl_s), self.settings.ttl_s)
        now = self._clock()
        self.store.put(StoredEntry(key, tenant, model, scope, answer.to_bytes(), vector, now + ttl), now)
        self.counters.stored += 1

    def _count_saved(self, answer: CachedAnswer) -> None:
        self.counters.saved_provider_us += sum(gap for gap, _ in answer.events)
        last = [e for _, e in answer.events if isinstance(e, UsageReport)]
        if last:
            self.counters.saved_tokens += last[-1].prompt_tokens + last[-1].completion_tokens
