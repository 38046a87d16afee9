"""The analytics pieces, fed records directly."""

from server.analytics.live import LiveWindow
from server.analytics.metrics import Metrics
from server.analytics.requestlog import RequestLog
from server.core.session import StreamRecord
from server.core.stream import TimingSummary, ux_score

S = 1_000_000_000


def timing(ttft_ms=200, tokens=50, stalls=0, total_ms=1200, itl_p95_ms=20):
    return TimingSummary(
        ttft_us=ttft_ms * 1000, total_us=total_ms * 1000, tokens=tokens, tokens_per_s=50.0, itl_p50_us=18_000,
        itl_p95_us=itl_p95_ms * 1000, itl_p99_us=30_000, itl_max_us=40_000, stalls=stalls, relay_p50_us=80,
        relay_max_us=400, attempts=1,
    )


def record(sid="a", model="demo", deployment="demo", status="stop", failed=False, **t):
    tm = timing(**t)
    return StreamRecord("sess", sid, "key1", model, "demo", deployment, status, failed, tm, ux_score(tm, failed, 1_000_000), 7, tm.tokens, 0)


def test_ux_score_is_satisfied_tolerating_or_frustrated():
    assert ux_score(timing(ttft_ms=300), False, 1_000_000) == 1.0
    assert ux_score(timing(ttft_ms=300, stalls=1), False, 1_000_000) == 0.5
    assert ux_score(timing(ttft_ms=3000), False, 1_000_000) == 0.5
    assert ux_score(timing(ttft_ms=5000), False, 1_000_000) == 0.0
    assert ux_score(timing(ttft_ms=300), True, 1_000_000) == 0.0
    assert ux_score(timing(ttft_ms=0, tokens=0, total_ms=6000), False, 1_000_000) == 0.0  # waited, nothing came


def test_metrics_use_gen_ai_names_and_count_streams_by_status():
    m = Metrics()
    m.observe(record())
    m.observe(record(status="rate_limited", failed=True))
    text = m.exposition().decode()
    assert 'gen_ai_server_time_to_first_token_seconds_count{deployment="demo",gen_ai_provider_name="demo",gen_ai_request_model="demo"} 2.0' in text
    assert "gen_ai_server_time_per_output_token_seconds_bucket" in text
    assert 'gen_ai_client_token_usage_bucket{gen_ai_provider_name="demo",gen_ai_request_model="demo",gen_ai_token_type="output"' in text
    assert 'llmproxy_streams_total{deployment="demo",gen_ai_provider_name="demo",gen_ai_request_model="demo",status="rate_limited"} 1.0' in text
    assert 'llmproxy_client_streams_total{client="key1",status="stop"} 1.0' in text
    assert 'llmproxy_client_tokens_total{client="key1",gen_ai_token_type="output"} 100.0' in text


def test_request_log_aggregates_per_group_and_keeps_no_text(tmp_path):
    log = RequestLog(tmp_path / "r.sqlite3", retention_s=60)
    log.write([record("a", ttft_ms=100), record("b", ttft_ms=300), record("c", model="other", status="cancelled")], now_ms=1_000_000)
    rows = {r["name"]: r for r in log.stats(3600, "model", now_ms=1_000_500)}
    assert rows["demo"]["streams"] == 2 and rows["demo"]["ttft_p50_ms"] == 100.0 and rows["demo"]["ttft_p95_ms"] == 300.0
    assert rows["other"]["cancelled"] == 1
    assert [r["name"] for r in log.stats(3600, "client", now_ms=1_000_500)] == ["key1"]
    log.write([], now_ms=1_000_000 + 120_000)  # retention prunes rows older than 60 s
    assert log.stats(3600, "model", now_ms=1_200_000) == []
    log.close()


