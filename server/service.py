"""The grpc.aio servicer: a thin driver around the sans-I/O session.

Per `Stream` call, one `Connection`: a reader (context.read), one writer task (context.write),
and one task per upstream stream. All of them only feed the session and wake the writer through
`_feed_*`, the one place that applies the session's actions and schedules the flush. The writer
drains whatever has accumulated each time it wakes, which is where token frames merge under
backpressure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing

import grpc

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from server.catalog import Catalog
from server.core.events import Failed, StreamEvent
from server.core.session import CancelUpstream, Session, SessionLimits, StartUpstream
from server.errors import InternalError, ProxyError, StreamCut
from server.routing import Router

log = logging.getLogger("llmproxy.server")


class Connection:
    """Drives one `Stream` call."""

    def __init__(
        self, router: Router, catalog: Catalog, limits: SessionLimits, context: grpc.aio.ServicerContext
    ) -> None:
        self._router = router
        self._context = context
        self._session = Session(limits, catalog, time.time_ns)
        self._wake = asyncio.Event()
        self._upstreams: dict[str, asyncio.Task[None]] = {}
        self._reading = True

    async def run(self) -> None:
        """Serves the call until the client half-closes and every stream has ended, or until
        the call is cancelled; either way every upstream request is closed on return."""
        writer = asyncio.create_task(self._write_loop())
        try:
            await self._read_loop()
            self._reading = False
            self._wake.set()
            await writer
        finally:
            writer.cancel()
            upstreams = list(self._upstreams.values())
            for task in upstreams:
                task.cancel()
            # Let cancelled upstream tasks run their `finally` (closing HTTP responses).
            await asyncio.gather(writer, *upstreams, return_exceptions=True)

    async def _read_loop(self) -> None:
        read = self._context.read
        while True:
            frame = await read()
            if frame is grpc.aio.EOF:
                return
            self._session.receive_frame(frame, time.monotonic_ns())
            self._apply()

    async def _write_loop(self) -> None:
        session, wake, write = self._session, self._wake, self._context.write
        while True:
            await wake.wait()
            wake.clear()
            for frame in session.frames_to_send():
                await write(frame)
            if not self._reading and session.live_streams == 0 and not session.has_output():
                return

    def _feed_event(self, stream_id: str, event: StreamEvent) -> bool:
        """Feeds one event of a live stream, acts on the result; returns whether it is live."""
        live = self._session.receive_event(stream_id, event, time.monotonic_ns())
        self._wake.set()
        return live

    def _apply(self) -> None:
        for action in self._session.actions_to_take():
            if isinstance(action, StartUpstream):
                self._upstreams[action.stream_id] = asyncio.create_task(self._run_upstream(action))
            elif isinstance(action, CancelUpstream):
                task = self._upstreams.pop(action.stream_id, None)
                if task is not None:
                    task.cancel()
        self._wake.set()

    async def _run_upstream(self, action: StartUpstream) -> None:
        stream_id, session = action.stream_id, self._session
        try:
            async with aclosing(self._router.stream(action.request)) as events:
                async for event in events:
                    if not self._feed_event(stream_id, event):
                        return
            if session.is_live(stream_id):  # the provider ended without a finish event
                self._feed_event(stream_id, Failed(StreamCut("the provider's stream ended early")))
        except ProxyError as exc:
            if session.is_live(stream_id):
                self._feed_event(stream_id, Failed(exc))
        except Exception:
            log.error("stream failed with an internal error", exc_info=True)
            if session.is_live(stream_id):
                self._feed_event(stream_id, Failed(InternalError()))
        finally:
            if self._upstreams.get(stream_id) is asyncio.current_task():
                del self._upstreams[stream_id]


class LLMProxyServicer(pb_grpc.LLMProxyServicer):  # type: ignore[misc]
    def __init__(self, router: Router, catalog: Catalog, limits: SessionLimits) -> None:
        self._router = router
        self._catalog = catalog
        self._limits = limits

    async def Stream(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        await Connection(self._router, self._catalog, self._limits, context).run()

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = []
        for name in self._catalog.names():
            deployments = [
                pb.DeploymentInfo(
                    name=b.info.name,
                    provider=b.info.provider,
                    upstream_model=b.info.upstream_model,
                    weight=b.info.weight,
                )
                for b in self._catalog.backends(name)
            ]
            models.append(pb.ModelInfo(name=name, deployments=deployments))
        return pb.ListModelsResponse(models=models)
