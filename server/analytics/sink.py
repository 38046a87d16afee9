"""Analytics: where ended streams go. Metrics at once, the live window at once, the request
log in batches from a worker thread (SQLite blocks)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from llmproxy.v1 import llmproxy_pb2 as pb
from server.analytics.live import LiveWindow
from server.analytics.metrics import Metrics
from server.analytics.requestlog import RequestLog
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

    def tick(self, now_ns: int, active_streams: int, sessions: int, tokens_total: int) -> None:
        if not self.enabled:
            return
        self.active_streams, self.sessions = active_streams, sessions
        self.metrics.active.set(active_streams)
        self.metrics.sessions.set(sessions)
        self.live.tick(now_ns, tokens_total)

    async def flush(self) -> None:
        """Writes pending rows to the request log (in a thread). Cancelling it is safe: the
        batch is written or kept for the next flush."""
        if self.request_log is None or not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            await asyncio.to_thread(self.request_log.write, batch)
        except Exception:
            log.error("request log write failed; %d rows dropped", len(batch), exc_info=True)

    def snapshot(self, tenant: tuple[str, int, int] | None = None) -> pb.StatsSnapshot:
        """Every tenant's picture, or with `tenant` = (client, its live streams, its sessions)
        that client's own."""
        if tenant is None:
            return self.live.snapshot(int(time.time() * 1000), self.active_streams, self.sessions)
        client, active, sessions = tenant
        return self.live.snapshot(int(time.time() * 1000), active, sessions, client=client)
