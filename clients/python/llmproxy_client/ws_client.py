"""The WebSocket client, with automatic reconnect and transparent resume.

    async with WSClient("ws://127.0.0.1:8765/stream") as client:
        s = client.stream(model="demo", messages=[{"role": "user", "content": "Hi"}])
        async for token in s:
            print(token, end="")

When the connection drops, the client reconnects with exponential backoff and full jitter
(base 1 s x 1.6 per attempt, +/-20 %, capped), sends `resume` with the last `seq` it holds per
unfinished stream, and the server replays exactly what was missed. Each handle drops any frame
at or below its last `seq`, so a token is never delivered twice. A stream whose start frame
never reached the server is started again. `close()` ends the session (close code 1000).
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from llmproxy_client.backoff import Backoff
from llmproxy_client.grpc_client import LLMProxyError

_END = object()


class WSStream:
    """One stream: iterate it for token texts; `frames()` gives every frame."""

    def __init__(self, client: WSClient, stream_id: str, start: dict[str, Any]) -> None:
        self.id = stream_id
        self.start_frame = start
        self.last_seq = 0
        self.duplicates = 0  # frames dropped because they were already delivered (should stay 0)
        self._client = client
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._texts()

    async def _texts(self) -> AsyncIterator[str]:
        async for frame in self.frames():
            if frame["type"] == "token":
                yield frame["token"]

    async def frames(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            item = await self._queue.get()
            if item is _END:
                await self._result
                return
            yield item

    async def result(self) -> dict[str, Any]:
        """The `done` frame; raises `LLMProxyError` if the stream failed."""
        return await self._result

    @property
    def finished(self) -> bool:
        return self._result.done()

    async def cancel(self) -> None:
        await self._client._send({"type": "cancel", "id": self.id})

    async def modify(self, *, append: Iterable[Mapping[str, Any]] = (), messages: Iterable[Mapping[str, Any]] = (), keep_partial: bool = False) -> None:
        await self._client._send(
            {"type": "modify", "id": self.id, "append": list(append), "messages": list(messages), "keep_partial": keep_partial}
        )

    def _deliver(self, frame: dict[str, Any]) -> None:
        seq = frame.get("seq", 0)
        kind = frame["type"]
        if kind == "error" and seq == 0:
            if self.last_seq == 0 or frame["code"] == "expired":  # refused start, or no replay
                self._settle(error=_error(frame))
            return
        if seq and seq <= self.last_seq:
            self.duplicates += 1
            return
        if seq:
            self.last_seq = seq
        self._queue.put_nowait(frame)
        if kind == "done":
            self._settle(result=frame)
        elif kind == "error":
            self._settle(error=_error(frame))

    def _settle(self, *, result: dict[str, Any] | None = None, error: LLMProxyError | None = None) -> None:
        if self._result.done():
            return
        if error is not None:
            self._result.set_exception(error)
            self._result.exception()
        else:
            self._result.set_result(result or {})
        self._queue.put_nowait(_END)


def _error(frame: dict[str, Any]) -> LLMProxyError:
    return LLMProxyError(frame["code"], frame["message"], retryable=frame.get("retryable", False), retry_after_ms=frame.get("retry_after_ms", 0))


class WSClient:
    def __init__(
        self,
        url: str | list[str],
        *,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        max_attempts: int = 12,
        seed: int | None = None,
        **connect_kwargs: Any,
    ) -> None:
        self._urls = [url] if isinstance(url, str) else list(url)  # tried in turn on reconnect
        self._reconnect = reconnect
        self._backoff = backoff or Backoff()
        self._max_attempts = max_attempts
        self._rng = random.Random(seed)
        self._connect_kwargs = connect_kwargs
        self._ws: ClientConnection | None = None
        self._streams: dict[str, WSStream] = {}
        self._pending: list[dict[str, Any]] = []  # frames to send once (re)connected
        self._ids = itertools.count(1)
        self._ready = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._closing = False
        self.session: dict[str, Any] | None = None
        self.reconnects = 0

    async def __aenter__(self) -> WSClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run())
        await asyncio.wait({self._runner, asyncio.ensure_future(self._ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if self._runner.done():
            self._runner.result()

    def stream(self, *, model: str, messages: Iterable[Mapping[str, Any]], stream_id: str | None = None, **params: Any) -> WSStream:
        sid = stream_id or f"ws-{next(self._ids)}"
        start = {"type": "start", "id": sid, "model": model, "messages": list(messages), **params}
        handle = WSStream(self, sid, start)
        self._streams[sid] = handle
        asyncio.get_running_loop().create_task(self._send(start))
        return handle

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            await self._ws.close(1000)
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)

    def drop_connection(self) -> None:
        """Cuts the TCP connection without a close handshake, as a network failure would."""
        if self._ws is not None:
            self._ws.transport.abort()

    async def _send(self, frame: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None or not self._ready.is_set():
            self._pending.append(frame)
            return
        try:
            await ws.send(orjson.dumps(frame).decode())
        except ConnectionClosed:
            self._pending.append(frame)

    async def _run(self) -> None:
        attempt = 0
        tries = 0  # connections tried: each try goes to the next URL
        while True:
            url = self._urls[tries % len(self._urls)]
            tries += 1
            try:
                async with connect(url, compression=None, **self._connect_kwargs) as ws:
                    attempt = 0
                    await self._serve(ws)
            except (OSError, ConnectionClosed, InvalidStatus, asyncio.TimeoutError) as exc:
                last_error: BaseException = exc
            else:
                last_error = ConnectionError("connection closed")
            self._ws = None
            self._ready.clear()
            if self._closing or not self._reconnect or attempt >= self._max_attempts:
                self._fail_all(LLMProxyError("unavailable", f"connection lost: {last_error!r}", retryable=True))
                return
            await asyncio.sleep(self._backoff.delay_s(attempt, self._rng))
            attempt += 1
            self.reconnects += 1

    async def _serve(self, ws: ClientConnection) -> None:
        first = orjson.loads(await ws.recv())
        if self.session is None or not self._unfinished():
            self.session = first
        else:
            positions = {sid: h.last_seq for sid, h in self._unfinished().items()}
            await ws.send(orjson.dumps({"type": "resume", "session_id": self.session["session_id"], "resume_token": self.session["resume_token"], "streams": positions}).decode())
            resumed = orjson.loads(await ws.recv())
            if resumed["type"] != "resumed":
                self._fail_all(_error(resumed))
                self.session = first
            else:
                for sid, info in resumed["streams"].items():
                    if not info["known"] and sid in self._streams:  # the start never arrived
                        self._pending.insert(0, self._streams[sid].start_frame)
        self._ws = ws
        pending, self._pending = self._pending, []
        for frame in pending:
            await ws.send(orjson.dumps(frame).decode())
        self._ready.set()
        async for raw in ws:
            frame = orjson.loads(raw)
            sid = frame.get("id")
            handle = self._streams.get(sid) if sid else None
            if handle is None:
                continue
            handle._deliver(frame)
            if handle.finished:
                del self._streams[sid]

    def _unfinished(self) -> dict[str, WSStream]:
        return {sid: h for sid, h in self._streams.items() if not h.finished}

    def _fail_all(self, error: LLMProxyError) -> None:
        for handle in self._streams.values():
            handle._settle(error=error)
        self._streams.clear()
