"""The live window behind the dashboard: the last minute of ended streams, and throughput."""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from llmproxy.v1 import llmproxy_pb2 as pb
from server.core.session import StreamRecord

TTFT_BOUNDS_MS = (50, 100, 250, 500, 1000, 2500, 5000, float("inf"))
ITL_BOUNDS_MS = (5, 10, 25, 50, 100, 250, 1000, float("inf"))
WINDOW_NS = 60_000_000_000


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
        self._breaker_state = breaker_state
        self._breaker_states = breaker_states
        self._slowest = slowest
        self.tokens_per_s = 0.0
        self._last_tokens = -1
        self._last_ns = 0

    def add(self, records: Iterable[StreamRecord], now_ns: int) -> None:
        for r in records:
            self._recent.append((now_ns, r))

    def tick(self, now_ns: int, tokens_total: int) -> None:
        """Once per interval: throughput since the last tick, and the window's old end."""
        if self._last_tokens >= 0 and now_ns > self._last_ns:
            self.tokens_per_s = max(0, tokens_total - self._last_tokens) / ((now_ns - self._last_ns) / 1e9)
        self._last_tokens, self._last_ns = tokens_total, now_ns
        while self._recent and now_ns - self._recent[0][0] > WINDOW_NS:
            self._recent.popleft()

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
        )
        snap.ttft_bounds_ms.extend(b if b != float("inf") else 0 for b in TTFT_BOUNDS_MS)
        snap.ttft_counts.extend(_histogram([r.timing.ttft_us / 1000 for r in records if r.timing.tokens], TTFT_BOUNDS_MS))
        snap.itl_bounds_ms.extend(b if b != float("inf") else 0 for b in ITL_BOUNDS_MS)
        snap.itl_counts.extend(_histogram([r.timing.itl_p95_us / 1000 for r in records if r.timing.tokens > 1], ITL_BOUNDS_MS))
        by_deployment: dict[str, list[StreamRecord]] = {}
        for r in records:
            by_deployment.setdefault(r.deployment or "(unrouted)", []).append(r)
        for name, items in sorted(by_deployment.items()):
            ttfts = [r.timing.ttft_us / 1000 for r in items if r.timing.tokens]
            snap.deployments.add(
                name=name,
                provider=items[-1].provider,
                streams=len(items),
                errors=sum(r.failed for r in items),
                ttft_p50_ms=statistics.median(ttfts) if ttfts else 0.0,
                breaker=self._breaker_state(name) if self._breaker_state else "",
            )
        if self._breaker_states is not None:
            for name, state in sorted(self._breaker_states().items()):
                if state != "closed" and name not in by_deployment:
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
