"""A server's live window condensed so that many servers' windows merge: the cluster's view.

Theory of operation. With `--store redis://...` every server publishes, once per report tick,
a `LiveSummary` of its live window (server/analytics/live.py) and reads the others'; any server
then answers `WatchStats` with `merge(summaries)`, the same `StatsSnapshot` one server alone
would give if it had run every stream. Sans-I/O: records in, bytes out, bytes in, a snapshot
out; the driver is server/analytics/cluster.py.

What merges how. Every figure of a snapshot is a count or a sum (ended streams, errors, UX-score
sum and count, cache figures, the routing counts, the TTFT and ITL histograms over the
snapshot's fixed bounds), so it adds exactly. Two are not sums:

- a deployment's TTFT median: each server publishes a histogram of its streams' TTFTs in
  log-spaced buckets (each 5 % wider than the last, sparse), and the merged median is read from
  the summed histogram, at the bucket's geometric middle: within 2.5 % of the exact median,
  whatever the traffic. We chose the histogram over the raw recent samples because its size does
  not grow with the stream rate (at most one counter per bucket that holds a stream, about 160
  from 1 ms to 30 s), while raw samples would either grow with it or, capped, stop being exact;
- the slowest streams: each server publishes its own slowest few, and the merge keeps the
  slowest few of their union, which is exactly the slowest few overall.

Tenancy: everything that belongs to a stream is kept per client (the API key id), so a key's
view merges only its own groups, exactly as one server's view filters its own records; its
live streams and sessions come per client too. Routing counts and breaker states belong to
the deployments, not to a client, and show in every view (as on one server).

Breakers are per process: a deployment's merged state is the worst any server reports
(open > half_open > closed).

Nothing here is per token: a summary is built from the window's ended streams (one entry per
stream) once per tick.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import orjson

from llmproxy.v1 import llmproxy_pb2 as pb
from server.analytics.live import ITL_BOUNDS_MS, TTFT_BOUNDS_MS, LiveWindow
from server.core.session import StreamRecord

UNROUTED = "(unrouted)"
GROWTH = 1.05  # the log buckets of a deployment's TTFT histogram: each 5 % wider
_LOG_GROWTH = math.log(GROWTH)
BREAKER_RANK = {"closed": 0, "": 0, "half_open": 1, "open": 2}
VERSION = 1


def log_bucket(ttft_us: int) -> int:
    """The index of the log bucket holding `ttft_us` (bucket i = [GROWTH**i, GROWTH**(i+1)) us)."""
    return int(math.log(max(ttft_us, 1)) / _LOG_GROWTH)


def log_median_ms(buckets: Mapping[int, int]) -> float:
    """The median of a log-bucket histogram in ms, each value taken at its bucket's geometric
    middle (as `statistics.median`: the mean of the two middle values of an even count)."""
    total = sum(buckets.values())
    if not total:
        return 0.0
    ranks = ((total + 1) // 2,) if total % 2 else (total // 2, total // 2 + 1)
    found: list[float] = []
    seen = 0
    for index in sorted(buckets):
        seen += buckets[index]
        while len(found) < len(ranks) and seen >= ranks[len(found)]:
            found.append(float(GROWTH ** (index + 0.5)) / 1000)
    return sum(found) / len(found)


@dataclass(frozen=True, slots=True)
class Slow:
    """One of the slowest recent streams (a `RecentStream`), with the key it is ranked by."""

    rank_us: int  # TTFT, or the whole time when no token came
    stream_id: str
    model: str
    deployment: str
    ttft_ms: float
    total_ms: float
    tokens: int
    status: str


@dataclass(frozen=True, slots=True)
class DeploymentPart:
    provider: str
    streams: int
    errors: int
    ttft_buckets: Mapping[int, int]  # log bucket -> streams


@dataclass(frozen=True, slots=True)
class ClientPart:
    """One client's ended streams of the last minute on one server, as counts and sums."""

    ended: int = 0
    errors: int = 0
    ux_sum: float = 0.0
    cache_hits: int = 0
    cache_saved_tokens: int = 0
    cache_saved_ms: float = 0.0
    cached_input_tokens: int = 0
    ttft_counts: tuple[int, ...] = (0,) * len(TTFT_BOUNDS_MS)
    itl_counts: tuple[int, ...] = (0,) * len(ITL_BOUNDS_MS)
    deployments: Mapping[str, DeploymentPart] = field(default_factory=dict)
    slowest: tuple[Slow, ...] = ()


