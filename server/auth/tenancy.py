"""What one tenant (API key) sees of the others: nothing.

`Stats` rows, `WatchStats` snapshots and the dashboard feed carry key ids and stream ids; a key
reads only its own, an admin key (`cli create --admin`) every tenant's. A `WatchStats` call is
held open for as long as the client likes, so it counts as one of the key's connections, like a
`Stream` call: a key limited to N connections cannot hold more than N subscriptions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Protocol

import grpc

from server.auth.policy import AuthPolicy, Principal
from server.core.session import Session
from server.errors import ProxyError


class _HasSession(Protocol):
    session: Session


def tenant_view(principal: Principal | None, runtimes: Iterable[_HasSession]) -> tuple[str, int, int] | None:
    """None for a caller that sees everything (no keys, or an admin key); else (its key id, its
    live streams, its sessions) for `Analytics.snapshot`."""
    if principal is None or principal.admin:
        return None
    own = [r.session for r in runtimes if r.session.owner == principal.key_id]
    return principal.key_id, sum(s.live_streams for s in own), len(own)


def tenant_counts(runtimes: Iterable[_HasSession]) -> dict[str, tuple[int, int]]:
    """Every key's (live streams, sessions) on this server, for the cluster's tenant views
    (server/analytics/summary.py): what `tenant_view` counts for one key, for all at once."""
    counts: dict[str, tuple[int, int]] = {}
    for r in runtimes:
        session = r.session
        streams, sessions = counts.get(session.owner, (0, 0))
        counts[session.owner] = (streams + session.live_streams, sessions + 1)
    return counts


@asynccontextmanager
async def watching(auth: AuthPolicy | None, principal: Principal | None, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Holds one of the key's connections for the body; aborts the call RESOURCE_EXHAUSTED when
    the key holds its maximum."""
    if auth is None or principal is None:
        yield
        return
    try:
        auth.open_connection(principal)
    except ProxyError as exc:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message)
    try:
        yield
    finally:
        auth.close_connection(principal)
