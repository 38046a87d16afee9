"""The interface between routing and providers.

A `Backend` is one deployment: a provider, an upstream model, credentials and limits. Its
`stream()` yields typed provider events for one request. HTTP providers implement it once, in
the shared streaming driver, over a pure per-provider adapter; the demo provider implements it
directly because it has no upstream.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from server.core.events import ProviderEvent
from server.core.request import ChatRequest


@dataclass(frozen=True, slots=True)
class DeploymentInfo:
    """What a client and an operator may see of a deployment (never its key or URL)."""

    name: str
    provider: str
    upstream_model: str
    weight: float = 1.0


class Backend(Protocol):
    @property
    def info(self) -> DeploymentInfo: ...

    def stream(self, request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        """Yields the provider events of one answer, ending with `Finished`.

        Raises a `server.errors.ProxyError` subclass on failure (`CallerError` when the request
        cannot be served by this deployment, `UpstreamError` when the provider failed). A stream
        that ends without `Finished` raises `StreamCut`. Cancelling the consuming task (or
        closing the iterator) closes the upstream request at once; it is safe.
        """
        ...

    async def aclose(self) -> None:
        """Releases pooled connections."""
        ...
