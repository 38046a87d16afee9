"""One stream's state machine: phases, sequence numbers, timing, replay buffer. Sans-I/O.

Theory of operation. A stream is created by an accepted start frame (PENDING). The driver routes
it (ROUTED), the provider's content events make it STREAMING, and it ends exactly once: DONE on
the provider's finish event, FAILED on a failure, CANCELLED on the client's cancel. A client's
modify sends a live stream back to PENDING for its amended generation. Every event is checked
against TRANSITIONS; an event a phase does not list is a bug in the driver or an adapter and
raises `IllegalTransition`. Times are monotonic nanoseconds passed in by the driver: this module
never reads a clock.

Sequence numbers: `started` is 1, each content event consumes one, `restarted` one, the final
frame one more. Every frame that carries a sequence number is also kept, in order, in the
stream's bounded replay buffer, so a client that reconnects gets exactly what it missed.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass

from llmproxy.v1 import llmproxy_pb2 as pb
from server.core.events import (
    Attempt,
    AttemptEnded,
    Failed,
    Finished,
    ReasoningDelta,
    Routed,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from server.core.request import ChatMessage, ChatRequest, ToolCall


class Phase(enum.Enum):
    PENDING = "pending"  # accepted (or restarted by modify), not routed yet
    ROUTED = "routed"  # routed to a deployment, no content yet
    STREAMING = "streaming"  # content has arrived
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class CancelRequested:
    """The client asked to cancel (a core event, not a provider one)."""

    __slots__ = ()


class ModifyRequested:
    """The client amended the request: the generation restarts."""

    __slots__ = ()


CANCEL = CancelRequested()
MODIFY = ModifyRequested()

_LIVE_MOVES: dict[type, Phase] = {
    UsageReport: Phase.STREAMING,
    TextDelta: Phase.STREAMING,
    ReasoningDelta: Phase.STREAMING,
    ToolCallDelta: Phase.STREAMING,
    Finished: Phase.DONE,
    Failed: Phase.FAILED,
    CancelRequested: Phase.CANCELLED,
    ModifyRequested: Phase.PENDING,
}

TRANSITIONS: dict[Phase, dict[type, Phase]] = {
    Phase.PENDING: {
        Attempt: Phase.PENDING,
        Routed: Phase.ROUTED,
        Failed: Phase.FAILED,
        CancelRequested: Phase.CANCELLED,
        ModifyRequested: Phase.PENDING,
    },
    # Routed: failover (ROUTED) or continuation elsewhere (STREAMING); Attempt: each upstream attempt
    # AttemptEnded: an attempt that answered ended, the stream goes on (or ends by the next event)
    Phase.ROUTED: {
        **_LIVE_MOVES,
        Routed: Phase.ROUTED,
        Attempt: Phase.ROUTED,
        AttemptEnded: Phase.ROUTED,
        UsageReport: Phase.ROUTED,
    },
    Phase.STREAMING: {**_LIVE_MOVES, Routed: Phase.STREAMING, Attempt: Phase.STREAMING, AttemptEnded: Phase.STREAMING},
    Phase.DONE: {},
    Phase.FAILED: {},
    Phase.CANCELLED: {},
}

TERMINAL = frozenset({Phase.DONE, Phase.FAILED, Phase.CANCELLED})


class IllegalTransition(Exception):
    """An event arrived that the stream's phase does not allow: a bug, never a client error."""


@dataclass(frozen=True, slots=True)
class TimingSummary:
    ttft_us: int
    total_us: int
    tokens: int
    tokens_per_s: float
    itl_p50_us: int
    itl_p95_us: int
    itl_p99_us: int
    itl_max_us: int
    stalls: int
    relay_p50_us: int
    relay_max_us: int
    attempts: int


def ux_score(timing: TimingSummary, failed: bool, target_ttft_us: int) -> float:
    """Apdex-like: 1 satisfied, 0.5 tolerating, 0 frustrated. The wait is the time to first
    token (or, when none came, the whole time). Satisfied: wait <= target and no stall.
    Tolerating: wait <= 4 x target and at most one stall. A failed stream is frustrated."""
    if failed:
        return 0.0
    wait = timing.ttft_us if timing.tokens else timing.total_us
    if wait <= target_ttft_us and timing.stalls == 0:
        return 1.0
    if wait <= 4 * target_ttft_us and timing.stalls <= 1:
        return 0.5
    return 0.0