@dataclass(frozen=True, slots=True)
class LiveSummary:
    """One server's live picture, mergeable with the other servers'."""

    server_id: str
    time_ms: int
    active_streams: int
    sessions: int
    tokens_per_s: float
    tenants: Mapping[str, tuple[int, int]]  # client -> (its live streams, its sessions)
    clients: Mapping[str, ClientPart]  # client ("" without keys) -> its ended streams
    routing: Mapping[str, tuple[int, int, int]]  # deployment -> (failed attempts, retries, failovers)
    providers: Mapping[str, str]  # deployment -> provider, for the ones that appear in `routing` only
    breakers: Mapping[str, str]  # deployment -> this server's breaker state


def _histogram(values: Iterable[float], bounds: tuple[float, ...]) -> tuple[int, ...]:
    counts = [0] * len(bounds)
    for v in values:
        for i, b in enumerate(bounds):
            if v <= b:
                counts[i] += 1
                break
    return tuple(counts)


def _column_sums(rows: list[tuple[int, ...]], width: int) -> list[int]:
    return [sum(row[i] for row in rows) for i in range(width)]


def _rank_us(r: StreamRecord) -> int:
    return r.timing.ttft_us if r.timing.tokens else r.timing.total_us


def client_part(records: list[StreamRecord], slowest: int) -> ClientPart:
    """The counts and sums of one client's records (the window's, oldest first)."""
    deployments: dict[str, list[StreamRecord]] = {}
    for r in records:
        deployments.setdefault(r.deployment or UNROUTED, []).append(r)
    parts = {}
    for name, items in deployments.items():
        buckets: dict[int, int] = {}
        for r in items:
            if r.timing.tokens:
                b = log_bucket(r.timing.ttft_us)
                buckets[b] = buckets.get(b, 0) + 1
        parts[name] = DeploymentPart(items[-1].provider, len(items), sum(r.failed for r in items), buckets)
    slow = sorted(records, key=_rank_us, reverse=True)[:slowest]
    return ClientPart(
        ended=len(records),
        errors=sum(r.failed for r in records),
        ux_sum=sum(r.ux_score for r in records),
        cache_hits=sum(1 for r in records if r.cache),
        cache_saved_tokens=sum(r.prompt_tokens + r.completion_tokens for r in records if r.cache),
        cache_saved_ms=sum(r.cache_saved_us for r in records) / 1000,
        cached_input_tokens=sum(r.cached_input_tokens for r in records),
        ttft_counts=_histogram((r.timing.ttft_us / 1000 for r in records if r.timing.tokens), TTFT_BOUNDS_MS),
        itl_counts=_histogram((r.timing.itl_p95_us / 1000 for r in records if r.timing.tokens > 1), ITL_BOUNDS_MS),
        deployments=parts,
        slowest=tuple(
            Slow(_rank_us(r), r.stream_id, r.model, r.deployment, r.timing.ttft_us / 1000, r.timing.total_us / 1000, r.timing.tokens, r.status)
            for r in slow
        ),
    )


def summarize(
    server_id: str,
    time_ms: int,
    records: Iterable[StreamRecord],
    *,
    active_streams: int,
    sessions: int,
    tokens_per_s: float,
    tenants: Mapping[str, tuple[int, int]],
    routing: Mapping[str, tuple[int, int, int]],
    providers: Mapping[str, str],
    breakers: Mapping[str, str],
    slowest: int = 8,
) -> LiveSummary:
    by_client: dict[str, list[StreamRecord]] = {}
    for r in records:
        by_client.setdefault(r.client, []).append(r)
    return LiveSummary(
        server_id,
        time_ms,
        active_streams,
        sessions,
        tokens_per_s,
        dict(tenants),
        {client: client_part(items, slowest) for client, items in by_client.items()},
        dict(routing),
        dict(providers),
        dict(breakers),
    )


