"""A session: the streams of one `Stream` call, multiplexed. Sans-I/O.

Theory of operation (after python-websockets' protocol.py and h11). The driver feeds the session
what happens, and the session says what to do:

    receive_frame(frame, now_ns)             a ClientFrame from the client
    receive_event(stream_id, event, now_ns)  an event of a running stream (routing, provider)
    frames_to_send() -> [ServerFrame]        what to write to the client, in order
    actions_to_take() -> [Action]            upstream work to start or cancel

Backpressure lives in the outbox: while the driver is busy writing, new tokens of a stream are
merged into that stream's token frame still waiting in the outbox (text appended, `seq` moved to
the last token, `count` raised), so a slow reader gets fewer, larger frames instead of an
unbounded queue, and a lone token is never delayed. Any other frame of that stream closes the
merge so order within a stream is kept.

Rejections: a start frame that fails validation, names an unknown model, reuses a live id or
exceeds the stream limit is answered with an error carrying the id and `seq` 0: the frame was
rejected and no stream changed. An error with `seq` > 0 ends that stream.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Container
from dataclasses import dataclass

from llmproxy.v1 import llmproxy_pb2 as pb
from server.core.events import (
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
from server.core.request import ROLES, ChatMessage, ChatRequest, ToolCall, ToolSpec
from server.core.stream import CANCEL, Phase, Stream
from server.errors import (
    CallerError,
    Code,
    DuplicateStream,
    InvalidRequest,
    ProxyError,
    TooManyStreams,
    UnknownModel,
    UnknownStream,
)

FINISH_TO_PROTO: dict[FinishReason, int] = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
    FinishReason.CONTENT_FILTER: pb.FINISH_REASON_CONTENT_FILTER,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}

CODE_TO_PROTO: dict[Code, int] = {code: pb.ErrorCode.Value(f"ERROR_CODE_{code.name}") for code in Code}


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_streams: int = 32  # live streams per call
    max_messages: int = 1024  # messages per request
    max_stream_id_chars: int = 128
    max_tokens_cap: int = 1_000_000  # a larger max_tokens is a mistake, not a request
    max_stop_sequences: int = 16
    max_tools: int = 128


@dataclass(frozen=True, slots=True)
class StartUpstream:
    stream_id: str
    request: ChatRequest


@dataclass(frozen=True, slots=True)
class CancelUpstream:
    stream_id: str


Action = StartUpstream | CancelUpstream


class Session:
    def __init__(
        self,
        limits: SessionLimits,
        known_models: Container[str],
        wall_time_ns: Callable[[], int],
    ) -> None:
        self._limits = limits
        self._known_models = known_models
        self._wall_time_ns = wall_time_ns
        self._streams: dict[str, Stream] = {}
        self._outbox: list[pb.ServerFrame] = []
        self._merging: dict[str, pb.TokenDelta] = {}  # stream id -> its token frame in the outbox
        self._actions: list[Action] = []
        self._next_auto_id = 1

    # -- queries ---------------------------------------------------------------------------------

    def is_live(self, stream_id: str) -> bool:
        return stream_id in self._streams

    @property
    def live_streams(self) -> int:
        return len(self._streams)

    def has_output(self) -> bool:
        return bool(self._outbox)

    # -- input -----------------------------------------------------------------------------------

    def receive_frame(self, frame: pb.ClientFrame, now_ns: int) -> None:
        """Handles one client frame. Never raises for bad input: it answers with an error."""
        kind = frame.WhichOneof("kind")
        if kind == "start":
            self._start(frame.start, now_ns)
        elif kind == "cancel":
            self._cancel(frame.cancel.stream_id, now_ns)
        elif kind == "ping":
            self._outbox.append(
                pb.ServerFrame(pong=pb.Pong(nonce=frame.ping.nonce, server_time_us=self._wall_time_ns() // 1000))
            )
        else:
            self._reject("", InvalidRequest("empty frame: set one of start, cancel, ping"))

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
        self._merging.pop(stream_id, None)
        if cls is ReasoningDelta:
            latency_us = stream.mark_content(now_ns)
            stream.seq += 1
            self._outbox.append(
                pb.ServerFrame(
                    reasoning=pb.ReasoningDelta(
                        stream_id=stream_id, seq=stream.seq, text=event.text, latency_us=latency_us  # type: ignore[union-attr]
                    )
                )
            )
        elif cls is ToolCallDelta:
            assert isinstance(event, ToolCallDelta)
            latency_us = stream.mark_content(now_ns)
            stream.seq += 1
            self._outbox.append(
                pb.ServerFrame(
                    tool_call=pb.ToolCallDelta(
                        stream_id=stream_id,
                        seq=stream.seq,
                        index=event.index,
                        id=event.id,
                        name=event.name,
                        arguments=event.arguments,
                        latency_us=latency_us,
                    )
                )
            )
        elif cls is Routed:
            assert isinstance(event, Routed)
            stream.deployment = event.deployment
            if stream.seq == 0:  # the first routing; a failover re-route sends no second frame
                stream.seq = 1
                self._outbox.append(
                    pb.ServerFrame(
                        started=pb.StreamStarted(
                            stream_id=stream_id,
                            seq=1,
                            model=stream.request.model,
                            provider=event.provider,
                            upstream_model=event.upstream_model,
                            deployment=event.deployment,
                            latency_us=(now_ns - stream.started_ns) // 1000,
                        )
                    )
                )
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

    def frames_to_send(self) -> list[pb.ServerFrame]:
        """Takes everything queued for the client, in order; merging restarts afterwards."""
        frames, self._outbox = self._outbox, []
        self._merging.clear()
        return frames

    def actions_to_take(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

    # -- internals -------------------------------------------------------------------------------

    def _token(self, stream: Stream, text: str, now_ns: int) -> None:
        latency_us = stream.mark_content(now_ns)
        stream.seq += 1
        merging = self._merging.get(stream.id)
        if merging is not None:
            merging.text += text
            merging.seq = stream.seq
            merging.count = (merging.count or 1) + 1
            return
        frame = pb.ServerFrame(
            token=pb.TokenDelta(stream_id=stream.id, seq=stream.seq, text=text, latency_us=latency_us)
        )
        self._outbox.append(frame)
        self._merging[stream.id] = frame.token

    def _start(self, start: pb.StartStream, now_ns: int) -> None:
        stream_id = start.stream_id
        try:
            if not stream_id:
                stream_id = self._auto_id()
            elif len(stream_id) > self._limits.max_stream_id_chars:
                raise InvalidRequest(f"stream id longer than {self._limits.max_stream_id_chars} characters")
            if stream_id in self._streams:
                raise DuplicateStream(f"stream {stream_id!r} is already running on this connection")
            request = self._to_request(start)
            if len(self._streams) >= self._limits.max_streams:
                raise TooManyStreams(f"at most {self._limits.max_streams} concurrent streams per connection")
        except CallerError as exc:
            self._reject(stream_id, exc)
            return
        self._streams[stream_id] = Stream(stream_id, request, now_ns)
        self._actions.append(StartUpstream(stream_id, request))

    def _auto_id(self) -> str:
        while True:
            candidate = f"s{self._next_auto_id}"
            self._next_auto_id += 1
            if candidate not in self._streams:
                return candidate

    def _to_request(self, start: pb.StartStream) -> ChatRequest:
        limits = self._limits
        if not start.model:
            raise InvalidRequest("model is required")
        if start.model not in self._known_models:
            raise UnknownModel(f"unknown model {start.model!r}; ListModels gives the served names")
        if not start.messages:
            raise InvalidRequest("messages must hold at least one message")
        if len(start.messages) > limits.max_messages:
            raise InvalidRequest(f"at most {limits.max_messages} messages per request")
        messages = []
        for i, m in enumerate(start.messages):
            if m.role not in ROLES:
                raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}")
            messages.append(
                ChatMessage(
                    role=m.role,
                    content=m.content,
                    name=m.name,
                    tool_call_id=m.tool_call_id,
                    tool_calls=tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls),
                )
            )
        p = start.params
        temperature = p.temperature if p.HasField("temperature") else None
        top_p = p.top_p if p.HasField("top_p") else None
        max_tokens = p.max_tokens if p.HasField("max_tokens") else None
        if temperature is not None and not (0.0 <= temperature <= 2.0 and math.isfinite(temperature)):
            raise InvalidRequest("temperature must be between 0 and 2")
        if top_p is not None and not (0.0 <= top_p <= 1.0 and math.isfinite(top_p)):
            raise InvalidRequest("top_p must be between 0 and 1")
        if max_tokens is not None and not (1 <= max_tokens <= limits.max_tokens_cap):
            raise InvalidRequest(f"max_tokens must be between 1 and {limits.max_tokens_cap}")
        if len(p.stop) > limits.max_stop_sequences or any(not s for s in p.stop):
            raise InvalidRequest(f"stop takes at most {limits.max_stop_sequences} non-empty strings")
        if len(start.tools) > limits.max_tools:
            raise InvalidRequest(f"at most {limits.max_tools} tools per request")
        tools = []
        for i, t in enumerate(start.tools):
            if not t.name:
                raise InvalidRequest(f"tools[{i}] needs a name")
            try:
                schema = json.loads(t.parameters_json or "{}")
            except ValueError:
                raise InvalidRequest(f"tools[{i}].parameters is not valid JSON") from None
            if not isinstance(schema, dict):
                raise InvalidRequest(f"tools[{i}].parameters must be a JSON object")
            tools.append(ToolSpec(t.name, t.description, t.parameters_json or "{}"))
        choice = start.tool_choice
        if choice and choice not in ("auto", "none", "required") and choice not in {t.name for t in tools}:
            raise InvalidRequest("tool_choice must be auto, none, required or the name of a given tool")
        return ChatRequest(
            model=start.model,
            messages=tuple(messages),
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            stop=tuple(p.stop),
            seed=p.seed if p.HasField("seed") else None,
            tools=tuple(tools),
            tool_choice=choice,
        )

    def _cancel(self, stream_id: str, now_ns: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            self._reject(stream_id, UnknownStream(f"no running stream {stream_id!r} on this connection"))
            return
        stream.move(CANCEL)
        self._actions.append(CancelUpstream(stream_id))
        self._merging.pop(stream_id, None)
        self._finish(stream, FinishReason.CANCELLED, now_ns)

    def _finish(self, stream: Stream, reason: FinishReason, now_ns: int) -> None:
        del self._streams[stream.id]
        self._merging.pop(stream.id, None)
        stream.seq += 1
        self._outbox.append(
            pb.ServerFrame(
                done=pb.StreamDone(
                    stream_id=stream.id,
                    seq=stream.seq,
                    finish_reason=FINISH_TO_PROTO[reason],  # type: ignore[arg-type]
                    usage=self._usage(stream),
                    timing=self._timing(stream, now_ns),
                    deployment=stream.deployment,
                    latency_us=(now_ns - stream.last_ns) // 1000,
                )
            )
        )

    def _fail(self, stream: Stream, error: ProxyError, now_ns: int) -> None:
        del self._streams[stream.id]
        self._merging.pop(stream.id, None)
        stream.seq += 1
        self._outbox.append(
            pb.ServerFrame(
                error=pb.StreamError(
                    stream_id=stream.id,
                    seq=stream.seq,
                    code=CODE_TO_PROTO[error.code],  # type: ignore[arg-type]
                    message=error.message,
                    retryable=error.retryable,
                    retry_after_ms=int((error.retry_after_s or 0) * 1000),
                    usage=self._usage(stream),
                    timing=self._timing(stream, now_ns),
                    deployment=stream.deployment,
                    latency_us=(now_ns - stream.last_ns) // 1000,
                )
            )
        )

    def _reject(self, stream_id: str, error: ProxyError) -> None:
        self._outbox.append(
            pb.ServerFrame(
                error=pb.StreamError(
                    stream_id=stream_id,
                    code=CODE_TO_PROTO[error.code],  # type: ignore[arg-type]
                    message=error.message,
                    retryable=error.retryable,
                )
            )
        )

    @staticmethod
    def _usage(stream: Stream) -> pb.Usage:
        return pb.Usage(
            prompt_tokens=stream.prompt_tokens,
            completion_tokens=stream.completion_tokens,
            reasoning_tokens=stream.reasoning_tokens,
        )

    @staticmethod
    def _timing(stream: Stream, now_ns: int) -> pb.Timing:
        t = stream.timing(now_ns)
        return pb.Timing(
            ttft_us=t.ttft_us,
            total_us=t.total_us,
            tokens=t.tokens,
            tokens_per_s=t.tokens_per_s,
            itl_p50_us=t.itl_p50_us,
            itl_p95_us=t.itl_p95_us,
            itl_p99_us=t.itl_p99_us,
            itl_max_us=t.itl_max_us,
        )
