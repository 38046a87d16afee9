"""Routing: turns a request into one stream of events from the deployment that serves it.

`Router.stream()` yields a `Routed` event naming the deployment, then that deployment's provider
events. Failover, retries and load distribution belong here, behind this one method, so the
connection driver never knows how many upstream attempts a stream took.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from server.catalog import Catalog
from server.core.events import Routed, StreamEvent
from server.core.request import ChatRequest


class Router:
    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        """Yields `Routed` and then the provider events of one answer.

        Raises `UnknownModel` and the backend's `ProxyError`s. Cancelling the consumer closes the
        upstream request.
        """
        backend = self._catalog.backends(request.model)[0]
        info = backend.info
        yield Routed(provider=info.provider, upstream_model=info.upstream_model, deployment=info.name)
        async with aclosing(backend.stream(request)) as events:
            async for event in events:
                yield event