def summarize_window(
    window: LiveWindow,
    server_id: str,
    time_ms: int,
    *,
    active_streams: int,
    sessions: int,
    tenants: Mapping[str, tuple[int, int]],
    slowest: int = 8,
) -> LiveSummary:
    """The summary of one server's live window (at its last tick)."""
    records = window.records()
    routing = window.routing_counts()
    deployments = {r.deployment or UNROUTED for r in records}
    return summarize(
        server_id,
        time_ms,
        records,
        active_streams=active_streams,
        sessions=sessions,
        tokens_per_s=window.tokens_per_s,
        tenants=tenants,
        routing=routing,
        providers={name: window.provider_of(name) for name in routing.keys() - deployments},
        breakers=window.breakers(deployments | routing.keys()),
        slowest=slowest,
    )


# -- the wire form: compact JSON (orjson), versioned ---------------------------------------------


def encode(s: LiveSummary) -> bytes:
    return orjson.dumps(
        {
            "v": VERSION,
            "id": s.server_id,
            "t": s.time_ms,
            "a": s.active_streams,
            "s": s.sessions,
            "tps": s.tokens_per_s,
            "ten": {c: list(v) for c, v in s.tenants.items()},
            "cl": {c: _encode_part(p) for c, p in s.clients.items()},
            "rt": {d: list(v) for d, v in s.routing.items()},
            "pr": dict(s.providers),
            "br": dict(s.breakers),
        }
    )


def _encode_part(p: ClientPart) -> list[object]:
    return [
        p.ended, p.errors, p.ux_sum, p.cache_hits, p.cache_saved_tokens, p.cache_saved_ms, p.cached_input_tokens,
        list(p.ttft_counts), list(p.itl_counts),
        {name: [d.provider, d.streams, d.errors, {str(b): n for b, n in d.ttft_buckets.items()}] for name, d in p.deployments.items()},
        [[x.rank_us, x.stream_id, x.model, x.deployment, x.ttft_ms, x.total_ms, x.tokens, x.status] for x in p.slowest],
    ]


class BadSummary(ValueError):
    """Bytes that are not a summary this version reads (another version, or corrupt)."""


def decode(data: bytes) -> LiveSummary:
    """Raises `BadSummary`."""
    try:
        o = orjson.loads(data)
        if o.get("v") != VERSION:
            raise BadSummary(f"summary version {o.get('v')!r}")
        return LiveSummary(
            str(o["id"]),
            int(o["t"]),
            int(o["a"]),
            int(o["s"]),
            float(o["tps"]),
            {c: (int(v[0]), int(v[1])) for c, v in o["ten"].items()},
            {c: _decode_part(p) for c, p in o["cl"].items()},
            {d: (int(v[0]), int(v[1]), int(v[2])) for d, v in o["rt"].items()},
            {d: str(p) for d, p in o["pr"].items()},
            {d: str(b) for d, b in o["br"].items()},
        )
    except BadSummary:
        raise
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise BadSummary(f"malformed summary: {exc!r}") from exc


def _decode_part(p: list[object]) -> ClientPart:
    ended, errors, ux_sum, hits, saved_tokens, saved_ms, cached, ttft, itl, deps, slow = p
    assert isinstance(ttft, list) and isinstance(itl, list) and isinstance(deps, dict) and isinstance(slow, list)
    if len(ttft) != len(TTFT_BOUNDS_MS) or len(itl) != len(ITL_BOUNDS_MS):
        raise BadSummary("histogram bounds differ")
    return ClientPart(
        int(ended),  # type: ignore[call-overload]
        int(errors),  # type: ignore[call-overload]
        float(ux_sum),  # type: ignore[arg-type]
        int(hits),  # type: ignore[call-overload]
        int(saved_tokens),  # type: ignore[call-overload]
        float(saved_ms),  # type: ignore[arg-type]
        int(cached),  # type: ignore[call-overload]
        tuple(int(n) for n in ttft),
        tuple(int(n) for n in itl),
        {
            str(name): DeploymentPart(str(d[0]), int(d[1]), int(d[2]), {int(b): int(n) for b, n in d[3].items()})
            for name, d in deps.items()
        },
        tuple(Slow(int(x[0]), str(x[1]), str(x[2]), str(x[3]), float(x[4]), float(x[5]), int(x[6]), str(x[7])) for x in slow),
    )