def test_live_window_snapshot_histograms_deployments_and_slowest():
    live = LiveWindow(breaker_state=lambda name: "open" if name == "bad" else "closed")
    live.add([record("fast", ttft_ms=40), record("slow", ttft_ms=3000, deployment="bad", status="timeout", failed=True)], 0)
    live.tick(0, 0)
    live.tick(1 * S, 500)
    snap = live.snapshot(123, active_streams=3, sessions=2)
    assert snap.tokens_per_s == 500 and snap.ended_1m == 2 and snap.errors_1m == 1
    assert sum(snap.ttft_counts) == 2 and snap.ttft_counts[0] == 1
    assert [(d.name, d.breaker) for d in snap.deployments] == [("bad", "open"), ("demo", "closed")]
    assert [s.stream_id for s in snap.slowest] == ["slow", "fast"]
    live.tick(62 * S, 500)
    assert live.snapshot(0, 0, 0).ended_1m == 0


def test_routing_notes_become_counters_and_breaker_states_a_gauge():
    from server.routing.attempts import AttemptFailed, BreakerMoved, FailingOver, Retrying, UsageParts

    class FakeRouter:
        def __init__(self):
            self.observers = []
            self.states = {"a": "closed", "b": "open"}

        def breaker_states(self):
            return self.states

    m, router = Metrics(), FakeRouter()
    m.watch_routing(router)
    for note in (
        AttemptFailed("m", "a", 1, "rate_limited", 429, False, 3, "rate limited"),
        AttemptFailed("m", "a", 2, "rate_limited", 429, False, 3, "rate limited"),
        Retrying("m", "a", 2, 100),
        FailingOver("m", "a", "b", 3, 0, True),
        BreakerMoved("a", "open"),
        UsageParts("m", ()),
    ):
        for observer in router.observers:
            observer(note)
    text = m.exposition().decode()
    assert 'llmproxy_upstream_attempt_failures_total{code="rate_limited",deployment="a"} 2.0' in text
    assert 'llmproxy_upstream_retries_total{deployment="a"} 1.0' in text
    assert 'llmproxy_upstream_failovers_total{deployment="b",from_deployment="a",kind="continuation"} 1.0' in text
    assert 'llmproxy_breaker_transitions_total{deployment="a",state="open"} 1.0' in text
    assert 'llmproxy_breaker_state{deployment="b"} 2.0' in text and 'llmproxy_breaker_state{deployment="a"} 0.0' in text
    router.states["b"] = "half_open"  # read at scrape time
    assert 'llmproxy_breaker_state{deployment="b"} 1.0' in m.exposition().decode()


def test_a_deployment_whose_breaker_is_open_shows_without_recent_streams():
    states = {"demo": "closed", "idle": "closed", "down": "open", "probing": "half_open"}
    live = LiveWindow(breaker_state=states.__getitem__, breaker_states=lambda: states)
    live.add([record("a")], 0)
    snap = live.snapshot(0, 0, 0)
    assert [(d.name, d.breaker, d.streams) for d in snap.deployments] == [("demo", "closed", 1), ("down", "open", 0), ("probing", "half_open", 0)]


def test_live_window_counts_failed_attempts_retries_and_failovers_per_deployment_for_a_minute():
    from server.routing.attempts import AttemptFailed, BreakerMoved, FailingOver, Retrying, UsageParts

    class FakeRouter:
        def __init__(self):
            self.observers = []

        def provider_of(self, name):
            return {"primary": "openai", "backup": "anthropic"}.get(name, "")

    clock = [0]
    router = FakeRouter()
    live = LiveWindow(breaker_state=lambda name: "open" if name == "primary" else "closed")
    live.watch_routing(router, clock=lambda: clock[0])

    def notify(*notes):
        for note in notes:
            for observer in router.observers:
                observer(note)

    # primary fails twice (retried once), then the request fails over to backup, which serves it
    notify(
        AttemptFailed("m", "primary", 1, "upstream_error", 500, False, 3, "boom"),
        Retrying("m", "primary", 2, 20),
        AttemptFailed("m", "primary", 2, "upstream_error", 500, False, 3, "boom"),
        FailingOver("m", "primary", "backup", 3, 0, False),
        BreakerMoved("primary", "open"),
        UsageParts("m", ()),
    )
    live.add([record("s1", deployment="backup")], 0)
    rows = {d.name: d for d in live.snapshot(0, 0, 0).deployments}
    # primary has no stream of its own (it never served one) and still shows, with its breaker
    assert (rows["primary"].streams, rows["primary"].breaker, rows["primary"].provider) == (0, "open", "openai")
    assert (rows["primary"].failed_attempts, rows["primary"].retries, rows["primary"].failovers) == (2, 1, 1)
    assert (rows["backup"].streams, rows["backup"].failed_attempts, rows["backup"].retries, rows["backup"].failovers) == (1, 0, 0, 0)
    # a continuation after backup failed mid-answer counts on backup, 30 s later
    clock[0] = 30 * S
    notify(AttemptFailed("m", "backup", 1, "upstream_error", 0, True, 900, "cut"), FailingOver("m", "backup", "primary", 2, 0, True))
    live.tick(30 * S, 0)
    rows = {d.name: d for d in live.snapshot(0, 0, 0).deployments}
    assert (rows["backup"].failed_attempts, rows["backup"].failovers) == (1, 1)
    assert rows["primary"].failed_attempts == 2
    # a minute after the first notes they are gone; the later ones stay
    live.tick(61 * S, 0)
    rows = {d.name: d for d in live.snapshot(0, 0, 0).deployments}
    assert "primary" not in rows
    assert (rows["backup"].streams, rows["backup"].failed_attempts, rows["backup"].failovers) == (0, 1, 1)
    live.tick(91 * S, 0)
    assert list(live.snapshot(0, 0, 0).deployments) == []


