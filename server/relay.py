"""The `Relay` service: every connection of a bridge over one gRPC call, batched per loop turn.

A bridge holds one long-lived `Relay` call and numbers the client connections it carries
(`conn`). Each one is a `RelayedConnection`: an attachment of a session exactly like a `Stream`
call (same `SessionRuntime`, same session core, same resume), except that its frames go out in
the call's shared batches instead of a call of its own.

Batching. A session with output notifies its attachment; a relayed connection only marks
itself dirty on its call and wakes the call's one writer. The writer runs once the loop turn
that woke it is done, drains every dirty connection's session (`frames_to_send`, where token
frames merge while a write is in progress) into one `RelayDown`, and writes it. A lone token
goes out at once; the tokens of 200 streams that arrived in one turn are one message. Nothing
waits on a timer. While a write is blocked by gRPC flow control (the bridge is slow as a whole),
sessions keep merging tokens; one slow browser never blocks this writer: the bridge holds what
a WebSocket cannot take yet (bridge/outbox.py).

The call's end (the bridge went away, or the relay's TCP connection was cut) detaches every
session it carried: they keep generating for the resume grace period, and the bridge
re-attaches them on a new call (`RelayOpen.resume`) with nothing lost or repeated.

Authentication: the call itself needs the relay token (`authorization: Bearer <token>`,
compared in constant time); each connection is then authenticated with the credential its
client presented, as a `Stream` call would be.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

import grpc

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from server.auth.policy import Principal, bearer_token
from server.core.session import CODE_TO_PROTO
from server.errors import Code, ProxyError
from server.service import Kick, LLMProxyServicer, SessionRuntime
from server.tracing import parse_traceparent

log = logging.getLogger("llmproxy.relay")

KICK_CODE: dict[Kick, int] = {
    Kick.RESUMED_ELSEWHERE: CODE_TO_PROTO[Code.RESUMED_ELSEWHERE],
    Kick.SLOW_CLIENT: CODE_TO_PROTO[Code.SLOW_READER],
}
_CLOSE = pb.ClientFrame(close=pb.Close())
# The client APIs a bridge may name in `RelayOpen.api` (analytics labels: a fixed set, so a
# bridge cannot grow the metrics without bound); anything else is counted as "other".
KNOWN_APIS = frozenset({"websocket", "sse", "openai.chat_completions", "openai.responses", "anthropic.messages"})


def api_label(api: str) -> str:
    """The analytics label of a relayed connection's `RelayOpen.api`."""
    if not api:
        return "websocket"
    return api if api in KNOWN_APIS else "other"


# A batch to the bridge is closed past this size (the bridge accepts messages up to 64 MiB).
MAX_BATCH_BYTES = 4 * 1024 * 1024


class RelayedConnection:
    """One client connection carried by a relay call: an attachment of one session."""

    __slots__ = ("conn", "runtime", "principal", "_call")

    write_since_ns = 0  # the bridge holds what its client cannot take; never blocked here

    def __init__(self, call: RelayCall, conn: int, runtime: SessionRuntime, principal: Principal | None) -> None:
        self._call = call
        self.conn = conn
        self.runtime = runtime
        self.principal = principal

    def notify(self) -> None:
        self._call.mark_dirty(self)

    def kick(self, why: Kick) -> None:
        self._call.end(self.conn, KICK_CODE[why], why.value)


