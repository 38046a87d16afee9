"""Google Gemini (Generative Language API): the pure adapter.

Wire format (https://ai.google.dev/api/generate-content#method:-models.streamgeneratecontent):
`POST {base_url}/models/{model}:streamGenerateContent?alt=sse` with `x-goog-api-key`. Each SSE
`data:` is a whole `GenerateContentResponse`: `candidates[0].content.parts[]` (`text`,
`thought: true` for reasoning summaries, `functionCall {name, args}`), `finishReason` on the
last one, cumulative `usageMetadata`. There is no `[DONE]`: the body ends after the chunk that
carries `finishReason`. A prompt the safety filter blocks answers with `promptFeedback.blockReason`
and no candidates. Lines may end in CRLF (the SSE decoder accepts both).

Request mapping: roles `user` and `model`; system messages become `systemInstruction`; an
assistant's tool calls become `functionCall` parts and a tool message a `functionResponse` part,
named after the call it answers (found by `tool_call_id` in the history). Tool schemas are
passed as `parametersJsonSchema`, which takes JSON Schema as is. A function call's arguments
arrive whole, so each call is one `ToolCallDelta`; Gemini gives calls no id unless it has one
(`functionCall.id`), so we name them `call_<index>`.

Usage is normalized to OpenAI's meaning: completion tokens include the thoughts.

Errors (https://ai.google.dev/gemini-api/docs/troubleshooting): `{"error": {"code", "message",
"status", "details"}}`, classified by HTTP status, `status` and the `details` (`ErrorInfo.reason`
`API_KEY_INVALID`, `RetryInfo.retryDelay`). An over-long prompt is an `INVALID_ARGUMENT` with no
structured reason, so it reaches the client as invalid_request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

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
    InvalidRequest,
    MalformedStream,
    Overloaded,
    RateLimited,
    StreamCut,
    UpstreamError,
    UpstreamInvalidRequest,
    UpstreamServerError,
    UpstreamTimeout,
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

PROVIDER = "gemini"

_FINISH = {
    "STOP": FinishReason.STOP,
    "MAX_TOKENS": FinishReason.LENGTH,
    "SAFETY": FinishReason.CONTENT_FILTER,
    "RECITATION": FinishReason.CONTENT_FILTER,
    "BLOCKLIST": FinishReason.CONTENT_FILTER,
    "PROHIBITED_CONTENT": FinishReason.CONTENT_FILTER,
    "SPII": FinishReason.CONTENT_FILTER,
    "IMAGE_SAFETY": FinishReason.CONTENT_FILTER,
}


def build_body(request: ChatRequest) -> dict[str, Any]:
    """The generateContent body for `request`; raises `InvalidRequest`."""
    system: list[dict[str, str]] = []
    contents: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool call id -> function name, for functionResponse
    for m in request.messages:
        if m.name:
            raise InvalidRequest("gemini does not support message names")
        if m.role == "system":
            if contents:
                raise InvalidRequest("gemini accepts system messages only before the conversation")
            system.append({"text": m.content})
            continue
        parts: list[dict[str, Any]] = []
        if m.role == "tool":
            name = call_names.get(m.tool_call_id)
            if name is None:
                raise InvalidRequest("a tool message must answer a tool call of an earlier assistant message")
            role = "user"
            response = _tool_response(m.content)
            parts.append({"functionResponse": {"name": name, "response": response}})
        else:
            role = "model" if m.role == "assistant" else "user"
            if m.content:
                parts.append({"text": m.content})
            for call in m.tool_calls:
                call_names[call.id] = call.name
                parts.append(
                    {
                        "functionCall": {
                            "name": call.name,
                            "args": parse_json_arg(call.arguments, f"the arguments of tool call {call.id!r}"),
                        }
                    }
                )
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    config: dict[str, Any] = {}
    if request.temperature is not None:
        config["temperature"] = request.temperature
    if request.top_p is not None:
        config["topP"] = request.top_p
    if request.max_tokens is not None:
        config["maxOutputTokens"] = request.max_tokens
    if request.stop:
        config["stopSequences"] = list(request.stop)
    if request.seed is not None:
        config["seed"] = request.seed
    if config:
        body["generationConfig"] = config
    if request.tools:
        body["tools"] = [
            {
                "functionDeclarations": [
                    {
                        "name": t.name,
                        "description": t.description,
                        "parametersJsonSchema": parse_json_arg(t.parameters_json, f"the parameters of tool {t.name!r}"),
                    }
                    for t in request.tools
                ]
            }
        ]
    if request.tool_choice:
        body["toolConfig"] = {"functionCallingConfig": _tool_choice(request)}
    return body


def _tool_response(content: str) -> dict[str, Any]:
    """A tool's answer as the object `functionResponse.response` must be."""
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        return {"result": content}
    return value if isinstance(value, dict) else {"result": value}


def _tool_choice(request: ChatRequest) -> dict[str, Any]:
    choice = request.tool_choice
    if not request.tools:
        raise InvalidRequest("tool_choice needs tools")
    if choice in ("auto", "none", "required"):
        return {"mode": {"auto": "AUTO", "none": "NONE", "required": "ANY"}[choice]}
    if choice not in {t.name for t in request.tools}:
        raise InvalidRequest(f"tool_choice names no tool of the request: {choice!r}")
    return {"mode": "ANY", "allowedFunctionNames": [choice]}


def _retry_delay(details: Any) -> float | None:
    """`RetryInfo.retryDelay` ("37s", a protobuf Duration in JSON) from the error details."""
    for detail in details if isinstance(details, list) else ():
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            delay = detail.get("retryDelay")
            if isinstance(delay, str) and delay.endswith("s"):
                try:
                    return float(delay[:-1])
                except ValueError:
                    return None
    return None


