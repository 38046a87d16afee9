"""A fast fake OpenAI Chat Completions upstream for `make bench`, in raw asyncio.

    python -m bench.fake_upstream --port 0 [--tokens 200] [--pace-ms 0] [--ttft-ms 0]

prints `bench-fake-upstream listening on 127.0.0.1:PORT` and serves `POST /v1/chat/completions`
with `"stream": true` in OpenAI's wire format
(https://platform.openai.com/docs/api-reference/chat-streaming): HTTP/1.1 keep-alive, chunked
transfer encoding, one `data: {chat.completion.chunk}` event per token, the finish chunk, the
usage chunk when `stream_options.include_usage` is set (and `"usage": null` on every earlier
chunk, as OpenAI does then), and `data: [DONE]`.

Each token's text is `|<send time>`: `time.monotonic_ns()` taken just before the token is
written. CLOCK_MONOTONIC is one clock for every process on a Linux machine, so a client computes
relay latency = its own `monotonic_ns()` at receipt minus that stamp. Tokens merged by the proxy
arrive as `|t1|t2|...`, one stamp per token.

Knobs, in increasing precedence: the command line; `max_tokens` / `max_completion_tokens` in the
request (the token count); a suffix of the model name, `fake@tokens=500,pace_ms=10,ttft_ms=0`,
which lets a proxy config point one public model at one workload.

Why not tests/fakes/openai.py: that one replays recordings with failure knobs and is built for
fidelity; this one is built for speed (every byte but the stamp is pre-encoded) so the fake's
own CPU does not cap what the bench can measure.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, replace

import orjson

READY = "bench-fake-upstream listening on "
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 8 * 1024 * 1024
CREATED = 1_700_000_000  # a fixed `created`: the chunks are the same bytes in every run


@dataclass(frozen=True, slots=True)
class Knobs:
    tokens: int = 200
    pace_ms: float = 0.0
    ttft_ms: float = 0.0

    def override(self, spec: str) -> Knobs:
        """`tokens=500,pace_ms=10` over these knobs. Raises ValueError on an unknown knob."""
        out = self
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, value = item.partition("=")
            if name == "tokens":
                out = replace(out, tokens=int(value))
            elif name == "pace_ms":
                out = replace(out, pace_ms=float(value))
            elif name == "ttft_ms":
                out = replace(out, ttft_ms=float(value))
            else:
                raise ValueError(f"unknown knob {name!r}")
        return out


def model_name(knobs: Knobs) -> str:
    """The upstream model name that selects `knobs` (used by the bench's config and clients)."""
    return f"fake@tokens={knobs.tokens},pace_ms={knobs.pace_ms:g},ttft_ms={knobs.ttft_ms:g}"


def _chunk(payload: bytes) -> bytes:
    """One SSE event as one HTTP/1.1 chunk (RFC 9112 7.1)."""
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(event), event)


@dataclass(frozen=True, slots=True)
class Frames:
    """The pre-encoded bytes of one answer; only the token text varies."""

    role: bytes
    token_head: bytes  # `data: {...,"content":"` (after the chunk-size line)
    token_tail: bytes  # `"},...}\n\n`
    finish: bytes
    usage: bytes  # empty when include_usage is off
    done: bytes

    @staticmethod
    def build(model: str, include_usage: bool, prompt_tokens: int, completion_tokens: int) -> Frames:
        head = b'{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":%d,"model":%b,' % (
            CREATED,
            orjson.dumps(model),
        )
        head += b'"system_fingerprint":"fp_bench","choices":['
        null_usage = b',"usage":null' if include_usage else b""
        role = head + b'{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]' + null_usage + b"}"
        finish = head + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]' + null_usage + b"}"
        usage = b""
        if include_usage:
            counts = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            }
            usage = _chunk(head + b'],"usage":' + orjson.dumps(counts) + b"}")
        return Frames(
            role=_chunk(role),
            token_head=b"data: " + head + b'{"index":0,"delta":{"content":"',
            token_tail=b'"},"logprobs":null,"finish_reason":null}]' + null_usage + b"}\n\n",
            finish=_chunk(finish),
            usage=usage,
            done=_chunk(b"[DONE]") + b"0\r\n\r\n",
        )

    def token(self, text: bytes) -> bytes:
        size = len(self.token_head) + len(text) + len(self.token_tail)
        return b"%x\r\n%b%b%b\r\n" % (size, self.token_head, text, self.token_tail)


