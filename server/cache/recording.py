"""Recording an answer as it streams, and its stored form. Sans-I/O.

A `Recorder` sees every event the runtime feeds the stream core, with the time it arrived. It
keeps the events of the attempt that answered, with the gap before each, and yields a
`CachedAnswer` only when the provider finished normally; its phases move by `TRANSITIONS`. Anything else (a failure, a stream cut
before the finish event, a cancel or a modify, which close the source before the finish, a
continuation on another deployment mid-answer) leaves nothing to store.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import orjson

from server.core.events import (
    Failed,
    Finished,
    FinishReason,
    ProviderEvent,
    ReasoningDelta,
    Routed,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """One finished answer: who served it, and its provider events with the gap (in
    microseconds) before each, the first one's gap being the time to first event."""

    provider: str
    upstream_model: str
    deployment: str
    events: tuple[tuple[int, ProviderEvent], ...]
    prompt: str = ""  # the compared prompt text of a semantic entry (for the near-miss guard)

    @property
    def has_tool_calls(self) -> bool:
        return any(isinstance(e, ToolCallDelta) for _, e in self.events)

    def to_bytes(self) -> bytes:
        items: list[list[object]] = []
        for gap_us, e in self.events:
            if isinstance(e, TextDelta):
                items.append([gap_us, "t", e.text])
            elif isinstance(e, ReasoningDelta):
                items.append([gap_us, "r", e.text])
            elif isinstance(e, ToolCallDelta):
                items.append([gap_us, "c", e.index, e.id, e.name, e.arguments])
            elif isinstance(e, UsageReport):
                items.append(
                    [gap_us, "u", e.prompt_tokens, e.completion_tokens, e.reasoning_tokens, e.cached_input_tokens, e.cache_write_input_tokens]
                )
            else:
                items.append([gap_us, "f", e.reason.value])
        return orjson.dumps({"v": 1, "q": self.prompt, "p": self.provider, "m": self.upstream_model, "d": self.deployment, "e": items})

    @classmethod
    def from_bytes(cls, data: bytes) -> CachedAnswer:
        """Raises `ValueError` for data this version did not write."""
        obj = orjson.loads(data)
        if not isinstance(obj, dict) or obj.get("v") != 1:
            raise ValueError("not a cached answer of version 1")
        events: list[tuple[int, ProviderEvent]] = []
        for item in obj["e"]:
            gap, kind = int(item[0]), item[1]
            event: ProviderEvent
            if kind == "t":
                event = TextDelta(item[2])
            elif kind == "r":
                event = ReasoningDelta(item[2])
            elif kind == "c":
                event = ToolCallDelta(item[2], item[3], item[4], item[5])
            elif kind == "u":
                event = UsageReport(*(int(x) for x in item[2:7]))
            elif kind == "f":
                event = Finished(FinishReason(item[2]))
            else:
                raise ValueError(f"unknown event kind {kind!r}")
            events.append((gap, event))
        return cls(obj["p"], obj["m"], obj["d"], tuple(events), obj.get("q", ""))


class Phase(enum.Enum):
    WAITING = "waiting"  # before an attempt answered
    ROUTED = "routed"  # an attempt answered, no content yet (a failover restarts the recording)
    RECORDING = "recording"  # content has arrived
    FINISHED = "finished"  # a normal finish: `answer()` has the recording
    SPOILED = "spoiled"  # failed, or continued on another deployment mid-answer: nothing to store


_CONTENT = (TextDelta, ReasoningDelta, ToolCallDelta)

# Event type -> next phase; a type a phase does not list leaves it unchanged and is not recorded
# (Attempt, AttemptEnded: routing bookkeeping, not part of the answer).
TRANSITIONS: dict[Phase, dict[type, Phase]] = {
    Phase.WAITING: {Routed: Phase.ROUTED, Failed: Phase.SPOILED},
    Phase.ROUTED: {
        Routed: Phase.ROUTED,
        UsageReport: Phase.ROUTED,
        **{t: Phase.RECORDING for t in _CONTENT},
        Finished: Phase.FINISHED,
        Failed: Phase.SPOILED,
    },
    Phase.RECORDING: {
        Routed: Phase.SPOILED,  # a continuation: the answer is stitched from two attempts
        UsageReport: Phase.RECORDING,
        **{t: Phase.RECORDING for t in _CONTENT},
        Finished: Phase.FINISHED,
        Failed: Phase.SPOILED,
    },
    Phase.FINISHED: {},
    Phase.SPOILED: {},
}

_RECORDED = frozenset({Phase.ROUTED, Phase.RECORDING, Phase.FINISHED})


class Recorder:
    """Feeds on a stream's events; `answer()` is the recording once it finished normally."""

    def __init__(self, now_ns: int) -> None:
        self.phase = Phase.WAITING
        self._last_ns = now_ns
        self._routed: Routed | None = None
        self._events: list[tuple[int, ProviderEvent]] = []

    def receive(self, event: StreamEvent, now_ns: int) -> None:
        after = TRANSITIONS[self.phase].get(type(event))
        if after is None:
            return
        self.phase = after
        if isinstance(event, Routed):
            if after is Phase.ROUTED:  # the attempt that answers (again, after a failover)
                self._routed = event
                self._events.clear()
                self._last_ns = now_ns
            return
        if after in _RECORDED and not isinstance(event, Failed):
            gap_us = max(now_ns - self._last_ns, 0) // 1000
            self._last_ns = now_ns
            self._events.append((gap_us, event))  # type: ignore[arg-type]

    def answer(self, prompt: str = "") -> CachedAnswer | None:
        if self.phase is not Phase.FINISHED or self._routed is None:
            return None
        r = self._routed
        return CachedAnswer(r.provider, r.upstream_model, r.deployment, tuple(self._events), prompt)
