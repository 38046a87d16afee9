"""Admission of every provider request of a key: a stream's start, each `modify` (a new
generation) and each continuation the router makes after a cut (a new upstream call).

The servicer calls an `Admission` with the client frame that asks for the request (for a
continuation, `continuation(stream_id)` stands for it); it answers None, or the typed error to
refuse it with. A refused start or modify is answered with an error of `seq` 0 and changes no
stream; a refused continuation ends its stream with the error. Tokens of every attempt are
charged separately, as generations end or are abandoned (server/service.py `_charged`).

With a shared store (`--store redis://`, server/auth/cluster.py) the check is a Redis round
trip, so it is a coroutine (`ClusterAdmission`) and must not block the event loop: each runtime
then has an `AdmissionQueue` that runs the check of an admitted frame in a task, and holds every
later frame of that runtime behind it, so frames still reach the session in the order they were
sent. Frames with no check pending pass straight through, in the same call. The memory store
keeps the synchronous `Admission`, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol

from llmproxy.v1 import llmproxy_pb2 as pb
from server.auth.cluster import UNAVAILABLE_MESSAGE, ClusterKeys
from server.auth.policy import REVOKED_MESSAGE, AuthPolicy, Principal
from server.core.session import Session
from server.errors import ForbiddenModel, InternalError, ProxyError, StoreUnavailable, Unauthenticated

log = logging.getLogger("llmproxy.server")

ADMITTED = frozenset({"start", "modify"})  # the client frames that make a provider request


class _HasSession(Protocol):
    session: Session


def continuation(stream_id: str) -> pb.ClientFrame:
    """The frame that stands for a continuation of `stream_id` at admission."""
    return pb.ClientFrame(modify=pb.Modify(stream_id=stream_id))


def stream_id_of(frame: pb.ClientFrame) -> str:
    return frame.start.stream_id if frame.WhichOneof("kind") == "start" else frame.modify.stream_id


class Admission:
    """The per-request check of one key on one session: revocation, models, rates, budget and
    live streams (over all the key's sessions)."""

    def __init__(self, auth: AuthPolicy, principal: Principal, session: Session, runtimes: Mapping[str, _HasSession]) -> None:
        self._auth = auth
        self._principal = principal
        self._session = session
        self._runtimes = runtimes

    def __call__(self, frame: pb.ClientFrame) -> ProxyError | None:
        principal = self._principal
        if frame.WhichOneof("kind") == "start":
            model, own = frame.start.model, 0
        else:
            found = self._session.model_of(frame.modify.stream_id)
            if found is None:
                return None  # not a live stream: the session answers unknown_stream, no request
            model, own = found, 1  # the stream already counts among the live ones
        live = 0
        if principal.limits.concurrency:
            live = _live(self._runtimes.values(), principal.key_id) - own
        return self._auth.admit(principal, model, live)


class ClusterAdmission:
    """`Admission` with the key's counters in Redis: the local checks (revocations as last
    polled, models), then one admission script (revocation flag, live streams over every
    server, requests and tokens per minute, budget). Answers `StoreUnavailable` when Redis is
    known to be down or does not answer; never admits without an answer."""

    def __init__(
        self,
        auth: AuthPolicy,
        principal: Principal,
        session: Session,
        runtimes: Mapping[str, _HasSession],
        cluster: ClusterKeys,
        healthy: Callable[[], bool],
    ) -> None:
        self._auth = auth
        self._principal = principal
        self._session = session
        self._runtimes = runtimes
        self._cluster = cluster
        self._healthy = healthy

    async def __call__(self, frame: pb.ClientFrame) -> ProxyError | None:
        """Cancelling it is safe: nothing is counted for a check whose answer never came."""
        principal = self._principal
        if frame.WhichOneof("kind") == "start":
            model, own = frame.start.model, 0
        else:
            found = self._session.model_of(frame.modify.stream_id)
            if found is None:
                return None
            model, own = found, 1
        if self._auth.is_revoked(principal.key_id):
            return Unauthenticated(REVOKED_MESSAGE)
        if not self._auth.may_use(principal, model):
            return ForbiddenModel(f"this API key may not use model {model!r}")
        if not self._healthy():
            return StoreUnavailable(UNAVAILABLE_MESSAGE)
        key_id = principal.key_id
        live = 0
        if principal.limits.concurrency:
            # Only streams generated here count here (one followed from another server counts
            # there), and so do checks of this key still in flight on this server: two
            # connections of one key must not both take the last slot.
            own = own if frame.WhichOneof("kind") == "start" or self._session.generates(frame.modify.stream_id) else 0
            live = _live(self._runtimes.values(), key_id) - own + self._cluster.checks_in_flight(key_id)
        with self._cluster.in_flight(key_id):
            try:
                return await self._cluster.admit(key_id, principal.limits, live)
            except StoreUnavailable as exc:
                return exc


class AdmissionQueue:
    """One runtime's frames, in order, while a check is pending (see the module docstring).

    `deliver(frame, refused)` hands a frame to the session once its check is done (refused:
    the error to reject it with, else None)."""

    def __init__(
        self, check: Callable[[pb.ClientFrame], Awaitable[ProxyError | None]], deliver: Callable[[pb.ClientFrame, ProxyError | None], None]
    ) -> None:
        self._check = check
        self._deliver = deliver
        self._pending: deque[pb.ClientFrame] = deque()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> bool:
        """Frames wait for a check."""
        return bool(self._pending)

    def feed(self, frame: pb.ClientFrame) -> None:
        if not self._pending and frame.WhichOneof("kind") not in ADMITTED:
            self._deliver(frame, None)
            return
        self._pending.append(frame)
        if self._task is None:
            self._task = asyncio.create_task(self._drain())

    async def check(self, frame: pb.ClientFrame) -> ProxyError | None:
        """The check alone (a continuation's, outside the client's frame order); a bug of ours
        refuses with `InternalError`."""
        try:
            return await self._check(frame)
        except Exception:
            log.error("an admission check failed", exc_info=True)
            return InternalError()

    async def _drain(self) -> None:
        try:
            while self._pending:
                frame = self._pending[0]
                refused = await self.check(frame) if frame.WhichOneof("kind") in ADMITTED else None
                self._pending.popleft()
                try:
                    self._deliver(frame, refused)
                except Exception:  # no caller to end: log, and go on with the next frames
                    log.error("a client frame failed with an internal error", exc_info=True)
        finally:
            self._task = None

    def close(self) -> None:
        """Drops the frames still waiting (the session is going away)."""
        self._pending.clear()
        if self._task is not None:
            self._task.cancel()


def _live(runtimes: Iterable[_HasSession], key_id: str) -> int:
    return sum(r.session.live_streams for r in runtimes if r.session.owner == key_id)
