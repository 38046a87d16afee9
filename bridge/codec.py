"""The bridge's one JSON codec: browser JSON frames <-> llmproxy.v1 protos.

Client frames (docs/protocol.md has an example of each):
    {"type": "start", "id": "s1", "model": "demo", "messages": [...], ...}
    {"model": "demo", "messages": [...], "stream": true}      the bare form: a start
    {"type": "cancel", "id": "s1"}
    {"type": "ping", "nonce": 7}
    {"type": "resume", "session_id": ..., "resume_token": ..., "streams": {"s1": 41}}
    {"type": "modify", "id": "s1", "append": [...], "messages": [...], "keep_partial": true}
    {"type": "close"}

Every server frame is one JSON object with `type`, and also `token` (the text of a token frame,
"" on every other frame) and `latency` ("12ms": time since the stream's previous token, or since
its start for the first), so a client that only reads `data.token` renders exactly the answer.

Decoding validates types strictly and names the offending field: a field of the wrong type or
an unknown field is an error, never silently dropped. Encoding writes each frame once with
orjson, straight from the proto fields.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orjson

from llmproxy.v1 import llmproxy_pb2 as pb

_START_FIELDS = frozenset(
    {"type", "id", "model", "messages", "stream", "temperature", "top_p", "max_tokens", "stop", "seed", "tools", "tool_choice", "conversation", "cache"}
)
_CACHE_FIELDS = frozenset({"skip_read", "skip_write", "ttl_s"})
_MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_call_id", "tool_calls", "cache_control"})

FINISH_NAMES: dict[int, str] = {
    v.number: v.name.removeprefix("FINISH_REASON_").lower() for v in pb.FinishReason.DESCRIPTOR.values
}
CODE_NAMES: dict[int, str] = {v.number: v.name.removeprefix("ERROR_CODE_").lower() for v in pb.ErrorCode.DESCRIPTOR.values}


class FrameError(Exception):
    """A client frame that cannot be turned into a proto: answered with an error frame."""

    def __init__(self, code: int, message: str, stream_id: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.stream_id = stream_id


# -- client JSON -> proto ------------------------------------------------------------------------


def decode_client_frame(data: str | bytes, max_bytes: int, max_messages: int = 1024) -> pb.ClientFrame:
    """Parses one WebSocket message. Raises `FrameError` with a typed code, and nothing else
    (tests/unit/bridge/test_codec_fuzz.py). `max_messages` bounds `messages` and `append`
    before any proto is built (the server checks the same limit again)."""
    if isinstance(data, bytes):
        raise FrameError(pb.ERROR_CODE_MALFORMED_FRAME, "binary frames are not accepted; send JSON as text frames")
    if len(data) > max_bytes:  # characters <= bytes, so this check is never too strict
        raise FrameError(pb.ERROR_CODE_FRAME_TOO_LARGE, f"frame larger than {max_bytes} bytes")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise FrameError(pb.ERROR_CODE_MALFORMED_FRAME, f"invalid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(obj, dict):
        raise FrameError(pb.ERROR_CODE_MALFORMED_FRAME, "a frame must be a JSON object")
    kind = obj.get("type")
    stream_id = obj.get("id", "")
    if not isinstance(stream_id, str):
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, "id must be a string")
    if kind is None and "messages" in obj:
        kind = "start"  # the bare OpenAI-style request
    for key in ("messages", "append"):
        items = obj.get(key)
        if isinstance(items, list) and len(items) > max_messages:
            raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"at most {max_messages} messages per request", stream_id)
    decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise FrameError(
            pb.ERROR_CODE_UNKNOWN_FRAME_TYPE, f"unknown frame type {kind!r}; expected start, cancel, modify, ping, resume or close", stream_id
        )
    try:
        return decoder(obj, stream_id)
    except FrameError as exc:
        exc.stream_id = stream_id
        raise


def _start(obj: dict[str, Any], stream_id: str) -> pb.ClientFrame:
    unknown = obj.keys() - _START_FIELDS
    if unknown:
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"unknown field {sorted(unknown)[0]!r} in start frame")
    if obj.get("stream", True) is not True:
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, "stream must be true: llmproxy only streams")
    start = pb.StartStream(stream_id=stream_id, model=_str(obj, "model", required=True), conversation=_str(obj, "conversation"))
    messages = obj.get("messages")
    if not isinstance(messages, list):
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, "messages must be a list of message objects")
    for i, m in enumerate(messages):
        _message(start.messages.add(), m, i)
    params = start.params
    if (v := _number(obj, "temperature")) is not None:
        params.temperature = v
    if (v := _number(obj, "top_p")) is not None:
        params.top_p = v
    if (n := _int(obj, "max_tokens")) is not None:
        if not 0 < n < 2**32:
            raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, "max_tokens must be a positive integer")
        params.max_tokens = n
    if (n := _int(obj, "seed")) is not None:
        if not -(2**63) <= n < 2**63:
            raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, "seed must fit in 64 bits")
        params.seed = n
    stop = obj.get("stop")
    if isinstance(stop, str):
        params.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        params.stop.extend(stop)
    elif stop is not None:
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, "stop must be a string or a list of strings")
    tools = obj.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, "tools must be a list")
        for i, t in enumerate(tools):
            _tool(start.tools.add(), t, i)
    choice = obj.get("tool_choice")
    if isinstance(choice, str):
        start.tool_choice = choice
    elif isinstance(choice, dict):
        fn = choice.get("function")
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
            raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, "tool_choice object must be {type: function, function: {name}}")
        start.tool_choice = fn["name"]
    elif choice is not None:
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, "tool_choice must be a string or an object")
    if "cache" in obj:
        _cache(start.cache, obj["cache"])
    return pb.ClientFrame(start=start)


def _cache(out: pb.CacheControl, c: object) -> None:
    """The start frame's `cache`: {"skip_read": bool, "skip_write": bool, "ttl_s": int}."""
    if not isinstance(c, dict) or c.keys() - _CACHE_FIELDS:
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, "cache must be an object with skip_read, skip_write and ttl_s")
    for flag in ("skip_read", "skip_write"):
        if flag in c:
            if not isinstance(c[flag], bool):
                raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"cache.{flag} must be true or false")
            setattr(out, flag, c[flag])
    if (n := _int(c, "ttl_s")) is not None:
        if not 0 <= n < 2**32:
            raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, "cache.ttl_s must be a non-negative integer")
        out.ttl_s = n