def _reasons(details: Any) -> set[str]:
    return {
        str(d.get("reason"))
        for d in (details if isinstance(details, list) else ())
        if isinstance(d, dict) and d.get("reason")
    }


def classify_error_object(err: Mapping[str, Any], status: int, headers: Mapping[str, str], body: str) -> UpstreamError:
    gstatus = err.get("status") if isinstance(err.get("status"), str) else ""
    if not status and isinstance(err.get("code"), int):
        status = err["code"]  # an in-stream error names its HTTP status
    details = err.get("details")
    kw: dict[str, Any] = {"status": status, "provider_type": str(gstatus or ""), "body": body}
    message = err.get("message")
    detail = f": {redact(message)[:300]}" if isinstance(message, str) and message else ""
    if "API_KEY_INVALID" in _reasons(details) or gstatus in ("UNAUTHENTICATED", "PERMISSION_DENIED") or status in (
        401,
        403,
    ):
        return UpstreamUnauthenticated("gemini refused the server's credentials", **kw)
    if gstatus == "RESOURCE_EXHAUSTED" or status == 429:
        retry = _retry_delay(details)
        return RateLimited("gemini: rate limited", retry_after_s=retry if retry is not None else parse_retry_after(headers), **kw)
    if gstatus == "UNAVAILABLE" or status == 503:
        return Overloaded("gemini is overloaded", retry_after_s=parse_retry_after(headers), **kw)
    if gstatus == "DEADLINE_EXCEEDED" or status == 504:
        return UpstreamTimeout("gemini timed out", **kw)
    if 400 <= status < 500 or gstatus in ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND"):
        return UpstreamInvalidRequest(f"gemini rejected the request (HTTP {status}){detail}", **kw)
    return UpstreamServerError(f"gemini failed (HTTP {status})" if status else "gemini failed mid-stream", **kw)


def classify(status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
    payload = loads_body(body)
    if isinstance(payload, list) and payload:  # the non-SSE stream form wraps errors in a list
        payload = payload[0]
    err = payload.get("error") if isinstance(payload, dict) else None
    return classify_error_object(err if isinstance(err, dict) else {}, status, headers, excerpt(body))


class GenerateContentDecoder:
    """Per-stream state: how many tool calls so far, the last usage sent, the finish."""

    __slots__ = ("_calls", "_usage", "_finished")

    def __init__(self) -> None:
        self._calls = 0
        self._usage: UsageReport | None = None
        self._finished: Finished | None = None

    def feed(self, event: SSEEvent) -> list[ProviderEvent]:
        chunk = loads_event(event, PROVIDER)
        if not isinstance(chunk, dict):
            raise MalformedStream("gemini sent an event that is not an object")
        err = chunk.get("error")
        if err is not None:
            raise classify_error_object(err if isinstance(err, dict) else {}, 0, {}, "")
        out: list[ProviderEvent] = []
        candidates = chunk.get("candidates")
        reason: str | None = None
        if candidates:
            candidate = candidates[0]
            for part in (candidate.get("content") or {}).get("parts") or ():
                text = part.get("text")
                if text:
                    out.append(ReasoningDelta(text) if part.get("thought") else TextDelta(text))
                call = part.get("functionCall")
                if call:
                    index = self._calls
                    self._calls += 1
                    out.append(
                        ToolCallDelta(
                            index,
                            call.get("id") or f"call_{index}",
                            call.get("name") or "",
                            orjson.dumps(call.get("args") or {}).decode(),
                        )
                    )
            reason = candidate.get("finishReason")
        usage = chunk.get("usageMetadata")
        if usage:
            thoughts = usage.get("thoughtsTokenCount") or 0
            report = UsageReport(
                prompt_tokens=usage.get("promptTokenCount") or 0,
                completion_tokens=(usage.get("candidatesTokenCount") or 0) + thoughts,
                reasoning_tokens=thoughts,
                cached_input_tokens=usage.get("cachedContentTokenCount") or 0,  # implicit or explicit context caching
            )
            if report != self._usage:  # cumulative: send only what changed
                self._usage = report
                out.append(report)
        if not candidates:
            block = (chunk.get("promptFeedback") or {}).get("blockReason")
            if block:
                raise ContentFiltered(f"gemini blocked the prompt ({block})", provider_type=str(block))
        if reason:
            if reason == "MALFORMED_FUNCTION_CALL":
                raise UpstreamServerError("gemini produced a malformed function call", provider_type=reason)
            finish = _FINISH.get(reason, FinishReason.STOP)
            if finish is FinishReason.STOP and self._calls:
                finish = FinishReason.TOOL_CALLS
            self._finished = Finished(finish)
        return out

    def end(self) -> list[ProviderEvent]:
        # No [DONE]: the body ends after the chunk with `finishReason`, which may still be
        # followed by a usage-only chunk, so the finish is held until the end of the body.
        if self._finished is None:
            raise StreamCut("gemini's stream ended before a finishReason")
        return [self._finished]


class GeminiAdapter:
    @property
    def name(self) -> str:
        return PROVIDER

    @property
    def default_base_url(self) -> str:
        return "https://generativelanguage.googleapis.com/v1beta"

    def build_request(self, request: ChatRequest, endpoint: Endpoint) -> UpstreamRequest:
        body = build_body(request)
        headers = {"content-type": "application/json", "accept": "text/event-stream"}
        if endpoint.key is not None:
            headers["x-goog-api-key"] = endpoint.key.reveal()
        url = join_url(
            endpoint.base_url or self.default_base_url, f"/models/{endpoint.upstream_model}:streamGenerateContent"
        )
        return post_json(url, headers, endpoint, body, {"alt": "sse"})

    def new_decoder(self) -> GenerateContentDecoder:
        return GenerateContentDecoder()

    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
        return classify(status, headers, body)
