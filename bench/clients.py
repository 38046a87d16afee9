"""The load client's three paths to the same tokens.

- `DirectPath`: straight to the fake upstream over HTTP/1.1 with a minimal SSE reader (chunked
  body -> `data:` events -> orjson), the baseline a proxy is compared with.
- `WebSocketPath`: the full chain, WebSocket -> bridge -> gRPC -> server (-> upstream).
- `GrpcPath`: straight to the server's `Stream` RPC, skipping the bridge.
- `ChatCompletionsPath`: the full chain through the bridge's OpenAI-compatible HTTP API
  (`POST /v1/chat/completions`, SSE), for the workloads in bench/run.py's `CHAT_WORKLOADS`.

Every path connects first, then waits on a shared barrier so that all streams of a round send
their request at the same moment, and times from that send: connection set-up is not part of
time to first token on any path (a browser's WebSocket and the proxy's upstream pool are both
open before a prompt is typed). One stream per connection (per call for gRPC, over one shared
channel as the bridge does) on every path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from bench.stats import StreamRecord
from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc

C = TypeVar("C")
PROMPT = "Explain quantum computing"
CONNECT_TIMEOUT_S = 30.0
CONNECTS_AT_ONCE = 50  # below the listeners' accept backlog (asyncio's default is 100)

# What a failed stream records as its error, instead of a traceback.
FAILURES = (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, WebSocketException, grpc.aio.AioRpcError, ValueError, KeyError)


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """What one stream asks for."""

    model: str
    max_tokens: int
    stamped: bool  # tokens carry the fake upstream's send stamps (`|<ns>` per token)
    timeout_s: float
    from_connect: bool = False  # time to first token counts from opening the connection


class Path(Protocol):
    name: str

    async def run(self, spec: StreamSpec, go: Go) -> StreamRecord: ...


@dataclass(frozen=True, slots=True)
class Go:
    """The start line of a round: every stream connects, then waits here; `on_go` runs once,
    as they are released (the bench reads the processes' CPU there, so connection set-up is
    not counted per token)."""

    barrier: asyncio.Barrier
    connect_slots: asyncio.Semaphore
    on_go: Callable[[], None]


class _Tokens:
    """Receive times (and relay latencies) of one stream's tokens as they arrive."""

    __slots__ = ("recv", "relay", "stamped")

    def __init__(self, stamped: bool) -> None:
        self.recv: list[int] = []
        self.relay: list[int] = []
        self.stamped = stamped

    def add(self, text: str, count: int, now_ns: int) -> None:
        if self.stamped:
            stamps = text.split("|")[1:]
            self.relay.extend(now_ns - int(s) for s in stamps)
            count = len(stamps)
        self.recv.extend([now_ns] * count)

    def record(self, sent_ns: int, ok: bool, error: str = "") -> StreamRecord:
        return StreamRecord(sent_ns, time.monotonic_ns(), tuple(self.recv), tuple(self.relay), ok, error)


