"""A fake LLM provider: a raw asyncio HTTP/1.1 server that replays a provider's recorded stream.

Each provider module (openai, anthropic, gemini) describes its wire format as a `Script` built
from the provider's own recorded fixtures (tests/fakes/fixtures, sources in its README); this
module serves it with keep-alive and chunked transfer encoding, as the real APIs do, and with
failure knobs.

Knobs (`Knobs.parse("cut=3,ttft=0.2")`) come from the server's defaults or per request from the
model name: `gpt-4o-mini@cut=3,pace=0.01` (the part after `@`), so a config file can point a
public model at a failure mode. Knobs:

    scenario=text|tool|thinking   which recording to replay (default text)
    tokens=N       replay N generated text tokens in the recording's format instead
    ttft=S         seconds before the first token      pace=S   seconds between tokens
    cut=N          after N tokens end the body cleanly, without the provider's finish
    reset=N        after N tokens drop the TCP connection mid-body
    stall=N        after N tokens send nothing more (until the client goes away)
    stream_error=N after N tokens send the provider's in-stream error event, then end
    malformed=N    after N tokens send an event that is not valid JSON
    no_done        leave out the end-of-stream event ([DONE], message_stop)
    hold_end       after the answer, keep the body open (send nothing more, never end it)
    drop_request   read the request, then drop the connection without answering
    status=S       answer with the provider's error body for HTTP status S
    code=X         the provider's structured error code/type for `status`
    retry_after=S, retry_after_ms=MS   headers of an error answer
    crlf           CRLF line endings     split=K   write each event in K-byte pieces
    hang           accept the request and never answer (no status line, no headers)
    offset=K       `tokens=N` starts at generated word K (a continuation that repeats some)
    cached=N       usage reports N prompt tokens read from the prompt cache (OpenAI
                   prompt_tokens_details.cached_tokens, Anthropic cache_read_input_tokens,
                   Gemini cachedContentTokenCount); cache_write=N: Anthropic
                   cache_creation_input_tokens
    times=N        the failure knobs apply to the first N requests of this model string only
    period=P       with `times`: the pattern repeats every P requests (times=1,period=2 flaps)
    tag=X          ignored: makes a model string (and so its `times` counter) unique
    echo           an error answer's message ends with every request header, as some
                   OpenAI-compatible servers do (`...; you sent authorization=Bearer ...`)

Observation: `requests` (every request: method, path, headers, body), `disconnects` (the
`time.monotonic()` at which a client dropped a stream before its end), `GET /_fake/state` for
the same over HTTP when the fake runs as a subprocess (`python -m tests.fakes.openai --port 0`
prints `fake-openai listening on 127.0.0.1:PORT`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class Knobs:
    scenario: str = "text"
    tokens: int | None = None
    ttft: float = 0.0
    pace: float = 0.0
    cut: int | None = None
    reset: int | None = None
    stall: int | None = None
    stream_error: int | None = None
    malformed: int | None = None
    no_done: bool = False
    hold_end: bool = False
    drop_request: bool = False
    status: int | None = None
    code: str | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    crlf: bool = False
    split: int | None = None
    hang: bool = False
    offset: int = 0
    cached: int | None = None  # prompt tokens reported as read from the provider's prompt cache
    cache_write: int | None = None  # ... and as written to it (Anthropic)
    times: int | None = None
    period: int | None = None
    tag: str | None = None
    echo: bool = False

    def healthy(self) -> Knobs:
        """These knobs without their failure modes."""
        return replace(self, ttft=0.0, cut=None, reset=None, stall=None, stream_error=None, malformed=None,
                       no_done=False, hold_end=False, drop_request=False, status=None, hang=False)

    @classmethod
    def parse(cls, text: str, base: Knobs | None = None) -> Knobs:
        base = base or cls()
        if not text:
            return base
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for item in text.split(","):
            name, _, value = item.strip().partition("=")
            if name not in types:
                raise ValueError(f"unknown knob {name!r}")
            kind = str(types[name])
            if "bool" in kind:
                values[name] = value in ("", "1", "true")
            elif "int" in kind:
                values[name] = int(value)
            elif "float" in kind:
                values[name] = float(value)
            else:
                values[name] = value
        return replace(base, **values)


def split_model(model: str) -> tuple[str, str]:
    """`"gpt-4o@cut=3"` -> `("gpt-4o", "cut=3")`."""
    name, _, knobs = model.partition("@")
    return name, knobs


def _echoed(body: bytes, headers: dict[str, str]) -> bytes:
    """The error body with the request's headers appended to its `error.message`."""
    payload = json.loads(body)
    error = (payload[0] if isinstance(payload, list) else payload)["error"]
    error["message"] += "; you sent " + ", ".join(f"{name}={value}" for name, value in headers.items())
    return json.dumps(payload).encode()


@dataclass
class Script:
    """One answer as SSE event bytes: `pre` (before the first token), `tokens` (one event per
    token), `post` (finish, usage), `done` (the end-of-stream event, dropped by `no_done`)."""

    pre: list[bytes]
    tokens: list[bytes]
    post: list[bytes]
    done: list[bytes] = field(default_factory=list)