class Stream:
    """State of one stream. The session owns it and turns its moves into frames."""

    __slots__ = (
        "id",
        "request",
        "conversation",
        "phase",
        "seq",
        "started_ns",
        "first_ns",
        "last_ns",
        "last_sent_ns",
        "gaps_ns",
        "prompt_tokens",
        "completion_tokens",
        "reasoning_tokens",
        "cached_input_tokens",
        "cache_write_input_tokens",
        "cache_hit",
        "deployment",
        "provider",
        "attempts",
        "answers",
        "answer_from",
        "attempt_usage",
        "relay_ns",
        "replay",
        "text_parts",
        "tool_calls",
        "persisted_seq",
        "sent_seq",
        "remote",
    )

    def __init__(self, stream_id: str, request: ChatRequest, conversation: str, now_ns: int, max_replay: int) -> None:
        self.id = stream_id
        self.request = request
        self.conversation = conversation
        self.phase = Phase.PENDING
        self.seq = 0
        self.deployment = ""
        self.provider = ""
        self.attempts = 0
        self.relay_ns: list[int] = []  # per frame: provider arrival -> handed to the connection
        self.replay: deque[pb.ServerFrame] = deque(maxlen=max_replay)
        self.last_sent_ns = now_ns
        self.persisted_seq = 0  # the last seq written to the shared store (server/store/)
        self.sent_seq = 0  # with a shared store: the last seq put into the outbox
        self.remote = ""  # another server generates this stream (its id): frames arrive from the store
        self._reset(now_ns)

    def _reset(self, now_ns: int) -> None:
        self.started_ns = now_ns
        self.first_ns = 0
        self.last_ns = now_ns
        self.gaps_ns: list[int] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.cached_input_tokens = 0
        self.cache_write_input_tokens = 0
        self.cache_hit: tuple[str, float, int] | None = None  # (kind, score, saved us): replayed from the response cache
        self.answers = 0  # attempts of this generation that answered (Routed events)
        self.answer_from = 0  # content events relayed before the current attempt answered
        self.attempt_usage: list[tuple[str, UsageReport]] = []  # AttemptEnded, in order
        self.text_parts: list[str] = []
        self.tool_calls: dict[int, list[str]] = {}  # index -> [id, name, arguments...]

    def move(self, event: StreamEvent | CancelRequested | ModifyRequested) -> Phase:
        """Applies the transition for `event`; raises `IllegalTransition` if there is none."""
        try:
            self.phase = TRANSITIONS[self.phase][type(event)]
        except KeyError:
            raise IllegalTransition(f"stream {self.id!r}: {type(event).__name__} in phase {self.phase.value}") from None
        return self.phase

    def restart(self, request: ChatRequest, now_ns: int) -> None:
        """A new generation under the same id: timing and the answer start over."""
        self.request = request
        self._reset(now_ns)

    def mark_content(self, now_ns: int) -> int:
        """Records a content event's arrival; returns the gap since the previous one (or since
        the start for the first) in microseconds."""
        gap = now_ns - self.last_ns
        if self.first_ns:
            self.gaps_ns.append(gap)
        else:
            self.first_ns = now_ns
        self.last_ns = now_ns
        return gap // 1000

    def add_tool_call(self, delta: ToolCallDelta) -> None:
        parts = self.tool_calls.get(delta.index)
        if parts is None:
            self.tool_calls[delta.index] = [delta.id, delta.name, delta.arguments]
        else:
            parts.append(delta.arguments)

    def answer(self) -> ChatMessage:
        """The assistant's answer so far, as a message for the conversation history."""
        calls = tuple(ToolCall(p[0], p[1], "".join(p[2:])) for _, p in sorted(self.tool_calls.items()))
        return ChatMessage(role="assistant", content="".join(self.text_parts), tool_calls=calls)

    def add_usage(self, usage: UsageReport) -> None:
        if usage.prompt_tokens:
            self.prompt_tokens = usage.prompt_tokens
        if usage.completion_tokens:
            self.completion_tokens = usage.completion_tokens
        if usage.reasoning_tokens:
            self.reasoning_tokens = usage.reasoning_tokens
        if usage.cached_input_tokens:
            self.cached_input_tokens = usage.cached_input_tokens
        if usage.cache_write_input_tokens:
            self.cache_write_input_tokens = usage.cache_write_input_tokens

    def answered(self) -> None:
        """An upstream attempt answered (a Routed event): the stream's content from here on is
        its own, until the next one."""
        self.answers += 1
        self.answer_from = self.relayed()

    def relayed(self) -> int:
        """Content events relayed in this generation."""
        return len(self.gaps_ns) + (1 if self.first_ns else 0)

    def usage_by_attempt(self) -> list[tuple[str, UsageReport]]:
        """The usage of each attempt that answered, in order; their sum is the stream's usage.

        The router reports an attempt's usage (`AttemptEnded`) when it fails after answering and
        when it finishes after another attempt answered. The current attempt's part is missing
        when it was the only one, or was cancelled, or the driver reports no parts: it is then
        what the stream's counts add beyond the reported parts (the router's usage reports are
        sums over the attempts) or, with no completion count of its own, the content events it
        relayed (a lower bound that keeps a stopped answer from being billed as zero)."""
        parts = list(self.attempt_usage)
        if self.answers > len(parts):
            prompt = completion = reasoning = cached = written = 0
            for _, u in parts:
                prompt += u.prompt_tokens
                completion += u.completion_tokens
                reasoning += u.reasoning_tokens
                cached += u.cached_input_tokens
                written += u.cache_write_input_tokens
            own = UsageReport(
                max(self.prompt_tokens - prompt, 0),
                max(self.completion_tokens - completion, 0) or (self.relayed() - self.answer_from),
                max(self.reasoning_tokens - reasoning, 0),
                max(self.cached_input_tokens - cached, 0),
                max(self.cache_write_input_tokens - written, 0),
            )
            parts.append((self.deployment, own))
        return parts

    def replay_after(self, last_seq: int) -> list[pb.ServerFrame] | None:
        """The kept frames after `last_seq`, or None when some of them were already dropped."""
        frames = [f for f in self.replay if _seq_of(f) > last_seq]
        if frames:
            first = frames[0]
            first_seq = _seq_of(first) - max(first.token.count, 1) + 1 if first.HasField("token") else _seq_of(first)
            if first_seq > last_seq + 1:
                return None
        elif self.seq > last_seq:
            return None
        return frames

    def timing(self, now_ns: int, stall_ns: int) -> TimingSummary:
        gaps = sorted(self.gaps_ns)
        relay = sorted(self.relay_ns)
        tokens = len(gaps) + (1 if self.first_ns else 0)
        span_s = (self.last_ns - self.first_ns) / 1e9 if self.first_ns else 0.0
        return TimingSummary(
            ttft_us=(self.first_ns - self.started_ns) // 1000 if self.first_ns else 0,
            total_us=(now_ns - self.started_ns) // 1000,
            tokens=tokens,
            tokens_per_s=(len(gaps) / span_s) if span_s > 0 else 0.0,
            itl_p50_us=_percentile(gaps, 0.50) // 1000,
            itl_p95_us=_percentile(gaps, 0.95) // 1000,
            itl_p99_us=_percentile(gaps, 0.99) // 1000,
            itl_max_us=(gaps[-1] // 1000) if gaps else 0,
            stalls=sum(1 for g in gaps if g > stall_ns),
            relay_p50_us=_percentile(relay, 0.50) // 1000,
            relay_max_us=(relay[-1] // 1000) if relay else 0,
            attempts=self.attempts,
        )


def _seq_of(frame: pb.ServerFrame) -> int:
    kind = frame.WhichOneof("kind")
    return getattr(frame, kind).seq  # type: ignore[no-any-return]


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]