def cached_record(sid="c", **kw):
    from dataclasses import replace

    return replace(record(sid), **kw)


def test_cache_hits_and_prompt_cache_tokens_in_metrics_request_log_and_live_window(tmp_path):
    hit = cached_record("h", cache="semantic", cache_score=0.93, cache_saved_us=2_500_000)
    prompt_cached = cached_record("p", cached_input_tokens=40, cache_write_input_tokens=12)
    m = Metrics()
    for r in (record(), hit, prompt_cached):
        m.observe(r)
    text = m.exposition().decode()
    assert 'llmproxy_cache_hits_total{gen_ai_request_model="demo",kind="semantic"} 1.0' in text
    assert 'llmproxy_cache_saved_provider_seconds_total{gen_ai_request_model="demo"} 2.5' in text
    assert 'llmproxy_cache_saved_tokens_total{gen_ai_request_model="demo"} 57.0' in text  # 7 + 50
    assert 'llmproxy_prompt_cache_tokens_total{gen_ai_provider_name="demo",gen_ai_request_model="demo",kind="read"} 40.0' in text
    assert 'llmproxy_prompt_cache_tokens_total{gen_ai_provider_name="demo",gen_ai_request_model="demo",kind="write"} 12.0' in text
    log = RequestLog(tmp_path / "log.sqlite3")
    log.write([record(), hit, prompt_cached])
    (row,) = log.stats(3600)
    assert row["cache_hits"] == 1 and row["cached_input_tokens"] == 40
    log.close()
    live = LiveWindow()
    live.add([record(), hit, prompt_cached], 0)
    snap = live.snapshot(0, 0, 0)
    assert (snap.cache_hits_1m, snap.cache_saved_tokens_1m, snap.cache_saved_ms_1m, snap.cached_input_tokens_1m) == (1, 57, 2500.0, 40)


def test_a_request_log_written_before_the_cache_columns_gains_them(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE streams (ended_ms INTEGER NOT NULL, stream_id TEXT NOT NULL, model TEXT NOT NULL, provider TEXT NOT NULL, "
        "deployment TEXT NOT NULL, status TEXT NOT NULL, failed INTEGER NOT NULL, ttft_us INTEGER, total_us INTEGER, "
        "tokens INTEGER, tokens_per_s REAL, itl_p50_us INTEGER, itl_p95_us INTEGER, itl_p99_us INTEGER, "
        "itl_max_us INTEGER, stalls INTEGER, relay_p50_us INTEGER, relay_max_us INTEGER, attempts INTEGER, "
        "ux_score REAL, prompt_tokens INTEGER, completion_tokens INTEGER, reasoning_tokens INTEGER)"
    )
    db.commit()
    db.close()
    log = RequestLog(path)
    log.write([cached_record("h", cache="exact", cache_score=1.0)])
    (row,) = log.stats(3600)
    assert row["cache_hits"] == 1 and row["streams"] == 1
    log.close()
