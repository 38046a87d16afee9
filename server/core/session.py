"""A session: the streams of one client, multiplexed, outliving any one connection. Sans-I/O.

Theory of operation (after python-websockets' protocol.py and h11). The driver feeds the session
what happens, and the session says what to do:

    receive_frame(frame, now_ns)             a ClientFrame from the attached connection
    receive_event(stream_id, event, now_ns)  an event of a running stream (routing, provider)
    frames_to_send() -> [ServerFrame]        what to write to the attached connection, in order
    actions_to_take() -> [Action]            upstream work to start or cancel
    detach(now_ns) / resume(frame, now_ns)   the connection dropped / a new one took over
    tick(now_ns)                             heartbeats for streams that have been silent

Replay. Every frame that carries a sequence number goes into its stream's bounded replay
buffer; while a connection is attached it also goes into the outbox. When the connection drops
the streams keep generating into their buffers; a resume rebuilds the outbox from them: the
frames after the client's last sequence number, then live ones. Nothing lost, nothing repeated.
A resume names each stream at most once and at most as many streams as a session keeps
(`resume_limit`); the replay is handed out at most `REPLAY_FRAMES_PER_DRAIN` frames per
`frames_to_send`, so a long replay goes out in pieces under the connection's flow control and
never as one loop turn's work. While a stream is still being replayed its new frames wait in its
buffer behind the replay (never in the outbox), so the order within a stream holds.

Backpressure lives in the outbox: while the driver is busy writing, new tokens of a stream are
merged into that stream's token frame that has not been sent yet (text appended, `seq` moved to
the last token, `count` raised), so a slow reader gets fewer, larger frames instead of an
unbounded queue, and a lone token is never delayed. Any other frame of that stream ends the
merge so order within a stream is kept. A frame is never changed once it has been handed out.

Rejections: a frame that fails validation, names an unknown model, reuses a live id or exceeds
a limit is answered with an error carrying the id and `seq` 0: the frame was rejected and no
stream changed. An error with `seq` > 0 ends that stream.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, replace

from llmproxy.v1 import llmproxy_pb2 as pb
from server.core.events import (
    Attempt,
    AttemptEnded,
    Failed,
    Finished,
    FinishReason,
    ReasoningDelta,
    Routed,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from server.core.request import CacheControl, ChatMessage, ChatRequest
from server.core.session_limits import SessionLimits
from server.core.stream import CANCEL, MODIFY, TERMINAL, Phase, Stream, TimingSummary, ux_score
from server.core.validate import to_messages, to_request
from server.errors import (
    CallerError,
    Code,
    DuplicateStream,
    InvalidRequest,
    ProxyError,
    SessionExpired,
    TooManyStreams,
    UnknownStream,
)

__all__ = ["Action", "CancelUpstream", "Changes", "ForwardFrame", "Session", "SessionLimits", "StartUpstream", "StreamRecord"]

FINISH_TO_PROTO: dict[FinishReason, int] = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
    FinishReason.CONTENT_FILTER: pb.FINISH_REASON_CONTENT_FILTER,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}

# At most this many replayed frames per `frames_to_send`: one drain of a resume costs the same
# however many frames the named streams hold.
REPLAY_FRAMES_PER_DRAIN = 256

CODE_TO_PROTO: dict[Code, int] = {code: pb.ErrorCode.Value(f"ERROR_CODE_{code.name}") for code in Code}


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """One ended stream, for metrics and the request log: no prompt or answer text."""

    session_id: str
    stream_id: str
    client: str  # the API key id the session belongs to ("" without keys): never the key itself
    model: str
    provider: str
    deployment: str
    status: str  # a finish reason ("stop", "cancelled", ...) or an error code ("rate_limited", ...)
    failed: bool
    timing: TimingSummary
    ux_score: float
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    api: str = ""  # the client API the session came in through ("grpc", "websocket", "openai.chat_completions", ...)
    cached_input_tokens: int = 0  # from the provider's prompt cache
    cache_write_input_tokens: int = 0
    cache: str = ""  # "exact" / "semantic": replayed from the response cache
    cache_score: float = 0.0
    cache_saved_us: int = 0  # the provider time the replay saved (the recorded answer's)


@dataclass(frozen=True, slots=True)
class StartUpstream:
    stream_id: str
    request: ChatRequest
    cache: CacheControl = CacheControl()
    partial: str = ""  # a stream taken over from a server that died: the answer so far, to continue


@dataclass(frozen=True, slots=True)
class ForwardFrame:
    """A cancel or modify of a stream that another server generates (`server`): the driver
    hands it to that server through the shared store."""

    stream_id: str
    server: str
    frame: pb.ClientFrame


@dataclass(slots=True)
class Changes:
    """What a session did since the last `take_changes`, for the shared store: streams that
    started here (with their requests), the frames of each stream generated here, the streams
    that ended, and conversations whose history changed."""

    started: list[Stream]
    frames: list[tuple[Stream, list[pb.ServerFrame]]]
    ended: list[Stream]
    conversations: dict[str, list[ChatMessage]]

    def __bool__(self) -> bool:
        return bool(self.started or self.frames or self.ended or self.conversations)


@dataclass(frozen=True, slots=True)
class CancelUpstream:
    stream_id: str


Action = StartUpstream | CancelUpstream | ForwardFrame


class Session:
    def __init__(
        self,
        session_id: str,
        resume_token: str,
        limits: SessionLimits,
        known_models: Container[str],
        wall_time_ns: Callable[[], int],
        now_ns: int,
        resume_grace_ms: int = 30_000,
        owner: str = "",
        api: str = "",
    ) -> None:
        self.id = session_id
        self.token = resume_token
        self.owner = owner  # the API key id the session belongs to ("" without auth)
        self.api = api  # the client API it came in through, for analytics only
        self._limits = limits
        self._known_models = known_models
        self._wall_time_ns = wall_time_ns
        self._heartbeat_ns = int(limits.heartbeat_interval_s * 1e9)
        self._stall_ns = int(limits.stall_threshold_s * 1e9)
        self._ux_target_us = int(limits.ux_target_ttft_s * 1e6)
        self._records: list[StreamRecord] = []
        self.attached = True
        self.detached_ns = 0
        self.closed = False
        self._streams: dict[str, Stream] = {}
        self._ended: OrderedDict[str, Stream] = OrderedDict()
        self._conversations: dict[str, list[ChatMessage]] = {}
        self._outbox: list[pb.ServerFrame] = [
            pb.ServerFrame(session=pb.SessionInfo(session_id=session_id, resume_token=resume_token, resume_grace_ms=resume_grace_ms))
        ]
        # stream id -> (its unsent token frame, the frame's first arrival time, the stream, the
        # index in the stream's text parts where the frame began). The frame's text, seq and
        # count are filled in once, when it is drained or the merge ends (`_fill`), not per token.
        self._merging: dict[str, tuple[pb.TokenDelta, int, Stream, int]] = {}
        self._actions: list[Action] = []
        # Streams whose replay is still being handed out, in order: (stream, the frames left of
        # the current snapshot of its buffer, the seq handed out last).
        self._replaying: deque[_Replay] = deque()
        self._next_auto_id = 1
        self._abandoned_tokens = 0
        self.tokens_relayed = 0  # content events of every stream, for throughput figures
        # With a shared store (server/store/): what to write there at the next `take_changes`.
        # A frame of a stream generated here then goes to the client only once the store has
        # it (`release`), so a server that dies has never sent a frame that the server taking
        # over cannot see (while the store is away, the driver releases without waiting).
        self.persist = False
        self._unpersisted: dict[Stream, None] = {}  # streams with frames not yet written
        self._in_flight = 0  # frames taken for the store, not yet released
        self._started_new: list[Stream] = []
        self._ended_new: list[Stream] = []
        self._conversations_changed: set[str] = set()

    # -- queries ---------------------------------------------------------------------------------

    def is_live(self, stream_id: str) -> bool:
        return stream_id in self._streams

    def model_of(self, stream_id: str) -> str | None:
        """The model of a live stream (None when it is not live)."""
        stream = self._streams.get(stream_id)
        return stream.request.model if stream is not None else None

    def has_content(self, stream_id: str) -> bool:
        """The live stream has content: a `Routed` now starts a continuation."""
        stream = self._streams.get(stream_id)
        return stream is not None and stream.phase is Phase.STREAMING

    def take_abandoned_tokens(self) -> int:
        """Completion tokens of generations that `modify` abandoned since the last call: the
        provider produced them, so the key is charged for them."""
        tokens, self._abandoned_tokens = self._abandoned_tokens, 0
        return tokens

    @property
    def live_streams(self) -> int:
        """Live streams generated here (not those followed from another server)."""
        streams = self._streams
        if not self.persist:
            return len(streams)
        return sum(1 for stream in streams.values() if not stream.remote)

    def awaiting_store(self) -> bool:
        """Frames are on their way to the shared store; they go out when it has them."""
        return bool(self._unpersisted) or self._in_flight > 0

    def generates(self, stream_id: str) -> bool:
        """The live stream is generated here (not followed from another server)."""
        stream = self._streams.get(stream_id)
        return stream is not None and not stream.remote

    def is_fresh(self) -> bool:
        """No stream has ever run here: the session may be swapped for a resumed one."""
        return not self._streams and not self._ended and self._next_auto_id == 1

    def has_output(self) -> bool:
        return bool(self._outbox) or bool(self._replaying)

    def resume_limit(self) -> int:
        """The most streams one resume may name: every live and kept ended stream."""
        return self._limits.max_streams + self._limits.max_ended_streams

    # -- connection ------------------------------------------------------------------------------

    def detach(self, now_ns: int) -> None:
        """The connection is gone; streams go on into their replay buffers."""
        self.attached = False
        self.detached_ns = now_ns
        self._outbox.clear()
        self._replaying.clear()

    def resume(self, resume: pb.Resume, now_ns: int) -> None:
        """A new connection takes over: `resumed`, then the frames each listed stream missed.

        The caller (the registry) has checked that no stream is named twice and that at most
        `resume_limit()` are named. The replayed frames are handed out by `frames_to_send`,
        a bounded number per call."""
        self.attached = True
        self.detached_ns = 0
        for merge in self._merging.values():
            _fill(merge)
        self._merging.clear()
        self._replaying.clear()
        self._outbox = [pb.ServerFrame()]  # the `resumed` frame, filled in below
        resumed = self._outbox[0].resumed
        resumed.session_id = self.id
        for position in resume.streams:
            sid = position.stream_id
            stream = self._streams.get(sid) or self._ended.get(sid)
            entry = resumed.streams.add(stream_id=sid, after_seq=position.last_seq)
            if stream is None:
                continue
            entry.known = True
            entry.live = sid in self._streams
            frames = stream.replay_after(position.last_seq)
            if frames is None:
                self.reject(sid, SessionExpired(f"frames of stream {sid!r} after seq {position.last_seq} are no longer kept"))
                continue
            entry.replayed = len(frames)
            if frames or entry.live:
                self._replaying.append(_Replay(stream, deque(frames), position.last_seq))

    def close(self, now_ns: int) -> None:
        """Ends the session: cancels every live stream; nothing is resumable afterwards."""
        self.closed = True
        for stream in list(self._streams.values()):
            if stream.remote:
                self._actions.append(ForwardFrame(stream.id, stream.remote, pb.ClientFrame(cancel=pb.CancelStream(stream_id=stream.id))))
                continue
            stream.move(CANCEL)
            self._actions.append(CancelUpstream(stream.id))
            self._finish(stream, FinishReason.CANCELLED, now_ns)

    def fail_all(self, error: ProxyError, now_ns: int) -> None:
        """Ends the session: every live stream fails with `error` (a revoked key's streams),
        its upstream is cancelled; nothing is resumable afterwards."""
        self.closed = True
        for stream in list(self._streams.values()):
            if stream.remote:
                continue  # its own server ends it
            self._settle(stream.id)
            stream.move(Failed(error))
            self._actions.append(CancelUpstream(stream.id))
            self._fail(stream, error, now_ns)

    def tick(self, now_ns: int) -> None:
        """Sends a heartbeat for every live stream that has sent nothing for the interval."""
        if not self.attached:
            return
        for stream in self._streams.values():
            idle = now_ns - stream.last_sent_ns
            if idle >= self._heartbeat_ns:
                stream.last_sent_ns = now_ns
                self._outbox.append(pb.ServerFrame(heartbeat=pb.Heartbeat(stream_id=stream.id, idle_ms=idle // 1_000_000)))

    def summary(self, now_ns: int) -> pb.SessionState:
        state = pb.SessionState(
            session_id=self.id,
            attached=self.attached,
            detached_ms=0 if self.attached else (now_ns - self.detached_ns) // 1_000_000,
        )
        for stream in [*self._streams.values(), *self._ended.values()]:
            state.streams.add(stream_id=stream.id, phase=stream.phase.value, seq=stream.seq, model=stream.request.model)
        for name, history in self._conversations.items():
            state.conversations.add(name=name, messages=len(history))
        return state

    # -- shared store (server/store/sessions.py) -------------------------------------------------

    def take_changes(self) -> Changes:
        """What to write to the shared store since the last call. The token frames that are
        still merging are closed first (a frame is written once, final), so the store holds
        exactly the frames a client of this server gets, and a resume anywhere lines up."""
        frames: list[tuple[Stream, list[pb.ServerFrame]]] = []
        if self._unpersisted:
            streams, self._unpersisted = self._unpersisted, {}
            for stream in streams:
                self._settle(stream.id)
                new = _frames_after(stream, stream.persisted_seq)
                if new:
                    stream.persisted_seq = _seq_of(new[-1])
                    frames.append((stream, new))
                    self._in_flight += len(new)
        changes = Changes(self._started_new, frames, self._ended_new, {c: self._conversations.get(c, []) for c in self._conversations_changed})
        self._started_new, self._ended_new, self._conversations_changed = [], [], set()
        return changes

    def demote(self, stream_id: str, last_seq: int) -> None:
        """Another server took this stream over (this one was thought dead): its frames after
        `last_seq` were refused by the store and never sent; from now on the stream is
        followed like any stream another server generates."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._settle(stream_id)
        while stream.replay and _seq_of(stream.replay[-1]) > last_seq:
            stream.replay.pop()
        stream.seq = stream.persisted_seq = last_seq
        stream.remote = "?"  # a cancel asks the store who holds it now
        self._unpersisted.pop(stream, None)

    def release(self, frames: list[tuple[Stream, list[pb.ServerFrame]]], skip: Container[str] = ()) -> None:
        """Frames the store now has (from `take_changes`) go to the attached client, in order;
        those a replay already handed out are not sent again, nor those of the streams in
        `skip` (refused by the store: another server took them over)."""
        self._in_flight = max(0, self._in_flight - sum(len(batch) for _, batch in frames))
        if not self.attached:
            return
        for stream, batch in frames:
            if stream.id in skip or (self._replaying and self._is_replaying(stream)):
                continue  # the replay hands them out
            sent = stream.sent_seq
            for frame in batch:
                seq = _seq_of(frame)
                if seq > sent:
                    self._outbox.append(frame)
                    sent = seq
            stream.sent_seq = sent

    def restore_conversations(self, conversations: dict[str, list[ChatMessage]]) -> None:
        """The conversation histories as the store has them (another server may have added to them)."""
        for name, history in conversations.items():
            if not any(s.conversation == name and not s.remote for s in self._streams.values()):
                self._conversations[name] = history

    def follow(
        self, stream_id: str, server: str, request: ChatRequest, conversation: str, frames: list[pb.ServerFrame], now_ns: int
    ) -> bool:
        """Mirrors a stream that `server` generates ("" when it has ended): `frames` are its
        frames so far as the store has them (from some seq on), later ones come through
        `receive_remote`. A stream this session generates itself is left alone. Returns whether
        the stream is still live (to be followed)."""
        current = self._streams.get(stream_id) or self._ended.get(stream_id)
        if current is not None and not current.remote:
            return current.phase not in TERMINAL
        stream = Stream(stream_id, request, conversation, now_ns, self._limits.max_replay_frames)
        stream.remote = server
        stream.phase = Phase.ROUTED
        self._streams.pop(stream_id, None)
        self._ended.pop(stream_id, None)
        self._streams[stream_id] = stream
        live = True
        for frame in frames:
            live = self._mirror(stream, frame, now_ns, emit=False)
        if live and not server:  # ended, and its last frame is before the client's position
            stream.phase = Phase.DONE
            del self._streams[stream_id]
            self._ended[stream_id] = stream
            return False
        return live

    def receive_remote(self, stream_id: str, frame: pb.ServerFrame, now_ns: int) -> bool:
        """A frame of a followed stream, from the store; returns whether the stream is still
        followed (a frame already had, or of a stream no longer followed, is ignored)."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.remote:
            return False
        return self._mirror(stream, frame, now_ns, emit=True)

    def adopt(
        self, stream_id: str, request: ChatRequest, conversation: str, frames: list[pb.ServerFrame], now_ns: int, may_continue: bool, error: ProxyError
    ) -> bool:
        """Takes over a stream whose server died: it goes on here after `frames` (all of its
        frames, from the store). Nothing answered yet: the request starts again. A text answer
        begun: it is continued from that text when `may_continue` (a `StartUpstream` with
        `partial`), otherwise the stream ends with `error` carrying the partial usage (so does
        an answer with reasoning or tool calls, which cannot be continued). Returns whether
        the stream goes on."""
        old = self._streams.pop(stream_id, None) or self._ended.pop(stream_id, None)
        if old is not None:
            self._settle(stream_id)
            self._replaying = deque(r for r in self._replaying if r.stream is not old)
        stream = Stream(stream_id, request, conversation, now_ns, self._limits.max_replay_frames)
        self._streams[stream_id] = stream
        continuable = True
        for frame in frames:
            kind = frame.WhichOneof("kind")
            stream.replay.append(frame)
            stream.seq = _seq_of(frame)
            if kind == "started":
                stream.move(Routed("", "", ""))
                stream.answered()
                stream.deployment, stream.provider = frame.started.deployment, frame.started.provider
            elif kind == "token" or kind == "reasoning" or kind == "tool_call":
                if kind == "token":
                    stream.text_parts.append(frame.token.text)
                else:
                    continuable = False
                for _ in range(max(frame.token.count, 1) if kind == "token" else 1):
                    stream.mark_content(now_ns)
                stream.phase = Phase.STREAMING
            elif kind == "restarted":
                stream.restart(request, now_ns)
                stream.phase = Phase.PENDING
                continuable = True
        stream.persisted_seq = stream.seq
        if stream.phase is not Phase.STREAMING:
            self._actions.append(StartUpstream(stream_id, request, CacheControl(skip_read=True, skip_write=True)))
            return True
        if continuable and may_continue:
            partial = "".join(stream.text_parts)
            self._actions.append(StartUpstream(stream_id, request, CacheControl(skip_read=True, skip_write=True), partial=partial))
            return True
        stream.move(Failed(error))
        self._fail(stream, error, now_ns)
        return False

    def _mirror(self, stream: Stream, frame: pb.ServerFrame, now_ns: int, emit: bool) -> bool:
        seq = _seq_of(frame)
        if seq <= stream.seq:
            return True
        kind = frame.WhichOneof("kind")
        stream.seq = seq
        if kind == "token":
            stream.text_parts.append(frame.token.text)
            stream.phase = Phase.STREAMING
        elif kind == "restarted":
            stream.text_parts.clear()
        if emit:
            self._emit(stream, frame, now_ns)
        else:
            stream.replay.append(frame)
        if kind == "done" or kind == "error":
            stream.phase = Phase.DONE if kind == "done" else Phase.FAILED
            self._end(stream)
            return False
        return True

    # -- input -----------------------------------------------------------------------------------

    def receive_frame(self, frame: pb.ClientFrame, now_ns: int) -> None:
        """Handles one client frame (not `resume`: the registry handles that). Never raises for
        bad input: it answers with an error frame."""
        kind = frame.WhichOneof("kind")
        if kind == "start":
            self._start(frame.start, now_ns)
        elif kind == "cancel":
            self._cancel(frame.cancel.stream_id, now_ns)
        elif kind == "modify":
            self._modify(frame.modify, now_ns)
        elif kind == "ping":
            self._outbox.append(
                pb.ServerFrame(pong=pb.Pong(nonce=frame.ping.nonce, server_time_us=self._wall_time_ns() // 1000))
            )
        elif kind == "close":
            self.close(now_ns)
        elif kind == "resume":
            self.reject("", InvalidRequest("resume must be the first frame of a connection"))
        else:
            self.reject("", InvalidRequest("empty frame: set one of start, cancel, modify, ping, resume, close"))

    def receive_event(self, stream_id: str, event: StreamEvent, now_ns: int) -> bool:
        """Applies one event of a live stream; returns whether the stream is still live.

        Raises `IllegalTransition` if the stream's phase does not allow the event, and
        `KeyError` if the stream is not live: both are driver bugs.
        """
        stream = self._streams[stream_id]
        phase = stream.move(event)
        cls = type(event)
        if cls is TextDelta:
            self._token(stream, event.text, now_ns)  # type: ignore[union-attr]
            return True
        if cls is UsageReport:
            stream.add_usage(event)  # type: ignore[arg-type]
            return True
        if cls is Attempt:  # counted whether it answers or not; an error names its deployment
            assert isinstance(event, Attempt)
            stream.attempts += 1
            stream.deployment = event.deployment
            stream.provider = event.provider
            return True
        if cls is AttemptEnded:
            assert isinstance(event, AttemptEnded)
            stream.attempt_usage.append((event.deployment, event.usage))
            return True
        self._settle(stream_id)
        if cls is ReasoningDelta or cls is ToolCallDelta:
            self.tokens_relayed += 1
        if cls is ReasoningDelta:
            latency_us = stream.mark_content(now_ns)
            stream.seq += 1
            frame = pb.ServerFrame()
            frame.reasoning.stream_id = stream_id
            frame.reasoning.seq = stream.seq
            frame.reasoning.text = event.text  # type: ignore[union-attr]
            frame.reasoning.latency_us = latency_us
            self._emit(stream, frame, now_ns)
        elif cls is ToolCallDelta:
            assert isinstance(event, ToolCallDelta)
            latency_us = stream.mark_content(now_ns)
            stream.add_tool_call(event)
            stream.seq += 1
            call = pb.ToolCallDelta(
                stream_id=stream_id,
                seq=stream.seq,
                index=event.index,
                id=event.id,
                name=event.name,
                arguments=event.arguments,
                latency_us=latency_us,
            )
            self._emit(stream, pb.ServerFrame(tool_call=call), now_ns)
        elif cls is Routed:
            assert isinstance(event, Routed)
            stream.answered()
            stream.deployment = event.deployment
            stream.provider = event.provider
            if event.cache:
                stream.cache_hit = (event.cache, event.cache_score, event.cache_saved_us)
            if stream.seq == 0:  # the first routing; a failover before content, or a restart, sends nothing
                stream.seq = 1
                started = pb.StreamStarted(
                    stream_id=stream_id,
                    seq=1,
                    model=stream.request.model,
                    provider=event.provider,
                    upstream_model=event.upstream_model,
                    deployment=event.deployment,
                    latency_us=(now_ns - stream.started_ns) // 1000,
                )
                if event.cache:
                    started.cache.kind = event.cache
                    started.cache.score = event.cache_score
                self._emit(stream, pb.ServerFrame(started=started), now_ns)
            elif phase is Phase.STREAMING:  # continued on another deployment mid-answer
                stream.seq += 1
                failover = pb.StreamFailover(
                    stream_id=stream_id,
                    seq=stream.seq,
                    deployment=event.deployment,
                    provider=event.provider,
                    upstream_model=event.upstream_model,
                    latency_us=(now_ns - stream.last_ns) // 1000,
                )
                self._emit(stream, pb.ServerFrame(failover=failover), now_ns)
        elif phase is Phase.DONE:
            assert isinstance(event, Finished)
            self._finish(stream, event.reason, now_ns)
            return False
        elif phase is Phase.FAILED:
            assert isinstance(event, Failed)
            self._fail(stream, event.error, now_ns)
            return False
        return True

    # -- output ----------------------------------------------------------------------------------

    def frames_to_send(self, now_ns: int = 0) -> list[pb.ServerFrame]:
        """Takes what is queued for the client, in order, with at most
        `REPLAY_FRAMES_PER_DRAIN` frames of a replay in progress (call again while
        `has_output()`); merging restarts afterwards. With `now_ns`, each drained token frame's
        time in the server is recorded."""
        for merge in self._merging.values():
            _fill(merge)
            if now_ns:
                merge[2].relay_ns.append(now_ns - merge[1])
        self._merging.clear()
        frames, self._outbox = self._outbox, []
        if self._replaying:
            self._replay_into(frames)
        return frames

    def _replay_into(self, frames: list[pb.ServerFrame]) -> None:
        """Appends the next piece of the replay; a stream whose buffer is handed out in full
        leaves the replay (its later frames go to the outbox again)."""
        budget = REPLAY_FRAMES_PER_DRAIN
        replaying = self._replaying
        while replaying and budget:
            replay = replaying[0]
            pending = replay.pending
            while pending and budget:
                frame = pending.popleft()
                frames.append(frame)
                replay.last_seq = replay.stream.sent_seq = _seq_of(frame)
                budget -= 1
            if pending:
                return
            # The snapshot is out: frames emitted since then are in the stream's buffer.
            stream = replay.stream
            if stream.seq > replay.last_seq:
                more = stream.replay_after(replay.last_seq)
                if more is None:  # the stream outran its buffer while the replay went out
                    replaying.popleft()
                    self.reject(stream.id, SessionExpired(f"frames of stream {stream.id!r} after seq {replay.last_seq} are no longer kept"))
                    continue
                if more:
                    replay.pending.extend(more)
                    continue
            replaying.popleft()

    def records(self) -> list[StreamRecord]:
        """Takes the records of the streams that ended since the last call."""
        records, self._records = self._records, []
        return records

    def actions_to_take(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

    # -- internals -------------------------------------------------------------------------------

    def _settle(self, stream_id: str) -> None:
        """Ends the stream's merge, if any: its frame gets its final text, seq and count."""
        merge = self._merging.pop(stream_id, None)
        if merge is not None:
            _fill(merge)

    def _emit(self, stream: Stream, frame: pb.ServerFrame, now_ns: int) -> None:
        """Queues a frame that carries a sequence number: replay buffer, and the outbox when a
        connection is attached."""
        stream.replay.append(frame)
        stream.last_sent_ns = now_ns
        if self.persist and not stream.remote:
            self._unpersisted[stream] = None
            return  # it goes out once the store has it (`release`)
        if self.attached and not (self._replaying and self._is_replaying(stream)):
            self._outbox.append(frame)

    def _is_replaying(self, stream: Stream) -> bool:
        return any(r.stream is stream for r in self._replaying)

    def _token(self, stream: Stream, text: str, now_ns: int) -> None:
        self.tokens_relayed += 1
        latency_us = stream.mark_content(now_ns)
        stream.seq += 1
        stream.text_parts.append(text)
        if stream.id in self._merging:  # the writer is busy: this token joins the unsent frame
            stream.last_sent_ns = now_ns
            return
        frame = pb.ServerFrame()
        token = frame.token
        token.stream_id = stream.id
        token.seq = stream.seq
        token.text = text
        token.latency_us = latency_us
        self._emit(stream, frame, now_ns)
        self._merging[stream.id] = (token, now_ns, stream, len(stream.text_parts) - 1)

    def _start(self, start: pb.StartStream, now_ns: int) -> None:
        stream_id = start.stream_id
        try:
            if self.closed:
                raise InvalidRequest("the session is closed")
            if not stream_id:
                stream_id = self._auto_id()
            elif len(stream_id) > self._limits.max_stream_id_chars:
                raise InvalidRequest(f"stream id longer than {self._limits.max_stream_id_chars} characters")
            if stream_id in self._streams:
                raise DuplicateStream(f"stream {stream_id!r} is already running on this connection")
            request = to_request(start, self._limits, self._known_models)
            conversation = start.conversation
            if conversation:
                request = self._with_history(conversation, request)
            if len(self._streams) >= self._limits.max_streams:
                raise TooManyStreams(f"at most {self._limits.max_streams} concurrent streams per connection")
        except CallerError as exc:
            self.reject(stream_id, exc)
            return
        self._ended.pop(stream_id, None)
        stream = self._streams[stream_id] = Stream(stream_id, request, conversation, now_ns, self._limits.max_replay_frames)
        if self.persist:
            self._started_new.append(stream)
        control = start.cache
        self._actions.append(StartUpstream(stream_id, request, CacheControl(control.skip_read, control.skip_write, control.ttl_s)))

    def _with_history(self, conversation: str, request: ChatRequest) -> ChatRequest:
        if any(s.conversation == conversation for s in self._streams.values()):
            raise InvalidRequest(f"conversation {conversation!r} already has a running stream")
        history = self._conversations.get(conversation)
        if history is None:
            if len(self._conversations) >= self._limits.max_conversations:
                raise InvalidRequest(f"at most {self._limits.max_conversations} conversations per session")
            return request
        return replace(request, messages=(*history, *request.messages))

    def _auto_id(self) -> str:
        while True:
            candidate = f"s{self._next_auto_id}"
            self._next_auto_id += 1
            if candidate not in self._streams:
                return candidate

    def _cancel(self, stream_id: str, now_ns: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            self.reject(stream_id, UnknownStream(f"no running stream {stream_id!r} on this connection"))
            return
        if stream.remote:  # its server cancels it; the `done` comes back through the store
            self._actions.append(ForwardFrame(stream_id, stream.remote, pb.ClientFrame(cancel=pb.CancelStream(stream_id=stream_id))))
            return
        stream.move(CANCEL)
        self._actions.append(CancelUpstream(stream_id))
        self._finish(stream, FinishReason.CANCELLED, now_ns)

    def _modify(self, modify: pb.Modify, now_ns: int) -> None:
        sid = modify.stream_id
        stream = self._streams.get(sid)
        if stream is None:
            self.reject(sid, UnknownStream(f"no running stream {sid!r} to modify"))
            return
        if stream.remote:  # its server restarts it; the frames come back through the store
            self._actions.append(ForwardFrame(sid, stream.remote, pb.ClientFrame(modify=modify)))
            return
        try:
            base = to_messages(modify.messages, self._limits) if modify.messages else list(stream.request.messages)
            if modify.keep_partial:
                answer = stream.answer()
                if answer.content or answer.tool_calls:
                    base.append(answer)
            base.extend(to_messages(modify.append, self._limits, "append"))
            if not modify.messages and not modify.append:
                raise InvalidRequest("modify needs messages or append")
            if len(base) > self._limits.max_messages:
                raise InvalidRequest(f"at most {self._limits.max_messages} messages per request")
        except CallerError as exc:
            self.reject(sid, exc)
            return
        stream.move(MODIFY)
        latency_us = (now_ns - stream.last_ns) // 1000
        usage, _ = _usage(stream)
        self._abandoned_tokens += usage.completion_tokens + usage.reasoning_tokens
        request = replace(stream.request, messages=tuple(base))
        self._settle(sid)
        stream.restart(request, now_ns)
        self._actions.append(CancelUpstream(sid))
        # A modified generation is never answered from, nor stored in, the response cache.
        self._actions.append(StartUpstream(sid, request, CacheControl(skip_read=True, skip_write=True)))
        stream.seq += 1
        restarted = pb.StreamRestarted(stream_id=sid, seq=stream.seq, keep_partial=modify.keep_partial, latency_us=latency_us)
        self._emit(stream, pb.ServerFrame(restarted=restarted), now_ns)

    def _end(self, stream: Stream) -> None:
        """Moves a stream from live to ended, and records its turn in its conversation."""
        del self._streams[stream.id]
        self._settle(stream.id)
        self._ended[stream.id] = stream
        while len(self._ended) > self._limits.max_ended_streams:
            self._ended.popitem(last=False)
        if stream.conversation:
            answer = stream.answer()
            history = [*stream.request.messages, *([answer] if answer.content or answer.tool_calls else [])]
            self._conversations[stream.conversation] = _trim(history, self._limits.max_history_messages, self._limits.max_history_chars)
            if self.persist and not stream.remote:
                self._conversations_changed.add(stream.conversation)
        if self.persist and not stream.remote:
            self._ended_new.append(stream)

    def _finish(self, stream: Stream, reason: FinishReason, now_ns: int) -> None:
        self._end(stream)
        stream.seq += 1
        usage, parts = _usage(stream)
        timing = self._record(stream, reason.value, False, now_ns, usage)
        done = pb.StreamDone(
            stream_id=stream.id,
            seq=stream.seq,
            finish_reason=FINISH_TO_PROTO[reason],  # type: ignore[arg-type]
            usage=usage,
            timing=timing,
            deployment=stream.deployment,
            latency_us=(now_ns - stream.last_ns) // 1000,
            attempts_usage=parts,
        )
        if stream.cache_hit is not None:
            done.cache.kind, done.cache.score = stream.cache_hit[0], stream.cache_hit[1]
            done.usage.cached = True
        self._emit(stream, pb.ServerFrame(done=done), now_ns)

    def _fail(self, stream: Stream, error: ProxyError, now_ns: int) -> None:
        self._end(stream)
        stream.seq += 1
        usage, parts = _usage(stream)
        timing = self._record(stream, error.code.value, True, now_ns, usage)
        failure = pb.StreamError(
            stream_id=stream.id,
            seq=stream.seq,
            code=CODE_TO_PROTO[error.code],  # type: ignore[arg-type]
            message=error.message,
            retryable=error.retryable,
            retry_after_ms=int((error.retry_after_s or 0) * 1000),
            usage=usage,
            timing=timing,
            deployment=stream.deployment,
            latency_us=(now_ns - stream.last_ns) // 1000,
            attempts_usage=parts,
        )
        self._emit(stream, pb.ServerFrame(error=failure), now_ns)

    def reject(self, stream_id: str, error: ProxyError) -> None:
        """Answers a frame that was refused: an error with `seq` 0 that changes no stream."""
        self._outbox.append(
            pb.ServerFrame(
                error=pb.StreamError(
                    stream_id=stream_id,
                    code=CODE_TO_PROTO[error.code],  # type: ignore[arg-type]
                    message=error.message,
                    retryable=error.retryable,
                    retry_after_ms=int((error.retry_after_s or 0) * 1000),
                )
            )
        )

    def _record(self, stream: Stream, status: str, failed: bool, now_ns: int, usage: pb.Usage) -> pb.Timing:
        """Computes the stream's timing once: the record for analytics and the proto timing."""
        t = stream.timing(now_ns, self._stall_ns)
        score = ux_score(t, failed, self._ux_target_us)
        self._records.append(
            StreamRecord(
                session_id=self.id,
                stream_id=stream.id,
                client=self.owner,
                model=stream.request.model,
                provider=stream.provider,
                deployment=stream.deployment,
                status=status,
                failed=failed,
                timing=t,
                ux_score=score,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                reasoning_tokens=usage.reasoning_tokens,
                api=self.api,
                cached_input_tokens=usage.cached_input_tokens,
                cache_write_input_tokens=usage.cache_write_input_tokens,
                cache=stream.cache_hit[0] if stream.cache_hit else "",
                cache_score=stream.cache_hit[1] if stream.cache_hit else 0.0,
                cache_saved_us=stream.cache_hit[2] if stream.cache_hit else 0,
            )
        )
        return pb.Timing(
            ttft_us=t.ttft_us,
            total_us=t.total_us,
            tokens=t.tokens,
            tokens_per_s=t.tokens_per_s,
            itl_p50_us=t.itl_p50_us,
            itl_p95_us=t.itl_p95_us,
            itl_p99_us=t.itl_p99_us,
            itl_max_us=t.itl_max_us,
            stalls=t.stalls,
            relay_p50_us=t.relay_p50_us,
            relay_max_us=t.relay_max_us,
            attempts=t.attempts,
            ux_score=score,
        )


@dataclass(slots=True)
class _Replay:
    """A stream whose missed frames are still being handed out."""

    stream: Stream
    pending: deque[pb.ServerFrame]
    last_seq: int


def _seq_of(frame: pb.ServerFrame) -> int:
    kind = frame.WhichOneof("kind")
    return getattr(frame, kind).seq  # type: ignore[no-any-return]


def _frames_after(stream: Stream, seq: int) -> list[pb.ServerFrame]:
    """The frames of the stream's replay buffer after `seq`, walking back from the newest."""
    out: list[pb.ServerFrame] = []
    for frame in reversed(stream.replay):
        if _seq_of(frame) <= seq:
            break
        out.append(frame)
    out.reverse()
    return out


def _usage(stream: Stream) -> tuple[pb.Usage, list[pb.AttemptUsage]]:
    """The stream's usage and that of each attempt that answered (see
    `Stream.usage_by_attempt`): the sum of the parts, or, when no attempt answered, the
    stream's own counts (the content events relayed when there is no completion count)."""
    parts = stream.usage_by_attempt()
    if not parts:
        return pb.Usage(
            prompt_tokens=stream.prompt_tokens,
            completion_tokens=stream.completion_tokens or stream.relayed(),
            reasoning_tokens=stream.reasoning_tokens,
            cached_input_tokens=stream.cached_input_tokens,
            cache_write_input_tokens=stream.cache_write_input_tokens,
        ), []
    total = pb.Usage()
    out = []
    for deployment, u in parts:
        total.prompt_tokens += u.prompt_tokens
        total.completion_tokens += u.completion_tokens
        total.reasoning_tokens += u.reasoning_tokens
        total.cached_input_tokens += u.cached_input_tokens
        total.cache_write_input_tokens += u.cache_write_input_tokens
        out.append(
            pb.AttemptUsage(
                deployment=deployment,
                usage=pb.Usage(
                    prompt_tokens=u.prompt_tokens,
                    completion_tokens=u.completion_tokens,
                    reasoning_tokens=u.reasoning_tokens,
                    cached_input_tokens=u.cached_input_tokens,
                    cache_write_input_tokens=u.cache_write_input_tokens,
                ),
            )
        )
    return total, out


def _fill(merge: tuple[pb.TokenDelta, int, Stream, int]) -> None:
    """Writes a merged token frame's text, last seq and count (a lone token is already set)."""
    token, _, stream, start = merge
    count = len(stream.text_parts) - start
    if count > 1:
        token.text = "".join(stream.text_parts[start:])
        token.seq = stream.seq
        token.count = count


def _trim(history: Iterable[ChatMessage], limit: int, max_chars: int) -> list[ChatMessage]:
    """Keeps the last `limit` messages holding at most `max_chars` characters of content (at
    least the last message), and a leading system message if there was one: a conversation
    cannot grow each request it prefixes past what one request may carry."""
    items = list(history)
    head = [items[0]] if items and items[0].role == "system" else []
    rest = items[len(head) :]
    budget = max_chars - sum(len(m.content) for m in head)
    kept = 0
    for message in reversed(rest[-(limit - len(head)) :] if limit > len(head) else []):
        budget -= len(message.content)
        if budget < 0 and kept:
            break
        kept += 1
    return [*head, *rest[len(rest) - kept :]] if kept else head