def _failure(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"grpc {exc.code().name}"
    return type(exc).__name__


async def _timed(connect_: Callable[[], Awaitable[C]], go: Go) -> tuple[C | None, str]:
    """Connects (a few at a time), then waits for every stream of the round. A failed connect
    still waits on the barrier, so one failure cannot hang the others."""
    conn: C | None = None
    error = ""
    try:
        async with go.connect_slots:
            conn = await asyncio.wait_for(connect_(), CONNECT_TIMEOUT_S)
    except FAILURES as exc:
        error = "connect: " + _failure(exc)
    if await go.barrier.wait() == 0:
        go.on_go()
    return conn, error


# -- direct: HTTP/1.1 + SSE to the fake upstream -------------------------------------------------


class ChunkedSSE:
    """Incremental decoder of a chunked (RFC 9112 7.1) SSE body into `data:` payloads. Minimal
    on purpose: the fake writes LF-terminated events and no chunk extensions or trailers."""

    __slots__ = ("_raw", "_body", "_left", "_crlf", "finished")

    def __init__(self) -> None:
        self._raw = bytearray()
        self._body = bytearray()
        self._left = 0  # bytes of the current chunk still to come
        self._crlf = False  # the CRLF after a chunk's data is still to come
        self.finished = False  # the last (zero-size) chunk was seen

    def feed(self, data: bytes) -> list[bytes]:
        raw, body = self._raw, self._body
        raw += data
        pos = 0
        while not self.finished:
            if self._left:
                take = min(self._left, len(raw) - pos)
                if not take:
                    break
                body += raw[pos : pos + take]
                pos += take
                self._left -= take
                self._crlf = not self._left
            elif self._crlf:
                if len(raw) - pos < 2:
                    break
                pos += 2
                self._crlf = False
            else:
                nl = raw.find(b"\r\n", pos)
                if nl < 0:
                    break
                size = int(raw[pos:nl], 16)
                pos = nl + 2
                self._left = size
                self.finished = size == 0
        del raw[:pos]
        payloads = []
        start = 0
        while (end := body.find(b"\n\n", start)) >= 0:
            event = bytes(body[start:end])
            start = end + 2
            if event.startswith(b"data: "):
                payloads.append(event[6:])
        del body[:start]
        return payloads


class DirectPath:
    name = "direct"

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port

    def _request(self, spec: StreamSpec) -> bytes:
        body = orjson.dumps(
            {
                "model": spec.model,
                "messages": [{"role": "user", "content": PROMPT}],
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": spec.max_tokens,
            }
        )
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Authorization: Bearer sk-bench\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def run(self, spec: StreamSpec, go: Go) -> StreamRecord:
        opened = time.monotonic_ns()
        conn, error = await _timed(lambda: asyncio.open_connection(self._host, self._port), go)
        tokens = _Tokens(spec.stamped)
        clock = time.monotonic_ns
        sent = clock()
        if conn is None:
            return tokens.record(sent, False, error)
        reader, writer = conn
        request = self._request(spec)
        ok = False
        try:
            async with asyncio.timeout(spec.timeout_s):
                sent = opened if spec.from_connect else clock()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    return tokens.record(sent, False, head.split(b"\r\n", 1)[0].decode())
                decoder, loads, read = ChunkedSSE(), orjson.loads, reader.read
                while not ok:
                    data = await read(65536)
                    now = clock()
                    if not data:
                        return tokens.record(sent, False, "cut")
                    for payload in decoder.feed(data):
                        if payload == b"[DONE]":
                            ok = True
                            break
                        choices = loads(payload)["choices"]
                        if choices and (text := choices[0]["delta"].get("content")):
                            tokens.add(text, 1, now)
        except FAILURES as exc:
            return tokens.record(sent, False, _failure(exc))
        finally:
            writer.close()
        return tokens.record(sent, ok)


class ChatCompletionsPath(DirectPath):
    """The full chain through the bridge's OpenAI-compatible HTTP API: HTTP/1.1 + SSE ->
    bridge -> relay -> server (-> upstream). The same request and reader as `DirectPath`: the
    bridge answers in the upstream's own shape."""

    name = "chat"


# -- the chain: WebSocket -> bridge -> server ----------------------------------------------------


class WebSocketPath:
    name = "ws"

    def __init__(self, url: str) -> None:
        self._url = url

    async def _open(self) -> ClientConnection:
        ws = await connect(self._url, compression=None, max_size=None, ping_interval=None)
        await ws.recv()  # the `session` frame every connection starts with
        return ws

    async def run(self, spec: StreamSpec, go: Go) -> StreamRecord:
        opened = time.monotonic_ns()
        conn, error = await _timed(self._open, go)
        tokens = _Tokens(spec.stamped)
        clock = time.monotonic_ns
        sent = clock()
        if conn is None:
            return tokens.record(sent, False, error)
        ws = conn
        start = orjson.dumps(
            {
                "type": "start",
                "id": "s",
                "model": spec.model,
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": spec.max_tokens,
            }
        ).decode()
        try:
            async with asyncio.timeout(spec.timeout_s):
                sent = opened if spec.from_connect else clock()
                await ws.send(start)
                loads = orjson.loads
                async for raw in ws:
                    now = clock()
                    frame = loads(raw)
                    kind = frame["type"]
                    if kind == "token":
                        tokens.add(frame["token"], frame.get("count", 1), now)
                    elif kind == "done":
                        ok = frame["finish_reason"] in ("stop", "length")
                        return tokens.record(sent, ok, "" if ok else frame["finish_reason"])
                    elif kind == "error":
                        return tokens.record(sent, False, frame["code"])
                return tokens.record(sent, False, "closed")
        except FAILURES as exc:
            return tokens.record(sent, False, _failure(exc))
        finally:
            await ws.close()  # 1000: the session ends with the connection


# -- direct gRPC to the server -------------------------------------------------------------------


class GrpcPath:
    name = "grpc"

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = pb_grpc.LLMProxyStub(channel)

    async def _open(self) -> grpc.aio.StreamStreamCall:
        call = self._stub.Stream()
        await call.read()  # the `session` frame
        return call

    async def run(self, spec: StreamSpec, go: Go) -> StreamRecord:
        opened = time.monotonic_ns()
        conn, error = await _timed(self._open, go)
        tokens = _Tokens(spec.stamped)
        clock = time.monotonic_ns
        sent = clock()
        if conn is None:
            return tokens.record(sent, False, error)
        call = conn
        start = pb.ClientFrame(
            start=pb.StartStream(
                stream_id="s",
                model=spec.model,
                messages=[pb.ChatMessage(role="user", content=PROMPT)],
                params=pb.GenerationParams(max_tokens=spec.max_tokens),
            )
        )
        try:
            async with asyncio.timeout(spec.timeout_s):
                sent = opened if spec.from_connect else clock()
                await call.write(start)
                read, eof = call.read, grpc.aio.EOF
                while (frame := await read()) is not eof:
                    now = clock()
                    kind = frame.WhichOneof("kind")
                    if kind == "token":
                        t = frame.token
                        tokens.add(t.text, t.count or 1, now)
                    elif kind == "done":
                        ok = frame.done.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
                        return tokens.record(sent, ok, "" if ok else pb.FinishReason.Name(frame.done.finish_reason))
                    elif kind == "error":
                        return tokens.record(sent, False, pb.ErrorCode.Name(frame.error.code))
                return tokens.record(sent, False, "eof")
        except FAILURES as exc:
            return tokens.record(sent, False, _failure(exc))
        finally:
            await _close_call(call)


async def _close_call(call: grpc.aio.StreamStreamCall) -> None:
    """Ends the session (as the bridge does on a normal close) and lets the call finish."""
    try:
        await call.write(pb.ClientFrame(close=pb.Close()))
        await call.done_writing()
        async with asyncio.timeout(5.0):
            while await call.read() is not grpc.aio.EOF:
                pass
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError, asyncio.TimeoutError):
        pass  # already ended, or slow to: the cancel below settles it
    finally:
        call.cancel()


