"""The live window behind the dashboard: the last minute of ended streams, of the router's
failed attempts, retries and failovers per deployment, and throughput."""

from __future__ import annotations

import enum
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from llmproxy.v1 import llmproxy_pb2 as pb
from server.core.session import StreamRecord
from server.routing.attempts import AttemptFailed, FailingOver, Note, Retrying

TTFT_BOUNDS_MS = (50, 100, 250, 500, 1000, 2500, 5000, float("inf"))
ITL_BOUNDS_MS = (5, 10, 25, 50, 100, 250, 1000, float("inf"))
WINDOW_NS = 60_000_000_000


class Routing(enum.Enum):
    """What a routing note counts on the dashboard, against which deployment."""

    FAILED_ATTEMPT = "failed_attempts"  # an attempt on it failed
    RETRY = "retries"  # an attempt made on it again
    FAILOVER = "failovers"  # an attempt moved from it to another deployment


class NoteSource(Protocol):
    """The router (server.routing.Router) as the live window watches it."""

    @property
    def observers(self) -> list[Callable[[Note], None]]: ...

    def provider_of(self, deployment: str) -> str: ...


def _routing_count(note: Note) -> tuple[str, Routing] | None:
    if isinstance(note, AttemptFailed):
        return note.deployment, Routing.FAILED_ATTEMPT
    if isinstance(note, Retrying):
        return note.deployment, Routing.RETRY
    if isinstance(note, FailingOver):
        return note.from_deployment, Routing.FAILOVER
    return None


