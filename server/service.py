"""The grpc.aio servicer: a thin driver around the sans-I/O sessions.

- `SessionRuntime` runs one session's upstream tasks. They belong to the session, not to a
  call: when a call drops they keep generating into the replay buffers for the grace period.
  `feed_frame`/`feed_event` are the one place that feeds the core, applies its actions and
  notifies the session's attachment.
- An attachment is what a session's frames go out through: a `Connection` (one `Stream` call:
  a reader, and a writer that drains whatever has accumulated each time it is notified, where
  token frames merge under backpressure) or a relayed connection (server/relay.py: one of the
  many connections a bridge carries over one `Relay` call). Both switch sessions on `resume`
  the same way (`LLMProxyServicer.resume`).
- Periodic jobs, each its own supervised task (server/jobs.py): expiring detached sessions,
  heartbeats and the slow-client cut-off, analytics.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import enum
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

import grpc

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from server.analytics.cluster import SharedLogUnavailable
from server.analytics.live import LiveWindow
from server.analytics.metrics import Metrics
from server.analytics.requestlog import GROUPS
from server.analytics.sink import Analytics
from server.auth.admission import ADMITTED, Admission, AdmissionQueue, ClusterAdmission, continuation, stream_id_of
from server.auth.policy import REVOKED_MESSAGE, AuthPolicy, Principal
from server.auth.tenancy import tenant_counts, tenant_view, watching
from server.cache.cache import ResponseCache
from server.catalog import Catalog
from server.core.events import Attempt, Failed, Routed, StreamEvent
from server.core.registry import SessionRegistry
from server.core.session import CancelUpstream, ForwardFrame, Session, StartUpstream, StreamRecord
from server.core.session_limits import SessionLimits
from server.errors import InternalError, ProxyError, SessionExpired, StoreUnavailable, StreamCut, TooManySessions, Unauthenticated
from server.routing import Router
from server.core.registry import EXPIRED_MESSAGE
from server.routing.policy import AfterFirstToken
from server.store.base import RedisStore, Store
from server.store.codec import load_request
from server.store.sessions import RedisSessions, SyncState
from server.tracing import TraceContext, Tracer, traceparent_of

log = logging.getLogger("llmproxy.server")


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    limits: SessionLimits = SessionLimits()
    resume_grace_s: float = 30.0
    max_sessions: int = 100_000
    slow_client_timeout_s: float = 10.0  # a write blocked this long ends the call
    tick_interval_s: float = 1.0
    takeover_s: float = 3.0  # with Redis: a dead server's streams are taken over within this


class Kick(enum.Enum):
    """Why the server ends an attachment from outside."""

    RESUMED_ELSEWHERE = "the session was resumed on another connection"
    SLOW_CLIENT = "the client reads too slowly"


class Attachment(Protocol):
    """Where an attached session's frames go: a `Stream` call or a relayed connection."""

    runtime: SessionRuntime
    write_since_ns: int  # when a blocked write began; 0 when none

    def notify(self) -> None:
        """The session has output (or its attachment changed): drain it soon."""

    def kick(self, why: Kick) -> None:
        """Ends the attachment from outside; its session is detached, not closed."""