@dataclass
class ErrorAnswer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


class Provider:
    """What a provider module implements."""

    name = "fake"

    def is_stream_request(self, method: str, path: str) -> bool:
        raise NotImplementedError

    def model_of(self, path: str, body: Any) -> str:
        raise NotImplementedError

    def script(self, knobs: Knobs) -> Script:
        raise NotImplementedError

    def error(self, status: int, knobs: Knobs) -> ErrorAnswer:
        raise NotImplementedError

    def stream_error_event(self, knobs: Knobs) -> bytes:
        raise NotImplementedError

    def malformed_event(self) -> bytes:
        return b'data: {"id":"broken","choices":[{"delta":{"content":"x"\n\n'

    def unary(self, method: str, path: str, body: Any) -> tuple[int, Any] | None:
        """A JSON answer for a non-streaming route (embeddings), or None: not one."""
        return None


def fake_embedding(text: str, dims: int = 64) -> list[float]:
    """A deterministic bag-of-words embedding: each lower-cased word adds 1 to a dimension chosen
    by its hash (stable across processes), so prompts with the same words point the same way."""
    import hashlib
    import re as _re

    vector = [0.0] * dims
    for word in _re.findall(r"\w+", text.lower()):
        vector[int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % dims] += 1.0
    return vector


def events_of(fixture: bytes) -> list[bytes]:
    """A recorded body as one bytes per event, each ending in a blank line (recordings may
    lack the final one)."""
    return [e + b"\n\n" for e in fixture.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]


WORDS = "The quick brown fox jumps over the lazy dog , and then it rests in the sun .".split()


def generated_tokens(n: int, offset: int = 0) -> list[str]:
    """The text tokens of `tokens=N` (from word `offset` on, as the same answer goes on)."""
    return [("" if i == 0 else " ") + WORDS[i % len(WORDS)] for i in range(offset, offset + n)]


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            413: "Payload Too Large", 429: "Too Many Requests", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout", 529: "Overloaded"}


