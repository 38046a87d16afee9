"""The cluster's live view: summaries of several servers' windows merge into the snapshot one
server would give for all their streams."""

from __future__ import annotations

import random
import statistics
from dataclasses import replace

import orjson
import pytest

from server.analytics.cluster import aggregate_shared, shared_row
from server.analytics.live import LiveWindow
from server.analytics.requestlog import RequestLog
from server.analytics.summary import BadSummary, decode, encode, log_bucket, log_median_ms, merge, summarize_window
from server.routing.attempts import AttemptFailed, FailingOver, Retrying
from tests.unit.analytics.test_analytics import record

S = 1_000_000_000


def records(seed: int, n: int, prefix: str) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = record(
            f"{prefix}{i}",
            model=rng.choice(["demo", "other"]),
            deployment=rng.choice(["demo", "backup", ""]),
            status=rng.choice(["stop", "stop", "cancelled", "timeout"]),
            ttft_ms=rng.randint(1, 6000),
            tokens=rng.choice([0, 1, 40]),
            itl_p95_ms=rng.randint(1, 2000),
            total_ms=rng.randint(6000, 9000),
        )
        out.append(replace(r, client=rng.choice(["k1", "k2", ""]), failed=r.status == "timeout", cache=rng.choice(["", "", "exact"]),
                           cache_saved_us=rng.randint(0, 5000), cached_input_tokens=rng.randint(0, 9)))
    return out


def window(recs, breakers=None) -> LiveWindow:
    live = LiveWindow(breaker_state=(breakers or {}).get if breakers is not None else None)
    live.add(recs, 0)
    return live


def summary_of(live: LiveWindow, server: str, active=0, sessions=0, tenants=None):
    return decode(encode(summarize_window(live, server, 0, active_streams=active, sessions=sessions, tenants=tenants or {})))


def comparable(snap):
    """A snapshot without the figures that merge only approximately (the TTFT medians)."""
    snap = type(snap).FromString(snap.SerializeToString())
    for d in snap.deployments:
        d.ttft_p50_ms = 0
    snap.time_ms = 0
    snap.ux_score, snap.cache_saved_ms_1m = round(snap.ux_score, 9), round(snap.cache_saved_ms_1m, 6)  # sums in another order
    return snap


@pytest.mark.parametrize("client", [None, "k1", "k2", ""])
def test_two_servers_merge_into_the_snapshot_of_all_their_streams(client):
    a, b = records(1, 150, "a"), records(2, 90, "b")
    one = window(a + b)
    merged = merge([summary_of(window(a), "A"), summary_of(window(b), "B")], 0, client)
    alone = one.snapshot(0, 0, 0, client=client)
    assert merged.ended_1m == alone.ended_1m > 0
    assert comparable(merged) == comparable(alone)
    for m, o in zip(merged.deployments, alone.deployments):
        assert o.ttft_p50_ms * 0.97 <= m.ttft_p50_ms <= o.ttft_p50_ms * 1.03 or m.ttft_p50_ms == o.ttft_p50_ms == 0


def test_live_streams_sessions_and_throughput_add_and_a_tenant_sees_its_own_counts():
    la, lb = window([]), window([])
    la.tick(0, 0), la.tick(S, 100), lb.tick(0, 0), lb.tick(S, 50)
    sa = summary_of(la, "A", active=3, sessions=2, tenants={"k1": (2, 1), "k2": (1, 1)})
    sb = summary_of(lb, "B", active=4, sessions=4, tenants={"k1": (4, 4)})
    everyone = merge([sa, sb], 0)
    assert (everyone.active_streams, everyone.sessions, everyone.tokens_per_s) == (7, 6, 150.0)
    k1 = merge([sa, sb], 0, "k1")
    assert (k1.active_streams, k1.sessions, k1.tokens_per_s) == (6, 5, 0.0)


def test_routing_counts_add_and_the_worst_breaker_shows():
    class Router:
        observers: list = []

        def provider_of(self, name):
            return "openai"

    la = LiveWindow(breaker_state={"demo": "closed", "primary": "half_open"}.get)
    la.watch_routing(Router(), clock=lambda: 0)
    for note in (AttemptFailed("m", "primary", 1, "upstream_error", 500, False, 3, "x"), Retrying("m", "primary", 2, 5)):
        Router.observers[-1](note)
    la.add([record("x")], 0)
    lb = LiveWindow(breaker_state={"demo": "closed", "primary": "open"}.get, breaker_states=lambda: {"demo": "closed", "primary": "open", "down": "open"})
    Router.observers = []
    lb.watch_routing(Router(), clock=lambda: 0)
    Router.observers[-1](FailingOver("m", "primary", "demo", 2, 0, False))
    rows = {d.name: d for d in merge([summary_of(la, "A"), summary_of(lb, "B")], 0).deployments}
    assert (rows["primary"].failed_attempts, rows["primary"].retries, rows["primary"].failovers) == (1, 1, 1)
    assert (rows["primary"].breaker, rows["primary"].provider, rows["primary"].streams) == ("open", "openai", 0)
    assert (rows["demo"].streams, rows["demo"].breaker) == (1, "closed")
    assert (rows["down"].breaker, rows["down"].streams) == ("open", 0)


def test_the_slowest_of_the_cluster_are_the_slowest_of_the_union():
    a = [record(f"a{i}", ttft_ms=100 * i) for i in range(10)]
    b = [record(f"b{i}", ttft_ms=100 * i + 50) for i in range(10)]
    merged = merge([summary_of(window(a), "A"), summary_of(window(b), "B")], 0)
    assert [s.stream_id for s in merged.slowest] == ["b9", "a9", "b8", "a8", "b7", "a7", "b6", "a6"]


def test_log_median_is_within_two_and_a_half_percent():
    rng = random.Random(7)
    for _ in range(200):
        values = [rng.randint(1, 30_000_000) for _ in range(rng.randint(1, 50))]
        buckets: dict[int, int] = {}
        for v in values:
            buckets[log_bucket(v)] = buckets.get(log_bucket(v), 0) + 1
        exact = statistics.median(values) / 1000
        assert abs(log_median_ms(buckets) - exact) <= exact * 0.025 + 1e-9
    assert log_median_ms({}) == 0.0


def test_a_summary_of_another_version_or_corrupt_is_refused():
    good = encode(summarize_window(window([record()]), "A", 0, active_streams=0, sessions=0, tenants={}))
    with pytest.raises(BadSummary):
        decode(good.replace(b'"v":1', b'"v":2'))
    with pytest.raises(BadSummary):
        decode(good[:-5])
    with pytest.raises(BadSummary):
        decode(b'{"v":1}')


@pytest.mark.parametrize("group_by", ["model", "deployment", "provider", "client", "api"])
def test_the_shared_log_aggregates_as_the_sqlite_log(tmp_path, group_by):
    recs = records(3, 120, "s")
    log = RequestLog(tmp_path / "r.sqlite3")
    log.write(recs, now_ms=1_000_000)
    rows = [orjson.dumps(shared_row(r, f"A/{i}")) for i, r in enumerate(recs)]
    rows += rows[10:20]  # a retried pipeline wrote these twice: counted once
    shared = [b"[" + b",".join(rows[:50]) + b"]", b"[" + b",".join(rows[50:]) + b"]", b"[]"]  # as READ_SCRIPT joins them
    for client in (None, "k1", "anonymous"):
        assert aggregate_shared(shared, group_by, client) == log.stats(3600, group_by, now_ms=1_000_500, client=client)
    log.close()