def _message(out: pb.ChatMessage, m: object, i: int) -> None:
    if not isinstance(m, dict):
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"messages[{i}] must be an object")
    unknown = m.keys() - _MESSAGE_FIELDS
    if unknown:
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"unknown field {sorted(unknown)[0]!r} in messages[{i}]")
    out.role = _str(m, "role", required=True, where=f"messages[{i}].")
    content = m.get("content")
    if isinstance(content, str):
        out.content = content
    elif isinstance(content, list):  # OpenAI content parts: only text parts are supported
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"messages[{i}].content parts must be text parts")
            texts.append(part["text"])
            if "cache_control" in part:  # Anthropic's breakpoint on a content part: after this message
                out.cache_breakpoint = True
        out.content = "".join(texts)
    elif content is not None:
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"messages[{i}].content must be a string")
    out.name = _str(m, "name", where=f"messages[{i}].")
    if "cache_control" in m:  # {"type": "ephemeral"}: a prompt-cache breakpoint after this message
        if not isinstance(m["cache_control"], dict):
            raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"messages[{i}].cache_control must be an object")
        out.cache_breakpoint = True
    out.tool_call_id = _str(m, "tool_call_id", where=f"messages[{i}].")
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"messages[{i}].tool_calls must be a list")
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if not (
                isinstance(fn, dict)
                and isinstance(call.get("id"), str)
                and isinstance(fn.get("name"), str)
                and isinstance(fn.get("arguments", ""), str)
            ):
                raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"messages[{i}].tool_calls entries need id, function.name, function.arguments")
            out.tool_calls.add(id=call["id"], name=fn["name"], arguments=fn.get("arguments", ""))