class FakeServer:
    """Serves one `Provider` on 127.0.0.1. Use `async with FakeServer(provider) as fake:`."""

    def __init__(self, provider: Provider, knobs: Knobs | None = None, port: int = 0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.provider = provider
        self._ssl = ssl_context  # serve HTTPS (the url says https://localhost)
        self.knobs = knobs or Knobs()
        self.requests: list[RecordedRequest] = []
        self.disconnects: list[float] = []
        self.completed = 0
        self.connections = 0  # TCP connections accepted (keep-alive reuse shows here)
        self.counts: dict[str, int] = {}  # requests per model string (the `times` knob)
        self._port = port
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._disconnected = asyncio.Event()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        if self._ssl is not None:
            return f"https://localhost:{self.port}"
        return f"http://127.0.0.1:{self.port}"

    @property
    def last_request(self) -> RecordedRequest:
        return self.requests[-1]

    async def wait_disconnect(self, timeout_s: float = 5.0) -> float:
        """The monotonic time of the next (or an already seen) client disconnect."""
        await asyncio.wait_for(self._disconnected.wait(), timeout_s)
        return self.disconnects[-1]

    async def start(self) -> FakeServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self._port, ssl=self._ssl)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- HTTP/1.1 --

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self.connections += 1
        conn = _Conn(reader, writer)
        try:
            while await self._serve_one(conn):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stop() ends this connection task; it ends here either way
        finally:
            self._conns.discard(task)
            writer.close()

    async def _serve_one(self, conn: _Conn) -> bool:
        head = await conn.read_until(b"\r\n\r\n")
        if head is None:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await conn.read_chunked()
        else:
            body = await conn.read_exactly(int(headers.get("content-length", "0")))
        request = RecordedRequest(method, target, headers, body, time.monotonic())
        path = target.split("?", 1)[0]
        if path == "/_fake/state":
            await conn.send_json(200, self.state())
            return True
        self.requests.append(request)
        try:
            parsed = json.loads(body) if body else {}
        except ValueError:
            parsed = {}
        unary = self.provider.unary(method, path, parsed if isinstance(parsed, dict) else {})
        if unary is not None:
            await conn.send_json(*unary)
            return True
        if not self.provider.is_stream_request(method, path):
            await conn.send_json(404, {"error": {"message": f"no route {method} {path}"}})
            return True
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            payload = {}
        model = self.provider.model_of(target, payload)
        _, knob_text = split_model(model)
        knobs = Knobs.parse(knob_text, self.knobs)
        seen = self.counts[model] = self.counts.get(model, 0) + 1
        if knobs.times is not None and ((seen - 1) % (knobs.period or seen)) >= knobs.times:
            knobs = knobs.healthy()
        if knobs.hang:
            await asyncio.sleep(3600)
        if knobs.drop_request:  # the request was read whole: a reset now leaves it ambiguous
            conn.abort()
            return False
        if knobs.status is not None:
            answer = self.provider.error(knobs.status, knobs)
            if knobs.retry_after is not None:
                answer.headers["retry-after"] = knobs.retry_after
            if knobs.retry_after_ms is not None:
                answer.headers["retry-after-ms"] = knobs.retry_after_ms
            if knobs.echo:
                answer.body = _echoed(answer.body, headers)
            await conn.send(answer.status, answer.headers, answer.body)
            return True
        return await self._stream(conn, knobs)

    async def _stream(self, conn: _Conn, knobs: Knobs) -> bool:
        script = self.provider.script(knobs)
        await conn.start_chunked(200, {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"})
        watcher = asyncio.create_task(conn.wait_eof())
        writer_task = asyncio.create_task(self._write_script(conn, script, knobs))
        done, _ = await asyncio.wait({watcher, writer_task}, return_when=asyncio.FIRST_COMPLETED)
        if watcher in done:  # the client went away before the end of the answer
            self.disconnects.append(watcher.result())
            self._disconnected.set()
            writer_task.cancel()
            await asyncio.gather(writer_task, return_exceptions=True)
            return False
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        keep_alive = writer_task.result()
        if keep_alive:
            self.completed += 1
        return keep_alive

    async def _write_script(self, conn: _Conn, script: Script, knobs: Knobs) -> bool:
        """Writes the answer; returns False when the connection must close (reset knob)."""
        for event in script.pre:
            await conn.chunk(event, knobs)
        for i, event in enumerate(script.tokens):
            if i == 0 and knobs.ttft:
                await asyncio.sleep(knobs.ttft)
            elif i and knobs.pace:
                await asyncio.sleep(knobs.pace)
            if i == knobs.cut:
                await conn.end_chunked()
                return True
            if i == knobs.reset:
                conn.abort()
                return False
            if i == knobs.stall:
                await asyncio.sleep(3600)
            if i == knobs.stream_error:
                await conn.chunk(self.provider.stream_error_event(knobs), knobs)
                await conn.end_chunked()
                return True
            if i == knobs.malformed:
                await conn.chunk(self.provider.malformed_event(), knobs)
            await conn.chunk(event, knobs)
        n = len(script.tokens)
        if knobs.cut is not None and knobs.cut >= n:
            await conn.end_chunked()
            return True
        if knobs.stall is not None and knobs.stall >= n:
            await asyncio.sleep(3600)
        for event in script.post:
            await conn.chunk(event, knobs)
        if not knobs.no_done:
            for event in script.done:
                await conn.chunk(event, knobs)
        if knobs.hold_end:
            await asyncio.sleep(3600)
        await conn.end_chunked()
        return True

    def state(self) -> dict[str, Any]:
        return {
            "requests": [
                {"method": r.method, "path": r.path, "headers": r.headers, "body": r.body.decode("utf-8", "replace"), "at": r.at}
                for r in self.requests
            ],
            "disconnects": self.disconnects,
            "completed": self.completed,
            "connections": self.connections,
        }


class _Conn:
    """Buffered reading and chunked writing on one connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = b""

    async def _fill(self) -> bool:
        data = await self.reader.read(65536)
        if not data:
            return False
        self.buffer += data
        return True

    async def read_until(self, sep: bytes) -> bytes | None:
        while sep not in self.buffer:
            if not await self._fill():
                return None
        head, _, self.buffer = self.buffer.partition(sep)
        return head

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not await self._fill():
                raise asyncio.IncompleteReadError(self.buffer, n)
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    async def read_chunked(self) -> bytes:
        body = b""
        while True:
            size_line = await self.read_until(b"\r\n")
            if size_line is None:
                raise asyncio.IncompleteReadError(body, None)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await self.read_until(b"\r\n")
                return body
            body += await self.read_exactly(size)
            await self.read_exactly(2)

    async def wait_eof(self) -> float:
        """Returns the monotonic time at which the client closed its side."""
        while True:
            try:
                data = await self.reader.read(65536)
            except ConnectionError:
                return time.monotonic()
            if not data:
                return time.monotonic()
            self.buffer += data  # a pipelined request: keep it

    async def send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await self.writer.drain()

    async def send_json(self, status: int, payload: Any) -> None:
        await self.send(status, {"content-type": "application/json"}, json.dumps(payload).encode())

    async def start_chunked(self, status: int, headers: dict[str, str]) -> None:
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "transfer-encoding: chunked"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        await self.writer.drain()

    async def chunk(self, data: bytes, knobs: Knobs) -> None:
        if knobs.crlf:
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        pieces = [data[i : i + knobs.split] for i in range(0, len(data), knobs.split)] if knobs.split else [data]
        for piece in pieces:
            self.writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await self.writer.drain()
            if knobs.split:
                await asyncio.sleep(0.001)

    async def end_chunked(self) -> None:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()

    def abort(self) -> None:
        self.writer.transport.abort()


def main(provider: Provider) -> None:
    """`python -m tests.fakes.<name> --port 0 [--knobs ...]`: serves until killed."""
    parser = argparse.ArgumentParser(prog=f"fake-{provider.name}")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--knobs", default="", help="default knobs, e.g. ttft=0.05,pace=0.01")
    args = parser.parse_args()

    async def serve() -> None:
        fake = await FakeServer(provider, Knobs.parse(args.knobs), args.port).start()
        print(f"fake-{provider.name} listening on 127.0.0.1:{fake.port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