class RelayCall:
    """Drives one `Relay` call: reads batches, feeds sessions, writes one batch per turn."""

    def __init__(self, service: LLMProxyServicer, context: grpc.aio.ServicerContext) -> None:
        self._service = service
        self._context = context
        self._conns: dict[int, RelayedConnection] = {}
        self._dirty: dict[RelayedConnection, None] = {}  # ordered set
        self._ended: list[pb.RelayDownEntry] = []
        self._wake = asyncio.Event()
        # With Redis a resume reads the store first: the connection's later entries wait here,
        # in order, until it is done (the other connections go on).
        self._waiting: dict[int, list[pb.RelayUpEntry]] = {}
        self._resumes: set[asyncio.Task[None]] = set()
        self.messages_written = 0
        self.entries_written = 0

    def mark_dirty(self, connection: RelayedConnection) -> None:
        self._dirty[connection] = None
        self._wake.set()

    def end(self, conn: int, code: int, message: str) -> None:
        """Ends one connection from the server's side: the bridge tells its client and closes."""
        connection = self._conns.pop(conn, None)
        if connection is None:
            return
        self._dirty.pop(connection, None)
        self._ended.append(pb.RelayDownEntry(conn=conn, ended=pb.RelayEnded(code=code, message=message)))  # type: ignore[arg-type]
        self._release(connection)
        self._wake.set()

    async def run(self) -> None:
        await self._context.write(pb.RelayDown())  # accepted: the bridge may count on this call
        writer = asyncio.create_task(self._write_loop())
        reader = asyncio.create_task(self._read_loop())
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            reader.cancel()
            writer.cancel()
            for task in self._resumes:
                task.cancel()
            await asyncio.shield(asyncio.gather(reader, writer, *self._resumes, return_exceptions=True))
            for connection in list(self._conns.values()):
                self._release(connection)
            self._conns.clear()

    # -- bridge -> server ------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        read = self._context.read
        while True:
            batch = await read()
            if batch is grpc.aio.EOF:
                return
            for entry in batch.entries:
                self._receive_one(entry)

    def _receive_one(self, entry: pb.RelayUpEntry) -> None:
        waiting = self._waiting.get(entry.conn)
        if waiting is not None:  # a resume of this connection is reading the store
            waiting.append(entry)
            return
        try:
            self._receive(entry)
        except Exception:  # a bug of ours: that connection ends, the others go on
            log.error("relayed connection failed with an internal error", exc_info=True)
            self.end(entry.conn, CODE_TO_PROTO[Code.INTERNAL], "internal error; details are in the server log")

    def _resume_later(self, connection: RelayedConnection, resume: pb.Resume, end_on_failure: bool) -> None:
        """A resume through the shared store (server/service.py `resume_shared`)."""
        self._waiting[connection.conn] = []
        task = asyncio.ensure_future(self._resume(connection, resume, end_on_failure))
        self._resumes.add(task)
        task.add_done_callback(self._resumes.discard)

    async def _resume(self, connection: RelayedConnection, resume: pb.Resume, end_on_failure: bool) -> None:
        conn = connection.conn
        try:
            resumed = await self._service.resume_shared(connection, resume)
        except Exception:
            log.error("resume failed with an internal error", exc_info=True)
            resumed = False
        queued = self._waiting.pop(conn, [])
        if self._conns.get(conn) is not connection:
            return
        if not resumed and end_on_failure:
            self.end(conn, CODE_TO_PROTO[Code.EXPIRED], "the session could not be resumed; it has expired")
            return
        connection.notify()
        for i, entry in enumerate(queued):
            self._receive_one(entry)
            if conn in self._waiting:  # another resume: the rest waits behind it
                self._waiting[conn].extend(queued[i + 1 :])
                return

    def _receive(self, entry: pb.RelayUpEntry) -> None:
        kind = entry.WhichOneof("kind")
        if kind == "frame":
            connection = self._conns.get(entry.conn)
            if connection is None:
                return  # ended by the server; the bridge has been told
            frame = entry.frame
            if frame.WhichOneof("kind") == "resume":
                if self._service.shared is not None:
                    self._resume_later(connection, frame.resume, False)
                else:
                    self._service.resume(connection, frame.resume)
            else:
                connection.runtime.feed_frame(frame)
        elif kind == "open":
            self._open(entry.conn, entry.open)
        elif kind == "close":
            self._close(entry.conn, entry.close.end_session)

    def _open(self, conn: int, open_: pb.RelayOpen) -> None:
        if conn in self._conns:
            self.end(conn, CODE_TO_PROTO[Code.INVALID_REQUEST], "connection number already in use")
            return
        try:
            principal = self._service.authenticate_credential(open_.credential)
            runtime = self._service.open_session(principal.key_id if principal else "", api_label(open_.api))
            runtime.trace_parent = parse_traceparent(open_.traceparent or None)
        except ProxyError as exc:
            self._refuse(conn, exc)
            return
        try:
            self._service.admit_connection(principal, runtime)
        except ProxyError as exc:
            self._service.detach(runtime)
            self._refuse(conn, exc)
            return
        connection = RelayedConnection(self, conn, runtime, principal)
        self._conns[conn] = connection
        runtime.owner = connection
        if open_.HasField("resume"):  # re-attached by the bridge: `resumed` and the replay
            if self._service.shared is not None:
                self._resume_later(connection, open_.resume, True)
                return
            if not self._service.resume(connection, open_.resume):
                self.end(conn, CODE_TO_PROTO[Code.EXPIRED], "the session could not be resumed; it has expired")
                return
        connection.notify()  # the `session` frame, or the replay

    def _refuse(self, conn: int, exc: ProxyError) -> None:
        self._ended.append(pb.RelayDownEntry(conn=conn, ended=pb.RelayEnded(code=CODE_TO_PROTO[exc.code], message=exc.message)))  # type: ignore[arg-type]
        self._wake.set()

    def _close(self, conn: int, end_session: bool) -> None:
        connection = self._conns.pop(conn, None)
        if connection is None:
            return
        self._dirty.pop(connection, None)
        if end_session and connection.runtime.owner is connection:
            connection.runtime.feed_frame(_CLOSE)  # every stream cancelled; nothing resumable
        self._release(connection)

    def _release(self, connection: RelayedConnection) -> None:
        """Detaches the connection's session (if still its own) and frees its key's slot."""
        runtime = connection.runtime
        if runtime.owner is connection:
            self._service.detach(runtime)
        self._service.release_connection(connection.principal)

    # -- server -> bridge ------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        write, wake = self._context.write, self._wake
        while True:
            await wake.wait()
            wake.clear()
            batch = pb.RelayDown()
            entries = batch.entries
            if self._dirty:
                dirty, self._dirty = self._dirty, {}
                now_ns = time.monotonic_ns()
                checked = 0
                for connection in dirty:
                    runtime = connection.runtime
                    if runtime.owner is not connection:
                        continue
                    conn = connection.conn
                    for frame in runtime.session.frames_to_send(now_ns):
                        entries.add(conn=conn, frame=frame)
                    if runtime.session.has_output():
                        connection.notify()  # a replay goes out in pieces: more next turn
                    if len(entries) - checked >= 256:  # a long backlog: stay under the bridge's limit
                        checked = len(entries)
                        if batch.ByteSize() > MAX_BATCH_BYTES:
                            self.messages_written += 1
                            self.entries_written += len(entries)
                            await write(batch)
                            batch = pb.RelayDown()
                            entries = batch.entries
                            checked = 0
            if self._ended:
                entries.extend(self._ended)
                self._ended = []
            if entries:
                self.messages_written += 1
                self.entries_written += len(entries)
                await write(batch)


class RelayServicer(pb_grpc.RelayServicer):  # type: ignore[misc]
    """The `Relay` RPC; refused (UNAUTHENTICATED) without the relay token."""

    def __init__(self, service: LLMProxyServicer, relay_token: str) -> None:
        self._service = service
        self._token = relay_token.encode()

    async def Relay(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        presented = bearer_token(context.invocation_metadata() or ())
        if not self._token or presented is None or not hmac.compare_digest(presented.encode(), self._token):
            # Read the opening batch first, as `Stream` refusals do (grpc/grpc#36066).
            try:
                await asyncio.wait_for(context.read(), 1.0)
            except (asyncio.TimeoutError, grpc.RpcError, asyncio.InvalidStateError):
                pass
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the relay is for llmproxy bridges holding the relay token")
        peer = context.peer()
        log.info("relay opened by %s", peer)
        call = RelayCall(self._service, context)
        try:
            await call.run()
        finally:
            log.info(
                "relay from %s ended: %d messages carried %d entries to the bridge", peer, call.messages_written, call.entries_written
            )