def _tool(out: pb.ToolDefinition, t: object, i: int) -> None:
    fn = t.get("function") if isinstance(t, dict) else None
    if not (isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(fn, dict)):
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"tools[{i}] must be {{type: function, function: {{...}}}}")
    out.name = _str(fn, "name", required=True, where=f"tools[{i}].function.")
    out.description = _str(fn, "description", where=f"tools[{i}].function.")
    params = fn.get("parameters", {})
    if not isinstance(params, dict):
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"tools[{i}].function.parameters must be an object")
    try:
        out.parameters_json = orjson.dumps(params).decode()
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (255); the server allows 64
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"tools[{i}].function.parameters nests too deeply") from None


def _cancel(obj: dict[str, Any], stream_id: str) -> pb.ClientFrame:
    if not stream_id:
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, "cancel needs the id of the stream")
    return pb.ClientFrame(cancel=pb.CancelStream(stream_id=stream_id))


def _ping(obj: dict[str, Any], stream_id: str) -> pb.ClientFrame:
    nonce = _int(obj, "nonce")
    if nonce is not None and not 0 <= nonce < 2**64:
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, "nonce must be a non-negative 64-bit integer")
    return pb.ClientFrame(ping=pb.Ping(nonce=nonce or 0))


def _resume(obj: dict[str, Any], stream_id: str) -> pb.ClientFrame:
    resume = pb.Resume(session_id=_str(obj, "session_id", required=True), resume_token=_str(obj, "resume_token", required=True))
    streams = obj.get("streams", {})
    if not isinstance(streams, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for k, v in streams.items()
    ):
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, "streams must map stream ids to the last seq received")
    for sid, last_seq in streams.items():
        resume.streams.add(stream_id=sid, last_seq=last_seq)
    return pb.ClientFrame(resume=resume)


def _modify(obj: dict[str, Any], stream_id: str) -> pb.ClientFrame:
    if not stream_id:
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, "modify needs the id of the stream")
    modify = pb.Modify(stream_id=stream_id)
    for key, field in (("messages", modify.messages), ("append", modify.append)):
        items = obj.get(key, [])
        if not isinstance(items, list):
            raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"{key} must be a list of message objects")
        for i, m in enumerate(items):
            _message(field.add(), m, i)
    keep = obj.get("keep_partial", False)
    if not isinstance(keep, bool):
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, "keep_partial must be true or false")
    modify.keep_partial = keep
    return pb.ClientFrame(modify=modify)


def _close(obj: dict[str, Any], stream_id: str) -> pb.ClientFrame:
    return pb.ClientFrame(close=pb.Close())


_DECODERS: dict[str, Callable[[dict[str, Any], str], pb.ClientFrame]] = {
    "start": _start,
    "cancel": _cancel,
    "ping": _ping,
    "resume": _resume,
    "modify": _modify,
    "close": _close,
}


def _str(obj: dict[str, Any], key: str, *, required: bool = False, where: str = "") -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"{where}{key} is required")
        return ""
    if not isinstance(value, str):
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"{where}{key} must be a string")
    return value


