"""The gRPC client: one bidi `Stream` call multiplexing any number of stream handles.

A reader task owns the call's responses and routes each frame to its handle's queue by stream
id; writes go through `call.write`. A stream that ends with an error frame raises
`LLMProxyError` from its iterator and from `result()`: it is never reported as finished.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import grpc

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc

_END = object()


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

    def _deliver(self, frame: pb.ServerFrame) -> None:
        kind = frame.WhichOneof("kind")
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
    def __init__(self, target: str, *, channel: grpc.aio.Channel | None = None) -> None:
        self._own_channel = channel is None
        self._channel = channel or grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.LLMProxyStub(self._channel)
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._handles: dict[str, StreamHandle] = {}
        self._pongs: dict[int, asyncio.Future[pb.Pong]] = {}
        self._ids = itertools.count(1)
        self.session: pb.SessionInfo | None = None  # from the call's first frame
        self._write_lock = asyncio.Lock()  # grpc.aio allows one write in flight per call

    async def __aenter__(self) -> LLMProxyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def list_models(self) -> list[pb.ModelInfo]:
        return list((await self._stub.ListModels(pb.ListModelsRequest())).models)

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
    ) -> StreamHandle:
        """Starts a stream and returns its handle at once (the start frame is written in the
        background; a failure to write ends the handle with `LLMProxyError`)."""
        sid = stream_id or f"py-{next(self._ids)}"
        params = pb.GenerationParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=list(stop), seed=seed)
        start = pb.StartStream(stream_id=sid, model=model, messages=[to_message(m) for m in messages], params=params)
        handle = StreamHandle(self, sid)
        self._handles[sid] = handle
        task = asyncio.get_running_loop().create_task(self._write(pb.ClientFrame(start=start)))
        task.add_done_callback(lambda t: _settle_on_write_failure(t, handle))
        return handle

    async def ping(self, nonce: int = 0) -> pb.Pong:
        future: asyncio.Future[pb.Pong] = asyncio.get_running_loop().create_future()
        self._pongs[nonce] = future
        await self._write(pb.ClientFrame(ping=pb.Ping(nonce=nonce)))
        return await future

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._own_channel:
            await self._channel.close()

    async def _write(self, frame: pb.ClientFrame) -> None:
        if self._call is None:
            self._call = self._stub.Stream()
            self._reader = asyncio.get_running_loop().create_task(self._read_loop(self._call))
        async with self._write_lock:
            await self._call.write(frame)

    async def _read_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        error: BaseException = LLMProxyError("unavailable", "the stream call ended")
        try:
            async for frame in call:
                kind = frame.WhichOneof("kind")
                if kind == "session":
                    self.session = frame.session
                    continue
                if kind in ("resumed", "heartbeat"):
                    continue
                if kind == "pong":
                    future = self._pongs.pop(frame.pong.nonce, None)
                    if future is not None and not future.done():
                        future.set_result(frame.pong)
                    continue
                sid = getattr(frame, kind).stream_id
                handle = self._handles.get(sid)
                if handle is None:
                    continue
                if kind == "error" and frame.error.seq == 0 and handle.started is not None:
                    continue  # a rejected frame about a live stream (e.g. a second start): not its end
                handle._deliver(frame)
                if kind in ("done", "error"):
                    del self._handles[sid]
        except grpc.aio.AioRpcError as exc:
            error = _call_error(exc)
        finally:
            for handle in self._handles.values():
                handle._settle(error=error)
            self._handles.clear()


def _settle_on_write_failure(task: asyncio.Task[None], handle: StreamHandle) -> None:
    if not task.cancelled() and task.exception() is not None:
        handle._settle(error=_call_error(task.exception()))


def _call_error(exc: BaseException | None) -> LLMProxyError:
    if isinstance(exc, grpc.aio.AioRpcError):
        return LLMProxyError("unavailable", f"gRPC call failed: {exc.code().name}", retryable=True)
    return LLMProxyError("internal", f"client error: {exc!r}")
