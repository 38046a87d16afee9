"""Analytics: where ended streams go. Metrics at once, the live window at once, the request
log in batches from a worker thread (SQLite blocks), and with a shared store the cluster's view
(server/analytics/cluster.py: this server's live summary and its rows, once per report tick)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from llmproxy.v1 import llmproxy_pb2 as pb
from server.analytics.cluster import ClusterAnalytics
from server.analytics.live import LiveWindow
from server.analytics.metrics import Metrics
from server.analytics.requestlog import RequestLog
from server.analytics.summary import summarize_window
from server.core.session import StreamRecord
from server.tracing import Tracer

log = logging.getLogger("llmproxy.analytics")


class Analytics:
    def __init__(self, metrics: Metrics, request_log: RequestLog | None, live: LiveWindow, enabled: bool = True) -> None:
        self.enabled = enabled  # off: records are drained and dropped (make bench measures the cost)
        self.metrics = metrics
        self.request_log = request_log
        self.live = live
        self._pending: list[StreamRecord] = []
        self.active_streams = 0
        self.sessions = 0
        self.tracer: Tracer | None = None  # OpenTelemetry spans of ended streams (--otlp-endpoint)
        # The whole cluster's view (--store redis://...): None with the memory store.
        self.cluster: ClusterAnalytics | None = None
        self._tenants: Mapping[str, tuple[int, int]] = {}  # client -> (live streams, sessions), cluster only

    def add(self, records: Iterable[StreamRecord], now_ns: int) -> None:
        batch = list(records)
        if batch and self.tracer is not None:
            self.tracer.end_streams(batch)
        if not batch or not self.enabled:
            return
        for record in batch:
            self.metrics.observe(record)
        self.live.add(batch, now_ns)
        if self.request_log is not None:
            self._pending.extend(batch)
            if self.cluster is not None:
                self.cluster.share(batch)

    def tick(self, now_ns: int, active_streams: int, sessions: int, tokens_total: int) -> None:
        if not self.enabled:
            return
        self.active_streams, self.sessions = active_streams, sessions
        self.metrics.active.set(active_streams)
        self.metrics.sessions.set(sessions)
        self.live.tick(now_ns, tokens_total)

    def count_tenants(self, counts: Callable[[], Mapping[str, tuple[int, int]]]) -> None:
        """Each client's live streams and sessions on this server, for the cluster's tenant
        views (`counts` is only called with a cluster: it walks every session)."""
        if self.cluster is not None and self.enabled:
            self._tenants = counts()

    async def flush(self) -> None:
        """Writes pending rows to the request log (in a thread), and with a cluster publishes
        this server's live summary and rows. Cancelling it is safe: the batch is written or
        kept for the next flush."""
        if self.request_log is not None and self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self.request_log.write, batch)
            except Exception:
                log.error("request log write failed; %d rows dropped", len(batch), exc_info=True)
        if self.cluster is not None and self.enabled:
            own = summarize_window(
                self.live,
                self.cluster.server_id,
                int(time.time() * 1000),
                active_streams=self.active_streams,
                sessions=self.sessions,
                tenants=self._tenants,
            )
            await self.cluster.sync(own)

    async def stats(self, window_s: int, group_by: str, client: str | None) -> list[dict[str, float | int | str]]:
        """`Stats` rows: from the shared log with a cluster, else this server's own. Raises
        KeyError for an unknown group, `SharedLogUnavailable`; the caller checks that the
        request log is on."""
        if self.cluster is not None:
            return await self.cluster.stats(window_s, group_by, client)
        assert self.request_log is not None
        return await asyncio.to_thread(self.request_log.stats, window_s, group_by, None, client)

    def snapshot(self, tenant: tuple[str, int, int] | None = None) -> pb.StatsSnapshot:
        """Every tenant's picture, or with `tenant` = (client, its live streams, its sessions)
        that client's own."""
        if self.cluster is not None and self.cluster.ready:  # every server's, merged
            return self.cluster.snapshot(tenant[0] if tenant is not None else None)
        if tenant is None:
            return self.live.snapshot(int(time.time() * 1000), self.active_streams, self.sessions)
        client, active, sessions = tenant
        return self.live.snapshot(int(time.time() * 1000), active, sessions, client=client)
