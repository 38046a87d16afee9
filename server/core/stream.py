"""One stream's state machine: phases, sequence numbers and timing. Sans-I/O.

Theory of operation. A stream is created by an accepted start frame (PENDING). The driver routes
it (ROUTED), the provider's content events make it STREAMING, and it ends exactly once: DONE on
the provider's finish event, FAILED on a failure, CANCELLED on the client's cancel. Every event
is checked against TRANSITIONS; an event a phase does not list is a bug in the driver or an
adapter and raises `IllegalTransition`. Times are monotonic nanoseconds passed in by the driver:
this module never reads a clock.

Sequence numbers: `started` is 1, each content event consumes one, the final frame one more.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from server.core.events import (
    Failed,
    Finished,
    ReasoningDelta,
    Routed,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from server.core.request import ChatRequest


class Phase(enum.Enum):
    PENDING = "pending"  # accepted, not routed yet
    ROUTED = "routed"  # routed to a deployment, no content yet
    STREAMING = "streaming"  # content has arrived
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class CancelRequested:
    """The client asked to cancel (a core event, not a provider one)."""

    __slots__ = ()


CANCEL = CancelRequested()

_CONTENT = (TextDelta, ReasoningDelta, ToolCallDelta)

TRANSITIONS: dict[Phase, dict[type, Phase]] = {
    Phase.PENDING: {Routed: Phase.ROUTED, Failed: Phase.FAILED, CancelRequested: Phase.CANCELLED},
    Phase.ROUTED: {
        Routed: Phase.ROUTED,  # failover before the first token
        UsageReport: Phase.ROUTED,
        TextDelta: Phase.STREAMING,
        ReasoningDelta: Phase.STREAMING,
        ToolCallDelta: Phase.STREAMING,
        Finished: Phase.DONE,
        Failed: Phase.FAILED,
        CancelRequested: Phase.CANCELLED,
    },
    Phase.STREAMING: {
        UsageReport: Phase.STREAMING,
        TextDelta: Phase.STREAMING,
        ReasoningDelta: Phase.STREAMING,
        ToolCallDelta: Phase.STREAMING,
        Finished: Phase.DONE,
        Failed: Phase.FAILED,
        CancelRequested: Phase.CANCELLED,
    },
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


class Stream:
    """State of one stream. The session owns it and turns its moves into frames."""

    __slots__ = (
        "id",
        "request",
        "phase",
        "seq",
        "started_ns",
        "first_ns",
        "last_ns",
        "gaps_ns",
        "prompt_tokens",
        "completion_tokens",
        "reasoning_tokens",
        "deployment",
    )

    def __init__(self, stream_id: str, request: ChatRequest, now_ns: int) -> None:
        self.id = stream_id
        self.request = request
        self.phase = Phase.PENDING
        self.seq = 0
        self.started_ns = now_ns
        self.first_ns = 0
        self.last_ns = now_ns
        self.gaps_ns: list[int] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.deployment = ""

    def move(self, event: StreamEvent | CancelRequested) -> Phase:
        """Applies the transition for `event`; raises `IllegalTransition` if there is none."""
        try:
            self.phase = TRANSITIONS[self.phase][type(event)]
        except KeyError:
            raise IllegalTransition(
                f"stream {self.id!r}: {type(event).__name__} in phase {self.phase.value}"
            ) from None
        return self.phase

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

    def add_usage(self, usage: UsageReport) -> None:
        if usage.prompt_tokens:
            self.prompt_tokens = usage.prompt_tokens
        if usage.completion_tokens:
            self.completion_tokens = usage.completion_tokens
        if usage.reasoning_tokens:
            self.reasoning_tokens = usage.reasoning_tokens

    def timing(self, now_ns: int) -> TimingSummary:
        gaps = sorted(self.gaps_ns)
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
        )


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]