async def run_round(
    path: Path, spec: StreamSpec, streams: int, on_go: Callable[[], None], arrival_spread_s: float = 0.0, seed: int = 0
) -> list[StreamRecord]:
    """Runs `streams` concurrent streams on `path`, all sent at once; never raises for a
    failed stream (it is recorded as failed). Cancelling it cancels every stream.

    With `arrival_spread_s`, streams arrive as users do instead: each opens its own new
    connection at a moment drawn uniformly over the spread (seeded), and nothing waits for the
    others; time to first token then counts from opening the connection."""
    if arrival_spread_s <= 0:
        go = Go(asyncio.Barrier(streams), asyncio.Semaphore(CONNECTS_AT_ONCE), on_go)
        return list(await asyncio.gather(*(path.run(spec, go) for _ in range(streams))))
    rng = random.Random(seed)
    offsets = sorted(rng.uniform(0, arrival_spread_s) for _ in range(streams))
    spec = dataclasses.replace(spec, from_connect=True)
    on_go()
    t0 = time.monotonic()

    async def arrive(offset: float) -> StreamRecord:
        await asyncio.sleep(max(0.0, t0 + offset - time.monotonic()))
        return await path.run(spec, Go(asyncio.Barrier(1), asyncio.Semaphore(1), lambda: None))

    return list(await asyncio.gather(*(arrive(o) for o in offsets)))