# -- the merge -----------------------------------------------------------------------------------


def merge(summaries: Iterable[LiveSummary], time_ms: int, client: str | None = None, slowest: int = 8) -> pb.StatsSnapshot:
    """The cluster's snapshot: every server's, or with `client` that client's own (its live
    streams and sessions, its ended streams; no throughput), as `LiveWindow.snapshot` gives
    for one server."""
    summaries = list(summaries)
    parts = [p for s in summaries for c, p in s.clients.items() if client is None or c == client]
    if client is None:
        active = sum(s.active_streams for s in summaries)
        sessions = sum(s.sessions for s in summaries)
    else:
        active = sum(s.tenants.get(client, (0, 0))[0] for s in summaries)
        sessions = sum(s.tenants.get(client, (0, 0))[1] for s in summaries)
    ended = sum(p.ended for p in parts)
    snap = pb.StatsSnapshot(
        time_ms=time_ms,
        active_streams=active,
        sessions=sessions,
        tokens_per_s=round(sum(s.tokens_per_s for s in summaries), 1) if client is None else 0.0,
        ended_1m=ended,
        errors_1m=sum(p.errors for p in parts),
        ux_score=sum(p.ux_sum for p in parts) / ended if ended else 0.0,
        cache_hits_1m=sum(p.cache_hits for p in parts),
        cache_saved_tokens_1m=sum(p.cache_saved_tokens for p in parts),
        cache_saved_ms_1m=sum(p.cache_saved_ms for p in parts),
        cached_input_tokens_1m=sum(p.cached_input_tokens for p in parts),
    )
    snap.ttft_bounds_ms.extend(b if b != float("inf") else 0 for b in TTFT_BOUNDS_MS)
    snap.ttft_counts.extend(_column_sums([p.ttft_counts for p in parts], len(TTFT_BOUNDS_MS)))
    snap.itl_bounds_ms.extend(b if b != float("inf") else 0 for b in ITL_BOUNDS_MS)
    snap.itl_counts.extend(_column_sums([p.itl_counts for p in parts], len(ITL_BOUNDS_MS)))

    deployments: dict[str, tuple[str, int, int, dict[int, int]]] = {}
    for p in parts:
        for name, d in p.deployments.items():
            provider, streams, errors, buckets = deployments.get(name, ("", 0, 0, {}))
            for b, n in d.ttft_buckets.items():
                buckets[b] = buckets.get(b, 0) + n
            deployments[name] = (provider or d.provider, streams + d.streams, errors + d.errors, buckets)
    routing: dict[str, list[int]] = {}
    providers: dict[str, str] = {}
    breakers: dict[str, str] = {}
    for s in summaries:
        for name, counts in s.routing.items():
            total = routing.setdefault(name, [0, 0, 0])
            for i, n in enumerate(counts):
                total[i] += n
        providers.update(s.providers)
        for name, state in s.breakers.items():
            if BREAKER_RANK.get(state, 0) >= BREAKER_RANK.get(breakers.get(name, ""), 0):
                breakers[name] = state
    for name in sorted(deployments.keys() | routing.keys()):
        provider, streams, errors, buckets = deployments.get(name, ("", 0, 0, {}))
        failed, retries, failovers = routing.get(name, (0, 0, 0))
        snap.deployments.add(
            name=name,
            provider=provider or providers.get(name, ""),
            streams=streams,
            errors=errors,
            ttft_p50_ms=log_median_ms(buckets),
            breaker=breakers.get(name, ""),
            failed_attempts=failed,
            retries=retries,
            failovers=failovers,
        )
    for name, state in sorted(breakers.items()):
        if state != "closed" and state and name not in deployments and name not in routing:
            snap.deployments.add(name=name, breaker=state)
    for x in sorted((x for p in parts for x in p.slowest), key=lambda x: x.rank_us, reverse=True)[:slowest]:
        snap.slowest.add(
            stream_id=x.stream_id, model=x.model, deployment=x.deployment, ttft_ms=x.ttft_ms, total_ms=x.total_ms, tokens=x.tokens, status=x.status
        )
    return snap