class SessionRuntime:
    """Drives one session's upstream work."""

    def __init__(self, session: Session, router: Router, tracer: Tracer | None = None, cache: ResponseCache | None = None) -> None:
        self.session = session
        self._router = router
        self._cache = cache  # the response cache (server/cache/); None: off
        self.tracer = tracer  # OpenTelemetry (server/tracing.py); None: off
        self.trace_parent: TraceContext | None = None  # the client's traceparent, if it sent one
        self._upstreams: dict[str, asyncio.Task[None]] = {}
        self.owner: Attachment | None = None
        # The key's models and limits, checked before a start or modify reaches the session
        # (auth on): each is a new provider request (server/auth/admission.py).
        self.admit: Callable[[pb.ClientFrame], ProxyError | None] | None = None
        self.principal: Principal | None = None  # the key it was opened with (None without auth)
        # With Redis (server/store/sessions.py): the driver that writes this session there.
        self.shared: RedisSessions | None = None
        self.sync = SyncState()
        # Instead of `admit`, with the key's counters in Redis: checks are round trips, frames wait in order.
        self.admit_queue: AdmissionQueue | None = None

    def feed_frame(self, frame: pb.ClientFrame) -> None:
        shared = self.shared
        if shared is not None and not shared.store.healthy and frame.WhichOneof("kind") == "start":
            self.session.reject(frame.start.stream_id, StoreUnavailable("the session store does not answer; try again shortly", retry_after_s=1.0))
            self.wake()
            return
        if self.admit_queue is not None:
            self.admit_queue.feed(frame)  # calls receive_checked, now or after the check
            return
        refused = self.admit(frame) if self.admit is not None and frame.WhichOneof("kind") in ADMITTED else None
        self.receive_checked(frame, refused)

    def checking(self) -> bool:
        """Frames wait for their admission in Redis (the call must not end before they ran)."""
        return self.admit_queue is not None and self.admit_queue.pending

    def receive_checked(self, frame: pb.ClientFrame, refused: ProxyError | None) -> None:
        if refused is not None:  # an error with seq 0, before any upstream call
            self.session.reject(stream_id_of(frame), refused)
            self.wake()
            return
        self.session.receive_frame(frame, time.monotonic_ns())
        self.apply()

    def feed_event(self, stream_id: str, event: StreamEvent) -> bool:
        """Feeds one event of a live stream; returns whether the stream is still live."""
        if self.admit is not None and type(event) is Routed and self.session.has_content(stream_id):
            refused = self.admit(continuation(stream_id))  # a continuation is a provider request too
            event = event if refused is None else Failed(refused)
        live = self.session.receive_event(stream_id, event, time.monotonic_ns())
        owner = self.owner
        if owner is not None:
            owner.notify()
        if self.shared is not None:
            self.shared.mark(self)
        return live

    def wake(self) -> None:
        """Tells the attachment, if any, that there is output."""
        if self.owner is not None:
            self.owner.notify()

    def apply(self) -> None:
        for action in self.session.actions_to_take():
            if isinstance(action, CancelUpstream):
                task = self._upstreams.pop(action.stream_id, None)
                if task is not None:
                    task.cancel()
            elif isinstance(action, StartUpstream):
                self._upstreams[action.stream_id] = asyncio.create_task(self._run_upstream(action))
            elif isinstance(action, ForwardFrame) and self.shared is not None:
                self.shared.forward(self.session.id, action)
        if self.shared is not None:
            self.shared.mark(self)
        self.wake()

    def disown(self, stream_id: str) -> None:
        """Another server took this stream over (it thought this one dead): stop generating it."""
        task = self._upstreams.pop(stream_id, None)
        if task is not None:
            task.cancel()

    async def aclose(self) -> None:
        """Cancels every upstream task and waits for their cleanup (closing HTTP responses)."""
        if self.admit_queue is not None:
            self.admit_queue.close()
        tasks = list(self._upstreams.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_upstream(self, action: StartUpstream) -> None:
        stream_id, session = action.stream_id, self.session
        tracer = self.tracer
        trace = tracer.begin_stream(session.id, stream_id, self.trace_parent) if tracer else None
        attempt_error: str | None = "cancelled"  # until the upstream work ends otherwise
        try:
            if action.partial:  # taken over from a server that died: continue its answer
                source = self._router.stream(action.request, action.partial)
            elif self._cache is None:
                source = self._router.stream(action.request)
            else:
                source = self._cache.stream(self._router.stream, action, session.owner)
            async with aclosing(source) as events:
                async for event in events:
                    if tracer and trace and isinstance(event, Attempt):  # a retry or failover replaces a failed one
                        tracer.begin_attempt(trace, event.provider, event.upstream_model, event.deployment)
                    if self.admit_queue is not None and type(event) is Routed and session.has_content(stream_id):
                        refused = await self.admit_queue.check(continuation(stream_id))  # a continuation, checked in Redis
                        event = event if refused is None else Failed(refused)
                    if not self.feed_event(stream_id, event):
                        attempt_error = None
                        return
            attempt_error = None
            if session.is_live(stream_id):  # the provider ended without a finish event
                attempt_error = "stream_cut"
                self.feed_event(stream_id, Failed(StreamCut("the provider's stream ended early")))
        except ProxyError as exc:
            attempt_error = exc.code.name.lower()
            if session.is_live(stream_id):
                self.feed_event(stream_id, Failed(exc))
        except Exception:
            attempt_error = "internal"
            log.error("stream failed with an internal error", exc_info=True)
            if session.is_live(stream_id):
                self.feed_event(stream_id, Failed(InternalError()))
        finally:
            if tracer and trace:
                tracer.end_attempt(trace, attempt_error)
            if self._upstreams.get(stream_id) is asyncio.current_task():
                del self._upstreams[stream_id]


# Kick -> the status that ends a `Stream` call.
KICK_STATUS: dict[Kick, grpc.StatusCode] = {
    Kick.RESUMED_ELSEWHERE: grpc.StatusCode.ABORTED,
    Kick.SLOW_CLIENT: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class Connection:
    """Drives one `Stream` call."""

    def __init__(self, service: LLMProxyServicer, runtime: SessionRuntime, context: grpc.aio.ServicerContext) -> None:
        self._service = service
        self.runtime = runtime
        self._context = context
        self._reading = True
        self._wake = asyncio.Event()
        self.notify = self._wake.set
        self.write_since_ns = 0  # when the write in progress began; 0 when none
        self._kicked: Kick | None = None
        self._writer: asyncio.Task[None] | None = None

    def kick(self, why: Kick) -> None:
        """Ends the call from outside (resumed elsewhere, client too slow)."""
        if self._kicked is None:
            self._kicked = why
            if self._writer is not None:
                self._writer.cancel()

    async def run(self) -> None:
        reader = asyncio.create_task(self._read_loop())
        self._writer = writer = asyncio.create_task(self._write_loop())
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and not reader.cancelled() and reader.exception() is None:
                self._reading = False  # half-closed: finish the streams, then end the call
                self.notify()
                await asyncio.wait({writer})
            for task in (reader, writer):
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if self._kicked is not None:
                await self._context.abort(KICK_STATUS[self._kicked], self._kicked.value)
        finally:
            reader.cancel()
            writer.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            if self.runtime.owner is self:
                self._service.detach(self.runtime)

    async def _read_loop(self) -> None:
        read = self._context.read
        while True:
            frame = await read()
            if frame is grpc.aio.EOF:
                return
            if frame.WhichOneof("kind") == "resume":
                if self._service.shared is not None:
                    await self._service.resume_shared(self, frame.resume)
                else:
                    self._service.resume(self, frame.resume)
            else:
                self.runtime.feed_frame(frame)

    async def _write_loop(self) -> None:
        write = self._context.write
        while True:
            await self._wake.wait()
            self._wake.clear()
            runtime = self.runtime
            if runtime.owner is not self:
                return  # another connection resumed this session
            session = runtime.session
            now_ns = time.monotonic_ns()
            frames = session.frames_to_send(now_ns)
            if frames:
                self.write_since_ns = now_ns
                for frame in frames:
                    await write(frame)
                self.write_since_ns = 0
                if session.has_output():
                    self.notify()  # a replay goes out in pieces (Session.frames_to_send)
            if not self._reading and session.live_streams == 0 and not session.has_output() and not session.awaiting_store() and not runtime.checking():
                return


# How long a refused `Stream` call waits for the client's opening frame before its status goes out.
REFUSAL_READ_S = 1.0


async def _refuse(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    await context.abort(code, message)


async def _refuse_stream(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """Ends a `Stream` call with `code` once the client's opening frame has arrived.

    A grpc.aio client whose `write` is still in flight when the status arrives reports
    INTERNAL ("Failed execute_batch") instead of the server's code (grpc/grpc#36066): one
    refused call in five did so here. Taking the first frame first (bounded, so a silent
    client cannot hold the call) lets that write complete and the client see `code`.
    """
    try:
        await asyncio.wait_for(context.read(), REFUSAL_READ_S)
    except (asyncio.TimeoutError, grpc.RpcError, asyncio.InvalidStateError):
        pass
    await context.abort(code, message)


class LLMProxyServicer(pb_grpc.LLMProxyServicer):  # type: ignore[misc]
    def __init__(
        self,
        router: Router,
        catalog: Catalog,
        settings: ServiceSettings,
        analytics: Analytics | None = None,
        auth: AuthPolicy | None = None,
        cache: ResponseCache | None = None,
        store: Store | None = None,
    ) -> None:
        self._store = store or Store()  # memory (this process) or Redis shared by servers (server/store/)
        self._router = router
        self._cache = cache  # the response cache (server/cache/), None when off
        self._auth = auth  # None: no keys configured (loopback only, see server/main.py)
        self._catalog = catalog
        self._settings = settings
        self._analytics = analytics or Analytics(Metrics(), None, LiveWindow())
        self._tokens_gone = 0  # tokens relayed by sessions already forgotten
        self._registry = SessionRegistry(
            settings.limits,
            catalog,
            time.time_ns,
            secrets.token_urlsafe,
            resume_grace_s=settings.resume_grace_s,
            max_sessions=settings.max_sessions,
        )
        self._runtimes: dict[str, SessionRuntime] = {}
        # Redis: sessions shared with the other servers (server/store/sessions.py); None: memory.
        self.shared: RedisSessions | None = None
        if isinstance(self._store, RedisStore):
            self.shared = RedisSessions(
                self._store,
                self._runtimes.get,
                self._take_over,
                resume_grace_s=settings.resume_grace_s,
                max_frames=settings.limits.max_replay_frames,
                lease_s=settings.takeover_s,
            )

    # -- sessions --------------------------------------------------------------------------------

    def detach(self, runtime: SessionRuntime) -> None:
        runtime.owner = None
        self._registry.detach(runtime.session, time.monotonic_ns())
        shared = self.shared
        if shared is not None and not runtime.session.is_fresh():
            (shared.closed if runtime.session.closed else shared.detached)(runtime)
        if runtime.session.closed or runtime.session.is_fresh():  # nothing left to resume
            self._runtimes.pop(runtime.session.id, None)
            self._forget(runtime.session)

    def open_session(self, owner: str, api: str = "grpc") -> SessionRuntime:
        """A fresh session of `owner` (an API key id, "" without keys), not yet attached, that
        came in through `api` (for analytics). Raises `TooManySessions`."""
        session = self._registry.create(time.monotonic_ns(), owner, api)
        runtime = SessionRuntime(session, self._router, self._analytics.tracer, self._cache)
        self._runtimes[session.id] = runtime
        if self.shared is not None:
            session.persist = True
            runtime.shared = self.shared
            self.shared.attached(runtime)
        return runtime

    def resume(self, attachment: Attachment, resume: pb.Resume) -> bool:
        """Moves `attachment` from its fresh session to the one `resume` names; returns whether
        it did (otherwise the fresh session has an error frame queued)."""
        current = attachment.runtime
        target = self._registry.resume(current.session, resume, time.monotonic_ns())
        if target is current.session:
            attachment.notify()  # the error frame
            return False
        self._runtimes.pop(current.session.id, None)
        runtime = self._runtimes[target.id]
        previous = runtime.owner
        runtime.owner = attachment
        attachment.runtime = runtime
        if previous is not None:
            previous.kick(Kick.RESUMED_ELSEWHERE)
        attachment.notify()
        return True

    async def resume_shared(self, attachment: Attachment, resume: pb.Resume) -> bool:
        """`resume` with Redis: the session may live (in part) on other servers. Reads it from
        the store, replays each named stream from there (or from this server when it generates
        it) and follows the streams other servers generate; returns whether it resumed."""
        shared = self.shared
        assert shared is not None
        current = attachment.runtime
        if not self._registry.check_resume(current.session, resume):
            attachment.notify()
            return False
        try:
            loaded = await shared.load(resume, current.session.owner)
        except Exception as exc:
            log.warning("resume: the store does not answer: %s", exc)
            current.session.reject("", StoreUnavailable("the session store does not answer; try again shortly", retry_after_s=1.0))
            attachment.notify()
            return False
        if current.owner is not attachment or attachment.runtime is not current:
            return False  # the connection ended (or moved) while the store answered
        if loaded is None:
            current.session.reject("", SessionExpired(EXPIRED_MESSAGE))
            attachment.notify()
            return False
        now = time.monotonic_ns()
        runtime = self._runtimes.get(resume.session_id)
        if runtime is None or runtime.session.closed:
            try:
                runtime = self._shared_runtime(resume.session_id, resume.resume_token, loaded.owner, loaded.api, now)
            except TooManySessions as exc:
                current.session.reject("", exc)
                attachment.notify()
                return False
            runtime.principal = current.principal
            if current.principal is not None:
                self._admission(current.principal, runtime)
        session = runtime.session
        session.token = resume.resume_token
        session.restore_conversations(loaded.conversations)
        for position in resume.streams:
            sid = position.stream_id
            known = loaded.requests.get(sid)
            if known is None:
                continue
            request, conversation = known
            entries = loaded.frames.get(sid, [])
            server = loaded.servers.get(sid, "")
            if session.follow(sid, server, request, conversation, [f for _, f in entries], now) and server != shared.me:
                shared.follow(runtime, sid, entries[-1][0] if entries else f"{position.last_seq}-0".encode())
        self._registry.swap(current.session, session, resume, now)
        self._runtimes.pop(current.session.id, None)
        previous = runtime.owner
        runtime.owner = attachment
        attachment.runtime = runtime
        if previous is not None and previous is not attachment:
            previous.kick(Kick.RESUMED_ELSEWHERE)
        shared.attached(runtime)
        attachment.notify()
        return True

    def _shared_runtime(self, session_id: str, token: str, owner: str, api: str, now_ns: int) -> SessionRuntime:
        """A runtime here for a session another server began (raises `TooManySessions`)."""
        assert self.shared is not None
        session = Session(
            session_id,
            token,
            self._settings.limits,
            self._catalog,
            time.time_ns,
            now_ns,
            resume_grace_ms=int(self._settings.resume_grace_s * 1000),
            owner=owner,
            api=api,
        )
        session.persist = True
        self._registry.add(session, now_ns)
        runtime = SessionRuntime(session, self._router, self._analytics.tracer, self._cache)
        runtime.shared = self.shared
        runtime.sync.written = True
        self._runtimes[session_id] = runtime
        return runtime

    def _take_over(self, session_id: str, stream_b: bytes, request_json: bytes, frames: list[tuple[bytes, pb.ServerFrame]], meta: dict[bytes, bytes]) -> None:
        """Continues a stream of a server that died (claimed in Redis by server/store/sessions.py)."""
        now = time.monotonic_ns()
        runtime = self._runtimes.get(session_id)
        if runtime is None or runtime.session.closed:
            try:
                runtime = self._shared_runtime(session_id, "", meta.get(b"owner", b"").decode(), meta.get(b"api", b"").decode(), now)
            except TooManySessions:
                log.error("cannot take over a stream of session %s: this server holds its maximum of sessions", session_id)
                return
            self._registry.detach(runtime.session, now)  # nobody is attached here (yet)
        request, conversation = load_request(request_json)
        try:
            may_continue = self._router.route(request.model).after_first_token is AfterFirstToken.CONTINUE
        except ProxyError:
            may_continue = False
        cut = StreamCut("the server generating this stream stopped; it could not be continued")
        runtime.session.adopt(stream_b.decode(), request, conversation, [f for _, f in frames], now, may_continue, cut)
        runtime.apply()

    # -- periodic jobs (each supervised on its own by server/main.py) ---------------------------

    async def expire_sessions(self) -> None:
        """Closes sessions detached longer than the grace period (cancelling their upstreams)."""
        while True:
            await asyncio.sleep(self._settings.tick_interval_s)
            spare = await self._spared(time.monotonic_ns()) if self.shared is not None else set()
            for session in self._registry.expire(time.monotonic_ns(), spare):
                runtime = self._runtimes.pop(session.id, None)
                if runtime is not None:
                    if self.shared is not None:
                        self.shared.closed(runtime)
                    runtime.apply()
                self._forget(session)

    async def _spared(self, now_ns: int) -> set[str]:
        """With Redis: of the sessions detached here past the grace period, those that live on
        (attached on another server, or detached there more recently). One attached elsewhere
        is dropped here once no stream of it runs here."""
        assert self.shared is not None
        candidates = self._registry.expiry_candidates(now_ns)
        if not candidates:
            return set()
        try:
            verdicts = await self.shared.verdicts(candidates)
        except Exception as exc:
            log.warning("session expiry waits for the store: %s", exc)
            return {s.id for s in candidates}
        spare: set[str] = set()
        recheck_ns = now_ns - int((self._settings.resume_grace_s - 1) * 1e9)
        for session in candidates:
            verdict = verdicts.get(session.id, "expire")
            if verdict == "expire":
                continue
            spare.add(session.id)
            if verdict == "elsewhere" and not session.live_streams:
                self._registry.drop(session)
                if self._runtimes.pop(session.id, None) is not None:
                    self._forget(session)
            else:
                session.detached_ns = max(session.detached_ns, recheck_ns)
        return spare

    async def keep_alive(self) -> None:
        """Heartbeats for silent streams; ends `Stream` calls whose client stopped reading."""
        slow_ns = int(self._settings.slow_client_timeout_s * 1e9)
        while True:
            await asyncio.sleep(self._settings.tick_interval_s)
            now = time.monotonic_ns()
            for runtime in list(self._runtimes.values()):
                session = runtime.session
                if session.attached and session.live_streams:
                    session.tick(now)
                    if session.has_output():
                        runtime.wake()
                owner = runtime.owner
                if owner is not None and owner.write_since_ns and now - owner.write_since_ns > slow_ns:
                    log.warning("disconnecting a client that stopped reading; its session stays resumable")
                    owner.kick(Kick.SLOW_CLIENT)

    async def report(self) -> None:
        """Feeds ended streams to analytics (and their tokens to the keys' budgets)."""
        while True:
            await asyncio.sleep(self._settings.tick_interval_s)
            now = time.monotonic_ns()
            active = tokens = 0
            for runtime in list(self._runtimes.values()):
                session = runtime.session
                self._analytics.add(self._charged(session), now)
                active += session.live_streams
                tokens += session.tokens_relayed
            self._analytics.tick(now, active, len(self._registry), tokens + self._tokens_gone)
            self._analytics.count_tenants(lambda: tenant_counts(self._runtimes.values()))  # cluster view only
            await self._analytics.flush()

    def cancel_key_streams(self, key_id: str) -> None:
        """The key was revoked with --cancel-streams: its sessions end, their streams fail."""
        now = time.monotonic_ns()
        for runtime in list(self._runtimes.values()):
            if runtime.session.owner == key_id:
                runtime.session.fail_all(Unauthenticated(REVOKED_MESSAGE), now)
                runtime.apply()

    def _forget(self, session: Session) -> None:
        """A session leaves the server: keep its last records and its token count."""
        self._analytics.add(self._charged(session), time.monotonic_ns())
        self._tokens_gone += session.tokens_relayed

    def _charged(self, session: Session) -> list[StreamRecord]:
        """Takes the session's ended-stream records, counting their tokens against its key."""
        records = session.records()
        abandoned = session.take_abandoned_tokens()  # generations that a modify replaced
        if self._auth is not None and (records or abandoned):
            self._auth.charge(session.owner, abandoned + sum(r.completion_tokens + r.reasoning_tokens for r in records))
        return records

    # -- authentication --------------------------------------------------------------------------

    async def _authenticate(self, context: grpc.aio.ServicerContext, streaming: bool = False) -> Principal | None:
        """The caller's key (None when auth is off); aborts the call UNAUTHENTICATED."""
        if self._auth is None:
            return None
        try:
            return self._auth.authenticate(context.invocation_metadata() or ())
        except ProxyError as exc:
            await (_refuse_stream if streaming else _refuse)(context, grpc.StatusCode.UNAUTHENTICATED, exc.message)
            raise  # not reached: abort raises

    def authenticate_credential(self, credential: str) -> Principal | None:
        """The principal of a relayed connection's key (None when auth is off). Raises
        `Unauthenticated` exactly as a `Stream` call with that key would be refused."""
        if self._auth is None:
            return None
        return self._auth.authenticate((("authorization", f"Bearer {credential}"),) if credential else ())

    def admit_connection(self, principal: Principal | None, runtime: SessionRuntime) -> None:
        """Counts a connection against its key (raises `TooManyConnections`) and applies the
        key's per-start checks to its session."""
        runtime.principal = principal
        if principal is not None:
            assert self._auth is not None
            self._auth.open_connection(principal)
            self._admission(principal, runtime)

    def release_connection(self, principal: Principal | None) -> None:
        if principal is not None:
            assert self._auth is not None
            self._auth.close_connection(principal)

    def _admission(self, principal: Principal, runtime: SessionRuntime) -> None:
        """The per-request check of one key: revocation, models, rates, budget, live streams
        (in Redis across servers: server/auth/cluster.py)."""
        auth = self._auth
        assert auth is not None
        if auth.cluster is None:
            runtime.admit = Admission(auth, principal, runtime.session, self._runtimes)
        else:
            store = self._store
            check = ClusterAdmission(auth, principal, runtime.session, self._runtimes, auth.cluster, lambda: store.healthy)
            runtime.admit_queue = AdmissionQueue(check, runtime.receive_checked)

    def live_streams_by_key(self) -> dict[str, int]:
        """Live streams per API key on this server (for the counters shared across servers)."""
        live: dict[str, int] = {}
        for runtime in self._runtimes.values():
            session = runtime.session
            if session.live_streams:  # generated here (a followed stream counts where it is generated)
                live[session.owner] = live.get(session.owner, 0) + session.live_streams
        return live

    async def aclose(self) -> None:
        await asyncio.gather(*(r.aclose() for r in self._runtimes.values()))

    # -- RPCs ------------------------------------------------------------------------------------

    async def Stream(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        principal = await self._authenticate(context, streaming=True)
        if principal is not None:
            assert self._auth is not None
            try:
                self._auth.open_connection(principal)
            except ProxyError as exc:
                await _refuse_stream(context, grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message)
            try:
                await self._stream(principal, context)
            finally:
                self._auth.close_connection(principal)
        else:
            await self._stream(None, context)

    async def _stream(self, principal: Principal | None, context: grpc.aio.ServicerContext) -> None:
        try:
            runtime = self.open_session(principal.key_id if principal else "")
        except ProxyError as exc:
            await _refuse_stream(context, grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message)
            return
        runtime.principal = principal
        if principal is not None:
            self._admission(principal, runtime)
        runtime.trace_parent = traceparent_of(context.invocation_metadata())
        connection = Connection(self, runtime, context)
        runtime.owner = connection
        connection.notify()  # the `session` frame
        await connection.run()

    async def GetSession(self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext) -> pb.SessionState:
        principal = await self._authenticate(context)
        session = self._registry.get(request.session_id, request.resume_token)
        if session is not None and principal is not None and session.owner != principal.key_id:
            session = None  # another key's session: the same answer as an unknown one
        if session is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such session, or it has expired")
        assert session is not None
        return session.summary(time.monotonic_ns())

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        principal = await self._authenticate(context)  # a key reads its own rows; an admin key all
        tenant = principal.tenant() if principal is not None else None
        log_ = self._analytics.request_log
        group_by = request.group_by or "model"
        if group_by not in GROUPS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"group_by must be one of {', '.join(sorted(GROUPS))}")
        if log_ is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the request log is off (server --request-log)")
        assert log_ is not None
        try:  # this server's log, or with a shared store every server's (server/analytics/cluster.py)
            rows = await self._analytics.stats(request.window_s or 3600, group_by, tenant)
        except SharedLogUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return pb.StatsResponse(rows=[pb.StatsRow(**row) for row in rows])  # type: ignore[arg-type]

    async def WatchStats(self, request: pb.WatchStatsRequest, context: grpc.aio.ServicerContext) -> None:
        principal = await self._authenticate(context)
        interval_s = max(200, request.interval_ms or 1000) / 1000
        async with watching(self._auth, principal, context):  # counts as one of the key's connections
            while True:
                await context.write(self._analytics.snapshot(tenant_view(principal, self._runtimes.values())))
                await asyncio.sleep(interval_s)

    async def DeleteCache(self, request: pb.DeleteCacheRequest, context: grpc.aio.ServicerContext) -> pb.DeleteCacheResponse:
        principal = await self._authenticate(context)  # a key deletes its own entries only
        deleted = self._cache.delete(principal.key_id if principal else "", request.model) if self._cache else 0
        return pb.DeleteCacheResponse(deleted=deleted)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        principal = await self._authenticate(context)
        models = []
        for name in self._catalog.names():
            if principal is not None and self._auth is not None and not self._auth.may_use(principal, name):
                continue
            deployments = [
                pb.DeploymentInfo(
                    name=d.name,
                    provider=d.provider,
                    upstream_model=d.upstream_model,
                    weight=d.weight,
                    breaker_state=d.breaker,
                    inflight=d.inflight,
                    ttft_ewma_ms=d.ttft_ms,
                )
                for d in self._router.deployment_states(name)
            ]
            models.append(pb.ModelInfo(name=name, deployments=deployments))
        return pb.ListModelsResponse(models=models)
