"""OpenAI Chat Completions, any OpenAI-compatible server, and Azure OpenAI: the pure adapter.

Wire format (https://platform.openai.com/docs/api-reference/chat-streaming): `POST
{base_url}/chat/completions` with `"stream": true`; the answer is `text/event-stream`, one
`data: <chat.completion.chunk>` per event, ended by `data: [DONE]`. We always send
`stream_options.include_usage` so a last chunk with `"choices": []` carries the usage.

Tool calls stream per `index`: the first delta has `id`, `type` and `function.name`, later ones
only `function.arguments` fragments. Some compatible servers repeat the id or send a whole call
at once; the decoder normalizes both to our shape (first fragment: index, id, name; then only
arguments). Reasoning text of compatible servers arrives as `reasoning_content` (DeepSeek, vLLM)
or `reasoning` (OpenRouter, Ollama).

End of stream: `finish_reason` arrives on the last choice chunk, the usage chunk follows, then
`[DONE]`. We finish only on `[DONE]`: a body that ends before it was cut, even after a
`finish_reason` (the usage chunk may be what was lost).

Azure OpenAI (https://learn.microsoft.com/azure/ai-services/openai/reference): the same body
and stream at `{base_url}/openai/deployments/{deployment}/chat/completions?api-version=...`
with an `api-key` header; the deployment name is the endpoint's upstream model.

Errors (https://platform.openai.com/docs/guides/error-codes): `{"error": {"message", "type",
"param", "code"}}`, classified by status and `code`/`type`, never by message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.core.events import (
    Finished,
    FinishReason,
    ProviderEvent,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from server.core.request import ChatRequest
from server.errors import (
    ContentFiltered,
    ContextLengthExceeded,
    InvalidRequest,
    MalformedStream,
    Overloaded,
    RateLimited,
    StreamCut,
    UpstreamError,
    UpstreamInvalidRequest,
    UpstreamServerError,
    UpstreamUnauthenticated,
)
from server.providers.adapter import (
    Endpoint,
    UpstreamRequest,
    excerpt,
    join_url,
    loads_body,
    loads_event,
    parse_json_arg,
    parse_retry_after,
    post_json,
    redact,
)
from server.providers.sse import SSEEvent

_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
    "content_filter": FinishReason.CONTENT_FILTER,
}

# OpenAI accepts at most 4 stop sequences (API reference, `stop`).
MAX_STOP = 4


def build_body(request: ChatRequest, model: str | None, max_tokens_field: str) -> dict[str, Any]:
    """The Chat Completions body for `request`; raises `InvalidRequest`."""
    messages: list[dict[str, Any]] = []
    for m in request.messages:
        if m.role == "tool":
            if not m.tool_call_id:
                raise InvalidRequest("a tool message needs tool_call_id")
            messages.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content})
            continue
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidRequest("only assistant messages carry tool calls")
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.tool_calls
            ]
            if not m.content:
                msg["content"] = None
        messages.append(msg)
    body: dict[str, Any] = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    if model is not None:
        body["model"] = model
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.max_tokens is not None:
        body[max_tokens_field] = request.max_tokens
    if request.stop:
        if len(request.stop) > MAX_STOP:
            raise InvalidRequest(f"this provider accepts at most {MAX_STOP} stop sequences")
        body["stop"] = list(request.stop)
    if request.seed is not None:
        body["seed"] = request.seed
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": parse_json_arg(t.parameters_json, f"the parameters of tool {t.name!r}"),
                },
            }
            for t in request.tools
        ]
    if request.tool_choice:
        body["tool_choice"] = _tool_choice(request)
    return body


def _tool_choice(request: ChatRequest) -> Any:
    choice = request.tool_choice
    if not request.tools:
        raise InvalidRequest("tool_choice needs tools")
    if choice in ("auto", "none", "required"):
        return choice
    if choice not in {t.name for t in request.tools}:
        raise InvalidRequest(f"tool_choice names no tool of the request: {choice!r}")
    return {"type": "function", "function": {"name": choice}}


def classify(status: int, headers: Mapping[str, str], body: bytes, provider: str) -> UpstreamError:
    """Maps a failed response to a typed error (status first, then the structured `code`)."""
    payload = loads_body(body)
    err = payload.get("error") if isinstance(payload, dict) else None
    err = err if isinstance(err, dict) else {}
    return classify_error_object(err, status, headers, excerpt(body), provider)


def classify_error_object(
    err: Mapping[str, Any], status: int, headers: Mapping[str, str], body: str, provider: str
) -> UpstreamError:
    code = err.get("code") if isinstance(err.get("code"), str) else ""
    etype = err.get("type") if isinstance(err.get("type"), str) else ""
    kind = str(code or etype or "")
    kw: dict[str, Any] = {"status": status, "provider_type": kind, "body": body}
    message = err.get("message")
    detail = f": {redact(message)[:300]}" if isinstance(message, str) and message else ""
    if code == "context_length_exceeded":
        return ContextLengthExceeded(f"{provider}: the prompt does not fit the model's context{detail}", **kw)
    if code == "content_filter" or code == "content_policy_violation":
        return ContentFiltered(f"{provider}: the provider's content filter refused the request{detail}", **kw)
    if status == 429 or code == "rate_limit_exceeded" or code == "insufficient_quota":
        retry_after = parse_retry_after(headers)
        if code == "insufficient_quota":
            # Out of credit: retrying the same key will not help (OpenAI error-codes guide).
            return UpstreamUnauthenticated(f"{provider}: the account is out of quota", **kw)
        return RateLimited(f"{provider}: rate limited", retry_after_s=retry_after, **kw)
    if status in (401, 403) or code == "invalid_api_key":
        return UpstreamUnauthenticated(f"{provider} refused the server's credentials", **kw)
    if status == 503:
        return Overloaded(f"{provider} is overloaded", retry_after_s=parse_retry_after(headers), **kw)
    if 400 <= status < 500:
        return UpstreamInvalidRequest(f"{provider} rejected the request (HTTP {status}){detail}", **kw)
    if status == 0 and etype in ("invalid_request_error",):
        return UpstreamInvalidRequest(f"{provider} rejected the request{detail}", **kw)
    return UpstreamServerError(f"{provider} failed (HTTP {status})" if status else f"{provider} failed mid-stream", **kw)


class ChatCompletionsDecoder:
    """Per-stream state of one Chat Completions answer."""

    __slots__ = ("_provider", "_reason", "_tool_ids", "_usage_seen")

    def __init__(self, provider: str) -> None:
        self._provider = provider
        self._reason: FinishReason | None = None
        self._tool_ids: dict[int, str] = {}
        self._usage_seen = False

    def feed(self, event: SSEEvent) -> list[ProviderEvent]:
        data = event.data
        if data == "[DONE]":
            return [Finished(self._reason or FinishReason.STOP)]
        chunk = loads_event(event, self._provider)
        if not isinstance(chunk, dict):
            raise MalformedStream(f"{self._provider} sent an event that is not a chunk")
        err = chunk.get("error")
        if err is not None:  # an in-stream error event: data: {"error": {...}}
            raise classify_error_object(err if isinstance(err, dict) else {}, 0, {}, "", self._provider)
        out: list[ProviderEvent] = []
        choices = chunk.get("choices")
        if choices:
            choice = choices[0]
            delta = choice.get("delta")
            if delta:
                content = delta.get("content")
                if content:
                    out.append(TextDelta(content))
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning and isinstance(reasoning, str):
                    out.append(ReasoningDelta(reasoning))
                refusal = delta.get("refusal")
                if refusal:
                    out.append(TextDelta(refusal))
                tool_calls = delta.get("tool_calls")
                if tool_calls:
                    self._tool_deltas(tool_calls, out)
            reason = choice.get("finish_reason")
            if reason:
                self._reason = _FINISH.get(reason, FinishReason.STOP)
        usage = chunk.get("usage")
        if usage:
            self._usage_seen = True
            details = usage.get("completion_tokens_details") or {}
            prompt_details = usage.get("prompt_tokens_details") or {}  # automatic prompt caching
            out.append(
                UsageReport(
                    prompt_tokens=usage.get("prompt_tokens") or 0,
                    completion_tokens=usage.get("completion_tokens") or 0,
                    reasoning_tokens=details.get("reasoning_tokens") or 0,
                    cached_input_tokens=prompt_details.get("cached_tokens") or 0,
                )
            )
        return out

    def _tool_deltas(self, tool_calls: list[Any], out: list[ProviderEvent]) -> None:
        for call in tool_calls:
            index = call.get("index", 0)
            function = call.get("function") or {}
            arguments = function.get("arguments") or ""
            if index not in self._tool_ids:
                call_id = call.get("id") or f"call_{index}"
                self._tool_ids[index] = call_id
                out.append(ToolCallDelta(index, call_id, function.get("name") or "", arguments))
            elif arguments:
                out.append(ToolCallDelta(index, "", "", arguments))

    def end(self) -> list[ProviderEvent]:
        # The provider signalled the end of the answer (a finish_reason, then the usage chunk
        # that `stream_options.include_usage` puts last) but not `[DONE]`: some OpenAI-compatible
        # servers leave it out. The answer is complete; continuing it would add to a finished
        # answer. Without both, the body was cut.
        if self._reason is not None and self._usage_seen:
            return [Finished(self._reason)]
        raise StreamCut(f"{self._provider}'s stream ended before [DONE]")


class OpenAIAdapter:
    """OpenAI itself (`max_completion_tokens`, required by reasoning models) or an
    OpenAI-compatible server (`max_tokens`, which vLLM, Ollama, llama.cpp and most others
    accept)."""

    def __init__(self, name: str, default_base_url: str, max_tokens_field: str) -> None:
        self._name = name
        self._default_base_url = default_base_url
        self._max_tokens_field = max_tokens_field

    @property
    def name(self) -> str:
        return self._name

    @property
    def default_base_url(self) -> str:
        return self._default_base_url

    def build_request(self, request: ChatRequest, endpoint: Endpoint) -> UpstreamRequest:
        body = build_body(request, endpoint.upstream_model, self._max_tokens_field)
        headers = {"content-type": "application/json", "accept": "text/event-stream"}
        if endpoint.key is not None:
            headers["authorization"] = "Bearer " + endpoint.key.reveal()
        url = join_url(endpoint.base_url or self._default_base_url, "/chat/completions")
        return post_json(url, headers, endpoint, body)

    def new_decoder(self) -> ChatCompletionsDecoder:
        return ChatCompletionsDecoder(self._name)

    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
        return classify(status, headers, body, self._name)


class AzureOpenAIAdapter:
    """Azure OpenAI: deployment URL, `api-version`, `api-key` header."""

    DEFAULT_API_VERSION = "2024-10-21"

    @property
    def name(self) -> str:
        return "azure"

    @property
    def default_base_url(self) -> str:
        return ""  # always configured: https://RESOURCE.openai.azure.com

    def build_request(self, request: ChatRequest, endpoint: Endpoint) -> UpstreamRequest:
        if not endpoint.base_url:
            raise InvalidRequest("the azure deployment has no base_url")
        body = build_body(request, None, "max_tokens")
        headers = {"content-type": "application/json", "accept": "text/event-stream"}
        if endpoint.key is not None:
            headers["api-key"] = endpoint.key.reveal()
        url = join_url(endpoint.base_url, f"/openai/deployments/{endpoint.upstream_model}/chat/completions")
        params = {"api-version": endpoint.api_version or self.DEFAULT_API_VERSION}
        return post_json(url, headers, endpoint, body, params)

    def new_decoder(self) -> ChatCompletionsDecoder:
        return ChatCompletionsDecoder("azure")

    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
        return classify(status, headers, body, "azure")
