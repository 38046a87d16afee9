"""Typed events that flow into the stream core.

Provider events come from a provider adapter (one upstream SSE event decodes to zero or more of
them); routing events come from the driver that runs the upstream request. All are frozen and
slotted: they are created per token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from server.errors import ProxyError


class FinishReason(enum.Enum):
    """Why a stream finished; values are the WebSocket spelling."""

    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"
    CANCELLED = "cancelled"


# -- provider events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Answer text."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """Reasoning ("thinking") text."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of a tool call: the first fragment of an index carries id and name."""

    index: int
    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class UsageReport:
    """Token counts so far. Providers that report cumulative counts send the latest values;
    the core keeps the last report of each field that is non-zero."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_input_tokens: int = 0  # prompt tokens read from the provider's prompt cache
    cache_write_input_tokens: int = 0  # prompt tokens written to it (Anthropic)


@dataclass(frozen=True, slots=True)
class Finished:
    """The provider ended the answer normally."""

    reason: FinishReason


ProviderEvent = TextDelta | ReasoningDelta | ToolCallDelta | UsageReport | Finished


# -- routing events (from the driver) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Routed:
    """The stream was assigned to a deployment."""

    provider: str
    upstream_model: str
    deployment: str
    cache: str = ""  # "exact" or "semantic" when the answer is replayed from the response cache
    cache_score: float = 0.0  # the prompts' similarity for a semantic hit
    cache_saved_us: int = 0  # the recorded answer's provider time, saved by the replay


@dataclass(frozen=True, slots=True)
class Attempt:
    """An upstream attempt starts on a deployment (before it answers, and whether it answers
    or not): the stream counts it, and an error names the deployment that failed."""

    provider: str
    upstream_model: str
    deployment: str


@dataclass(frozen=True, slots=True)
class AttemptEnded:
    """An upstream attempt that had answered ended (failed, or finished after an earlier attempt
    answered): its own usage. The stream reports one entry per attempt that answered and their
    sum as its usage; the last attempt of a stream served by one attempt needs no event (the
    stream's own counts are that attempt's)."""

    deployment: str
    usage: UsageReport


@dataclass(frozen=True, slots=True)
class Failed:
    """The stream failed; no further events follow."""

    error: ProxyError


StreamEvent = ProviderEvent | Attempt | AttemptEnded | Routed | Failed