def _number(obj: dict[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"{key} must be a number")
    return float(value)


def _int(obj: dict[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FrameError(pb.ERROR_CODE_INVALID_REQUEST, f"{key} must be an integer")
    return value


# -- proto -> server JSON ------------------------------------------------------------------------


def _latency(us: int) -> str:
    return f"{(us + 500) // 1000}ms"


def _ms(us: int) -> float:
    return round(us / 1000, 3)


def _usage(u: pb.Usage) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "reasoning_tokens": u.reasoning_tokens}
    if u.cached_input_tokens or u.cache_write_input_tokens:  # the provider's prompt cache
        out["cached_input_tokens"] = u.cached_input_tokens
        out["cache_write_input_tokens"] = u.cache_write_input_tokens
    if u.cached:  # replayed from the response cache
        out["cached"] = True
    return out


def _cache_hit(h: pb.CacheHit) -> dict[str, Any]:
    return {"kind": h.kind, "score": round(h.score, 4)}


def _attempts(parts: Iterable[pb.AttemptUsage]) -> list[dict[str, Any]]:
    return [{"deployment": p.deployment, "usage": _usage(p.usage)} for p in parts]


def _timing(t: pb.Timing) -> dict[str, float | int]:
    return {
        "ttft_ms": _ms(t.ttft_us),
        "total_ms": _ms(t.total_us),
        "tokens": t.tokens,
        "tokens_per_s": round(t.tokens_per_s, 2),
        "itl_p50_ms": _ms(t.itl_p50_us),
        "itl_p95_ms": _ms(t.itl_p95_us),
        "itl_p99_ms": _ms(t.itl_p99_us),
        "itl_max_ms": _ms(t.itl_max_us),
        "stalls": t.stalls,
        "relay_p50_ms": _ms(t.relay_p50_us),
        "relay_max_ms": _ms(t.relay_max_us),
        "attempts": t.attempts,
        "ux_score": t.ux_score,
    }


def encode_token(f: pb.ServerFrame) -> bytes:
    """A token frame (the hot path: the caller knows the kind)."""
    t = f.token
    if t.count > 1:
        return orjson.dumps(
            {"type": "token", "id": t.stream_id, "seq": t.seq, "token": t.text, "latency": _latency(t.latency_us), "count": t.count}
        )
    return orjson.dumps({"type": "token", "id": t.stream_id, "seq": t.seq, "token": t.text, "latency": _latency(t.latency_us)})


def _enc_started(f: pb.ServerFrame) -> bytes:
    s = f.started
    out: dict[str, Any] = {
        "type": "started",
        "id": s.stream_id,
        "seq": s.seq,
        "model": s.model,
        "provider": s.provider,
        "upstream_model": s.upstream_model,
        "deployment": s.deployment,
        "token": "",
        "latency": _latency(s.latency_us),
    }
    if s.HasField("cache"):
        out["cache"] = _cache_hit(s.cache)
    return orjson.dumps(out)


def _enc_done(f: pb.ServerFrame) -> bytes:
    d = f.done
    out: dict[str, Any] = {
        "type": "done",
        "id": d.stream_id,
        "seq": d.seq,
        "finish_reason": FINISH_NAMES[d.finish_reason],
        "usage": _usage(d.usage),
        "timing": _timing(d.timing),
        "deployment": d.deployment,
        "token": "",
        "latency": _latency(d.latency_us),
    }
    if len(d.attempts_usage) > 1:  # continued on another deployment: each part (their sum is usage)
        out["attempts"] = _attempts(d.attempts_usage)
    if d.HasField("cache"):
        out["cache"] = _cache_hit(d.cache)
    return orjson.dumps(out)


def _enc_error(f: pb.ServerFrame) -> bytes:
    e = f.error
    out: dict[str, Any] = {
        "type": "error",
        "id": e.stream_id,
        "seq": e.seq,
        "code": CODE_NAMES[e.code],
        "message": e.message,
        "retryable": e.retryable,
        "token": "",
        "latency": _latency(e.latency_us),
    }
    if e.retry_after_ms:
        out["retry_after_ms"] = e.retry_after_ms
    if e.seq:  # the error ended a stream: say how far it got
        out["usage"] = _usage(e.usage)
        out["timing"] = _timing(e.timing)
        out["deployment"] = e.deployment
        if len(e.attempts_usage) > 1:
            out["attempts"] = _attempts(e.attempts_usage)
    return orjson.dumps(out)


def _enc_pong(f: pb.ServerFrame) -> bytes:
    p = f.pong
    return orjson.dumps({"type": "pong", "nonce": p.nonce, "server_time_us": p.server_time_us, "token": "", "latency": "0ms"})


def _enc_tool_call(f: pb.ServerFrame) -> bytes:
    c = f.tool_call
    return orjson.dumps(
        {
            "type": "tool_call",
            "id": c.stream_id,
            "seq": c.seq,
            "index": c.index,
            "call_id": c.id,
            "name": c.name,
            "arguments": c.arguments,
            "token": "",
            "latency": _latency(c.latency_us),
        }
    )


def _enc_reasoning(f: pb.ServerFrame) -> bytes:
    r = f.reasoning
    return orjson.dumps(
        {"type": "reasoning", "id": r.stream_id, "seq": r.seq, "text": r.text, "token": "", "latency": _latency(r.latency_us)}
    )


def _enc_session(f: pb.ServerFrame) -> bytes:
    s = f.session
    return orjson.dumps(
        {
            "type": "session",
            "session_id": s.session_id,
            "resume_token": s.resume_token,
            "resume_grace_ms": s.resume_grace_ms,
            "token": "",
            "latency": "0ms",
        }
    )


def _enc_resumed(f: pb.ServerFrame) -> bytes:
    r = f.resumed
    streams = {s.stream_id: {"after_seq": s.after_seq, "replayed": s.replayed, "live": s.live, "known": s.known} for s in r.streams}
    return orjson.dumps({"type": "resumed", "session_id": r.session_id, "streams": streams, "token": "", "latency": "0ms"})


def _enc_restarted(f: pb.ServerFrame) -> bytes:
    r = f.restarted
    return orjson.dumps(
        {"type": "restarted", "id": r.stream_id, "seq": r.seq, "keep_partial": r.keep_partial, "token": "", "latency": _latency(r.latency_us)}
    )


def _enc_heartbeat(f: pb.ServerFrame) -> bytes:
    h = f.heartbeat
    return orjson.dumps({"type": "heartbeat", "id": h.stream_id, "idle_ms": h.idle_ms, "token": "", "latency": "0ms"})


def _enc_failover(f: pb.ServerFrame) -> bytes:
    o = f.failover
    return orjson.dumps(
        {
            "type": "failover",
            "id": o.stream_id,
            "seq": o.seq,
            "deployment": o.deployment,
            "provider": o.provider,
            "upstream_model": o.upstream_model,
            "token": "",
            "latency": _latency(o.latency_us),
        }
    )


_ENCODERS: dict[str, Callable[[pb.ServerFrame], bytes]] = {
    "failover": _enc_failover,
    "session": _enc_session,
    "resumed": _enc_resumed,
    "restarted": _enc_restarted,
    "heartbeat": _enc_heartbeat,
    "token": encode_token,
    "started": _enc_started,
    "done": _enc_done,
    "error": _enc_error,
    "pong": _enc_pong,
    "tool_call": _enc_tool_call,
    "reasoning": _enc_reasoning,
}


def encode_server_frame(frame: pb.ServerFrame) -> bytes:
    """One server frame as UTF-8 JSON (sent as a text frame)."""
    return _ENCODERS[frame.WhichOneof("kind")](frame)


def encode_error(code: int, message: str, stream_id: str = "", retryable: bool = False) -> bytes:
    """An error frame made by the bridge itself (a rejected frame, or the reason a connection
    is being closed: `seq` 0). `code` is a proto ErrorCode number."""
    return orjson.dumps(
        {
            "type": "error",
            "id": stream_id,
            "seq": 0,
            "code": CODE_NAMES[code],
            "message": message,
            "retryable": retryable,
            "token": "",
            "latency": "0ms",
        }
    )
