"""The unified chat request every provider adapter receives (OpenAI-shaped, provider-neutral)."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A complete tool call in the conversation history."""

    id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # one of ROLES
    content: str
    name: str = ""
    tool_call_id: str = ""  # role "tool"
    tool_calls: tuple[ToolCall, ...] = ()  # role "assistant"
    cache_breakpoint: bool = False  # a prompt-cache breakpoint after this message (Anthropic)


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call; `parameters_json` is its JSON Schema as text."""

    name: str
    description: str
    parameters_json: str


# The user message that asks a model to go on with a partial answer (the assistant message just
# before it): a continuation after a cut or after a takeover (server/routing/policy.py).
CONTINUE_PROMPT = "Continue your previous answer exactly where it stops, without repeating any of it."


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str  # the public model name
    messages: tuple[ChatMessage, ...]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = ""  # "", "auto", "none", "required" or a tool name


@dataclass(frozen=True, slots=True)
class CacheControl:
    """What one request lets the response cache do (the start frame's `cache`)."""

    skip_read: bool = False
    skip_write: bool = False
    ttl_s: int = 0  # 0: the configured TTL