STREAM_HEADERS = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"Connection: keep-alive\r\n"
    b"Cache-Control: no-cache\r\n"
    b"\r\n"
)


def _error(status: int, reason: str, message: str, kind: str) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})
    return b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%b" % (
        status,
        reason.encode(),
        len(body),
        body,
    )


class FakeUpstream:
    """Serves streams on keep-alive connections until the process is stopped."""

    def __init__(self, defaults: Knobs) -> None:
        self._defaults = defaults

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away (a cancelled stream closes its connection)
        finally:
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answers one request; returns whether the connection stays open."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # a clean close between requests
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if length > MAX_BODY_BYTES:
            writer.write(_error(413, "Payload Too Large", "request too large", "invalid_request_error"))
            return False
        body = await reader.readexactly(length) if length else b""
        if method != "POST" or not path.split("?", 1)[0].endswith("/chat/completions"):
            writer.write(_error(404, "Not Found", f"no route {method} {path}", "invalid_request_error"))
            return True
        try:
            request = orjson.loads(body)
            model = str(request.get("model", "fake"))
            knobs = self._defaults
            limit = request.get("max_completion_tokens") or request.get("max_tokens")
            if isinstance(limit, int) and limit > 0:
                knobs = replace(knobs, tokens=limit)
            knobs = knobs.override(model.partition("@")[2])
            stream = request.get("stream") is True
            include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
            prompt_tokens = sum(len(str(m.get("content", "")).split()) + 4 for m in request.get("messages", []))
        except (orjson.JSONDecodeError, ValueError, AttributeError, TypeError) as exc:
            writer.write(_error(400, "Bad Request", f"bad request: {exc}", "invalid_request_error"))
            return True
        if not stream:
            writer.write(_error(400, "Bad Request", "the bench fake only streams", "invalid_request_error"))
            return True
        await self._stream(writer, Frames.build(model, include_usage, prompt_tokens, knobs.tokens), knobs)
        return True

    @staticmethod
    async def _stream(writer: asyncio.StreamWriter, frames: Frames, knobs: Knobs) -> None:
        write, clock = writer.write, time.monotonic_ns
        write(STREAM_HEADERS + frames.role)
        start = time.monotonic()
        ttft_s, pace_s = knobs.ttft_ms / 1000, knobs.pace_ms / 1000
        for i in range(knobs.tokens):
            if ttft_s or pace_s:
                # An absolute schedule: a late wake-up does not push every later token back.
                delay = start + ttft_s + i * pace_s - time.monotonic()
                await asyncio.sleep(max(0.0, delay))
            else:
                # Unpaced: as fast as we can, but one token per loop turn, so concurrent
                # streams interleave (as a busy provider's do) instead of each one's whole
                # answer going out before the next stream's first token.
                await asyncio.sleep(0)
            write(frames.token(b"|%d" % clock()))
            # drain() only waits when the socket's buffer is over its high-water mark: a slow
            # reader slows us down (as a real provider's TCP would) instead of buffering all.
            await writer.drain()
        write(frames.finish + frames.usage + frames.done)
        await writer.drain()


async def serve(port: int, defaults: Knobs) -> None:
    fake = FakeUpstream(defaults)
    server = await asyncio.start_server(fake.handle, "127.0.0.1", port, backlog=1024, limit=MAX_HEADER_BYTES)
    bound = server.sockets[0].getsockname()[1]
    print(f"{READY}127.0.0.1:{bound}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench-fake-upstream", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--pace-ms", type=float, default=0.0)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    defaults = Knobs(tokens=args.tokens, pace_ms=args.pace_ms, ttft_ms=args.ttft_ms)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(args.port, defaults))
    else:
        # SIGTERM ends the process at once: nothing here needs cleaning up.
        uvloop.run(serve(args.port, defaults))


if __name__ == "__main__":
    main(sys.argv[1:])