class LiveWindow:
    def __init__(
        self,
        breaker_state: Callable[[str], str] | None = None,
        slowest: int = 8,
        breaker_states: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        """`breaker_state(name)`: one deployment's breaker; `breaker_states()`: every configured
        deployment's, so one whose breaker is not closed shows even when no stream reached it
        in the last minute (an open breaker turns every request away before it)."""
        self._recent: deque[tuple[int, StreamRecord]] = deque()
        self._routing: deque[tuple[int, str, Routing]] = deque()  # one per note, never per token
        self._provider_of: Callable[[str], str] = lambda name: ""
        self._breaker_state = breaker_state
        self._breaker_states = breaker_states
        self._slowest = slowest
        self.tokens_per_s = 0.0
        self._last_tokens = -1
        self._last_ns = 0

    def add(self, records: Iterable[StreamRecord], now_ns: int) -> None:
        for r in records:
            self._recent.append((now_ns, r))

    def watch_routing(self, router: NoteSource, clock: Callable[[], int] = time.monotonic_ns) -> None:
        """Counts the router's failed attempts, retries and failovers per deployment (`clock`:
        the monotonic nanoseconds that `add` and `tick` are given)."""
        router.observers.append(lambda note: self.add_note(note, clock()))
        self._provider_of = router.provider_of  # for a deployment that served no stream

    def add_note(self, note: Note, now_ns: int) -> None:
        """One operator note of the router; the ones the dashboard counts are kept a minute."""
        counted = _routing_count(note)
        if counted is not None:
            self._routing.append((now_ns, *counted))

    def tick(self, now_ns: int, tokens_total: int) -> None:
        """Once per interval: throughput since the last tick, and the window's old end."""
        if self._last_tokens >= 0 and now_ns > self._last_ns:
            self.tokens_per_s = max(0, tokens_total - self._last_tokens) / ((now_ns - self._last_ns) / 1e9)
        self._last_tokens, self._last_ns = tokens_total, now_ns
        while self._recent and now_ns - self._recent[0][0] > WINDOW_NS:
            self._recent.popleft()
        while self._routing and now_ns - self._routing[0][0] > WINDOW_NS:
            self._routing.popleft()

    # -- what the cluster's view reads (server/analytics/summary.py) -------------------------

    def records(self) -> list[StreamRecord]:
        """The window's ended streams, oldest first."""
        return [r for _, r in self._recent]

    def routing_counts(self) -> dict[str, tuple[int, int, int]]:
        """Per deployment: (failed attempts, retries, failovers) of the window."""
        counts: dict[str, list[int]] = {}
        order = (Routing.FAILED_ATTEMPT, Routing.RETRY, Routing.FAILOVER)
        for _, name, kind in self._routing:
            counts.setdefault(name, [0, 0, 0])[order.index(kind)] += 1
        return {name: (c[0], c[1], c[2]) for name, c in counts.items()}

    def provider_of(self, deployment: str) -> str:
        return self._provider_of(deployment)

    def breakers(self, names: Iterable[str]) -> dict[str, str]:
        """The breaker state of `names` and of every configured deployment whose breaker is not
        closed (empty when this window knows no breakers)."""
        states: dict[str, str] = {}
        if self._breaker_state is not None:
            states.update((name, self._breaker_state(name)) for name in names)
        if self._breaker_states is not None:
            states.update((name, state) for name, state in self._breaker_states().items() if state != "closed")
        return states

    def snapshot(self, time_ms: int, active_streams: int, sessions: int, client: str | None = None) -> pb.StatsSnapshot:
        """The live picture; with `client`, of that client's streams only (a tenant's view:
        the caller passes that client's own counts, and throughput is not shown)."""
        records = [r for _, r in self._recent if client is None or r.client == client]
        snap = pb.StatsSnapshot(
            time_ms=time_ms,
            active_streams=active_streams,
            sessions=sessions,
            tokens_per_s=round(self.tokens_per_s, 1) if client is None else 0.0,
            ended_1m=len(records),
            errors_1m=sum(r.failed for r in records),
            ux_score=statistics.fmean(r.ux_score for r in records) if records else 0.0,
            cache_hits_1m=sum(1 for r in records if r.cache),
            cache_saved_tokens_1m=sum(r.prompt_tokens + r.completion_tokens for r in records if r.cache),
            cache_saved_ms_1m=sum(r.cache_saved_us for r in records) / 1000,
            cached_input_tokens_1m=sum(r.cached_input_tokens for r in records),
        )
        snap.ttft_bounds_ms.extend(b if b != float("inf") else 0 for b in TTFT_BOUNDS_MS)
        snap.ttft_counts.extend(_histogram([r.timing.ttft_us / 1000 for r in records if r.timing.tokens], TTFT_BOUNDS_MS))
        snap.itl_bounds_ms.extend(b if b != float("inf") else 0 for b in ITL_BOUNDS_MS)
        snap.itl_counts.extend(_histogram([r.timing.itl_p95_us / 1000 for r in records if r.timing.tokens > 1], ITL_BOUNDS_MS))
        by_deployment: dict[str, list[StreamRecord]] = {}
        for r in records:
            by_deployment.setdefault(r.deployment or "(unrouted)", []).append(r)
        routing: dict[str, dict[Routing, int]] = {}
        for _, name, kind in self._routing:
            counts = routing.setdefault(name, {})
            counts[kind] = counts.get(kind, 0) + 1
        # a deployment whose attempts all failed over has no stream of its own: it shows too
        for name in sorted(by_deployment.keys() | routing.keys()):
            items = by_deployment.get(name, [])
            ttfts = [r.timing.ttft_us / 1000 for r in items if r.timing.tokens]
            counts = routing.get(name, {})
            snap.deployments.add(
                name=name,
                provider=items[-1].provider if items else self._provider_of(name),
                streams=len(items),
                errors=sum(r.failed for r in items),
                ttft_p50_ms=statistics.median(ttfts) if ttfts else 0.0,
                breaker=self._breaker_state(name) if self._breaker_state else "",
                failed_attempts=counts.get(Routing.FAILED_ATTEMPT, 0),
                retries=counts.get(Routing.RETRY, 0),
                failovers=counts.get(Routing.FAILOVER, 0),
            )
        if self._breaker_states is not None:
            for name, state in sorted(self._breaker_states().items()):
                if state != "closed" and name not in by_deployment and name not in routing:
                    snap.deployments.add(name=name, breaker=state)
        for r in sorted(records, key=lambda r: r.timing.ttft_us if r.timing.tokens else r.timing.total_us, reverse=True)[: self._slowest]:
            snap.slowest.add(
                stream_id=r.stream_id,
                model=r.model,
                deployment=r.deployment,
                ttft_ms=r.timing.ttft_us / 1000,
                total_ms=r.timing.total_us / 1000,
                tokens=r.timing.tokens,
                status=r.status,
            )
        return snap


def _histogram(values: list[float], bounds: tuple[float, ...]) -> list[int]:
    counts = [0] * len(bounds)
    for v in values:
        for i, b in enumerate(bounds):
            if v <= b:
                counts[i] += 1
                break
    return counts
