"""Prometheus metrics, named after the OpenTelemetry gen_ai semantic conventions.

- gen_ai_server_time_to_first_token_seconds   histogram, per stream
- gen_ai_server_time_per_output_token_seconds histogram, per stream (mean gap after the first)
- gen_ai_client_token_usage                   histogram, per stream, gen_ai_token_type input|output
- llmproxy_streams_total                      counter by status
- llmproxy_stream_stalls_total, llmproxy_relay_seconds (the proxy's own share per frame, p50)
- llmproxy_active_streams, llmproxy_sessions  gauges
- llmproxy_client_streams_total, llmproxy_client_tokens_total  per client (API key id)
- llmproxy_api_streams_total, llmproxy_api_time_to_first_token_seconds  per client API (grpc,
  websocket, sse, openai.chat_completions, openai.responses, anthropic.messages)
- llmproxy_upstream_attempt_failures_total  per deployment and error code: every failed attempt
- llmproxy_upstream_retries_total           per deployment: attempts again on a deployment the
                                            request already tried
- llmproxy_upstream_failovers_total         per deployment taking over (and the one it took over
                                            from) and kind: failover (before content) or
                                            continuation (mid-answer)
- llmproxy_breaker_transitions_total        per deployment and state (open, closed)
- llmproxy_breaker_state                    per deployment: 0 closed, 1 half-open, 2 open, read
                                            from the router at each scrape
- llmproxy_cache_hits_total                 per model and kind (exact, semantic): streams replayed
                                            from the response cache
- llmproxy_cache_saved_tokens_total, llmproxy_cache_saved_provider_seconds_total  per model: the
                                            replayed answers' tokens and recorded provider time
- llmproxy_cache_lookups_total              by result (exact, semantic, miss), read at each scrape
- llmproxy_cache_entries, llmproxy_cache_bytes, llmproxy_cache_evictions_total (reason: size,
                                            expired), llmproxy_cache_lookup_seconds_total: the store
- llmproxy_cache_semantic_score             histogram: the best similarity of each semantic lookup
- llmproxy_prompt_cache_tokens_total        per model, provider and kind (read, write): prompt
                                            tokens served from / written to the providers' caches

Labels are bounded: model and deployment come from the configuration (a stream with a model
that is not configured is rejected before it exists), provider from the registry, status from
the finish-reason and error-code enums, client from the key store (key ids, "anonymous" without
keys) and only on the two per-client counters, api from a fixed set (server/relay.py), so it does not multiply the histograms. Each
server has its own registry (no module globals).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.core.session import StreamRecord


class CacheSource(Protocol):
    """What the metrics read from the response cache (server.cache.cache.ResponseCache)."""

    def metric_values(self) -> dict[str, float]: ...

    score_observers: list[Callable[[float], None]]
from server.routing.attempts import AttemptFailed, BreakerMoved, FailingOver, Note, Retrying

BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class RoutingSource(Protocol):
    """What the metrics read from the router (server.routing.Router)."""

    @property
    def observers(self) -> list[Callable[[Note], None]]: ...

    def breaker_states(self) -> dict[str, str]: ...


class _BreakerCollector(Collector):
    """llmproxy_breaker_state, read at scrape time (a cooldown ends without an event)."""

    def __init__(self, states: Callable[[], Mapping[str, str]]) -> None:
        self._states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "llmproxy_breaker_state", "Circuit breaker state per deployment: 0 closed, 1 half-open, 2 open", labels=("deployment",)
        )
        for name, state in sorted(self._states().items()):
            family.add_metric((name,), BREAKER_STATE_VALUES.get(state, 0))
        yield family

class _CacheCollector(Collector):
    """The response cache's lookups and store, read at scrape time (plain numbers, so reading
    them from the metrics thread is safe)."""

    def __init__(self, cache: CacheSource) -> None:
        self._cache = cache

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        v = self._cache.metric_values()
        lookups = CounterMetricFamily("llmproxy_cache_lookups", "Response cache lookups by result", labels=("result",))
        for result in ("exact", "semantic", "miss"):
            lookups.add_metric((result,), v.get(f"lookups_{result}", 0))
        yield lookups
        yield GaugeMetricFamily("llmproxy_cache_entries", "Entries in the response cache", value=v.get("entries", 0))
        yield GaugeMetricFamily("llmproxy_cache_bytes", "Bytes held by the response cache (answers and vectors)", value=v.get("bytes", 0))
        evictions = CounterMetricFamily("llmproxy_cache_evictions", "Entries removed by the bounds or their TTL", labels=("reason",))
        evictions.add_metric(("size",), v.get("evicted", 0))
        evictions.add_metric(("expired",), v.get("expired", 0))
        yield evictions
        yield CounterMetricFamily("llmproxy_cache_lookup_seconds", "Time spent in cache lookups (key, embedding, index)", value=v.get("lookup_s", 0))


_SCORE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.98, 0.99, 1.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
_RELAY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("gen_ai_request_model", "gen_ai_provider_name", "deployment")
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token",
            "Time to generate the first token of a stream",
            labels,
            unit="seconds",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token",
            "Time per output token after the first, per stream",
            labels,
            unit="seconds",
            buckets=_TPOT_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Histogram(
            "gen_ai_client_token_usage",
            "Tokens used per stream",
            ("gen_ai_request_model", "gen_ai_provider_name", "gen_ai_token_type"),
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.relay = Histogram(
            "llmproxy_relay",
            "The proxy's own time per frame: provider arrival to the client connection (median per stream)",
            ("gen_ai_request_model",),
            unit="seconds",
            buckets=_RELAY_BUCKETS,
            registry=self.registry,
        )
        self.streams = Counter(
            "llmproxy_streams", "Streams ended, by status", (*labels, "status"), registry=self.registry
        )
        self.stalls = Counter("llmproxy_stream_stalls", "Gaps between tokens over the stall threshold", labels, registry=self.registry)
        self.client_streams = Counter(
            "llmproxy_client_streams", "Streams ended, per client key id and status", ("client", "status"), registry=self.registry
        )
        self.client_tokens = Counter(
            "llmproxy_client_tokens", "Tokens used, per client key id", ("client", "gen_ai_token_type"), registry=self.registry
        )
        self.api_streams = Counter(
            "llmproxy_api_streams", "Streams ended, per client API and status", ("api", "status"), registry=self.registry
        )
        self.api_ttft = Histogram(
            "llmproxy_api_time_to_first_token", "Time to first token per stream, per client API", ("api",),
            unit="seconds", buckets=_TTFT_BUCKETS, registry=self.registry,
        )
        self.attempt_failures = Counter(
            "llmproxy_upstream_attempt_failures", "Upstream attempts that failed, per deployment and error code",
            ("deployment", "code"), registry=self.registry,
        )
        self.retries = Counter(
            "llmproxy_upstream_retries", "Attempts on a deployment the request had already tried", ("deployment",), registry=self.registry
        )
        self.failovers = Counter(
            "llmproxy_upstream_failovers", "Attempts moved to another deployment (kind: failover before content, continuation after)",
            ("deployment", "from_deployment", "kind"), registry=self.registry,
        )
        self.breaker_moves = Counter(
            "llmproxy_breaker_transitions", "Circuit breakers opening and closing, per deployment", ("deployment", "state"),
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "llmproxy_cache_hits", "Streams replayed from the response cache", ("gen_ai_request_model", "kind"), registry=self.registry
        )
        self.cache_saved_tokens = Counter(
            "llmproxy_cache_saved_tokens", "Tokens of the replayed answers", ("gen_ai_request_model",), registry=self.registry
        )
        self.cache_saved_time = Counter(
            "llmproxy_cache_saved_provider", "Recorded provider time of the replayed answers", ("gen_ai_request_model",),
            unit="seconds", registry=self.registry,
        )
        self.semantic_score = Histogram(
            "llmproxy_cache_semantic_score", "Best similarity of each semantic lookup", buckets=_SCORE_BUCKETS, registry=self.registry
        )
        self.prompt_cache_tokens = Counter(
            "llmproxy_prompt_cache_tokens", "Prompt tokens read from (read) or written to (write) the providers' prompt caches",
            ("gen_ai_request_model", "gen_ai_provider_name", "kind"), registry=self.registry,
        )
        self.active = Gauge("llmproxy_active_streams", "Streams generating now", registry=self.registry)
        self.sessions = Gauge("llmproxy_sessions", "Sessions held", registry=self.registry)

    def observe(self, r: StreamRecord) -> None:
        t = r.timing
        labels = (r.model, r.provider or "none", r.deployment or "none")
        if t.tokens:
            self.ttft.labels(*labels).observe(t.ttft_us / 1e6)
        if t.tokens > 1:
            span_us = t.total_us - t.ttft_us
            self.tpot.labels(*labels).observe(span_us / 1e6 / (t.tokens - 1))
        if r.prompt_tokens:
            self.tokens.labels(r.model, labels[1], "input").observe(r.prompt_tokens)
        if r.completion_tokens:
            self.tokens.labels(r.model, labels[1], "output").observe(r.completion_tokens)
        if t.relay_p50_us:
            self.relay.labels(r.model).observe(t.relay_p50_us / 1e6)
        if t.stalls:
            self.stalls.labels(*labels).inc(t.stalls)
        self.streams.labels(*labels, r.status).inc()
        if r.cache:
            self.cache_hits.labels(r.model, r.cache).inc()
            self.cache_saved_tokens.labels(r.model).inc(r.prompt_tokens + r.completion_tokens)
            self.cache_saved_time.labels(r.model).inc(r.cache_saved_us / 1e6)
        if r.cached_input_tokens:
            self.prompt_cache_tokens.labels(r.model, labels[1], "read").inc(r.cached_input_tokens)
        if r.cache_write_input_tokens:
            self.prompt_cache_tokens.labels(r.model, labels[1], "write").inc(r.cache_write_input_tokens)
        api = r.api or "grpc"
        self.api_streams.labels(api, r.status).inc()
        if t.tokens:
            self.api_ttft.labels(api).observe(t.ttft_us / 1e6)
        client = r.client or "anonymous"
        self.client_streams.labels(client, r.status).inc()
        if r.prompt_tokens:
            self.client_tokens.labels(client, "input").inc(r.prompt_tokens)
        if r.completion_tokens:
            self.client_tokens.labels(client, "output").inc(r.completion_tokens)

    def watch_routing(self, router: RoutingSource) -> None:
        """Counts the router's operator notes and exposes its breaker states."""
        router.observers.append(self.observe_routing)
        self.registry.register(_BreakerCollector(router.breaker_states))

    def watch_cache(self, cache: CacheSource) -> None:
        """Exposes the response cache's lookups and store, and its semantic scores."""
        self.registry.register(_CacheCollector(cache))
        cache.score_observers.append(self.semantic_score.observe)

    def observe_routing(self, note: Note) -> None:
        """One operator note: a failed attempt, a retry, a failover or a breaker move."""
        if isinstance(note, AttemptFailed):
            self.attempt_failures.labels(note.deployment, note.code).inc()
        elif isinstance(note, Retrying):
            self.retries.labels(note.deployment).inc()
        elif isinstance(note, FailingOver):
            kind = "continuation" if note.continuation else "failover"
            self.failovers.labels(note.deployment, note.from_deployment, kind).inc()
        elif isinstance(note, BreakerMoved):
            self.breaker_moves.labels(note.deployment, note.state).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
