"""The gRPC client: one bidi `Stream` call multiplexing any number of stream handles.

A reader task owns the call's responses and routes each frame to its handle's queue by stream
id; writes go through `call.write`, one at a time. A stream that ends with an error frame
raises `LLMProxyError` from its iterator and from `result()`: it is never reported as finished.

When the call fails underneath unfinished streams (the server restarted its listener, a proxy
cut the connection, the client was too slow), the client opens a new call after a backoff with
jitter, sends `resume` with the last `seq` of each unfinished stream, and the server replays
what was missed: the same semantics as the WebSocket client. Frames at or below a handle's last
`seq` are dropped, so nothing is delivered twice.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import grpc

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from llmproxy_client.backoff import Backoff

_END = object()
_SEQUENCED = frozenset({"started", "token", "done", "error", "tool_call", "reasoning", "restarted", "failover"})
# A call that fails with one of these may be resumed; others (bad credentials, a bug) may not.
_RESUMABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
)


class LLMProxyError(Exception):
    """An error frame from the server (or the call failing underneath a stream)."""

    def __init__(self, code: str, message: str, *, retryable: bool = False, retry_after_ms: int = 0) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms

    @classmethod
    def from_frame(cls, e: pb.StreamError) -> LLMProxyError:
        code = pb.ErrorCode.Name(e.code).removeprefix("ERROR_CODE_").lower()
        return cls(code, e.message, retryable=e.retryable, retry_after_ms=e.retry_after_ms)


class StreamHandle:
    """One stream: iterate it for token texts; `frames()` gives every frame instead."""

    def __init__(self, client: LLMProxyClient, stream_id: str) -> None:
        self.id = stream_id
        self._client = client
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._result: asyncio.Future[pb.StreamDone] = asyncio.get_running_loop().create_future()
        self.started: pb.StreamStarted | None = None
        self.start_frame: pb.ClientFrame | None = None
        self.last_seq = 0
        self.duplicates = 0  # frames dropped as already delivered (should stay 0)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._texts()

    async def _texts(self) -> AsyncIterator[str]:
        async for frame in self.frames():
            if frame.WhichOneof("kind") == "token":
                yield frame.token.text

    async def frames(self) -> AsyncIterator[pb.ServerFrame]:
        """Every frame of this stream, ending after `done`; raises `LLMProxyError` on error."""
        while True:
            item = await self._queue.get()
            if item is _END:
                await self._result  # raises the stream's error, if any
                return
            yield item

    async def result(self) -> pb.StreamDone:
        """The `done` frame. Raises `LLMProxyError` if the stream failed."""
        return await self._result

    async def cancel(self) -> None:
        """Asks the server to cancel; the stream then ends with finish reason CANCELLED."""
        await self._client._write(pb.ClientFrame(cancel=pb.CancelStream(stream_id=self.id)))

    @property
    def finished(self) -> bool:
        return self._result.done()

    def _deliver(self, frame: pb.ServerFrame) -> None:
        kind = frame.WhichOneof("kind")
        seq = getattr(frame, kind).seq if kind in _SEQUENCED else 0
        if seq:
            if seq <= self.last_seq:
                self.duplicates += 1
                return
            self.last_seq = seq
        if kind == "started":
            self.started = frame.started
        self._queue.put_nowait(frame)
        if kind == "done":
            self._settle(result=frame.done)
        elif kind == "error":
            self._settle(error=LLMProxyError.from_frame(frame.error))

    def _settle(self, *, result: pb.StreamDone | None = None, error: BaseException | None = None) -> None:
        if self._result.done():
            return
        if error is not None:
            self._result.set_exception(error)
            self._result.exception()  # consumed here, re-raised to whoever awaits
        else:
            assert result is not None
            self._result.set_result(result)
        self._queue.put_nowait(_END)


def to_message(m: Mapping[str, Any] | pb.ChatMessage) -> pb.ChatMessage:
    if isinstance(m, pb.ChatMessage):
        return m
    calls = [
        pb.ToolCall(id=c["id"], name=c["function"]["name"], arguments=c["function"].get("arguments", ""))
        for c in m.get("tool_calls") or ()
    ]
    return pb.ChatMessage(
        role=m["role"],
        content=m.get("content") or "",
        name=m.get("name", ""),
        tool_call_id=m.get("tool_call_id", ""),
        tool_calls=calls,
    )


class LLMProxyClient:
    def __init__(
        self,
        target: str,
        *,
        channel: grpc.aio.Channel | None = None,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        max_attempts: int = 12,
        metadata: tuple[tuple[str, str], ...] = (),
        seed: int | None = None,
    ) -> None:
        self._own_channel = channel is None
        self._channel = channel or grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.LLMProxyStub(self._channel)
        self._metadata = metadata
        self._reconnect = reconnect
        self._backoff = backoff or Backoff()
        self._max_attempts = max_attempts
        self._rng = random.Random(seed)
        self._call: grpc.aio.StreamStreamCall | None = None
        self._runner: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()  # a call is open and resumed: writes go straight out
        self._pending: list[pb.ClientFrame] = []  # written while no call was ready
        self._handles: dict[str, StreamHandle] = {}
        self._pongs: dict[int, asyncio.Future[pb.Pong]] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()  # grpc.aio allows one write in flight per call
        self._closing = False
        self.session: pb.SessionInfo | None = None  # from the first call's first frame
        self.reconnects = 0

    async def __aenter__(self) -> LLMProxyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def list_models(self) -> list[pb.ModelInfo]:
        return list((await self._stub.ListModels(pb.ListModelsRequest(), metadata=self._metadata)).models)

    def stream(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any] | pb.ChatMessage],
        stream_id: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        stop: Iterable[str] = (),
        seed: int | None = None,
        cache: Mapping[str, Any] | None = None,
    ) -> StreamHandle:
        """Starts a stream and returns its handle at once (the start frame is written in the
        background; a failure to write ends the handle with `LLMProxyError`). `cache`: the
        response-cache controls, e.g. `{"skip_read": True}` or `{"ttl_s": 60}`
        (docs/caching.md); `handle.started.cache.kind` says whether the answer was replayed."""
        sid = stream_id or f"py-{next(self._ids)}"
        params = pb.GenerationParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=list(stop), seed=seed)
        start = pb.StartStream(stream_id=sid, model=model, messages=[to_message(m) for m in messages], params=params)
        if cache:
            start.cache.CopyFrom(pb.CacheControl(**cache))
        handle = StreamHandle(self, sid)
        handle.start_frame = pb.ClientFrame(start=start)
        self._handles[sid] = handle
        task = asyncio.get_running_loop().create_task(self._write(handle.start_frame))
        task.add_done_callback(lambda t: _settle_on_write_failure(t, handle))
        return handle

    async def ping(self, nonce: int = 0) -> pb.Pong:
        future: asyncio.Future[pb.Pong] = asyncio.get_running_loop().create_future()
        self._pongs[nonce] = future
        await self._write(pb.ClientFrame(ping=pb.Ping(nonce=nonce)))
        return await future

    async def close(self) -> None:
        """Ends the session (its streams are cancelled) and the call."""
        self._closing = True
        if self._call is not None and self._ready.is_set():
            try:
                async with self._write_lock:
                    await self._call.write(pb.ClientFrame(close=pb.Close()))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass
        if self._call is not None:
            self._call.cancel()
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        if self._own_channel:
            await self._channel.close()

    def drop_call(self) -> None:
        """Cancels the current call as a network failure would (for tests and demos); the
        client then reconnects and resumes."""
        if self._call is not None:
            self._call.cancel()

    async def _write(self, frame: pb.ClientFrame) -> None:
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run())
        if not self._ready.is_set():
            self._pending.append(frame)
            return
        assert self._call is not None
        try:
            async with self._write_lock:
                await self._call.write(frame)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            self._pending.append(frame)  # sent again after the resume

    async def _run(self) -> None:
        """Owns the call across reconnects: open, resume, read; on a resumable failure, again."""
        attempt = 0
        error: LLMProxyError = LLMProxyError("unavailable", "the stream call ended")
        while True:
            call = self._stub.Stream(metadata=self._metadata)
            self._call = call
            user_cancelled = False
            try:
                await self._open(call)
                attempt = 0
                while (frame := await call.read()) is not grpc.aio.EOF:
                    self._dispatch(frame)
                return  # the server ended the call cleanly
            except grpc.aio.AioRpcError as exc:
                error = _call_error(exc)
                user_cancelled = exc.code() == grpc.StatusCode.CANCELLED and self._closing
                resumable = exc.code() in _RESUMABLE or (exc.code() == grpc.StatusCode.CANCELLED and not self._closing)
            except asyncio.CancelledError:
                raise
            finally:
                self._ready.clear()
            if user_cancelled or not resumable or not self._reconnect or attempt >= self._max_attempts or not self._unfinished():
                self._fail_all(error)
                return
            await asyncio.sleep(self._backoff.delay_s(attempt, self._rng))
            attempt += 1
            self.reconnects += 1

    async def _open(self, call: grpc.aio.StreamStreamCall) -> None:
        """Reads the `session` frame; resumes the earlier session if streams are unfinished;
        then sends what was written meanwhile."""
        first = await call.read()
        if first is grpc.aio.EOF:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "no session frame")
        unfinished = self._unfinished()
        if self.session is None or not unfinished:
            self.session = first.session
        else:
            resume = pb.Resume(session_id=self.session.session_id, resume_token=self.session.resume_token)
            for sid, handle in unfinished.items():
                resume.streams.add(stream_id=sid, last_seq=handle.last_seq)
            async with self._write_lock:
                await call.write(pb.ClientFrame(resume=resume))
            reply = await call.read()
            if reply is grpc.aio.EOF:
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "no resume answer")
            if reply.WhichOneof("kind") != "resumed":
                self._fail_all(LLMProxyError.from_frame(reply.error))  # expired: a fresh session
                self.session = first.session
            else:
                restart = [s.stream_id for s in reply.resumed.streams if not s.known]
                starts = [self._handles[sid].start_frame for sid in restart if sid in self._handles]
                self._pending[:0] = [f for f in starts if f is not None and f not in self._pending]
        pending, self._pending = self._pending, []
        async with self._write_lock:
            for frame in pending:
                await call.write(frame)
        self._ready.set()

    def _dispatch(self, frame: pb.ServerFrame) -> None:
        kind = frame.WhichOneof("kind")
        if kind == "pong":
            future = self._pongs.pop(frame.pong.nonce, None)
            if future is not None and not future.done():
                future.set_result(frame.pong)
            return
        if kind in ("session", "resumed"):
            return
        sid = getattr(frame, kind).stream_id
        handle = self._handles.get(sid)
        if handle is None:
            return
        if kind == "error" and frame.error.seq == 0 and handle.started is not None and frame.error.code != pb.ERROR_CODE_EXPIRED:
            return  # a rejected frame about a live stream (e.g. a second start): not its end
        handle._deliver(frame)
        if handle.finished:
            del self._handles[sid]

    def _unfinished(self) -> dict[str, StreamHandle]:
        return {sid: h for sid, h in self._handles.items() if not h.finished}

    def _fail_all(self, error: LLMProxyError) -> None:
        for handle in self._handles.values():
            handle._settle(error=error)
        self._handles.clear()
        for future in self._pongs.values():
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved here; re-raised to whoever awaits the ping
        self._pongs.clear()


def _settle_on_write_failure(task: asyncio.Task[None], handle: StreamHandle) -> None:
    if not task.cancelled() and task.exception() is not None:
        handle._settle(error=_call_error(task.exception()))


def _call_error(exc: BaseException | None) -> LLMProxyError:
    if isinstance(exc, grpc.aio.AioRpcError):
        code = "unauthenticated" if exc.code() == grpc.StatusCode.UNAUTHENTICATED else "unavailable"
        return LLMProxyError(code, f"gRPC call failed: {exc.code().name}", retryable=code == "unavailable")
    return LLMProxyError("internal", f"client error: {exc!r}")
