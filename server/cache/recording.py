"""Recording an answer as it streams, and its stored form. Sans-I/O.

A `Recorder` sees every event the runtime feeds the stream core, with the time it arrived. It
keeps the events of the attempt that answered, with the gap before each, and yields a
`CachedAnswer` only when the provider finished normally. Anything else (a failure, a stream cut
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
    WAITING = "waiting"  # before the attempt that answers
    RECORDING = "recording"
    FINISHED = "finished"  # a normal finish: `answer()` has the recording
    SPOILED = "spoiled"  # failed, or continued mid-answer: nothing to store


class Recorder:
    """Feeds on a stream's events; `answer()` is the recording once it finished normally."""

    def __init__(self, now_ns: int) -> None:
        self.phase = Phase.WAITING
        self._last_ns = now_ns
        self._routed: Routed | None = None
        self._events: list[tuple[int, ProviderEvent]] = []
        self._content = False

    def receive(self, event: StreamEvent, now_ns: int) -> None:
        if self.phase in (Phase.FINISHED, Phase.SPOILED):
            return
        if isinstance(event, Routed):
            if self._content:  # continued on another deployment mid-answer: a stitched answer
                self.phase = Phase.SPOILED
                return
            self._routed = event
            self._events.clear()
            self.phase = Phase.RECORDING
            self._last_ns = now_ns
            return
        if isinstance(event, Failed):
            self.phase = Phase.SPOILED
            return
        if self.phase is not Phase.RECORDING:
            return
        if isinstance(event, (TextDelta, ReasoningDelta, ToolCallDelta, UsageReport, Finished)):
            gap_us = max(now_ns - self._last_ns, 0) // 1000
            self._last_ns = now_ns
            self._events.append((gap_us, event))
            if not isinstance(event, UsageReport):
                self._content = True
            if isinstance(event, Finished):
                self.phase = Phase.FINISHED

    def answer(self, prompt: str = "") -> CachedAnswer | None:
        if self.phase is not Phase.FINISHED or self._routed is None:
            return None
        r = self._routed
        return CachedAnswer(r.provider, r.upstream_model, r.deployment, tuple(self._events), prompt)
